"""The run's metric history: every metrics dict a Checkpointer is given and every
checkpoint it commits, kept beside the checkpoints in ``<registry>/<run_id>/history/``
as JSON lines, so that a run that keeps two checkpoints still shows all its reports.

The directory holds segments, ``<session:08d>-<8 hex>.jsonl``, one JSON object a line:

- ``{"session": 2, "n": 7, "step": 350, "time": 1.7e9, "metrics": {"val/loss": 0.3}}``
- ``{"session": 2, "n": 8, "step": 400, "time": 1.7e9, "saved": "latest"}``

``session`` numbers a writer's timeline (a new Checkpointer, or a load after it wrote),
``n`` a record within it, so a record is known by ``(session, n)`` wherever it lies.
The first record of a session resumed from a checkpoint also has ``"resumed": <step>``.

On a local disk each session appends to its own segment (``O_APPEND``: one ``write``
a report, no fsync) and fsyncs it after each checkpoint commit and at ``close()``: the
history is as durable as the checkpoints. Object stores have no append: a session keeps
its records in memory and writes them as a new segment after each commit, at
``close()``, and whenever they pass ``_FLUSH_BYTES``. When the segments grow past
``max_bytes`` (``LEARNAX_HISTORY_MAX_BYTES``, 16 MiB) or ``_MAX_SEGMENTS`` in number,
the writer compacts them into one: the timeline below applied, thinned (:func:`thin`:
evenly over the run, the most frequent kind of report first) until half the cap is
left, written atomically before the old segments are removed. Reports that happen to be jax arrays are written once the device
has computed them, never waited for on the step that reports them.

Reading (:func:`read_history`) merges every segment, skips a torn last line and any
line that is not exactly one record, and makes one timeline: a session that resumed
(``load_latest``, which a restarted training run calls) supersedes every record of an earlier session whose step is at or past where
it took over (the step after the checkpoint it resumed from, or its first record's
step if smaller): what a crash and a resume from an earlier checkpoint abandoned. Other
sessions only add records: loading ``best`` or a numbered checkpoint to evaluate it
never drops what training reported.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import logging
import math
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ._storage import NOT_WRITABLE_ERRNOS, LocalStorage, UnsafeFileError

if TYPE_CHECKING:
    from ._storage import Storage

logger = logging.getLogger("learnax")

HISTORY = "history"
_SEGMENT = re.compile(r"\A([0-9]{8})-[0-9a-f]{8}\.jsonl\Z")
_TMP_PREFIX = ".tmp-"
MAX_BYTES = 16 << 20  # default bound of a run's history on storage
_MAX_SEGMENTS = 32  # more segments than this are compacted into one
_FLUSH_BYTES = 256 << 10  # object stores: records kept in memory before a segment is written
_READ_LIMIT = 1 << 30  # a segment larger than this is not one learnax wrote
_MAX_QUEUED = 10_000  # reports queued (for the device, or after a failure) at most
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def max_bytes() -> int:
    """The bound of a run's history: ``LEARNAX_HISTORY_MAX_BYTES``, else ``MAX_BYTES``."""
    raw = os.environ.get("LEARNAX_HISTORY_MAX_BYTES")
    if raw is None:
        return MAX_BYTES
    try:
        return max(int(raw), 1024)
    except ValueError:
        logger.warning("LEARNAX_HISTORY_MAX_BYTES=%r is not an integer: using %d", raw, MAX_BYTES)
        return MAX_BYTES


def history_dir(storage: Storage, run: str) -> str:
    """The history directory of ``run`` (``<registry>/<run_id>``, or its checkpoints
    directory)."""
    run = run.rstrip("/")
    if run.rpartition("/")[2] == "checkpoints":
        run = storage.dirname(run)
    return storage.join(run, HISTORY)


# --------------------------------------------------------------------------- values


