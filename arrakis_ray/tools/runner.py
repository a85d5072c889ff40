"""Run a tool over a harvested run: one Ray task per shard, results as Parquet.

Everything is checked before any task starts (tool name, parameters, the hooks the
tool needs against the hooks the run harvested), so a bad call writes nothing. Each
task reads only its shard's files and writes ``results/<output>/<call>/shard-NNNNN.parquet``
atomically and returns the files' inventory entries; the driver then records the call
(parameters, schema version, rows, the result files) in the run's ``tools/<tool>.json``
(``RunWriter.record_tool``), and deletes the previous call's files. Readers read exactly
the files the record lists, so until the new record they read the previous call's
results, whole; a call that fails deletes its own files and leaves those.
Live tools (``scope = "live"``) run in actors holding the model: ``live/runner.py``.
"""

from __future__ import annotations

import difflib
import importlib
import json
import logging
import secrets
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from arrakis_ray.config import ModelConfig, build_dataclass, to_dict
from arrakis_ray.errors import ToolError
from arrakis_ray.hooks import harvest_glob, hook_family
from arrakis_ray.store.inventory import FileEntry
from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.location import StorePath
from arrakis_ray.store.manifest import ToolRecord, read_tool_records, record_key
from arrakis_ray.store.reader import RunReader
from arrakis_ray.store.writer import RunWriter
from arrakis_ray.tools.base import ShardInputs, Tool

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 8  # shard tasks submitted at once: bounds the object store's load


@dataclass(frozen=True)
class AnalyzeResult:
    """What an analyze call wrote."""

    tool: str
    run_id: str
    results_dir: Path
    shards: int
    rows: int
    seconds: float


