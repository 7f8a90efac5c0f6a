"""Data a save takes from the checkpoint before it instead of writing it again.

Two cases. At one step, when latest, numbered and best are all due, they are written
from one snapshot: the first is written, the others take its data files. Across steps,
a ``jax.Array`` is immutable: one that is the very same object, under the same name, as
in the previous save of this Checkpointer (a frozen base passed through unchanged)
holds the same bytes, so the data file holding it can be taken as it is, if at least
half of that file's bytes are such arrays (the rest, changed since, stays in the file
unreferenced, and the changed arrays are written anew). Unchanged arrays whose file
cannot be taken are written to data files of their own, so that the next save takes
those whole. NumPy arrays can change in place: they are always written.

Taking a file is the storage's job (``Storage.take``): the same file when the new
checkpoint is in the same directory (latest over latest), else a hard link on a local
disk or a server-side copy on an object store. Every checkpoint directory thus holds
all of its data files, so it can be copied anywhere and loads, and deleting one
checkpoint never breaks another. Multi-host saves always write everything.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import jax

from . import _tree
from ._dtypes import dtype_from_name
from ._manifest import Part
from ._write import TakenFile

# A data file is taken when at least this share of its bytes is unchanged.
_TAKE_SHARE = 0.5


@dataclass
class Plan:
    """What a save of one snapshot takes from the last commit, worked out in the
    caller's thread before the snapshot, which then copies only what is written."""

    originals: dict[str, weakref.ref[jax.Array]] = field(default_factory=dict)
    taken: list[TakenFile] = field(default_factory=list)
    apart: set[str] = field(default_factory=set)  # unchanged, in files not taken

    @property
    def not_read(self) -> set[str]:
        """The names of the leaves whose data comes from taken files."""
        return {name for f in self.taken for name in f.arrays}


@dataclass
class _Committed:
    """The data files of the last checkpoint this Checkpointer committed."""

    directory: str
    part: Part
    plan: Plan  # the plan of the snapshot it was written from (its identity only)


class Reuse:
    """The last commit of one Checkpointer, and what a new save takes from it."""

    def __init__(self, storage: Any) -> None:
        self._storage = storage
        self._last: _Committed | None = None

    def plan(self, leaves: list[_tree.ArrayLeaf]) -> Plan:
        """What a save of ``leaves`` takes from the last commit: the files whose bytes
        are mostly jax arrays that are the very objects it wrote under the same names.
        Call before the leaves are snapshotted."""
        plan = Plan()
        last = self._last
        unchanged = set()
        for leaf in leaves:
            value = leaf.value
            if leaf.kind != "array" or not isinstance(value, jax.Array):
                continue  # numpy can change in place; a key's data is a new array each time
            ref = _weak(value)
            if ref is None:
                continue
            plan.originals[leaf.name] = ref
            known = last.plan.originals.get(leaf.name) if last is not None else None
            if known is not None and known() is value:
                unchanged.add(leaf.name)
        if last is None or not unchanged:
            return plan
        for file, entries in _by_file(last.part).items():
            keep = {n: e for n, e in entries.items() if n in unchanged}
            if (
                sum(_nbytes(e) for e in keep.values())
                >= _TAKE_SHARE * last.part.files[file]["bytes"]
            ):
                source = self._storage.join(last.directory, file)
                plan.taken.append(TakenFile(source, last.part.files[file], keep))
            else:
                plan.apart.update(keep)
        return plan

    def taken_files(
        self, leaves: list[_tree.ArrayLeaf], plan: Plan
    ) -> tuple[list[TakenFile], set[str]]:
        """The files a save of ``leaves`` takes, and the leaves it writes apart: every
        file of the last commit when that was written from this very snapshot (latest,
        numbered and best due at one step), else what ``plan`` found."""
        last = self._last
        if last is None or last.plan is not plan:
            return plan.taken, plan.apart
        names = {leaf.name for leaf in leaves}
        taken = []
        for file, entries in _by_file(last.part).items():
            keep = {n: e for n, e in entries.items() if n in names}
            if keep:
                source = self._storage.join(last.directory, file)
                taken.append(TakenFile(source, last.part.files[file], keep))
        return taken, set()

    def committed(self, directory: str, part: Part, plan: Plan) -> None:
        """A checkpoint of the snapshot planned with ``plan`` is committed in
        ``directory`` with the data files ``part`` (nothing of the snapshot is kept:
        it may be a copy of the whole state)."""
        self._last = _Committed(directory, part, plan)

    def forget(self) -> None:
        """Take nothing from earlier commits (after one whose outcome is unknown)."""
        self._last = None


def _by_file(part: Part) -> dict[str, dict[str, dict[str, Any]]]:
    """The array entries of ``part`` by the data file holding them."""
    by_file: dict[str, dict[str, dict[str, Any]]] = {}
    for name, entry in part.arrays.items():
        if "file" in entry:  # a whole array (multi-host shards are never taken)
            by_file.setdefault(entry["file"], {})[name] = entry
    return by_file


def _weak(value: jax.Array) -> weakref.ref[jax.Array] | None:
    try:
        return weakref.ref(value)
    except TypeError:  # an array type without weak references: never taken
        return None


def _nbytes(entry: dict[str, Any]) -> int:
    size = dtype_from_name(entry["dtype"]).itemsize
    for dim in entry["shape"]:
        size *= dim
    return size