def encode_value(value: Any) -> Any:
    """A reported value as JSON: numbers (Python, numpy, 0-d jax), ``bool``, ``str`` and
    ``None`` as they are, non-finite floats as ``"NaN"``, ``"Infinity"``,
    ``"-Infinity"``; ``_SKIP`` for anything else (an array, a list)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):  # beyond 64 bits: as a float (JSON readers use doubles)
        if -(2**63) <= value < 2**64:
            return value
        try:
            return encode_value(float(value))
        except OverflowError:
            return _SKIP
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        scalar = value.item()
        if isinstance(scalar, (bool, int, float)):
            return encode_value(scalar)
    return _SKIP


_SKIP = object()


def _decode_value(value: Any) -> Any:
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    return value


def _pending_on_device(metrics: Mapping[str, Any]) -> bool:
    """Whether a value is a jax array the device has not computed yet."""
    for value in metrics.values():
        is_ready = getattr(value, "is_ready", None)
        if is_ready is not None and not is_ready():
            return True
    return False


# --------------------------------------------------------------------------- reading


def _segments(storage: Storage, directory: str) -> list[str]:
    return sorted(name for name in storage.listdir(directory) if _SEGMENT.match(name))


def _parse(
    data: bytes, where: str, lines_of: dict[int, bytes] | None = None
) -> list[dict[str, Any]]:
    """The records of one segment; a torn last line (a write in progress or cut by a
    crash) and lines that are not exactly one record are skipped (with one warning a
    segment), never raised: a stray or crafted segment must not fail a reader, nor
    through a compaction the training that writes. With ``lines_of``, each record's
    line is put there under the record's ``id`` (compaction writes it back)."""
    lines = data.split(b"\n")[:-1]  # the last piece has no newline: torn, or empty
    # All lines at once (one call of the decoder instead of one a line) where no line
    # must be known to hold its own record: lines that are not JSON on their own can
    # only be misread as one another's values, never raise. Compaction, which writes
    # the lines back, decodes each line alone.
    values = _loads_all(lines) if lines_of is None else None
    if values is None:
        values = [_loads_or_none(line) for line in lines]
    records = []
    for value, line in zip(values, lines, strict=True):
        if _is_record(value):
            records.append(value)
            if lines_of is not None:
                lines_of[id(value)] = line + b"\n"
    if len(records) < len(lines):
        _warn_once(where, f"{len(lines) - len(records)} line(s) that are not records skipped")
    return records


def _loads_all(lines: list[bytes]) -> list[Any] | None:
    """The values of ``lines`` decoded as one JSON array, or ``None`` when that fails
    or a line holds no value or several (``1,2``): then each line is decoded alone."""
    try:
        values = json.loads(b"[" + b",".join(lines) + b"]") if lines else []
    except (ValueError, RecursionError):  # RecursionError: a line nested too deep
        return None
    return values if len(values) == len(lines) else None


def _loads_or_none(line: bytes) -> Any:
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


# Segments already warned about (once a process: a writer compacts, and a reader may
# read the history at every step).
_WARNED: set[str] = set()


def _warn_once(where: str, what: str) -> None:
    (logger.debug if where in _WARNED else logger.warning)(
        "%s in the metric history: %s", where, what
    )
    _WARNED.add(where)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_value(value: Any) -> bool:
    """Whether ``value`` is a metric as :func:`encode_value` writes it: ``None``, a
    ``bool``, a ``str``, a 64-bit integer or a finite float (what readers such as
    ``metric_history`` can convert without an error)."""
    if value is None or isinstance(value, (bool, str)):
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**64
    return isinstance(value, float) and math.isfinite(value)


def _is_record(record: Any) -> bool:
    """Whether ``record`` is a record as the format says, checked field by field: the
    rest of the history (the timeline, thinning, ``decoded``, the CLI) relies on it."""
    if not isinstance(record, dict):
        return False
    if not all(_is_int(record.get(key)) for key in ("session", "n", "step")):
        return False
    if "resumed" in record and not _is_int(record["resumed"]):
        return False
    when = record.get("time", 0.0)
    if isinstance(when, bool) or not isinstance(when, (int, float)):
        return False
    if ("metrics" in record) == ("saved" in record):  # a report or a save, never both
        return False
    if "saved" in record:
        return isinstance(record["saved"], str)
    metrics = record["metrics"]
    return isinstance(metrics, dict) and all(_is_value(v) for v in metrics.values())


