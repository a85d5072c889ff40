"""Sweep files: a base pipeline and the parameters to vary, expanded into validated configs.

A sweep file (``pipelines/sweeps/*.yaml``) follows W&B's sweep conventions::

    name: sae-k-by-layer
    base: demo_base.yaml               # a pipeline file, relative to this file
    method: grid                       # or random, with count (and seed, default 0)
    parameters:
      analyze.superposition_disentangler.params.k: {values: [4, 16]}
      data.max_documents: {value: 64}  # one value
    zip:                               # parameters that vary together: one grid axis
      - harvest.hooks: [[blocks.1.hook_resid_post], [blocks.3.hook_resid_post]]
        analyze.0.params.hook: [blocks.1.hook_resid_post, blocks.3.hook_resid_post]
    max_concurrent: 2                  # points run at once
    retries: 1                         # more tries of a failed point

A dotted path addresses the base pipeline's fields (``harvest.hooks``, ``model.zoo``),
an analyze step by index or by its tool's name when one step runs it
(``analyze.0.params.k``, ``analyze.logit_lens.params.include_embed``). Paths are checked
against the config's dataclasses (a tool parameter against the tool's ``Params``) when
the file is read; values when the sweep expands: every point is built and validated
(``pipeline_from_dict``, ``make_tool``) before anything runs, and every invalid point is
reported in one error naming the sweep file, the parameter, the value and the point.
Relative paths in values (``data.path``, a tool's ``prompts``) resolve against the
sweep file, those of the base against the base.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from arrakis_ray.config import (
    PipelineConfig,
    ToolRun,
    pipeline_from_dict,
    show_value,
)
from arrakis_ray.errors import ConfigError, ToolError
from arrakis_ray.strict_yaml import read_strict_yaml
from arrakis_ray.sweeps.paths import (
    Key,
    check_overlaps,
    resolve_path,
    resolve_relative,
    set_value,
)

SWEEP_KEYS = (
    "name",
    "base",
    "method",
    "parameters",
    "zip",
    "count",
    "seed",
    "max_concurrent",
    "retries",
    "report",
)
MAX_POINTS = 100_000  # a bigger grid is a typo (a list where a value was meant), not a plan
MAX_LISTED = 3  # invalid points' errors shown in the one message; the rest are counted
# stands in for the source while a point is validated: finds the field in the message
_MARK = "\x00point"


@dataclass(frozen=True)
class Axis:
    """One grid axis: one parameter, or a zip group whose parameters vary together."""

    paths: tuple[str, ...]
    """Dotted paths as written in the sweep file."""
    labels: tuple[str, ...]
    """Where each path is written (``parameters.<path>``, ``zip[0].<path>``)."""
    keys: tuple[Key, ...]
    """Each path resolved against the base pipeline."""
    settings: tuple[tuple[Any, ...], ...]
    """The axis's settings, each one value per path."""


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file (``load_sweep``); ``expand`` makes its points."""

    name: str
    source: str
    """The sweep file, as given (for messages)."""
    base: Path
    """The base pipeline file."""
    method: Literal["grid", "random"]
    parameters: dict[str, tuple[Any, ...]]
    """Dotted path -> its values, in spec order (zip groups' paths included)."""
    count: int | None
    """Points drawn by method random."""
    seed: int
    """Seed of method random's draws."""
    max_concurrent: int
    """Points run at once."""
    retries: int
    """Further tries of a failed point."""
    sweep_id: str
    """16 hex: sha256 of the parsed spec and the base pipeline's parsed content."""
    text: str = field(repr=False)
    """The sweep file's text."""
    axes: tuple[Axis, ...] = field(repr=False)
    """The grid axes in spec order (a zip group is one)."""
    base_raw: dict[str, Any] = field(repr=False, compare=False)
    """The base pipeline as a dict, its relative data and prompts paths resolved."""
    report: str | None = None
    """A study's report, ``package.module:function`` (``study.py``); None: no page."""

    @property
    def size(self) -> int:
        """How many points ``expand`` makes (duplicates included)."""
        if self.method == "random":
            return self.count or 0
        return int(np.prod([len(a.settings) for a in self.axes], dtype=object))


@dataclass(frozen=True)
class SweepPoint:
    """One expanded point: its swept values and its validated pipeline config."""

    index: int
    params: dict[str, Any]
    """Dotted path -> value, in spec order."""
    config: PipelineConfig


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file and its base pipeline (nothing is expanded yet)."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(f"{source}: sweep file not found")
    raw = read_strict_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    for key in raw:
        if key not in SWEEP_KEYS:
            close = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"{source}: {key}: unknown key{hint}; allowed: {', '.join(SWEEP_KEYS)}"
            )
    base, written_base, base_raw = _read_base(path, raw.get("base"))
    method = raw.get("method", "grid")
    if method not in ("grid", "random"):
        raise ConfigError(f"{source}: method: {show_value(method)} is not one of grid, random")
    count, seed = raw.get("count"), raw.get("seed", 0)
    if method == "grid":
        for key in ("count", "seed"):
            if key in raw:
                raise ConfigError(f"{source}: {key}: applies to method random only")
    elif count is None:
        raise ConfigError(f"{source}: count: method random needs count (points to draw)")
    else:
        _check_int(count, 1, source, "count")
        _check_int(seed, 0, source, "seed")
    axes: list[Axis] = []
    for key, value in raw.items():  # spec order: parameters and zip as the file lists them
        if key == "parameters":
            axes += _parameter_axes(value, source, base_raw)
        elif key == "zip":
            axes += _zip_axes(value, source, base_raw)
    check_overlaps([kl for a in axes for kl in zip(a.keys, a.labels, strict=True)], source)
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{source}: name: expected a non-empty string, got {show_value(name)}")
    sweep = Sweep(
        name=name,
        source=source,
        base=base,
        method=method,
        parameters={
            p: tuple(s[i] for s in a.settings) for a in axes for i, p in enumerate(a.paths)
        },
        count=count,
        seed=seed,
        max_concurrent=_check_int(raw.get("max_concurrent", 1), 1, source, "max_concurrent"),
        retries=_check_int(raw.get("retries", 0), 0, source, "retries"),
        sweep_id=sweep_id_of(raw, written_base),
        text=path.read_text(encoding="utf-8"),
        axes=tuple(axes),
        base_raw=base_raw,
        report=raw.get("report"),
    )
    if sweep.report is not None:
        from arrakis_ray.sweeps.study import report_function

        report_function(sweep.report, source)  # a typo fails before any run
    if sweep.size > MAX_POINTS:
        raise ConfigError(f"{source}: {sweep.size:,} points, over the limit of {MAX_POINTS:,}")
    return sweep


