"""Dotted paths of a sweep (``harvest.batch_size``, ``analyze.0.params.k``): checked
against the pipeline's dataclasses and the base pipeline's analyze steps, then set in
a pipeline dict.

A path names a field of ``PipelineConfig`` and its sections; an analyze step by index
or by its tool's name when one step of the base runs it; a tool parameter by its name
in the tool's ``Params``. Free-form fields (``model.config``) take any key below them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

from arrakis_ray.config import (
    PipelineConfig,
    ToolRun,
    field_types,
    resolve_data_path,
    resolve_model_paths,
    resolve_prompts,
)
from arrakis_ray.errors import ConfigError

Key = tuple[str | int, ...]
"""A dotted path resolved against the base pipeline: an analyze step as its index."""


def check_overlaps(labelled: list[tuple[Key, str]], source: str) -> None:
    """Refuse a field set twice, or a field and a part of it (``data`` and ``data.path``);
    ``labelled``: (key, where the sweep file sets it)."""
    for i, (key, label) in enumerate(labelled):
        for other, other_label in labelled[:i]:
            n = min(len(key), len(other))
            if key[:n] == other[:n]:
                raise ConfigError(
                    f"{source}: {label}: sets what {other_label} sets; give each field once"
                )


def resolve_path(path: Any, base_raw: dict, source: str, label: str) -> Key:
    """A dotted path checked against the pipeline's dataclasses and the base's analyze
    steps; ConfigError naming the sweep file and ``label`` if it addresses nothing."""
    if not isinstance(path, str) or not path or any(not p for p in path.split(".")):
        raise ConfigError(f"{source}: {label}: not a dotted path (like harvest.batch_size)")
    parts = path.split(".")
    cls: type = PipelineConfig
    key: list[str | int] = []
    i = 0
    while i < len(parts):
        part, here = parts[i], ".".join(parts[: i + 1])
        hints, fields = field_types(cls)
        names = [n for n in fields if not (cls is PipelineConfig and n == "source")]
        if part not in names:
            close = difflib.get_close_matches(part, names, n=2)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ConfigError(
                f"{source}: {label}: {here}: no such field{hint}; allowed: {', '.join(names)}"
            )
        key.append(part)
        hint = _unwrap(hints[part])
        if cls is PipelineConfig and part == "analyze" and i + 1 < len(parts):
            key.append(_step_index(parts[i + 1], base_raw, source, label))
            cls, i = ToolRun, i + 2
            continue
        if cls is ToolRun and part == "params" and i + 1 < len(parts):
            key.append(_tool_param(parts[i + 1 :], base_raw, key[1], source, label))
            break
        if dataclasses.is_dataclass(hint):
            cls, i = hint, i + 1
            continue
        if hint is Any or typing.get_origin(hint) is dict:  # free-form (model.config)
            key.extend(parts[i + 1 :])
            break
        if i + 1 < len(parts):
            raise ConfigError(f"{source}: {label}: {here} has no fields: sweep it whole")
        i += 1
    return tuple(key)


def _unwrap(hint: Any) -> Any:
    """``X`` of ``X | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _step_index(selector: str, base_raw: dict, source: str, label: str) -> int:
    """An analyze step by index, or by tool name when one step of the base runs it."""
    steps = base_raw.get("analyze") or []
    tools = [s.get("tool") for s in steps]
    if selector.isdigit():
        if int(selector) >= len(steps):
            raise ConfigError(
                f"{source}: {label}: analyze.{selector}: the base pipeline has "
                f"{len(steps)} analyze step(s)"
            )
        return int(selector)
    found = [i for i, t in enumerate(tools) if t == selector]
    if not found:
        raise ConfigError(
            f"{source}: {label}: no analyze step of the base runs tool {selector!r} (its "
            f"steps: {', '.join(map(str, tools)) or 'none'})"
        )
    if len(found) > 1:
        raise ConfigError(
            f"{source}: {label}: tool {selector!r} runs at analyze steps "
            f"{', '.join(map(str, found))}: address one by index (analyze.{found[0]}...)"
        )
    return found[0]


def _tool_param(rest: list[str], base_raw: dict, step: int, source: str, label: str) -> str:
    """A parameter name of the base step's tool (checked against its Params)."""
    from arrakis_ray.tools.runner import tool_class

    tool = base_raw["analyze"][step]["tool"]
    names = [f.name for f in dataclasses.fields(tool_class(tool).Params)]
    if rest[0] not in names:
        close = difflib.get_close_matches(rest[0], names, n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        allowed = ", ".join(names) or "none"
        raise ConfigError(
            f"{source}: {label}: tool {tool} has no parameter {rest[0]!r}{hint}; its "
            f"parameters: {allowed}"
        )
    if len(rest) > 1:
        raise ConfigError(f"{source}: {label}: a tool parameter is swept whole")
    return rest[0]


def set_value(raw: dict, key: Key, value: Any) -> None:
    """Set ``value`` at ``key`` in a pipeline dict (a step by index), in place."""
    node: Any = raw
    for k in key[:-1]:
        if isinstance(k, str) and node.get(k) is None:
            node[k] = {}  # a section (or a step's params) the base leaves to defaults
        node = node[k]
    node[key[-1]] = value


def resolve_relative(raw: dict, keys: list[Key], base: Path) -> None:
    """Resolve the relative ``data.path``, ``model.checkpoint``/``tokenizer`` and tools'
    ``prompts``/``path`` that ``keys`` may set,
    against ``base`` (as ``config.load_pipeline`` does against a pipeline file)."""
    for key in keys:
        data = raw.get("data")
        if key[0] == "data" and key[1:2] in ((), ("path",)) and isinstance(data, dict):
            raw["data"] = resolve_data_path(data, base)
        model = raw.get("model")
        model_paths = ((), ("checkpoint",), ("tokenizer",))
        if key[0] == "model" and key[1:2] in model_paths and isinstance(model, dict):
            raw["model"] = resolve_model_paths(model, base)
        steps = raw.get("analyze")
        sets_prompts = key[2:] in ((), ("params",), ("params", "prompts"), ("params", "path"))
        if key[0] == "analyze" and isinstance(steps, list) and sets_prompts:
            for i in range(len(steps)) if len(key) == 1 else [key[1]]:
                steps[i] = resolve_prompts(steps[i], base)
