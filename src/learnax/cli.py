"""The ``learnax`` command: look at, check, compare, convert and prune checkpoints.

It prints what the public functions of :mod:`learnax.checkpoint` return and imports
nothing else of the package (but its printing helpers), so a script can do all it
does. It starts without jax: the commands that read manifests only (``ls``, ``show``,
``prune``, ``--help``) never import it.

Every command takes local paths or fsspec URLs (``--storage-options`` passes the
filesystem's options as JSON). Failures print one line, ``learnax: error: ...``. Exit
statuses mean one thing each (see ``EXIT_*`` below and docs/cli.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from learnax import _cli_output as out
from learnax.checkpoint import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointInfo,
    CheckpointSaveError,
    CheckpointSummary,
    LeafInfo,
    LegacyPickleError,
    Location,
    RunSummary,
    checkpoint_path,
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

EXIT_OK = 0
EXIT_DIFFERS_OR_DAMAGED = 1  # diff: the checkpoints differ; any command: one is damaged
EXIT_USAGE = 2  # a bad argument, a path that does not exist, a missing extra
EXIT_IO = 3  # reading or writing failed: permissions, disk, network, credentials
EXIT_BROKEN_PIPE = 141  # stdout closed early (`| head`): 128 + SIGPIPE, as the shell's
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT


class UsageError(Exception):
    """A bad argument or a path that does not exist: exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)  # --help, --version and usage errors exit here
        _cpu_only_and_warnings_on_stderr()
        status = args.run(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return status
    except BrokenPipeError:
        return _stdout_closed()
    except UsageError as e:
        return _fail(str(e), EXIT_USAGE)
    except CheckpointCorruptedError as e:
        return _fail(str(e), EXIT_DIFFERS_OR_DAMAGED)
    except KeyError as e:
        return _fail(str(e.args[0]), EXIT_USAGE)
    except (FileNotFoundError, FileExistsError, ValueError, TypeError, ImportError) as e:
        return _fail(str(e), EXIT_USAGE)
    except (OSError, CheckpointSaveError) as e:
        return _fail(str(e), EXIT_IO)
    except CheckpointError as e:
        return _fail(str(e), EXIT_DIFFERS_OR_DAMAGED)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)


def _cpu_only_and_warnings_on_stderr() -> None:
    if "JAX_PLATFORMS" not in os.environ:
        # Reading checkpoints needs no accelerator: never grab a training node's GPU.
        # jax reads the variable when (and if) a command imports it.
        if "jax" in sys.modules:
            sys.modules["jax"].config.update("jax_platforms", "cpu")
        else:
            os.environ["JAX_PLATFORMS"] = "cpu"
    # The library's warnings (a pickle unpickled, a damaged checkpoint skipped), as one
    # line each on stderr.
    logging.basicConfig(format="learnax: %(levelname)s: %(message)s", level=logging.WARNING)


def _stdout_closed() -> int:
    """The reader of our output went away (``learnax ls --json | head -2``): stop
    quietly, as a command killed by SIGPIPE does. Python would report the unflushed
    rest of stdout at exit, so stdout now points at /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def _fail(message: str, status: int) -> int:
    print(f"learnax: error: {message}", file=sys.stderr)
    return status


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("learnax")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        import learnax

        return getattr(learnax, "__version__", "unknown")


class _VersionAction(argparse.Action):
    """``--version``, found only when asked for (importlib.metadata takes a moment)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(f"learnax {_version()}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="learnax",
        description="Look at, check, compare, convert and prune checkpoints.",
        epilog="exit status: 0 ok, 1 damaged or (diff) different, 2 usage, 3 I/O or "
        "credentials, 130 interrupted, 141 stdout closed early",
    )
    parser.add_argument("--version", action=_VersionAction)
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
    verify.add_argument("--json", action="store_true", help="print JSON")
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
    conv.add_argument("--json", action="store_true", help="print JSON")
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
    prune.add_argument(
        "--keep-top-k",
        type=_positive,
        default=None,
        help="also keep the K best by --metric (as keep_top_k does)",
    )
    prune.add_argument("--metric", help='with --keep-top-k: the metric that ranks, e.g. "val/loss"')
    prune.add_argument(
        "--maximize", action="store_true", help="with --keep-top-k: higher is better"
    )
    prune.add_argument("--dry-run", action="store_true", help="only print what would go")
    prune.add_argument("--json", action="store_true", help="print JSON")
    prune.set_defaults(run=cmd_prune)


