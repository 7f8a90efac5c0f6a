"""What the ``learnax`` command prints: strict JSON, tables, sizes, times, and progress
bars by bytes on a terminal. Nothing here knows about checkpoints; ``cli.py`` decides
what to print and this module how.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from typing import Any


def print_json(value: Any) -> None:
    # Strict JSON: NaN and infinities become "NaN", "Infinity", "-Infinity".
    print(json.dumps(finite(value), indent=2, default=str, allow_nan=False))


def finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    if not rows:
        return
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def when(t: float | None) -> str:
    """A time as local date and time; one the platform cannot convert (NaN, infinite,
    or far outside its years, in a crafted or damaged manifest) as the number itself."""
    if not t:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    except (OverflowError, OSError, ValueError):
        return number(t)


def number(x: Any) -> str:
    return f"{x:.6g}" if isinstance(x, float) else str(x)


def metrics(values: dict[str, Any]) -> str:
    return "  ".join(f"{k}={number(v)}" for k, v in values.items())


def or_dash(x: Any) -> str:
    return "-" if x is None else str(x)


class ByteProgress:
    """Progress bars by bytes on stderr, one per stage (``"read"``, ``"write"``...),
    when stderr is a terminal; otherwise nothing at all.

    It is the ``progress(stage, nbytes, total)`` callback of ``verify`` and
    ``convert``; I/O threads call it, so updates are serialized.
    """

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self._lock = threading.Lock()
        self._stage: str | None = None
        self._bar: Any = None

    def callback(self) -> ByteProgress | None:
        """This object as the callback to pass, or ``None`` when not on a terminal (so
        the library does not even total the bytes)."""
        return self if self.enabled else None

    def __call__(self, stage: str, nbytes: int, total: int) -> None:
        with self._lock:
            if stage != self._stage:
                self._close_bar()
                self._stage = stage
                self._bar = _tqdm()(
                    total=total or None,
                    desc=stage,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    file=sys.stderr,
                    leave=False,
                    dynamic_ncols=True,
                )
            bar = self._bar
            if bar.total is not None and bar.n + nbytes > bar.total:
                bar.total = bar.n + nbytes  # the total was a guide: never past 100%
            bar.update(nbytes)

    def print(self, line: str) -> None:
        """``print(line)`` without tearing a bar on the terminal."""
        with self._lock:
            if self._bar is None:
                print(line)
            else:
                self._bar.write(line, file=sys.stdout)

    def close(self) -> None:
        with self._lock:
            self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _tqdm() -> Any:
    from tqdm import tqdm  # only on a terminal: it costs an import

    return tqdm
