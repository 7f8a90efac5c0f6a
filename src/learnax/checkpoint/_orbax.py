"""Orbax checkpoints in, for ``convert``: an item directory, or a ``CheckpointManager``
step directory with every one of its items.

PyTree items (``StandardSave``, ``PyTreeSave``) are read by orbax itself; JSON items
(``JsonSave``, and the ``metrics`` item a manager writes) as JSON. A step comes in
whole: one item as its tree, several as ``{item name: value}``, the manager's metrics
as the checkpoint's metrics. An item of any other kind is refused, naming it, before
anything is written: a conversion never drops part of a checkpoint silently.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from ._metrics import encode_metrics

ITEM_METADATA = "_METADATA"  # in an item directory that orbax's PyTree handlers wrote
STEP_METADATA = "_CHECKPOINT_METADATA"  # in a CheckpointManager step directory
_COMMIT_MARKER = "commit_success.txt"
_METRICS_ITEM = "metrics"
_MAX_JSON_BYTES = 64 << 20


def looks_like_orbax(path: str) -> bool:
    """Whether local directory ``path`` is an Orbax item or step directory."""
    if any(os.path.exists(os.path.join(path, m)) for m in (ITEM_METADATA, STEP_METADATA)):
        return True
    return any(os.path.isfile(os.path.join(path, e, ITEM_METADATA)) for e in os.listdir(path))


def load_orbax(path: str) -> tuple[Any, int | None, dict[str, Any]]:
    """The state, step (from a step directory's name, else ``None``) and metrics of the
    Orbax checkpoint at local absolute ``path``; arrays as NumPy.

    Raises ``ValueError`` naming the items it cannot carry, ``ImportError`` without
    orbax.
    """
    ocp = _import_orbax(path)
    name = os.path.basename(path.rstrip("/"))
    step = int(name) if name.isdigit() else None
    if os.path.isfile(os.path.join(path, ITEM_METADATA)):
        return jax.device_get(_restore_pytree(ocp, path)), step, {}
    metadata = _step_metadata(path)
    kinds = _item_kinds(path, metadata.get("item_handlers"))
    values = {item: _read_item(ocp, path, item, kind) for item, kind in kinds.items()}
    metrics = dict(metadata.get("metrics") or {})
    if kinds.get(_METRICS_ITEM) == "json":
        metrics.update(_as_metrics(values.pop(_METRICS_ITEM), path))
    _check_metrics(metrics, path)
    if not values:
        raise ValueError(f"{path}: no Orbax item to convert (found {sorted(kinds)})")
    state = next(iter(values.values())) if len(values) == 1 else values
    return jax.device_get(state), step, metrics


def _import_orbax(path: str) -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise ImportError(
            f"{path} looks like an Orbax checkpoint; reading it needs orbax: "
            "pip install orbax-checkpoint"
        ) from None
    return ocp


def _restore_pytree(ocp: Any, path: str) -> Any:
    return ocp.StandardCheckpointer().restore(path)


def _step_metadata(path: str) -> dict[str, Any]:
    """The step directory's ``_CHECKPOINT_METADATA``; ``{}`` when it has none."""
    file = os.path.join(path, STEP_METADATA)
    if not os.path.isfile(file):
        return {}
    try:
        metadata = json.loads(_read_small(file))
    except (ValueError, OSError) as e:
        raise ValueError(f"{file}: cannot read it ({e})") from None
    return metadata if isinstance(metadata, dict) else {}


def _item_kinds(path: str, handlers: Any) -> dict[str, str]:
    """``{item: "pytree" | "json"}`` for every item directory of step ``path``; raises
    ``ValueError`` naming the items of another kind."""
    handlers = handlers if isinstance(handlers, dict) else {}
    kinds, refused = {}, []
    for item in sorted(os.listdir(path)):
        item_path = os.path.join(path, item)
        if item.startswith(".") or ".orbax-checkpoint-tmp" in item or not os.path.isdir(item_path):
            continue
        handler = handlers.get(item)
        if os.path.isfile(os.path.join(item_path, ITEM_METADATA)):
            kinds[item] = "pytree"
        elif "JsonCheckpointHandler" in str(handler) or (handler is None and _is_json(item_path)):
            kinds[item] = "json"
        else:
            refused.append(f"{item!r} ({handler or 'not an item orbax or learnax knows'})")
    if refused:
        raise ValueError(
            f"{path}: cannot convert the Orbax item(s) {', '.join(refused)}: learnax reads "
            "PyTree items (StandardSave, PyTreeSave) and JSON items, and converts a step "
            "with all its items or not at all; nothing was written. To convert the other "
            f"items alone: learnax convert {path}/<item> <checkpoint dir> --step <step>"
        )
    return kinds


def _json_file(item_path: str) -> str | None:
    """The one data file of a JSON item directory, or ``None``."""
    files = [f for f in os.listdir(item_path) if f != _COMMIT_MARKER and not f.startswith(".")]
    if len(files) == 1 and os.path.isfile(os.path.join(item_path, files[0])):
        return os.path.join(item_path, files[0])
    return None


def _is_json(item_path: str) -> bool:
    """Whether an item directory that the step's metadata does not describe holds one
    JSON file."""
    file = _json_file(item_path)
    if file is None:
        return False
    try:
        json.loads(_read_small(file))
    except (ValueError, OSError):
        return False
    return True


def _read_item(ocp: Any, path: str, item: str, kind: str) -> Any:
    item_path = os.path.join(path, item)
    if kind == "pytree":
        return _restore_pytree(ocp, item_path)
    file = _json_file(item_path)
    if file is None:
        raise ValueError(f"{item_path}: a JSON item should hold one file")
    try:
        return json.loads(_read_small(file))
    except (ValueError, OSError) as e:
        raise ValueError(f"{file}: the JSON item {item!r} cannot be read ({e})") from None


def _read_small(file: str) -> bytes:
    with open(file, "rb") as f:
        data = f.read(_MAX_JSON_BYTES + 1)
    if len(data) > _MAX_JSON_BYTES:
        raise ValueError(f"larger than {_MAX_JSON_BYTES >> 20} MiB")
    return data


def _as_metrics(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{path}: the manager's metrics are {type(value).__name__}, not a dict")
    return value


def _check_metrics(metrics: dict[str, Any], path: str) -> None:
    """Metrics a learnax checkpoint can carry (scalar numbers), else ``ValueError``."""
    try:
        encode_metrics(metrics)
    except TypeError as e:
        raise ValueError(f"{path}: cannot carry the manager's metrics: {e}") from None