def sweep_id_of(spec: dict[str, Any], base: dict[str, Any]) -> str:
    """16 hex of a sweep's parsed spec (less the base's path: its content stands in) and
    its base pipeline as written: the same files, however formatted or commented or
    wherever they lie, give the same id."""
    content = {"sweep": {k: v for k, v in spec.items() if k != "base"}, "base": base}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_base(path: Path, base: Any) -> tuple[Path, dict, dict]:
    """(base path, its dict as written, its dict with relative paths resolved), the
    base checked as a pipeline of its own (errors name the base file)."""
    from arrakis_ray.tools.runner import make_tool

    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: give the base pipeline file (relative to the sweep)")
    base_path = Path(os.path.normpath(path.parent / base))
    if not base_path.is_file():
        raise ConfigError(f"{path}: base: pipeline file {base_path} not found")
    written = read_strict_yaml(base_path)
    if not isinstance(written, dict):
        raise ConfigError(f"{base_path}: expected a mapping at the top level")
    raw = copy.deepcopy(written)
    resolve_relative(raw, [("data",), ("model",), ("analyze",)], base_path.parent)
    config = pipeline_from_dict(raw, source=str(base_path))
    for i, step in enumerate(config.analyze):
        make_tool(step.tool, step.params, source=f"{base_path}: analyze.{i}")
    return base_path, written, raw


