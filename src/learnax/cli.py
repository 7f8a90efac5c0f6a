"""The ``learnax`` command: look at, check, compare, convert and prune checkpoints.

It prints what the public functions of :mod:`learnax.checkpoint` return and imports
nothing else of the package, so a script can do all it does.

Every command takes local paths or fsspec URLs (``--storage-options`` passes the
filesystem's options as JSON). Failures print one line, ``learnax: error: ...``, and
exit with status 2 for a bad argument or a missing path, 1 for a damaged checkpoint;
``verify`` and ``diff`` exit 1 when something is damaged or differs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from learnax.checkpoint import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointInfo,
    CheckpointSummary,
    LeafInfo,
    LegacyPickleError,
    Location,
    RunSummary,
    checkpoint_path,
    convert,
    diff,
    find_checkpoints,
    find_legacy_pickles,
    list_checkpoints,
    list_runs,
    locate,
    metric_history,
    prune,
    read_info,
    read_metric_history,
    verify,
)


class UsageError(Exception):
    """A bad argument or a path that does not exist: exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if "JAX_PLATFORMS" not in os.environ:
        # Reading checkpoints needs no accelerator: never grab a training node's GPU.
        import jax

        jax.config.update("jax_platforms", "cpu")
    # The library's warnings (a pickle unpickled, a damaged checkpoint skipped), as one
    # line each on stderr.
    logging.basicConfig(format="learnax: %(levelname)s: %(message)s", level=logging.WARNING)
    try:
        return args.run(args)
    except UsageError as e:
        return _fail(str(e), 2)
    except CheckpointCorruptedError as e:
        return _fail(str(e), 1)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError, TypeError, ImportError) as e:
        return _fail(str(e.args[0]) if isinstance(e, KeyError) else str(e), 2)
    except (CheckpointError, OSError) as e:
        return _fail(str(e), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def _fail(message: str, status: int) -> int:
    print(f"learnax: error: {message}", file=sys.stderr)
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="learnax", description="Look at, check, compare, convert and prune checkpoints."
    )
    _add_storage_options(parser, default=None)
    # Also accepted after the command (then it wins): `learnax ls URL --storage-options ...`.
    common = argparse.ArgumentParser(add_help=False)
    _add_storage_options(common, default=argparse.SUPPRESS)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, parents=[common], **kwargs)

    for add in (_add_ls, _add_show, _add_verify, _add_diff, _add_convert, _add_prune, _add_plot):
        add(add_parser)
    return parser


def _add_ls(add_parser: Callable[..., argparse.ArgumentParser]) -> None:
    ls = add_parser("ls", help="the runs of a registry, or the checkpoints of a run")
    ls.add_argument("path", help="a registry or a run (<registry>/<run_id>)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(run=cmd_ls)


def _add_show(add_parser: Callable[..., argparse.ArgumentParser]) -> None:
    show = add_parser("show", help="what a checkpoint holds, without loading it")
    show.add_argument("path", help="a checkpoint directory, or a run")
    show.add_argument("name", nargs="?", help="with a run: latest, best, or a step")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(run=cmd_show)


def _add_verify(add_parser: Callable[..., argparse.ArgumentParser]) -> None:
    verify = add_parser("verify", help="check every checksum; exit 1 if damaged")
    verify.add_argument("path", help="a checkpoint, a run or a registry")
    verify.set_defaults(run=cmd_verify)


def _add_diff(add_parser: Callable[..., argparse.ArgumentParser]) -> None:
    diff = add_parser("diff", help="compare two checkpoints; exit 1 if they differ")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--json", action="store_true", help="print JSON")
    diff.set_defaults(run=cmd_diff)


def _add_convert(add_parser: Callable[..., argparse.ArgumentParser]) -> None:
    conv = add_parser(
        "convert", help="pickle / Orbax / safetensors -> learnax, or learnax -> safetensors"
    )
    conv.add_argument(
        "src",
        help="a state_*.pyd pickle, an Orbax directory, a .safetensors "
        "file or a learnax checkpoint",
    )
    conv.add_argument(
        "dst", help="a checkpoint directory .../checkpoints/state_<name>, or a .safetensors file"
    )
    conv.add_argument(
        "--allow-pickle",
        action="store_true",
        help="unpickle a legacy pickle that needs code to be read (this runs code from the file)",
    )
    conv.add_argument("--step", type=_non_negative, help="the step, when the source has none")
    conv.add_argument("--only", metavar="SUBTREE", help='keep a subtree, e.g. "params"')
    conv.set_defaults(run=cmd_convert)


def _add_prune(add_parser: Callable[..., argparse.ArgumentParser]) -> None:
    prune = add_parser("prune", help="apply retention to a run offline")
    prune.add_argument("path", help="a run (<registry>/<run_id>)")
    prune.add_argument("--keep", type=_positive, required=True, help="numbered checkpoints to keep")
    prune.add_argument(
        "--keep-period",
        type=_positive,
        default=None,
        help="also keep every step that is a multiple of this",
    )
    prune.add_argument("--dry-run", action="store_true", help="only print what would go")
    prune.set_defaults(run=cmd_prune)


def _add_plot(add_parser: Callable[..., argparse.ArgumentParser]) -> None:
    plot = add_parser("plot", help="a metric of a run against the step, every report")
    plot.add_argument("path", help="a run (<registry>/<run_id>)")
    plot.add_argument("--metric", required=True, help='e.g. "val/loss"')
    plot.add_argument("-o", "--output", help="the PNG file to write (required without --json)")
    plot.add_argument("--json", action="store_true", help="print the series as JSON")
    plot.add_argument(
        "--maximize",
        action="store_true",
        help="higher is better (default: what state_best says, else lower)",
    )
    plot.set_defaults(run=cmd_plot)


def _add_storage_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--storage-options",
        type=_json_object,
        default=default,
        metavar="JSON",
        help="options for the fsspec filesystem of URLs, e.g. '{\"anon\": true}'",
    )


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return int(text)


