"""Storage: durable writes, the atomic commit step, ranged reads, listing and locking.

Everything the checkpoint format needs from storage goes through the few operations of
the :class:`~.base.Storage` protocol, which two back-ends implement:
:class:`LocalStorage` for local (or locally mounted) filesystems, the fast path, and
:class:`FsspecStorage` for any other fsspec URL (``s3://``, ``gs://``, ``memory://``...).
:func:`open_storage` picks one for a path; the rest of the package imports from here.
"""

from __future__ import annotations

from typing import Any

from .base import NOT_WRITABLE_ERRNOS, ReadFile, Storage, UncertainWriteError, UnsafeFileError
from .fsspec import LEFTOVER_GRACE_S, FsspecReadFile, FsspecStorage
from .local import LOCK_NAME, LocalReadFile, LocalStorage, skip_transferred

__all__ = [
    "LEFTOVER_GRACE_S",
    "LOCK_NAME",
    "NOT_WRITABLE_ERRNOS",
    "FsspecReadFile",
    "FsspecStorage",
    "LocalReadFile",
    "LocalStorage",
    "ReadFile",
    "Storage",
    "UncertainWriteError",
    "UnsafeFileError",
    "open_storage",
    "skip_transferred",
]


def open_storage(path: str, storage_options: dict[str, Any] | None = None) -> tuple[Storage, str]:
    """The storage for ``path`` and ``path`` as that storage names it: a plain path or a
    ``file://`` (or ``local://``) URL gives :class:`LocalStorage` and a local path; any
    other URL gives :class:`FsspecStorage` (fsspec must be installed, with the
    filesystem's package, e.g. ``s3fs``) and the URL itself."""
    if "://" not in path or path.startswith(("file://", "local://")):
        if storage_options:
            raise ValueError(f"storage_options are for fsspec URLs, not the local path {path!r}")
        return LocalStorage(), path.split("://", 1)[-1]
    try:
        # The fsspec package itself: an absolute import, never this package's .fsspec.
        import fsspec
    except ImportError:
        raise ImportError(_missing_packages(path, "fsspec")) from None
    try:
        fs, _ = fsspec.core.url_to_fs(path, **(storage_options or {}))
    except ImportError as e:  # fsspec is there, the filesystem's package is not
        raise ImportError(f"{_missing_packages(path, e.name)} ({e})") from None
    return FsspecStorage(fs), path.rstrip("/")


# The extra that installs fsspec with the package of a protocol's filesystem.
_EXTRAS = {
    "s3": ("s3", "s3fs"),
    "s3a": ("s3", "s3fs"),
    "gs": ("gcs", "gcsfs"),
    "gcs": ("gcs", "gcsfs"),
}


def _missing_packages(path: str, missing: str | None) -> str:
    """What to install for the URL ``path`` when the import of ``missing`` failed: the
    extra of its protocol (``s3://``: ``learnax[s3]``), or else fsspec itself, whose own
    filesystems (``memory://``, ``file://``...) need nothing more."""
    protocol = path.split("://", 1)[0].lower()
    if protocol in _EXTRAS:
        extra, package = _EXTRAS[protocol]
        return f"Checkpoints at {path!r} need fsspec and {package}: pip install 'learnax[{extra}]'"
    if missing == "fsspec":
        return f"Checkpoints at {path!r} need fsspec, which is not installed: pip install fsspec"
    return f"Checkpoints at {path!r} need the package of fsspec's {protocol}:// filesystem" + (
        f": pip install {missing}" if missing else ""
    )