def read_records(
    storage: Storage, directory: str, lines_of: dict[int, bytes] | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every record of every segment in ``directory`` (duplicates included) and the
    segments read (``lines_of``: as for :func:`_parse`). A segment removed while it was
    listed (a compaction committed meanwhile) makes the listing start again. An entry
    named like a segment that is no regular file (a directory, a link, a FIFO) is not
    one learnax wrote: skipped with a warning, and not among the segments read, so that
    a compaction leaves it where it is instead of failing to remove it every time."""
    for _ in range(5):
        records: list[dict[str, Any]] = []
        read: list[str] = []
        vanished = False
        for name in _segments(storage, directory):
            path = storage.join(directory, name)
            try:
                data = storage.read_bytes(path, _READ_LIMIT)
            except FileNotFoundError:
                # LocalStorage says so for a directory too: only a missing one vanished.
                if storage.kind(path) is None:
                    vanished = True
                    break
                _warn_once(path, "skipped: a directory, not a segment")
                continue
            except UnsafeFileError as e:  # not a segment learnax wrote: never read
                _warn_once(path, f"skipped: {e}")
                continue
            records.extend(_parse(data, path, lines_of))
            read.append(name)
        if not vanished:
            return records, read
    return records, read


def timeline(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One timeline of ``records``: each record once (by ``(session, n)``); a session
    that resumed (its first record says from which step: ``load_latest``) supersedes
    the records of earlier sessions at or past the step where it took over, the
    smaller of ``resumed + 1`` and its first record's step; a session that did not
    (an evaluation job's reports, reports after ``load_best``) only adds its records.
    Sorted by step, then session, then ``n``."""
    sessions: dict[int, dict[int, dict[str, Any]]] = collections.defaultdict(dict)
    for record in records:
        sessions[record["session"]][record["n"]] = record
    kept: list[dict[str, Any]] = []
    for session in sorted(sessions):
        own = [sessions[session][n] for n in sorted(sessions[session])]
        resumed = own[0].get("resumed")
        if isinstance(resumed, int) and not isinstance(resumed, bool):
            takeover = min(own[0]["step"], resumed + 1)
            kept = [r for r in kept if r["step"] < takeover]
        kept.extend(own)
    kept.sort(key=lambda r: (r["step"], r["session"], r["n"]))
    return kept


def decoded(record: dict[str, Any]) -> dict[str, Any]:
    """A stored record as :func:`read_history` returns it: non-finite floats back."""
    if "metrics" not in record:
        return dict(record)
    return {**record, "metrics": {k: _decode_value(v) for k, v in record["metrics"].items()}}


def read_history(
    storage: Storage, run: str, unwritten: Iterable[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """The metric history of ``run`` as one timeline (see :func:`timeline`), oldest
    step first, with a writer's ``unwritten`` records; ``[]`` when the run has none."""
    records, _ = read_records(storage, history_dir(storage, run))
    return [decoded(r) for r in timeline([*records, *unwritten])]


# --------------------------------------------------------------------------- bound


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def thin(
    records: list[dict[str, Any]], budget: int, lines_of: dict[int, bytes] | None = None
) -> list[dict[str, Any]]:
    """``records`` (a timeline) cut down to at most ``budget`` bytes of lines where it
    can be, not counting the records no thinning drops: the first record of each
    session, the last record, and the reports of a kind with fewer than three (one
    huge report must not make every other give way).

    Reports are grouped by kind (the same set of metric names). Thinning keeps, of each
    kind, the first report in every step bucket ``[m * W, (m + 1) * W)``, with ``W``
    the smallest power of two that fits; the newest quarter of each kind is kept whole (unless nothing else fits).
    So a metric reported every step gives way long before one reported every hundred
    steps (its buckets hold one report until ``W`` passes a hundred), the spacing of
    what is kept is even over the whole run (never more than ``2 * W`` between two
    reports of a kind), and thinning again only makes ``W`` larger: a report kept at
    ``2 * W`` was kept at ``W``, so repeated compactions never erode the oldest part
    to nothing. The records of saves are thinned alike, each kind (``latest``,
    ``numbered``, ``best``) as one more kind of report: saved every hundred steps, they
    give way after a metric reported every step. ``lines_of`` holds the stored line of a record by its ``id`` where known
    (else it is encoded)."""
    lines_of = lines_of or {}
    sizes = [len(lines_of.get(id(r)) or _line(r)) for r in records]
    total = sum(sizes)
    protected = {len(records) - 1} if records else set()
    first: dict[int, int] = {}  # session -> index of its first record
    for i, r in enumerate(records):
        j = first.get(r["session"])
        if j is None or r["n"] < records[j]["n"]:
            first[r["session"]] = i
    protected |= set(first.values())
    reports: dict[Any, list[int]] = collections.defaultdict(list)
    saved: dict[Any, list[int]] = collections.defaultdict(list)
    for i, r in enumerate(records):
        if i in protected:
            continue
        if "metrics" in r:
            reports[tuple(sorted(r["metrics"]))].append(i)
        else:
            saved[r["saved"]].append(i)
    # What no thinning drops does not count against the budget.
    budget += sum(sizes[i] for i in protected)
    budget += sum(sizes[i] for members in reports.values() if len(members) < 3 for i in members)
    if total <= budget:
        return records
    # Saves are thinned alike, as one more kind: left for last, the saves of a long
    # run would fill the bound and leave the reports nothing but their newest quarter.
    everything = [*reports.values(), *saved.values()]
    drop = _bucket_drops(records, sizes, everything, total - budget, newest_whole=True)
    if sum(sizes[i] for i in drop) < total - budget:
        drop = _bucket_drops(records, sizes, everything, total - budget, newest_whole=False)
    return [r for i, r in enumerate(records) if i not in drop]


def _bucket_drops(
    records: list[dict[str, Any]],
    sizes: list[int],
    groups: list[list[int]],
    excess: int,
    newest_whole: bool,
) -> set[int]:
    """The records to drop so that at least ``excess`` bytes go (all it can when it
    cannot): in each group of at least three (indices in step order; the newest
    quarter left out where ``newest_whole``), those with an earlier member in their step bucket of width
    ``W = 2 ** k``, for the smallest ``k`` that frees enough. A member shares its
    bucket with an earlier one exactly when it shares it with the one just before
    it (steps are in order): when the two steps agree above bit ``k``, i.e. from
    ``k = (a ^ b).bit_length()`` on."""
    levels: list[tuple[int, int]] = []  # (the k from which it is dropped, index)
    for members in groups:
        if len(members) < 3:
            continue
        older = members[: len(members) - len(members) // 4] if newest_whole else members
        for before, i in zip(older, older[1:], strict=False):
            a, b = records[before]["step"], records[i]["step"]
            levels.append(((a ^ b).bit_length() if a >= 0 and b >= 0 else 64, i))
    levels.sort()
    freed = 0
    for n, (level, i) in enumerate(levels):
        freed += sizes[i]
        last_of_level = n + 1 == len(levels) or levels[n + 1][0] != level
        if freed >= excess and last_of_level:
            return {j for _, j in levels[: n + 1]}
    return {j for _, j in levels}


# --------------------------------------------------------------------------- writing


# Writers with records that may not be on storage yet: written at exit (a run that ends
# without close() keeps the reports it made since its last commit).
_OPEN: weakref.WeakSet[HistoryWriter] = weakref.WeakSet()


def _close_at_exit() -> None:
    for writer in list(_OPEN):
        writer.close()


# Before the thread pools stop taking work, which fsspec's object stores need to write
# (threading's exit callbacks run before atexit's, the last registered first); where
# that hook does not exist, at exit.
getattr(threading, "_register_atexit", atexit.register)(_close_at_exit)


# A forked child (a data loader's worker) writes none of its parent's records.
os.register_at_fork(after_in_child=_OPEN.clear)


class HistoryWriter:
    """Appends one Checkpointer's reports and saves to its run's history.

    ``report`` is called on the training thread and never waits: not for the device
    (values not computed yet stay queued), nor for a save in the background (when
    that thread holds the lock, the report stays queued for the next call).
    ``committed`` and ``close`` write what is queued and make it durable. An I/O
    failure is logged once and never raised: the history must not fail training; after
    one, reports only queue (the oldest dropped beyond ``_MAX_QUEUED``) until the next
    commit tries again, so that a storage that refuses costs no request per step.
    Only a writer made with ``enabled`` (process 0 of a multi-host run) writes.
    """

    def __init__(self, storage: Storage, run: str, *, enabled: bool = True) -> None:
        self._storage = storage
        self._dir = history_dir(storage, run)
        self._enabled = enabled
        self._append = isinstance(storage, LocalStorage)
        self._queue: collections.deque[tuple[int, float, dict[str, Any]]] = collections.deque()
        self._lock = threading.Lock()
        self._session: int | None = None  # taken at the first record
        self._n = 0
        self._resumed: int | None = None
        self._restart = False  # a load after this session wrote: the next record starts one
        self._fd: int | None = None  # local: the segment appended to
        self._fd_new = False  # its directory entry is not durable yet
        self._buffer: list[bytes] = []  # object stores: lines not written yet
        self._buffered = 0  # their bytes
        self._bytes = 0  # on storage, as far as this writer knows
        self._segments = 0
        self._max_bytes = max_bytes()
        self._compact_at = self._max_bytes  # see _compact
        self._failed = False  # the last write failed: reports only queue until a commit
        self._logged = False  # a failure was logged (once)
        self._skipped: set[str] = set()

    # The training thread.

    def report(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Queue ``metrics`` reported at ``step`` and write what is ready."""
        if not self._enabled or not isinstance(metrics, Mapping) or not metrics:
            return  # not a dict: a save that is due says so (encode_metrics)
        self._queue.append((step, round(time.time(), 3), dict(metrics)))
        if len(self._queue) == 1:
            _OPEN.add(self)
        if self._failed:  # storage failed: tried again at the next commit, not every step
            if len(self._queue) > _MAX_QUEUED:
                self._queue.popleft()
            return
        if self._lock.acquire(blocking=False):
            try:
                self._guarded(self._drain, len(self._queue) > _MAX_QUEUED)
            finally:
                self._lock.release()

    def resumed(self, step: int) -> None:
        """A checkpoint at ``step`` was loaded: records from now on continue from it."""
        if not self._enabled:
            return
        with self._lock:
            self._guarded(self._drain, True)
            self._resumed = step
            self._restart = self._session is not None and self._n > 0

    # Any thread.

    def committed(self, name: str, step: int) -> None:
        """Checkpoint ``state_<name>`` of ``step`` was committed: record it, then make
        the history durable up to here."""
        if not self._enabled:
            return
        with self._lock:
            self._guarded(self._commit, name, step)

    def close(self) -> None:
        """Write everything queued, durably, and release the segment."""
        if not self._enabled:
            return
        with self._lock:
            self._guarded(self._close)

    def unwritten(self) -> list[dict[str, Any]]:
        """The records not on storage yet (object stores: those kept in memory), once
        the queue is written out."""
        if not self._enabled:
            return []
        with self._lock:
            self._guarded(self._drain, True)
            return _parse(b"".join(self._buffer), self._dir)

    # With the lock held.

    def _guarded(self, work: Any, *args: Any) -> None:
        """Run ``work``; whatever it raises is logged, never raised: the history must
        not fail training nor a save (an ``OSError`` of storage, or anything else: a
        segment nobody expected, a bug)."""
        try:
            work(*args)
        except Exception as e:
            # A lost report is worth a warning, not an error (training goes on); on a
            # read-only registry the saves already said so, as an error.
            unwritable = isinstance(e, OSError) and e.errno in NOT_WRITABLE_ERRNOS
            (logger.debug if self._logged else logger.info if unwritable else logger.warning)(
                "Cannot write the metric history in %s: %s. Training and saves go on; "
                "the history is tried again at the next checkpoint commit.",
                self._dir,
                e if isinstance(e, OSError) else repr(e),
                exc_info=not isinstance(e, OSError),  # not storage: where it came from
            )
            self._logged = self._failed = True
            # Object stores: the records kept in memory stay there for the next commit
            # to write again (a segment written twice is read once: records are known
            # by (session, n)); beyond the history's bound, the oldest are dropped.
            while self._buffer and self._buffered > self._max_bytes:
                self._buffered -= len(self._buffer.pop(0))
            self._close_fd()

    def _commit(self, name: str, step: int) -> None:
        self._failed = False
        self._drain(True)
        self._add({"step": step, "time": round(time.time(), 3), "saved": name})
        self._sync()
        if self._bytes > self._compact_at or self._segments > _MAX_SEGMENTS:
            self._compact()

    def _close(self) -> None:
        self._failed = False
        self._drain(True)
        self._sync()
        self._close_fd()

    def _drain(self, wait: bool) -> None:
        """Write the queued reports whose values are computed (all with ``wait``)."""
        lines = []
        while self._queue:
            step, when, metrics = self._queue[0]
            if not wait and _pending_on_device(metrics):
                break
            self._queue.popleft()
            lines.append(
                self._record({"step": step, "time": when, "metrics": self._encode(metrics)})
            )
        if lines:
            self._write(lines)
            if self._bytes > self._compact_at or self._segments > _MAX_SEGMENTS:
                self._sync()
                self._compact()

    def _encode(self, metrics: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in metrics.items():
            encoded = encode_value(value)
            if encoded is _SKIP or not isinstance(key, str):
                if str(key) not in self._skipped:
                    self._skipped.add(str(key))
                    logger.warning(
                        "Metric %r (%s) is not kept in the metric history: only str names "
                        "of scalar numbers, strings, booleans and None are.",
                        key,
                        type(value).__name__,
                    )
                continue
            out[key] = encoded
        return out

    def _add(self, record: dict[str, Any]) -> None:
        self._write([self._record(record)])

    def _record(self, record: dict[str, Any]) -> bytes:
        if self._session is None or self._restart:
            self._start_session()
        head: dict[str, Any] = {"session": self._session, "n": self._n}
        if self._n == 0 and self._resumed is not None:
            head["resumed"] = self._resumed
        self._n += 1
        return _line({**head, **record})

    def _start_session(self) -> None:
        if self._session is None:
            self._storage.makedirs(self._dir)
            names = _segments(self._storage, self._dir)
            self._session = 1 + max((int(n[:8]) for n in names), default=0)
            self._segments = len(names)
            self._bytes = self._storage.usage(self._dir)[0]
        else:  # a load after this session wrote: a new timeline from the loaded step
            # Numbered past every session on storage, not just past this one: another
            # Checkpointer of the run (an evaluation job) may have taken the next.
            self._close_fd()
            names = _segments(self._storage, self._dir)
            self._session = 1 + max([self._session, *(int(n[:8]) for n in names)])
        self._restart = False
        self._n = 0

    def _write(self, lines: list[bytes]) -> None:
        data = b"".join(lines)
        self._bytes += len(data)
        if not self._append:
            self._buffer.append(data)
            self._buffered += len(data)
            if self._buffered > _FLUSH_BYTES:
                self._sync()
            return
        if self._fd is None:
            self._fd = os.open(
                self._new_segment(), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644
            )
            self._fd_new = True
            self._segments += 1
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def _new_segment(self) -> str:
        return self._storage.join(self._dir, f"{self._session:08d}-{uuid.uuid4().hex[:8]}.jsonl")

    def _sync(self) -> None:
        """Make what was written durable: fsync the segment (local), or write what is
        kept in memory as a new segment (object stores)."""
        if self._append:
            if self._fd is not None:
                os.fsync(self._fd)
                if self._fd_new:
                    self._storage.fsync_dir(self._dir)
                    self._fd_new = False
            return
        if self._buffer:
            data = b"".join(self._buffer)
            path = self._new_segment()
            self._storage.replace_atomic(path, data, _TMP_PREFIX + path.rpartition("/")[2])
            self._buffer.clear()
            self._buffered = 0
            self._segments += 1

    def _compact(self) -> None:
        """Merge every segment into one, thinned to half the bound, written before the
        old ones are removed (a reader sees both meanwhile: records are deduplicated by
        ``(session, n)``)."""
        lines_of: dict[int, bytes] = {}
        records, names = read_records(self._storage, self._dir, lines_of)
        kept = thin(timeline(records), self._max_bytes // 2, lines_of)
        data = b"".join(lines_of.get(id(r)) or _line(r) for r in kept)
        session = max([int(n[:8]) for n in names] + [self._session or 0])
        name = f"{session:08d}-{uuid.uuid4().hex[:8]}.jsonl"
        self._storage.replace_atomic(self._storage.join(self._dir, name), data, _TMP_PREFIX + name)
        self._storage.fsync_dir(self._dir)
        self._close_fd()  # the next record starts a segment of its own
        for old in names:
            self._storage.remove(self._storage.join(self._dir, old))
        self._storage.fsync_dir(self._dir)
        self._bytes, self._segments = len(data), 1
        # What thinning cannot drop (a report of a kind too rare to thin, the first
        # record of many sessions) may leave more than half the bound: the next
        # compaction then waits for as many new bytes as usual, not for the next report.
        self._compact_at = max(self._max_bytes, len(data) + self._max_bytes // 2)
        logger.debug(
            "Compacted the metric history in %s: %d records kept of %d",
            self._dir,
            len(kept),
            len(records),
        )

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