# --------------------------------------------------------------------------- commands


def _open(args: argparse.Namespace, path: str) -> Location:
    try:
        return locate(path, storage_options=args.storage_options)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None


def cmd_ls(args: argparse.Namespace) -> int:
    kind, path = _open(args, args.path)
    if kind == "checkpoint":
        raise UsageError(f"{path} is a checkpoint: use `learnax show {args.path}`")
    if kind == "run":
        rows = [
            _checkpoint_row(c) for c in list_checkpoints(path, storage_options=args.storage_options)
        ]
        pickles = find_legacy_pickles(path, storage_options=args.storage_options)
        headers = ["name", "step", "time", "size", "metrics", "status"]
        cells = [
            [
                r["name"],
                _or_dash(r["step"]),
                _when(r["time"]),
                _size(r["bytes"]),
                _metrics(r["metrics"]),
                r["status"],
            ]
            for r in rows
        ]
        history = _history_summary(read_metric_history(path, storage_options=args.storage_options))
        listing = {
            "path": path,
            "checkpoints": rows,
            "legacy_pickles": pickles,
            "history": history,
        }
        status = _listing(args, listing, headers, cells, "checkpoints", _pickles_note(pickles))
        if history is not None and not args.json:
            last = history["last_metrics"]
            print(
                f"metric history: {history['reports']} report(s), steps "
                f"{history['first_step']}-{history['last_step']}, {history['saves']} save(s); "
                f"last at step {last['step']}: {_metrics(last['metrics']) or '-'}"
                if last is not None
                else f"metric history: {history['saves']} save(s), no reports"
            )
        return status
    rows = [_run_row(r) for r in list_runs(path, storage_options=args.storage_options)]
    headers = ["run", "checkpoints", "newest step", "best", "size", "last write"]
    cells = [
        [
            r["run"],
            str(r["checkpoints"]),
            _or_dash(r["newest_step"]),
            "-" if r["best"] is None else f"{r['best']['metric']}={_number(r['best']['value'])}",
            _size(r["bytes"]),
            _when(r["last_write"]),
        ]
        for r in rows
    ]
    return _listing(args, {"path": path, "runs": rows}, headers, cells, "runs")


def _listing(
    args: argparse.Namespace,
    as_json: dict[str, Any],
    headers: list[str],
    cells: list[list[str]],
    what: str,
    note: str | None = None,
) -> int:
    """Print a listing as JSON (``--json``) or as a table and its ``note``, saying so
    when it is empty."""
    if args.json:
        _print_json(as_json)
        return 0
    _print_table(headers, cells)
    if not cells and note is None:
        print(f"(no {what} in {as_json['path']})")
    if note is not None:
        print(("" if cells else f"(no learnax checkpoints in {as_json['path']}) ") + note)
    return 0


def _pickles_note(pickles: list[str]) -> str | None:
    """What to say of the original learnax's pickles beside a listing; ``None`` when
    there are none."""
    if not pickles:
        return None
    names = ", ".join(p.rpartition("/")[2] for p in pickles)
    return (
        f"{len(pickles)} pickle checkpoint(s) of the original learnax: {names} (loads read "
        "them; to convert one: learnax convert <run>/checkpoints/state_<name>.pyd "
        "<run>/checkpoints/state_<name>)"
    )


def _checkpoint_row(c: CheckpointSummary) -> dict[str, Any]:
    row = {
        "name": c.name,
        "path": c.path,
        "step": c.step,
        "time": c.time,
        "bytes": c.nbytes,
        "metrics": c.metrics,
        "status": c.status,
    }
    return row if c.problem is None else {**row, "problem": c.problem}