def _check_int(value: Any, low: int, source: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(
            f"{source}: {where}: expected an integer >= {low}, got {show_value(value)}"
        )
    return value


def _parameter_axes(params: Any, source: str, base_raw: dict) -> list[Axis]:
    if not isinstance(params, dict):
        raise ConfigError(
            f"{source}: parameters: expected a mapping of dotted paths to {{values: [...]}} "
            f"or {{value: x}}, got {show_value(params)}"
        )
    axes = []
    for path, spec in params.items():
        label = f"parameters.{path}"
        if not isinstance(spec, dict) or len(spec) != 1 or not {"values", "value"} >= set(spec):
            raise ConfigError(
                f"{source}: {label}: expected {{values: [...]}} or {{value: x}}, got "
                f"{show_value(spec)} (distributions are not supported: list the values)"
            )
        values = [spec["value"]] if "value" in spec else spec["values"]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: {label}.values: expected a non-empty list")
        key = resolve_path(path, base_raw, source, label)
        axes.append(Axis((path,), (label,), (key,), tuple((v,) for v in values)))
    return axes


def _zip_axes(groups: Any, source: str, base_raw: dict) -> list[Axis]:
    if not isinstance(groups, list) or not groups:
        raise ConfigError(
            f"{source}: zip: expected a list of groups, each a mapping of dotted paths to "
            "lists of equal length"
        )
    axes = []
    for g, group in enumerate(groups):
        where = f"zip[{g}]"
        if not isinstance(group, dict) or not group:
            raise ConfigError(f"{source}: {where}: expected a mapping of dotted paths to lists")
        for path, values in group.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{source}: {where}.{path}: expected a non-empty list")
        lengths = {path: len(values) for path, values in group.items()}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{p}: {n}" for p, n in lengths.items())
            raise ConfigError(
                f"{source}: {where}: lists of unequal lengths ({shown}); the parameters of "
                "a zip group vary together, one value each per point"
            )
        paths = tuple(group)
        labels = tuple(f"{where}.{p}" for p in paths)
        keys = tuple(
            resolve_path(p, base_raw, source, la) for p, la in zip(paths, labels, strict=True)
        )
        axes.append(Axis(paths, labels, keys, tuple(zip(*group.values(), strict=True))))
    return axes


def expand(sweep: Sweep) -> list[SweepPoint]:
    """Every point of the sweep as a validated config (grid: the cartesian product of
    the axes in spec order, the last varying fastest; random: ``count`` draws, with
    replacement, seeded). ConfigError listing the invalid points if any is."""
    sweep_dir = Path(sweep.source).parent
    keys = [k for a in sweep.axes for k in a.keys]
    points, failures = [], []
    tool_errors: dict[str, str | None] = {}  # a step's (tool, params) -> its error, if any
    for index, choice in enumerate(_choices(sweep)):
        raw = copy.deepcopy(sweep.base_raw)
        swept = []  # (label, key, path, value) of this point
        for axis, j in zip(sweep.axes, choice, strict=True):
            for path, label, key, value in zip(
                axis.paths, axis.labels, axis.keys, axis.settings[j], strict=True
            ):
                set_value(raw, key, copy.deepcopy(value))
                swept.append((label, key, path, value))
        resolve_relative(raw, keys, sweep_dir)
        try:
            config = pipeline_from_dict(raw, source=_MARK)
            for i, step in enumerate(config.analyze):
                text = json.dumps([step.tool, step.params], sort_keys=True, default=str)
                if text not in tool_errors:
                    tool_errors[text] = _tool_error(step)
                if tool_errors[text] is not None:
                    raise _PointError(*_where(tool_errors[text], f"analyze.{i}"))
        except ConfigError as exc:
            failures.append((index, *_where(str(exc), ""), swept))
            continue
        except _PointError as exc:
            failures.append((index, *exc.args, swept))
            continue
        params = {path: value for _label, _key, path, value in swept}
        points.append(
            SweepPoint(index, params, replace(config, source=_point_source(sweep, index)))
        )
    if failures:
        raise ConfigError(_failure_message(sweep, failures))
    return points


def _tool_error(step: ToolRun) -> str | None:
    from arrakis_ray.tools.runner import make_tool

    try:
        make_tool(step.tool, step.params, source=_MARK)
    except ToolError as exc:
        return str(exc)
    return None


def _point_source(sweep: Sweep, index: int) -> str:
    return f"{sweep.source} (point {index})"


def _choices(sweep: Sweep) -> list[tuple[int, ...]]:
    """Each point's setting index on every axis."""
    sizes = [len(a.settings) for a in sweep.axes]
    if sweep.method == "grid":
        return list(itertools.product(*(range(n) for n in sizes)))
    rng = np.random.default_rng(sweep.seed)
    # one column of draws per axis: uniform over the product without enumerating it
    columns = [rng.integers(0, n, size=sweep.count).tolist() for n in sizes]
    return list(zip(*columns, strict=True)) if columns else [()] * (sweep.count or 0)


class _PointError(Exception):
    """(where, reason) of a point's invalid tool step."""


def _where(text: str, prefix: str) -> tuple[str, str]:
    """(dotted field, reason) of a validation error raised with source ``_MARK``."""
    if _MARK not in text:  # raised before the parameters were read (an unknown tool)
        return prefix, text
    where, _, reason = text.split(f"{_MARK}: ", 1)[1].partition(": ")
    where = "" if where == "top level" else re.sub(r"\[(\d+)\]", r".\1", where)
    return ".".join(p for p in (prefix, where) if p), reason


def _failure_message(sweep: Sweep, failures: list) -> str:
    """One line: the sweep file, then each distinct error with the points it hits."""
    groups: dict[str, list[int]] = {}
    for index, where, reason, swept in failures:
        groups.setdefault(_blame(where, reason, swept), []).append(index)
    texts = [text.replace("{points}", _points(ix)) for text, ix in groups.items()]
    if len(texts) == 1:
        return f"{sweep.source}: {texts[0]}"
    more = len(texts) - MAX_LISTED
    tail = f"; and {more} more" if more > 0 else ""
    return (
        f"{sweep.source}: {len(failures)} of {sweep.size} points are invalid: "
        f"{'; '.join(texts[:MAX_LISTED])}{tail}"
    )


def _blame(where: str, reason: str, swept: list) -> str:
    """The error of a point, naming the swept parameter(s) of the field at fault."""
    at = tuple(int(p) if p.isdigit() else p for p in where.split(".")) if where else ()
    hits = [
        (label, path, value)
        for label, key, path, value in swept
        if key[: len(at)] == at or at[: len(key)] == key
    ]
    if len(hits) > 1:  # a reason that names one of their fields ("k must be ...") blames it
        named = [h for h in hits if re.search(rf"\b{re.escape(h[1].split('.')[-1])}\b", reason)]
        hits = named if len(named) == 1 else hits
    if len(hits) == 1:
        label, _path, value = hits[0]
        reason = reason.removesuffix(f", got {show_value(value)}")
        return f"{label}: value {show_value(value)} ({{points}}): {reason}"
    if hits:
        shown = ", ".join(f"{path}={show_value(value)}" for _label, path, value in hits)
        return f"parameters {shown} ({{points}}): {where}: {reason}"
    return f"{where or 'pipeline'} ({{points}}): {reason}"


def _points(indices: list[int]) -> str:
    shown = ", ".join(map(str, indices[:MAX_LISTED]))
    if len(indices) == 1:
        return f"point {shown}"
    more = len(indices) - MAX_LISTED
    return f"points {shown}" + (f" and {more} more" if more > 0 else "")