def _add_plot(add_parser: Callable[..., argparse.ArgumentParser]) -> None:
    plot = add_parser(
        "plot", help="a metric of a run against the step (every report), as a PNG or as JSON"
    )
    plot.add_argument("path", help="a run (<registry>/<run_id>)")
    plot.add_argument("--metric", required=True, help='e.g. "val/loss"')
    plot.add_argument("-o", "--output", help="the PNG file to write (required without --json)")
    plot.add_argument(
        "--maximize",
        action="store_true",
        help="higher is better (default: what state_best says, else lower)",
    )
    plot.add_argument(
        "--json", action="store_true", help="print the series as JSON (no matplotlib needed)"
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
                out.or_dash(r["step"]),
                out.when(r["time"]),
                out.size(r["bytes"]),
                out.metrics(r["metrics"]),
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
                f"last at step {last['step']}: {out.metrics(last['metrics']) or '-'}"
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
            out.or_dash(r["newest_step"]),
            "-" if r["best"] is None else f"{r['best']['metric']}={out.number(r['best']['value'])}",
            out.size(r["bytes"]),
            out.when(r["last_write"]),
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
        out.print_json(as_json)
        return EXIT_OK
    out.print_table(headers, cells)
    if not cells and note is None:
        print(f"(no {what} in {as_json['path']})")
    if note is not None:
        print(("" if cells else f"(no learnax checkpoints in {as_json['path']}) ") + note)
    return EXIT_OK


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
        out.print_json(_info_json(path, info))
        return EXIT_OK
    arrays = [leaf for leaf in info.leaves if leaf.nbytes or leaf.shape]
    total = sum(leaf.nbytes for leaf in info.leaves)
    for key, value in (
        ("checkpoint", path),
        ("step", info.step),
        ("time", out.when(info.time)),
        ("metrics", out.metrics(info.metrics) or "-"),
        ("size", f"{out.size(info.nbytes)} on storage"),
    ):
        print(f"{key:<11} {value}")
    print()
    out.print_table(
        ["leaf", "dtype", "shape", "bytes"],
        [
            [
                leaf.path,
                leaf.dtype,
                _shape(leaf),
                out.size(leaf.nbytes) if leaf.nbytes or leaf.shape else repr(leaf.value)[:40],
            ]
            for leaf in info.leaves
        ],
    )
    print(f"{len(info.leaves)} leaves, {len(arrays)} arrays, {out.size(total)}")
    return EXIT_OK


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
    progress = out.ByteProgress()
    results: list[tuple[str, str | None]] = []

    def report(checkpoint: str, problem: str | None) -> None:
        results.append((checkpoint, problem))
        if not args.json:
            progress.print(
                f"ok       {checkpoint}" if problem is None else f"DAMAGED  {checkpoint}: {problem}"
            )

    try:
        damaged = verify(
            path,
            storage_options=args.storage_options,
            report=report,
            progress=progress.callback(),
        )
    finally:
        progress.close()
    status = EXIT_DIFFERS_OR_DAMAGED if damaged else EXIT_OK
    if args.json:
        rows = [
            {"path": c, "status": "ok"}
            if problem is None
            else {"path": c, "status": "damaged", "problem": problem}
            for c, problem in results
        ]
        out.print_json(
            {
                "path": path,
                "checkpoints": rows,
                "verified": len(results),
                "damaged": len(damaged),
                "legacy_pickles": pickles,
            }
        )
        return status
    print(f"{len(results)} checkpoint(s) verified, {len(damaged)} damaged")
    if note is not None:
        print(f"Not verified (pickles have no checksums): {note}")
    return status


def cmd_diff(args: argparse.Namespace) -> int:
    for side in (args.a, args.b):
        if _open(args, side).kind != "checkpoint":
            raise UsageError(f"{side} is not a checkpoint (.../checkpoints/state_<name>)")
    # A damaged side raises CheckpointCorruptedError: exit 1 as well, with its error line.
    result = diff(args.a, args.b, storage_options=args.storage_options)
    differ = bool(result["added"] or result["removed"] or result["changed"] or result["different"])
    if args.json:
        out.print_json({**result, "differ": differ})
        return EXIT_DIFFERS_OR_DAMAGED if differ else EXIT_OK
    for path in result["removed"]:
        print(f"removed  {path}")
    for path in result["added"]:
        print(f"added    {path}")
    for c in result["changed"]:
        print(f"changed  {c['path']}: {c['a']} -> {c['b']}")
    for d in result["different"]:
        print(
            f"differs  {d['path']}: max abs {out.number(d['max_abs'])}, max rel {out.number(d['max_rel'])}"
        )
    print(
        f"{result['identical']} leaves identical"
        + ("" if differ else "; the checkpoints are identical")
    )
    return EXIT_DIFFERS_OR_DAMAGED if differ else EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    from learnax.checkpoint import convert  # imports jax: only here

    progress = out.ByteProgress()
    try:
        written = convert(
            args.src,
            args.dst,
            allow_pickle=args.allow_pickle,
            step=args.step,
            only=args.only,
            storage_options=args.storage_options,
            progress=progress.callback(),
        )
    except LegacyPickleError as e:  # the user's call: --allow-pickle
        raise UsageError(str(e).replace("allow_pickle=True", "--allow-pickle")) from None
    finally:
        progress.close()
    if args.json:
        out.print_json({"source": args.src, "written": written})
    else:
        print(f"wrote {written}")
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    kind, path = _open(args, args.path)
    if kind != "run":
        raise UsageError(f"{path} is not a run (<registry>/<run_id>)")
    if args.keep_top_k is not None and not args.metric:
        raise UsageError("--keep-top-k needs --metric, the metric that ranks the checkpoints")
    victims = prune(
        path,
        args.keep,
        keep_period=args.keep_period,
        keep_top_k=args.keep_top_k,
        metric=args.metric,
        maximize=args.maximize,
        dry_run=args.dry_run,
        storage_options=args.storage_options,
    )
    if args.json:
        out.print_json({"path": path, "dry_run": args.dry_run, "checkpoints": victims})
        return EXIT_OK
    for victim in victims:
        print(f"{'would delete' if args.dry_run else 'deleted'} {victim}")
    if not victims:
        print("nothing to delete")
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    kind, path = _open(args, args.path)
    if kind != "run":
        raise UsageError(f"{path} is not a run (<registry>/<run_id>)")
    if not args.json and args.output is None:
        raise UsageError("plot needs -o FILE.png, or --json for the series as JSON")
    series = _plot_series(args, path)
    if args.output is not None:
        _draw(series, args.output)
    if args.json:
        out.print_json(series)
    else:
        best = series["best"]
        what = "reports" if series["source"] == "history" else "checkpoints"
        print(
            f"wrote {args.output} ({len(series['points'])} {what}, "
            f"best {out.number(best['value'])} at step {best['step']})"
        )
    return EXIT_OK


def _plot_series(args: argparse.Namespace, run: str) -> dict[str, Any]:
    """What ``plot`` draws, as ``--json`` prints it: the metric's points by step and the
    best of them, from :func:`learnax.checkpoint.metric_history` alone (the run's metric
    history, or its checkpoints' metrics for a run without one: ``source``)."""
    history = metric_history(
        run, args.metric, maximize=args.maximize, storage_options=args.storage_options
    )
    return {
        "run": run,
        "metric": args.metric,
        "source": history.source,
        "maximize": history.maximize,
        "points": [{"step": step, "value": value} for step, value in history.points.items()],
        "best": {"step": history.best_step, "value": history.best_value},
    }


def _draw(series: dict[str, Any], output: str) -> None:
    """The series as a PNG: the line, and the best point as a star."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError('plot needs matplotlib: pip install "learnax[plot]"') from None
    steps = [p["step"] for p in series["points"]]
    values = [p["value"] for p in series["points"]]
    best = series["best"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, values, marker="o", markersize=3, linewidth=1.5, label=series["metric"])
    ax.scatter(
        [best["step"]],
        [best["value"]],
        s=120,
        marker="*",
        color="tab:red",
        zorder=3,
        label=f"best: {out.number(best['value'])} at step {best['step']}",
    )
    ax.set_xlabel("step")
    ax.set_ylabel(series["metric"])
    ax.set_title(series["run"].rstrip("/").rpartition("/")[2])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------- output


def _shape(leaf: LeafInfo) -> str:
    if not leaf.shape and not leaf.nbytes:
        return "-"
    return "(" + ", ".join(map(str, leaf.shape)) + ("," if len(leaf.shape) == 1 else "") + ")"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