def _history_summary(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """How many reports and saves a run's metric history holds, and the last report."""
    if not records:
        return None
    reports = [r for r in records if "metrics" in r]
    return {
        "reports": len(reports),
        "saves": len(records) - len(reports),
        "first_step": records[0]["step"],
        "last_step": records[-1]["step"],
        "last_metrics": (
            {"step": reports[-1]["step"], "metrics": reports[-1]["metrics"]} if reports else None
        ),
    }


def _run_row(r: RunSummary) -> dict[str, Any]:
    return {
        "run": r.name,
        "path": r.path,
        "checkpoints": r.checkpoints,
        "newest_step": r.newest_step,
        "best": r.best,
        "bytes": r.nbytes,
        "last_write": r.last_write,
    }


def cmd_show(args: argparse.Namespace) -> int:
    kind, path = _open(args, args.path)
    if kind == "run":
        if args.name is None:
            raise UsageError(
                f"{path} is a run: name a checkpoint, e.g. `learnax show {args.path} latest`"
            )
        path = checkpoint_path(path, args.name, storage_options=args.storage_options)
    elif kind != "checkpoint":
        raise UsageError(f"{path} is a registry: `learnax ls {args.path}` lists its runs")
    try:
        info = read_info(path, storage_options=args.storage_options)
    except FileNotFoundError:
        raise UsageError(f"No committed checkpoint at {path}") from None
    if args.json:
        _print_json(_info_json(path, info))
        return 0
    arrays = [leaf for leaf in info.leaves if leaf.nbytes or leaf.shape]
    total = sum(leaf.nbytes for leaf in info.leaves)
    for key, value in (
        ("checkpoint", path),
        ("step", info.step),
        ("time", _when(info.time)),
        ("metrics", _metrics(info.metrics) or "-"),
        ("size", f"{_size(info.nbytes)} on storage"),
    ):
        print(f"{key:<11} {value}")
    print()
    _print_table(
        ["leaf", "dtype", "shape", "bytes"],
        [
            [
                leaf.path,
                leaf.dtype,
                _shape(leaf),
                _size(leaf.nbytes) if leaf.nbytes or leaf.shape else repr(leaf.value)[:40],
            ]
            for leaf in info.leaves
        ],
    )
    print(f"{len(info.leaves)} leaves, {len(arrays)} arrays, {_size(total)}")
    return 0


def _info_json(path: str, info: CheckpointInfo) -> dict[str, Any]:
    arrays = [leaf for leaf in info.leaves if leaf.nbytes or leaf.shape]
    total = sum(leaf.nbytes for leaf in info.leaves)
    return {
        "path": path,
        "step": info.step,
        "time": info.time,
        "metrics": info.metrics,
        "leaves": [
            {
                "path": leaf.path,
                "dtype": leaf.dtype,
                "shape": list(leaf.shape),
                "bytes": leaf.nbytes,
                **({"value": leaf.value} if leaf.value is not None else {}),
            }
            for leaf in info.leaves
        ],
        "n_leaves": len(info.leaves),
        "n_arrays": len(arrays),
        "total_bytes": total,
        "bytes_on_storage": info.nbytes,
    }


def cmd_verify(args: argparse.Namespace) -> int:
    kind, path = _open(args, args.path)
    checkpoints = find_checkpoints(path, storage_options=args.storage_options)
    pickles = find_legacy_pickles(path, storage_options=args.storage_options)
    note = _pickles_note(pickles)
    if not checkpoints:
        if note is not None:
            raise UsageError(
                f"no learnax checkpoints under {path} to verify. {note}. Pickles have no "
                "checksums: verify checks them once converted."
            )
        raise UsageError(f"no checkpoints under {path}")
    bar = _progress(len(checkpoints))
    results: list[tuple[str, str | None]] = []

    def report(checkpoint: str, problem: str | None) -> None:
        results.append((checkpoint, problem))
        line = f"ok       {checkpoint}" if problem is None else f"DAMAGED  {checkpoint}: {problem}"
        (bar.write if bar is not None else print)(line)
        if bar is not None:
            bar.update(1)

    try:
        damaged = verify(path, storage_options=args.storage_options, report=report)
    finally:
        if bar is not None:
            bar.close()
    print(f"{len(results)} checkpoint(s) verified, {len(damaged)} damaged")
    if note is not None:
        print(f"Not verified (pickles have no checksums): {note}")
    return 1 if damaged else 0


def _progress(total: int) -> Any:
    """A progress bar on a terminal when tqdm is installed (extra ``learnax[cli]``)."""
    if total < 2 or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="ckpt", file=sys.stderr, leave=False)