def tool_class(name: str) -> type[Tool]:
    """A registered tool by name, or a user's tool given as ``package.module:ClassName``."""
    from arrakis_ray.tools import TOOLS, register_tool

    if ":" in name:
        module_name, _, class_name = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            raise ToolError(f"tool '{name}': cannot import it: {exc}") from None
        if not (isinstance(cls, type) and issubclass(cls, Tool)):
            raise ToolError(f"tool '{name}' is not a subclass of arrakis_ray.tools.Tool")
        return register_tool(cls)
    if name not in TOOLS:
        close = difflib.get_close_matches(name, list(TOOLS), n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ToolError(f"unknown tool '{name}'{hint}; known tools: {', '.join(sorted(TOOLS))}")
    return TOOLS[name]


def make_tool(
    name: str | type[Tool], params: dict[str, Any] | None = None, source: str = "--param"
) -> Tool:
    """Instantiate a tool (by name or class) with validated parameters."""
    cls = tool_class(name) if isinstance(name, str) else name
    try:
        parsed = build_dataclass(cls.Params, dict(params or {}), source, "params")
    except Exception as exc:  # ConfigError from validation: re-raise as a tool error
        raise ToolError(f"tool {cls.name}: {exc}") from None
    return cls(parsed)


def tool_variant(tool: Tool) -> str:
    """12 hex naming one setting of a tool: a hash of its name and validated parameters
    (defaults filled in), so equal settings written differently are one variant."""
    import hashlib

    text = json.dumps({"tool": tool.name, "params": to_dict(tool.params)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def stored_record(layout: RunLayout, tool: Tool, variant: str | None = None) -> ToolRecord | None:
    """The run's record of ``tool`` (under ``variant``, if given) if it was computed with
    ``tool``'s parameters (the stored ones built into the tool's Params, defaults filled
    in, then compared) and its schema version, over a complete harvest (an observational
    tool's record of a run still harvesting may lack shards); else None."""
    from arrakis_ray.store.manifest import read_manifest

    record = read_tool_records(layout).get(record_key(tool.name, variant))
    if record is None or record.schema_version != tool.schema_version:
        return None
    if tool.scope != "live" and read_manifest(layout).status != "complete":
        return None  # computed while the harvest ran: shards may have come since
    try:
        stored = make_tool(type(tool), record.params, source="the run's tool record")
    except ToolError:  # parameters this version of the tool no longer takes
        return None
    return record if to_dict(stored.params) == to_dict(tool.params) else None


def analyze(
    run: str | Path,
    tool_name: str,
    params: dict[str, Any] | None = None,
    store: str | Path | None = None,
    variant: str | None = None,
) -> AnalyzeResult:
    """Run a tool (a name, or ``module:Class``) over every completed shard of ``run``.

    ``variant`` (``tool_variant``): record the call as one setting of the tool beside the
    others, ``tools/<tool>.<variant>.json``, rather than as the run's own call of it,
    which the next call with other parameters replaces.
    """
    from arrakis_ray.harvest.placement import check_store_reachable, store_probe
    from arrakis_ray.ray_session import ensure_ray

    started = time.perf_counter()
    reader = RunReader.open(run, store)
    layout, manifest = reader.layout, reader.manifest
    tool = make_tool(tool_name, params)
    for output in tool.output_names():
        tool.result_schema(output)  # a missing schema file fails here, before any task runs
    tool.check(manifest)
    missing = [h for h in tool.required_hooks(manifest) if h not in manifest.hooks]
    if missing:
        raise ToolError(
            f"tool {tool.name} needs hooks that run {layout.run_id} did not harvest: "
            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; harvest again "
            f"with harvest.hooks including {', '.join(harvest_hint(missing))}"
        )
    shards = reader.shards
    if not shards and tool.scope != "live":
        raise ToolError(f"run {layout.run_id} has no completed shard to analyze")

    ensure_ray()
    with store_probe(layout.store_root) as probe:  # every task checks it before writing
        # results are written by tasks on any node: a local store they cannot see is refused
        check_store_reachable(layout.store_root, probe)
        return _analyze(tool, reader, shards, variant, started, probe)


def _analyze(tool: Tool, reader: RunReader, shards: list[int], variant, started, probe):
    """Run the checked call's tasks and record it (``analyze``, past its checks)."""
    from ray import cloudpickle

    layout = reader.layout
    if not type(tool).__module__.startswith("arrakis_ray."):
        # a user's tool travels to the workers by value: its module need not be
        # importable there (a notebook, a script, a file outside any package)
        cloudpickle.register_pickle_by_value(sys.modules[type(tool).__module__])
    writer = RunWriter.for_layout(layout)
    # this call writes its own result directories: until its record replaces the
    # previous one, the previous results stay whole and readable, and a call that fails
    # leaves them as they were
    call = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
    # the store root travels as a path object: a UPath carries its filesystem options
    payload = (type(tool), to_dict(tool.params), layout.store_root, layout.run_id, call)
    own_dirs = (*tool.output_names(), tool.name)  # its tables', and its artifacts'
    try:
        files, units = _run_tasks(tool, reader, payload, shards, probe)
    except BaseException:
        writer.remove_call(own_dirs, call)
        raise
    files = sorted(files, key=lambda e: e.path)
    rows = sum(e.rows for e in files)

    seconds = time.perf_counter() - started
    record = ToolRecord(
        params=to_dict(tool.params),
        outputs=tool.output_names(),
        schema_version=tool.schema_version,
        shards=units,
        rows=rows,
        seconds=round(seconds, 3),
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        files=tuple(files),
    )
    # (an unreadable previous record is skipped here: its files are left for verify)
    key = record_key(tool.name, variant)
    previous = read_tool_records(layout).get(key)
    try:
        writer.record_tool(key, record)
    except BaseException:
        writer.remove_call(own_dirs, call)
        raise
    if previous is not None:  # the replaced call's files, now listed nowhere
        writer.remove_results(previous.files, keep=record.files)
        for old in _calls_of(previous) - {call}:  # and its artifacts
            writer.remove_call([tool.name], old)
    log.info("%s: %d rows over %d shards in %.1f s", tool.name, rows, units, seconds)
    return AnalyzeResult(
        tool.name,
        layout.run_id,
        layout.results_dir(tool.output_names()[0]),
        units,
        rows,
        seconds,
    )


def _calls_of(record: ToolRecord) -> set[str]:
    """The call directories a record's files lie in (``results/<output>/<call>/...``)."""
    return {parts[2] for e in record.files if len(parts := e.path.split("/")) == 4}


def _run_tasks(tool: Tool, reader: RunReader, payload: tuple, shards: list[int], probe=None):
    """Run the tool's Ray tasks (or live actors); (their files, units of work).
    ``probe``: the driver's store probe, checked by each task before it writes."""
    import ray

    from arrakis_ray.ray_session import ray_errors

    with ray_errors(f"tool {tool.name}"):  # a failure in a task becomes one line
        if tool.scope == "live":
            from arrakis_ray.live.runner import run_live

            return run_live(tool, reader, payload, probe)
        if tool.scope == "run":
            whole = ray.remote(_run_whole).options(num_cpus=1).remote(*payload, probe=probe)
            return ray.get(whole), len(shards)  # it reads every shard
        refs: list = []
        try:
            if tool.reduce is not None:
                partial = ray.remote(_partial_shard).options(num_cpus=0.5)
                refs += _map(partial, payload, shards, probe)
                reduce = ray.remote(_reduce).options(num_cpus=1)
                refs.append(reduce.remote(*payload, *refs, probe=probe))
                return ray.get(refs[-1]), len(shards)
            refs += _map(ray.remote(_run_shard).options(num_cpus=0.5), payload, shards, probe)
            return [e for entries in ray.get(refs) for e in entries], len(shards)
        except BaseException:
            _stop(refs)
            raise


def _stop(refs: list) -> None:
    """Cancel the tasks still running after one failed, and wait for them: the call's
    files are removed next, and a task still writing would leave one behind."""
    import ray

    for ref in refs:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # finished or already failed: nothing to cancel
            pass
    ray.wait(refs, num_returns=len(refs), timeout=60)


def harvest_hint(missing: list[str]) -> list[str]:
    """The harvest hook globs that would have captured ``missing`` hook names."""
    return [harvest_glob(f) for f in sorted({hook_family(h) for h in missing})]


def _map(task, payload: tuple, shards: list[int], probe=None) -> list:
    """Submit ``task(*payload, shard, probe=probe)`` for every shard, at most
    MAX_IN_FLIGHT running.

    Returns the object refs in shard order; results stay in Ray's object store.
    """
    import ray

    refs, running = [], []
    for shard in shards:
        if len(running) >= MAX_IN_FLIGHT:
            _, running = ray.wait(running, num_returns=1)
        ref = task.remote(*payload, shard, probe=probe)
        refs.append(ref)
        running.append(ref)
    return refs


def _context(
    tool_cls: type[Tool],
    params: dict,
    store_root: StorePath,
    run_id: str,
    call: str,
    reducing=False,
    probe=None,
):
    """(tool, reader, model-or-None) inside a worker, once it has checked the driver's
    store probe (``placement.check_probe``): nothing is read or written on a node that
    cannot see the store."""
    from arrakis_ray.harvest.placement import check_probe

    check_probe(store_root, probe)
    reader = RunReader(RunLayout(store_root, run_id))
    reader.call = call
    tool = make_tool(tool_cls, params)
    wanted = tool.reduce_needs_weights if reducing else tool.needs_weights
    model_config = json.dumps(to_dict(reader.manifest.model_config), sort_keys=True)
    return tool, reader, _model(model_config) if wanted else None


def shard_inputs(tool, reader: RunReader, shard: int) -> ShardInputs:
    """What ``compute_shard`` reads for one shard (the bench's in-process runs too)."""
    families = sorted({hook_family(h) for h in tool.required_hooks(reader.manifest)})
    return ShardInputs(
        run_id=reader.run_id,
        shard=shard,
        manifest=reader.manifest,
        activations={f: reader.activations(f, shard) for f in families},
        tokens=reader.tokens(shard),
        vocab=reader.vocab,
    )


def _run_shard(
    tool_cls: type[Tool],
    params: dict,
    store_root: StorePath,
    run_id: str,
    call: str,
    shard: int,
    probe=None,
) -> list[FileEntry]:
    """A Ray task: compute one shard's result rows and write them; returns the files."""
    tool, reader, model = _context(tool_cls, params, store_root, run_id, call, probe=probe)
    result = tool.compute_shard(shard_inputs(tool, reader, shard), model)
    return write_outputs(tool, reader.layout, result, shard, call)


def _partial_shard(
    tool_cls: type[Tool],
    params: dict,
    store_root: StorePath,
    run_id: str,
    call: str,
    shard: int,
    probe=None,
):
    """A Ray task: write one shard's final outputs; return its partials for ``reduce``
    and the files written."""
    tool, reader, model = _context(tool_cls, params, store_root, run_id, call, probe=probe)
    result = as_outputs(tool, tool.compute_shard(shard_inputs(tool, reader, shard), model))
    reduced = tool.output_names() if tool.reduced_outputs is None else tool.reduced_outputs
    final = {name: table for name, table in result.items() if name not in reduced}
    files = write_outputs(tool, reader.layout, final, shard, call) if final else []
    return {name: table for name, table in result.items() if name in reduced}, files


def _reduce(
    tool_cls: type[Tool],
    params: dict,
    store_root: StorePath,
    run_id: str,
    call: str,
    *partials,
    probe=None,
) -> list[FileEntry]:
    """A Ray task: combine every shard's partials into the final tables and write them;
    returns every file of the call (the shards' final outputs too)."""
    tool, reader, model = _context(
        tool_cls, params, store_root, run_id, call, reducing=True, probe=probe
    )
    shard_files = [e for _part, files in partials for e in files]
    partials = [part for part, _files in partials]
    names = {name for part in partials for name in part}
    by_output = {name: [part[name] for part in partials if name in part] for name in names}
    result = tool.reduce(by_output, reader.manifest, model)
    return shard_files + write_outputs(tool, reader.layout, result, 0, call)


def _run_whole(
    tool_cls: type[Tool], params: dict, store_root: StorePath, run_id: str, call: str, probe=None
) -> list[FileEntry]:
    """A Ray task: a run-scope tool's whole computation."""
    tool, reader, model = _context(tool_cls, params, store_root, run_id, call, probe=probe)
    return write_outputs(tool, reader.layout, tool.compute_run(reader, model), 0, call)


def as_outputs(tool, result) -> dict:
    """A tool's result as {output: table}, its outputs checked against its declaration."""
    if isinstance(result, dict):
        unknown = set(result) - set(tool.output_names())
        if unknown:
            raise ToolError(f"tool {tool.name} returned undeclared outputs {sorted(unknown)}")
        return result
    return {tool.output_names()[0]: result}


def write_outputs(tool, layout, result, shard: int, call: str) -> list[FileEntry]:
    """Write each output table of ``result``; returns the files' inventory entries."""
    writer = RunWriter.for_layout(layout)
    return [
        writer.write_result(
            output, shard, table, tool.result_schema(output), tool.schema_version, call
        )
        for output, table in as_outputs(tool, result).items()
    ]


@lru_cache(maxsize=2)
def _model(model_config_json: str):
    """The run's model, loaded once per worker process."""
    from arrakis_ray.harvest.model_source import load_model

    config = build_dataclass(ModelConfig, json.loads(model_config_json), "manifest", "model")
    return load_model(config, device="cpu")
