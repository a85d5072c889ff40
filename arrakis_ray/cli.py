"""The ``arrakis-ray`` command. Only this module prints; the library logs.

Heavy imports (torch, ray, altair) happen inside the subcommands that need them, so
``arrakis-ray sql`` starts fast on a laptop without a model.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import logging
import os
import sys
import textwrap
from pathlib import Path

from arrakis_ray.cli_sql import add_sql_command
from arrakis_ray.cli_sweeps import add_sweep_commands
from arrakis_ray.errors import ArrakisError
from arrakis_ray.resources import demo_pipeline
from arrakis_ray.store.location import os_reason

DEMO_PIPELINE = demo_pipeline()


def console() -> None:
    """The ``arrakis-ray`` console script: ``main`` in a process of its own, whose
    native stderr (Ray's C++ warnings) goes to the log file of a command that uses Ray."""
    try:
        sys.exit(main(own_process=True))
    except BrokenPipeError:  # output piped into a reader that stopped early (`| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def main(argv: list[str] | None = None, own_process: bool = False) -> int:
    """Run one ``arrakis-ray`` command; returns the exit code.

    ``own_process``: this process is the command's alone (the console script), so its
    file descriptors may be redirected; a caller embedding ``main`` keeps its own.
    """
    args = _parser().parse_args(argv)
    uses_ray = getattr(args, "uses_ray", False)
    if callable(uses_ray):  # decided by the arguments (sweep: not with --dry-run)
        uses_ray = uses_ray(args)
    if uses_ray or getattr(args, "repair", False):
        from arrakis_ray.ray_session import LOG_DIR_ENV, log_file, native_stderr_to_log

        try:
            if own_process:
                native_stderr_to_log()
            print(f"log:    {log_file()}  (Ray's own messages, remote tracebacks)")
        except OSError as exc:
            print(f"arrakis-ray: error: cannot write the log file ({LOG_DIR_ENV}): {exc}",
                  file=sys.stderr)  # fmt: skip
            return 2
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        return args.func(args) or 0
    except BrokenPipeError:  # the console script's to handle
        raise
    except Exception as exc:
        message = _error_line(exc, args.command)
        if message is None:
            raise  # a bug: its traceback is the report
        print(f"arrakis-ray: error: {message}", file=sys.stderr)
        return 2


def _error_line(exc: Exception, command: str) -> str | None:
    """The one line that reports a failed command; None for a bug.

    Besides the ArrakisErrors the library raises: a Ray task's failure that reached the
    command outside the ``ray_errors`` block that would have unwrapped it (its message
    would be the whole remote traceback), and a path the system refused where the
    library did not expect it (a store made read-only): no traceback for either.
    """
    if "ray" in sys.modules:  # else no Ray error can have been raised
        from arrakis_ray.ray_session import one_line_error

        exc = one_line_error(exc, command) or exc
    if isinstance(exc, ArrakisError):
        text = str(exc) or type(exc).__name__
    elif isinstance(exc, OSError) and exc.filename:
        text = f"{exc.filename}: {os_reason(Path(str(exc.filename)), exc)}"
    elif isinstance(exc, OSError):
        text = str(exc) or type(exc).__name__
    else:
        return None
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arrakis-ray", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(required=True, metavar="COMMAND", dest="command")

    h = sub.add_parser("harvest", help="run a pipeline's harvest into a store")
    h.add_argument("pipeline", help="pipeline YAML file")
    h.add_argument(
        "--store",
        required=True,
        help="store directory, or a URI such as s3://bucket/prefix (created if needed)",
    )
    h.set_defaults(func=_cmd_harvest, uses_ray=True)

    r = sub.add_parser("run", help="harvest, run the pipeline's tools, write the report")
    r.add_argument("pipeline", help="pipeline YAML file, or a study (a sweep file with a report)")
    r.add_argument(
        "--store",
        required=True,
        help="store directory, or a URI such as s3://bucket/prefix (created if needed)",
    )
    r.set_defaults(func=_cmd_run, uses_ray=True)

    a = sub.add_parser("analyze", help="run an analysis tool over a harvested run")
    a.add_argument("run", help="run directory (STORE/runs/ID), or a run id with --store")
    a.add_argument(
        "--tool",
        required=True,
        help="tool name (see 'arrakis-ray tools'), or your own as package.module:ClassName",
    )
    a.add_argument(
        "--param", action="append", default=[], metavar="K=V", help="tool parameter (repeatable)"
    )
    a.add_argument("--store", help="store directory or URI, when RUN is a run id")
    a.set_defaults(func=_cmd_analyze, uses_ray=True)

    add_sql_command(sub)
    add_sweep_commands(sub)

    m = sub.add_parser(
        "migrate", help="convert a store written by an older arrakis-ray to this layout"
    )
    m.add_argument("store", help="store directory, or a URI such as s3://bucket/prefix")
    m.set_defaults(func=_cmd_migrate)

    v = sub.add_parser("verify", help="check a store's files against their inventories (an fsck)")
    v.add_argument("store", help="store directory")
    v.add_argument("run", nargs="?", help="only this run (its id or a unique prefix)")
    v.add_argument(
        "--repair",
        action="store_true",
        help="harvest the damaged shards again and delete temp files of killed writers",
    )
    v.set_defaults(func=_cmd_verify)  # uses Ray with --repair only

    rep = sub.add_parser("report", help="write a run's HTML report (+ PNGs)")
    rep.add_argument("run", help="run directory (STORE/runs/ID), or a run id with --store")
    rep.add_argument("--store", help="store directory or URI, when RUN is a run id")
    rep.add_argument("--seq", type=int, help="sequence to show in the heatmap (default: first)")
    rep.add_argument(
        "--out",
        help="output directory (default: RUN/report; ./report-RUN_ID for an object-store run)",
    )
    rep.set_defaults(func=_cmd_report)

    site = sub.add_parser(
        "site", help="write the store's offline HTML site: runs, tools, features, experiments"
    )
    site.add_argument("store", help="store directory, or a URI such as s3://bucket/prefix")
    site.add_argument("--out", required=True, help="output directory (created if needed)")
    site.add_argument(
        "--runs", nargs="+", metavar="ID", help="only these runs (ids or unique prefixes)"
    )
    site.add_argument(
        "--top-features",
        type=int,
        default=8,
        metavar="N",
        help="feature pages per layer of a run with neuron_dashboard results (default 8)",
    )
    site.set_defaults(func=_cmd_site)

    t = sub.add_parser("tools", help="list the analysis tools and their parameters")
    t.set_defaults(func=_cmd_tools)

    d = sub.add_parser("demo", help="the whole chain on the shipped demo model")
    d.add_argument("--store", default="demo_store", help="store directory (default demo_store)")
    d.set_defaults(func=_cmd_demo, uses_ray=True)
    return p


def _cmd_harvest(args) -> None:
    from arrakis_ray.config import load_pipeline
    from arrakis_ray.harvest.driver import harvest

    result = harvest(load_pipeline(args.pipeline), args.store)
    _print_harvest(result)


def _cmd_run(args) -> int | None:
    if _is_sweep_file(Path(args.pipeline)):  # a study: a sweep with a report
        from arrakis_ray.cli_sweeps import cmd_sweep

        sweep_args = argparse.Namespace(
            sweep=args.pipeline,
            store=args.store,
            dry_run=False,
            address=None,
            working_dir=None,
            resubmit=False,
        )
        return cmd_sweep(sweep_args)
    run_pipeline(Path(args.pipeline), args.store)
    return None


def _is_sweep_file(path: Path) -> bool:
    """True for a sweep (or study) file: it names a ``base`` pipeline at the top level."""
    from arrakis_ray.strict_yaml import read_strict_yaml

    if not path.is_file():
        return False  # load_pipeline says so, in its words
    raw = read_strict_yaml(path)
    return isinstance(raw, dict) and "base" in raw


def _cmd_analyze(args) -> None:
    from arrakis_ray.tools.runner import analyze

    result = analyze(args.run, args.tool, _parse_params(args.param), store=args.store)
    print(
        f"{result.tool}: {result.rows} rows over {result.shards} shards "
        f"in {result.seconds:.1f} s -> {result.results_dir}"
    )


def _cmd_migrate(args) -> None:
    from arrakis_ray.store.migrate import migrate_store

    done = migrate_store(args.store)
    if not done.runs and not done.files_converted:
        print(f"{done.store}: already in this arrakis-ray's layout, nothing to do")
        return
    print(
        f"{done.store}: layout {done.from_version} -> current: {done.runs} runs, "
        f"{done.files_converted} files converted, {done.runs_compacted} runs compacted"
    )


def _cmd_verify(args) -> int:
    from arrakis_ray.harvest.repair import verify_store

    checks = verify_store(args.store, args.run, repair=args.repair)
    for check in checks:
        state = "ok" if check.ok and not check.repair_error else "DAMAGED"
        n = check.repaired_shards
        done = f", {n} shard{'' if n == 1 else 's'} harvested again" if args.repair else ""
        print(f"run {check.run_id}: {state}{done}")
        for damage in check.damage:
            shards = f" (shards {', '.join(map(str, damage.shards))})" if damage.shards else ""
            print(f"  damaged: {damage.path}: {damage.problem}{shards}")
        for line in check.results:
            print(f"  damaged result: {line}")
        for path in check.orphans:
            print(f"  orphan temp file: {path}" + (" (deleted)" if args.repair else ""))
        for path in check.strays:
            print(f"  stray file, not read by queries: {path}")
        if check.repair_error:
            print(f"  repair failed: {check.repair_error}")
    if not args.repair and any(c.damage or c.orphans for c in checks):
        print(f"repair with: arrakis-ray verify {args.store} --repair")
    return 0 if all(c.ok and not c.repair_error for c in checks) else 1


def _cmd_report(args) -> None:
    from arrakis_ray.reports.run_report import build_report

    report = build_report(args.run, args.store, seq_id=args.seq, out_dir=args.out)
    print(f"report: {report.html}")
    for png in report.pngs:
        print(f"png:    {png}")


def _cmd_site(args) -> None:
    from arrakis_ray.reports.site import build_site

    site = build_site(args.store, args.out, runs=args.runs, top_features=args.top_features)
    print(f"site:   {site.index}  ({len(site.pages)} pages)")


def _cmd_tools(args) -> None:
    from arrakis_ray.tools import TOOLS

    for name, cls in sorted(TOOLS.items()):
        print(f"{name}: {cls.summary}")
        if cls.reference:
            print(f"    reference: {cls.reference}")
        print(f"    writes: {', '.join('results_' + o for o in cls.output_names())}")
        if cls.scope == "live":
            needs = ", ".join(cls.prompt_columns) or "no prompts"
            print(f"    runs the model again, in actors (live); prompt columns: {needs}")
        docs = field_docs(cls.Params)
        for f in dataclasses.fields(cls.Params):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "required"
            print(f"    --param {f.name}=...  (default {default})")
            if f.name in docs:
                print(textwrap.indent(docs[f.name], " " * 8))


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under that field of a dataclass (and of its
    dataclass bases), read from the source; fields without one are left out.

    Reads the ``.py`` file the class came from, so it works wherever the package is
    installed as source (a wheel, an editable checkout); {} when no source exists.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _cmd_demo(args) -> None:
    from arrakis_ray.cli_demo import run_demo

    run_demo(args.store)


def run_pipeline(pipeline: Path, store: str):
    """``arrakis-ray run``: the harvest, the pipeline's tools, then the report (when the
    logit lens ran); (run directory, report or None)."""
    from arrakis_ray.config import load_pipeline
    from arrakis_ray.harvest.driver import harvest
    from arrakis_ray.reports.run_report import build_report
    from arrakis_ray.tools.runner import analyze, make_tool

    config = load_pipeline(pipeline)
    for i, step in enumerate(config.analyze):  # a bad tool or parameter fails before the harvest
        make_tool(step.tool, step.params, source=f"{config.source}: analyze[{i}]")
    result = harvest(config, store)
    _print_harvest(result)
    for step in config.analyze:
        done = analyze(result.run_dir, step.tool, step.params)
        print(f"{done.tool}: {done.rows} rows in {done.seconds:.1f} s -> {done.results_dir}")
    report = None
    if any(step.tool == "logit_lens" for step in config.analyze):
        report = build_report(result.run_dir)
        print(f"report: {report.html}")
    return result.run_dir, report


def _print_harvest(result) -> None:
    if result.status == "already complete":
        print(
            f"run {result.run_id} is already complete ({result.shards_total} shards): "
            f"nothing to do -> {result.run_dir}"
        )
        return
    rate = result.tokens / result.seconds if result.seconds else 0.0
    print(
        f"harvested run {result.run_id}: {result.shards_done}/{result.shards_total} shards, "
        f"{result.tokens} tokens, {result.bytes_written / 1e6:.1f} MB in "
        f"{result.seconds:.1f} s ({rate:.0f} tokens/s) -> {result.run_dir}"
    )


def _parse_params(items: list[str]) -> dict:
    import yaml

    from arrakis_ray.errors import ToolError

    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ToolError(f"--param {item!r}: expected KEY=VALUE")
        params[key] = yaml.safe_load(value)
    return params


if __name__ == "__main__":
    console()
