"""A fault-injecting HTTP proxy in front of the test S3 server (tests/moto_server.py).

It forwards every request to the server and returns the reply, except where a rule
the test added says otherwise. A rule is (request kind, key matcher, fault, times):

- the kind is read from the method and the query string: ``head``, ``get``, ``list``,
  ``put``, ``create_multipart``, ``upload_part``, ``complete_multipart``,
  ``abort_multipart``, ``delete``, ``delete_many`` (see :func:`request_kind`);
- the key is the object's key (without the bucket), the ``prefix`` of a listing, or
  the keys of a multi-object delete joined by newlines; the matcher is a substring of
  it or a callable on it;
- the fault is one of the functions below (:func:`status`, :func:`applied_then`,
  :data:`drop_before`, ...);
- ``times`` is how many requests it applies to (``None``: all of them).

The first rule that matches a request and has times left decides its fate. Every
request is logged as :class:`Entry` (kind, key, the fault's name or ``None``).

Only the standard library: a ``ThreadingHTTPServer`` speaking HTTP/1.1 (so that the
client's pooled keep-alive connections are used as they would be against S3) and one
``http.client`` connection to the server per request.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import http.client
import http.server
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable

HOST = "127.0.0.1"
# Headers that describe one hop, not the message: never forwarded as they are.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
    "expect",
}
KINDS = {
    "head",
    "get",
    "list",
    "put",
    "create_multipart",
    "upload_part",
    "complete_multipart",
    "abort_multipart",
    "delete",
    "delete_many",
}


# --- faults ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fault:
    """What happens to a request a rule matches; made by the functions below."""

    name: str
    code: int = 0
    s3_code: str = ""
    seconds: float = 0.0
    release: threading.Event | None = None
    hide: str | Callable[[str], bool] | None = None

    def __str__(self) -> str:
        return self.name


def status(code: int, s3_code: str) -> Fault:
    """Answer ``code`` with an S3 error body (``<Code>s3_code</Code>``) without
    forwarding: the request was NOT applied. A HEAD reply has no body (as on S3)."""
    return Fault(f"status({code}, {s3_code})", code=code, s3_code=s3_code)


def applied_then(code: int, s3_code: str = "InternalError") -> Fault:
    """Forward the request (it IS applied), then answer ``code`` anyway: a reply
    lost after the store acted on the request."""
    return Fault(f"applied_then({code})", code=code, s3_code=s3_code)


drop_before = Fault("drop_before")
"""Close the connection without forwarding: the request was not applied."""

drop_after = Fault("drop_after")
"""Forward the request (it is applied), then close the connection without a reply."""

truncate = Fault("truncate")
"""Forward; reply with the real headers (Content-Length included) but only the first
half of the body, then close the connection."""


def stale_list(hide: str | Callable[[str], bool] | None = None) -> Fault:
    """Forward a listing, then leave out of its reply the entries (``<Contents>``
    keys and ``<CommonPrefixes>`` prefixes) that ``hide`` matches (by default the
    rule's own matcher), as an eventually consistent listing that lags behind."""
    return Fault("stale_list", hide=hide)


def skew(seconds: float) -> Fault:
    """Forward; shift the ``Last-Modified`` header and every ``<LastModified>`` of a
    listing by ``seconds`` (negative: the objects look older than they are)."""
    return Fault(f"skew({seconds:+g})", seconds=seconds)


def delay(seconds: float, release: threading.Event | None = None) -> Fault:
    """Wait ``seconds`` (or until ``release`` is set, if given, whichever comes
    first), then forward as usual: a slow or held request."""
    return Fault(f"delay({seconds:g})", seconds=seconds, release=release)


# --- requests --------------------------------------------------------------------------


def request_kind(method: str, path: str, query: dict[str, list[str]]) -> tuple[str, str]:
    """The kind of an S3 request (path-style addressing: ``/<bucket>/<key>``) and its
    bucket-relative key (for a listing: its prefix)."""
    _, _, rest = path.lstrip("/").partition("/")
    key = urllib.parse.unquote(rest)
    if method == "HEAD":
        return ("head" if key else "head_bucket"), key
    if method == "GET":
        if not key:
            if "uploads" in query or "location" in query:
                return "bucket_info", ""
            return "list", query.get("prefix", [""])[0]
        return "get", key
    if method == "PUT":
        if "uploadId" in query:
            return "upload_part", key
        return ("put" if key else "create_bucket"), key
    if method == "POST":
        if "delete" in query:
            return "delete_many", ""
        if "uploads" in query:
            return "create_multipart", key
        if "uploadId" in query:
            return "complete_multipart", key
    if method == "DELETE":
        if "uploadId" in query:
            return "abort_multipart", key
        return ("delete" if key else "delete_bucket"), key
    return method.lower(), key


def matches(match: str | Callable[[str], bool], key: str) -> bool:
    return match(key) if callable(match) else match in key


@dataclasses.dataclass
class Rule:
    kind: str
    match: str | Callable[[str], bool]
    fault: Fault
    times: int | None  # None: always


@dataclasses.dataclass(frozen=True)
class Entry:
    """One request the proxy saw: its kind, key and the fault applied (its name)."""

    kind: str
    key: str
    fault: str | None


def error_body(code: int, s3_code: str, key: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{s3_code}</Code><Message>injected {code} {s3_code}</Message>"
        f"<Key>{key}</Key><RequestId>s3proxy</RequestId></Error>"
    ).encode()


def _shift_http_date(value: str, seconds: float) -> str:
    when = email.utils.parsedate_to_datetime(value) + datetime.timedelta(seconds=seconds)
    return email.utils.format_datetime(when.astimezone(datetime.timezone.utc), usegmt=True)


def _shift_iso_date(value: str, seconds: float) -> str:
    when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    when += datetime.timedelta(seconds=seconds)
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def skew_listing(body: bytes, seconds: float) -> bytes:
    """``body`` (a listing) with every ``<LastModified>`` shifted by ``seconds``."""
    return re.sub(
        r"<LastModified>([^<]+)</LastModified>",
        lambda m: f"<LastModified>{_shift_iso_date(m.group(1), seconds)}</LastModified>",
        body.decode(),
    ).encode()


def hide_from_listing(body: bytes, hide: str | Callable[[str], bool]) -> bytes:
    """``body`` (a ListObjects(V2) reply) without the entries whose key or common prefix
    ``hide`` matches; ``<KeyCount>`` counts what is left."""
    removed = 0

    def drop(entry: re.Match) -> str:
        nonlocal removed
        name = re.search(r"<(?:Key|Prefix)>([^<]*)</", entry.group(0)).group(1)
        if matches(hide, urllib.parse.unquote(name)):
            removed += 1
            return ""
        return entry.group(0)

    text = re.sub(r"<Contents>.*?</Contents>", drop, body.decode(), flags=re.S)
    text = re.sub(r"<CommonPrefixes>.*?</CommonPrefixes>", drop, text, flags=re.S)
    return re.sub(
        r"<KeyCount>(\d+)</KeyCount>",
        lambda m: f"<KeyCount>{max(int(m.group(1)) - removed, 0)}</KeyCount>",
        text,
    ).encode()


# --- the proxy -------------------------------------------------------------------------


class S3FaultProxy:
    """A reverse proxy on 127.0.0.1 (a free port) in front of ``target_port``.

    ``add(kind, match, fault, times=None)`` adds a rule, ``clear()`` removes them all
    (and empties the log), ``log`` lists what was seen. ``close()`` stops it.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self.log: list[Entry] = []
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def add(
        self,
        kind: str,
        match: str | Callable[[str], bool],
        fault: Fault,
        times: int | None = None,
    ) -> Rule:
        if kind not in KINDS:
            raise ValueError(f"unknown request kind {kind!r}; one of {sorted(KINDS)}")
        rule = Rule(kind, match, fault, times)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self.log.clear()

    def faults(self, kind: str | None = None) -> list[Entry]:
        """The logged requests a fault was applied to (of ``kind``, if given)."""
        with self._lock:
            return [e for e in self.log if e.fault and kind in (None, e.kind)]

    def requests(self, kind: str) -> list[Entry]:
        with self._lock:
            return [e for e in self.log if e.kind == kind]

    def _take(self, kind: str, key: str) -> Rule | None:
        """The rule that decides this request (its ``times`` counted down), if any;
        the request is logged."""
        with self._lock:
            chosen = None
            for rule in self._rules:
                if rule.kind == kind and rule.times != 0 and matches(rule.match, key):
                    if rule.times is not None:
                        rule.times -= 1
                    chosen = rule
                    break
            self.log.append(Entry(kind, key, chosen.fault.name if chosen else None))
            return chosen

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclasses.dataclass
class Reply:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: S3FaultProxy

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the proxy's own log is S3FaultProxy.log

    def do_HEAD(self) -> None:
        self._handle()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        body = self._read_body()
        kind, key = request_kind(self.command, url.path, query)
        if kind == "delete_many":
            key = "\n".join(re.findall(r"<Key>([^<]*)</Key>", body.decode(errors="replace")))
        rule = self.owner._take(kind, key)
        fault = rule.fault if rule else None
        name = fault.name if fault else ""

        if fault is drop_before:
            return self._drop()
        if name.startswith("status("):
            return self._send_error(fault.code, fault.s3_code, key)
        if name.startswith("delay("):
            if fault.release is not None:
                fault.release.wait(fault.seconds)
            else:
                time.sleep(fault.seconds)

        reply = self._forward(body)

        if name.startswith("applied_then("):
            return self._send_error(fault.code, fault.s3_code, key)
        if fault is drop_after:
            return self._drop()
        if name.startswith("skew("):
            reply = self._skewed(reply, fault.seconds)
        if name == "stale_list" and kind == "list" and reply.status == 200:
            reply.body = hide_from_listing(reply.body, fault.hide or rule.match)
        self._send(reply, truncated=fault is truncate)

    def _forward(self, body: bytes) -> Reply:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(HOST, self.owner.target_port, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            return Reply(response.status, response.reason, response.getheaders(), data)
        finally:
            upstream.close()

    def _skewed(self, reply: Reply, seconds: float) -> Reply:
        headers = [
            (k, _shift_http_date(v, seconds) if k.lower() == "last-modified" else v)
            for k, v in reply.headers
        ]
        body = reply.body
        if b"<LastModified>" in body:
            body = skew_listing(body, seconds)
        return Reply(reply.status, reply.reason, headers, body)

    def _send(self, reply: Reply, truncated: bool = False) -> None:
        self.send_response(reply.status, reply.reason)
        length = None
        for k, v in reply.headers:
            if k.lower() in HOP_BY_HOP or k.lower() in ("content-length", "date", "server"):
                if k.lower() == "content-length":
                    length = v
                continue
            self.send_header(k, v)
        # A HEAD reply keeps the object's length; any other, the length of its body.
        self.send_header(
            "Content-Length", length if self.command == "HEAD" and length else str(len(reply.body))
        )
        if truncated:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        if truncated:
            self.wfile.write(reply.body[: len(reply.body) // 2])
            self.wfile.flush()
            return self._drop()
        self.wfile.write(reply.body)

    def _send_error(self, code: int, s3_code: str, key: str) -> None:
        body = b"" if self.command == "HEAD" else error_body(code, s3_code, key)
        self.send_response(code)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
