"""A real S3-compatible server for the object-storage tests: moto's server, run as a
subprocess on 127.0.0.1 (as s3fs's own test suite does), and a TCP proxy in front of
it that can be cut and restored to make the server unreachable for a while.

This is a helper module, not a test file: it only uses the standard library, so that
importing it never fails where moto or s3fs are missing (the tests skip then).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any

HOST = "127.0.0.1"
START_TIMEOUT = 60.0  # seconds for the server to answer HTTP: a hang guard
STOP_TIMEOUT = 10.0


# ``python -m moto.server``; on Linux through a one-line launcher that first asks the
# kernel to SIGTERM the server when the process that started it dies, so that a test
# run killed before its teardown (a CI timeout) leaves no server behind.
SERVER_MODULE = (
    [
        "-c",
        "import ctypes, runpy, signal; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
        "runpy.run_module('moto.server', run_name='__main__', alter_sys=True)",
    ]
    if sys.platform.startswith("linux")
    else ["-m", "moto.server"]
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def s3_storage_options(endpoint_url: str, **extra) -> dict:
    """``storage_options`` for s3fs against ``endpoint_url``, with dummy credentials
    passed explicitly (so nothing looks for real ones)."""
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint_url, "region_name": "us-east-1"},
    }
    options.update(extra)
    return options


class MotoServer:
    """``python -m moto.server -H 127.0.0.1 -p <port>`` in a subprocess (see
    ``SERVER_MODULE``).

    ``start()`` returns once the server answers HTTP; ``stop()`` terminates it and
    waits (then kills it if it does not exit). Its output goes to a log file, shown
    in the error when it fails to start.
    """

    def __init__(self) -> None:
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="moto-server-", suffix=".log", delete=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def storage_options(self, **extra) -> dict:
        return s3_storage_options(self.endpoint_url, **extra)

    def client(self) -> Any:
        """A boto3 S3 client of the test's own on the server (the test credentials),
        to create buckets and look at what is stored without going through learnax."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` on the server."""
        self.client().create_bucket(Bucket=name)

    def start(self, attempts: int = 3) -> MotoServer:
        # The port is free when chosen, but another process may take it before the
        # server binds it: then the server exits and we try another port.
        for _ in range(attempts):
            self.port = free_port()
            env = dict(os.environ)
            env.pop("MOTO_PORT", None)
            self.proc = subprocess.Popen(
                [sys.executable, *SERVER_MODULE, "-H", HOST, "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
            )
            if self._wait_until_up():
                return self
            self.stop()
        raise RuntimeError(f"moto server did not start; its output:\n{self.log_text()}")

    def _wait_until_up(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=2) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        return False

    def reset(self) -> None:
        """Drop every bucket and object the server holds (moto's reset API)."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=30) as r:
            r.read()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        self.proc = None

    def log_text(self) -> str:
        self._log.flush()
        with open(self._log.name, "rb") as f:
            return f.read()[-5000:].decode(errors="replace")

    def close(self) -> None:
        self.stop()
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)


class TcpProxy:
    """Forwards connections from its own port on 127.0.0.1 to ``target_port``.

    ``cut()`` makes the server unreachable through it: it stops listening (new
    connections are refused at once) and closes every open connection (a client's
    pooled keep-alive connections are dropped). ``restore()`` listens again on the
    same port. The data behind it stays on the server all the while.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._stop = threading.Event()
        self.port = self._listen(0)

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _listen(self, port: int) -> int:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, port))
        listener.listen(64)
        listener.settimeout(0.05)
        self._listener = listener
        self._stop = threading.Event()
        self._accepting = threading.Thread(
            target=self._accept_loop, args=(listener, self._stop), daemon=True
        )
        self._accepting.start()
        return listener.getsockname()[1]

    def _accept_loop(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection((HOST, self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                if stop.is_set():
                    client.close()
                    upstream.close()
                    return
                self._connections.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
                with self._lock:
                    self._connections.discard(s)

    def cut(self) -> None:
        self._stop.set()
        if self._accepting is not None:
            self._accepting.join(5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            connections = list(self._connections)
            self._connections.clear()
        for s in connections:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        if self._listener is None:
            self._listen(self.port)

    def close(self) -> None:
        self.cut()