def cmd_diff(args: argparse.Namespace) -> int:
    for side in (args.a, args.b):
        if _open(args, side).kind != "checkpoint":
            raise UsageError(f"{side} is not a checkpoint (.../checkpoints/state_<name>)")
    try:
        result = diff(args.a, args.b, storage_options=args.storage_options)
    except CheckpointCorruptedError as e:
        return _fail(str(e), 2)  # as diff(1): 1 means "they differ", 2 "trouble"
    differ = bool(result["added"] or result["removed"] or result["changed"] or result["different"])
    if args.json:
        _print_json({**result, "differ": differ})
        return 1 if differ else 0
    for path in result["removed"]:
        print(f"removed  {path}")
    for path in result["added"]:
        print(f"added    {path}")
    for c in result["changed"]:
        print(f"changed  {c['path']}: {c['a']} -> {c['b']}")
    for d in result["different"]:
        print(
            f"differs  {d['path']}: max abs {_number(d['max_abs'])}, max rel {_number(d['max_rel'])}"
        )
    print(
        f"{result['identical']} leaves identical"
        + ("" if differ else "; the checkpoints are identical")
    )
    return 1 if differ else 0


def cmd_convert(args: argparse.Namespace) -> int:
    try:
        written = convert(
            args.src,
            args.dst,
            allow_pickle=args.allow_pickle,
            step=args.step,
            only=args.only,
            storage_options=args.storage_options,
        )
    except LegacyPickleError as e:  # the user's call: --allow-pickle
        raise UsageError(str(e).replace("allow_pickle=True", "--allow-pickle")) from None
    print(f"wrote {written}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    kind, path = _open(args, args.path)
    if kind != "run":
        raise UsageError(f"{path} is not a run (<registry>/<run_id>)")
    victims = prune(
        path,
        args.keep,
        keep_period=args.keep_period,
        dry_run=args.dry_run,
        storage_options=args.storage_options,
    )
    for victim in victims:
        print(f"{'would delete' if args.dry_run else 'deleted'} {victim}")
    if not victims:
        print("nothing to delete")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    kind, path = _open(args, args.path)
    if kind != "run":
        raise UsageError(f"{path} is not a run (<registry>/<run_id>)")
    if not args.json and not args.output:
        raise UsageError("plot needs -o FILE.png (or --json to print the series)")
    history = metric_history(
        path, args.metric, maximize=args.maximize, storage_options=args.storage_options
    )
    steps, values = list(history.points), list(history.points.values())
    best = (history.best_step, history.best_value)
    if args.json:
        _print_json(
            {
                "path": path,
                "metric": args.metric,
                "source": history.source,
                "maximize": history.maximize,
                "points": [[s, v] for s, v in history.points.items()],
                "best": {"step": best[0], "value": best[1]},
            }
        )
        return 0
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError('plot needs matplotlib: pip install "learnax[plot]"') from None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, values, marker="o", markersize=3, linewidth=1.5, label=args.metric)
    ax.scatter(
        [best[0]],
        [best[1]],
        s=120,
        marker="*",
        color="tab:red",
        zorder=3,
        label=f"best: {_number(best[1])} at step {best[0]}",
    )
    ax.set_xlabel("step")
    ax.set_ylabel(args.metric)
    ax.set_title(path.rstrip("/").rpartition("/")[2])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.output, format="png")
    plt.close(fig)
    what = "reports" if history.source == "history" else "checkpoints"
    print(f"wrote {args.output} ({len(steps)} {what}, best {_number(best[1])} at step {best[0]})")
    return 0


# --------------------------------------------------------------------------- output


def _print_json(value: Any) -> None:
    # Strict JSON: NaN and infinities become "NaN", "Infinity", "-Infinity".
    print(json.dumps(_finite(value), indent=2, default=str, allow_nan=False))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _print_table(headers: list[str], rows: list[list[str]]) -> None:
    if not rows:
        return
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _when(t: float | None) -> str:
    """A time as local date and time; one the platform cannot convert (NaN, infinite,
    or far outside its years, in a crafted or damaged manifest) as the number itself."""
    if not t:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    except (OverflowError, OSError, ValueError):
        return _number(t)


def _number(x: Any) -> str:
    return f"{x:.6g}" if isinstance(x, float) else str(x)


def _metrics(metrics: dict[str, Any]) -> str:
    return "  ".join(f"{k}={_number(v)}" for k, v in metrics.items())


def _or_dash(x: Any) -> str:
    return "-" if x is None else str(x)


def _shape(leaf: LeafInfo) -> str:
    if not leaf.shape and not leaf.nbytes:
        return "-"
    return "(" + ", ".join(map(str, leaf.shape)) + ("," if len(leaf.shape) == 1 else "") + ")"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
