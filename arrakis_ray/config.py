"""Pipeline configuration: typed, frozen, validated in one place.

A pipeline file (``pipelines/*.yaml``) becomes one frozen ``PipelineConfig``. Every
error names the file and the dotted field (``pipelines/demo.yaml: harvest.batch_size:
expected a positive integer, got 'abc'``) and suggests close matches for unknown keys.
The config is never mutated after loading: derived values (resolved hook names, the
run id) live in the manifest, not here.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from arrakis_ray.errors import ConfigError
from arrakis_ray.strict_yaml import read_strict_yaml

Dtype = Literal["float32", "float16", "bfloat16"]
StorageDtype = Literal["float16", "float32"]


@dataclass(frozen=True)
class ModelConfig:
    """Which model to hook. Exactly one of ``zoo``, ``path``, ``arch`` or ``factory``."""

    zoo: str | None = None
    """Name of a model shipped with arrakis-ray (``facts-gpt2``); needs no download."""
    path: str | None = None
    """Local directory holding an HF checkpoint (``save_pretrained`` output)."""
    arch: str | None = None
    """Random-init architecture (gpt2, gpt-neo, gpt-neox, llama, gemma, phi3, qwen2,
    mistral, stablelm); sizes come from ``config``."""
    factory: str | None = None
    """A custom torch model: ``package.module:function`` returning a ``TorchModel``
    (``arrakis_ray/models/custom.py``); ``config`` holds its keyword arguments."""
    checkpoint: str | None = None
    """State dict of a ``factory`` model (.safetensors or .pt; relative paths are relative
    to the pipeline file). None: random init from ``seed``."""
    config: dict[str, Any] = field(default_factory=dict)
    """HF config overrides for ``arch`` (e.g. ``num_hidden_layers: 4``), or the
    ``factory``'s keyword arguments."""
    tokenizer: str | None = None
    """Tokenizer for texts: a local directory or ``zoo:NAME``. Defaults to the one saved
    with a zoo/path model; required for ``arch`` and ``factory`` models."""
    seed: int = 0
    """Seed of the random init (``arch``, or ``factory`` without a checkpoint)."""
    dtype: Dtype = "float32"
    """Dtype the model computes in."""

    def __post_init__(self) -> None:
        given = [k for k in ("zoo", "path", "arch", "factory") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of zoo, path, arch or factory (got {', '.join(given) or 'none'})"
            )
        if self.config and not (self.arch or self.factory):
            raise ValueError("config applies only to an 'arch' or a 'factory' model")
        if self.checkpoint and not self.factory:
            raise ValueError("checkpoint applies only to a 'factory' model (use path for HF)")


@dataclass(frozen=True)
class DataConfig:
    """Where the documents come from and how they become token sequences."""

    path: str
    """A .jsonl, .parquet, .txt or .npy file, or a directory of them (relative paths are
    relative to the pipeline file). A .npy file is a 2-D integer array of token ids, one
    document per row."""
    text_column: str = "text"
    """Column holding the document text (jsonl/parquet)."""
    token_column: str | None = None
    """Column holding pre-tokenized documents, lists of token ids (jsonl/parquet); when
    set, the texts are not read. BOS is prepended unless a list starts with it, as for
    texts. None: documents are texts (a .npy file always holds token ids)."""
    keep_columns: tuple[str, ...] = ()
    """Columns of the input documents stored with the run, one value per document
    (table ``documents``): labels such as relation or subject. jsonl/parquet only."""
    context_length: int = 128
    """Tokens per sequence (BOS included); in document mode longer documents are cut."""
    mode: Literal["document", "packed"] = "document"
    """document: one sequence per document (truncated, padded in batches, padding never
    stored). packed: documents joined as <bos> text <eos> and cut into full sequences."""
    max_documents: int | None = None
    """Use only the first N documents (None: all)."""

    def __post_init__(self) -> None:
        if self.context_length < 2:
            raise ValueError("context_length must be at least 2")
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError("max_documents must be positive")
        if self.token_column is not None and self.text_column != "text":
            raise ValueError("give text_column or token_column, not both")
        repeated = sorted({c for c in self.keep_columns if self.keep_columns.count(c) > 1})
        if repeated:
            raise ValueError(f"keep_columns: {', '.join(repeated)} given more than once")


@dataclass(frozen=True)
class HarvestConfig:
    """What to capture and how to spread the work over Ray actors."""

    hooks: tuple[str, ...]
    """Hook names or globs (``blocks.*.hook_resid_post``)."""
    batch_size: int = 16
    """Sequences per forward pass."""
    shard_size: int | None = None
    """Documents per shard: the unit of work, of output files and of resume. None (the
    default): sized for ~128 MiB of activations per shard (``harvest.plan.auto_shard_size``)."""
    actors: int = 1
    """Model replicas (Ray actors), each holding the whole model."""
    num_gpus_per_actor: float = 0.0
    """GPUs per actor (1 on GPU clusters; 0 runs on CPU)."""
    num_cpus_per_actor: float = 0.5
    """CPUs reserved per actor; fractional so the write stage is not starved."""
    storage_dtype: StorageDtype = "float16"
    """Dtype of stored activations (attention patterns are always float32). bfloat16 has
    no Parquet type: float16 holds a bfloat16 model's values exactly for |x| in [6.1e-5,
    65504] and rounds smaller ones (error at most 3e-8); a run with larger values is
    refused. float32 stores every model dtype exactly."""
    max_bytes: int | None = None
    """Refuse to start a run whose predicted size exceeds this many bytes."""
    stages: int = 1
    """Pipeline stages: the model's blocks split into this many contiguous ranges, one
    actor and device each, for models too large for one device. 1: whole replicas."""
    layer_ranges: tuple[tuple[int, ...], ...] = ()
    """Explicit stage ranges instead of stages: [[0, 10], [10, 24]] (start, stop)."""
    spread_stages: bool = False
    """Place each stage's actors on nodes of their own (a STRICT_SPREAD placement group:
    every stage actor on a different node), e.g. one stage per GPU node. false: Ray
    places them where resources are free, several stages may share a node."""
    compact: bool = True
    """Once every shard is harvested, merge each (layer, column block)'s small shard
    files into ~512 MiB parts, so that a query opens few footers (store/compact.py).
    false: keep one file per shard."""

    def __post_init__(self) -> None:
        if not self.hooks:
            raise ValueError("hooks: name at least one hook point")
        if self.layer_ranges and self.stages != 1:
            raise ValueError("give stages or layer_ranges, not both")
        for name in ("batch_size", "shard_size", "actors", "stages"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        for name in ("num_gpus_per_actor", "num_cpus_per_actor"):
            # not (x >= 0): a NaN compares false with everything
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number >= 0")


# fields renamed since a release: (dataclass, old name) -> new name
RENAMED_FIELDS: dict[tuple[type, str], str] = {(HarvestConfig, "model_shards"): "stages"}


@dataclass(frozen=True)
class ToolRun:
    """One analysis tool to run after the harvest."""

    tool: str
    """Tool name (``arrakis-ray tools`` lists them)."""
    params: dict[str, Any] = field(default_factory=dict)
    """Tool parameters."""


@dataclass(frozen=True)
class PipelineConfig:
    """A whole pipeline: model, data, harvest, then tools."""

    name: str
    """Human-readable name, shown in the ``runs`` view."""
    model: ModelConfig
    data: DataConfig
    harvest: HarvestConfig
    analyze: tuple[ToolRun, ...] = ()
    """Tools to run over the harvested run, in order."""
    source: str = "<dict>"
    """Where this config was read from (for error messages)."""


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline YAML file; relative paths (``data.path``,
    ``model.checkpoint``, ``model.tokenizer``, a tool's ``prompts`` or ``path``) resolve
    against it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: pipeline file not found")
    raw = read_strict_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    raw = dict(raw)
    if isinstance(raw.get("data"), dict):
        raw["data"] = resolve_data_path(raw["data"], path.parent)
    if isinstance(raw.get("model"), dict):
        raw["model"] = resolve_model_paths(raw["model"], path.parent)
    steps = raw.get("analyze")
    if isinstance(steps, list):  # a live tool's prompts file, like data.path
        raw["analyze"] = [resolve_prompts(step, path.parent) for step in steps]
    return pipeline_from_dict(raw, source=str(path))


def resolve_data_path(data: dict, base: Path) -> dict:
    """A pipeline's ``data`` section with its relative ``path`` resolved against ``base``,
    the pipeline's (or sweep's) directory."""
    if isinstance(data.get("path"), str) and not Path(data["path"]).is_absolute():
        return {**data, "path": str((base / data["path"]).resolve())}
    return data


FILE_PARAMS = ("prompts", "path")
"""Tool parameters that name a file: relative ones resolve against the pipeline file."""


def resolve_prompts(step: Any, base: Path) -> Any:
    """An analyze step (a dict) with its relative file parameters (``params.prompts``,
    ``params.path``) resolved against ``base``, the pipeline's (or sweep's) directory."""
    params = step.get("params") if isinstance(step, dict) else None
    if not isinstance(params, dict):
        return step
    resolved = dict(params)
    for name in FILE_PARAMS:
        value = params.get(name)
        if isinstance(value, str) and not Path(value).is_absolute() and "://" not in value:
            resolved[name] = str((base / value).resolve())
    return step if resolved == params else {**step, "params": resolved}


def resolve_model_paths(model: dict, base: Path) -> dict:
    """A pipeline's ``model`` section with its relative ``checkpoint`` and ``tokenizer``
    (not ``zoo:NAME``) resolved against ``base``, the pipeline's (or sweep's) directory."""
    resolved = dict(model)
    for name in ("checkpoint", "tokenizer"):
        value = model.get(name)
        if isinstance(value, str) and not value.startswith("zoo:") and "://" not in value:
            if value and not Path(value).expanduser().is_absolute():
                resolved[name] = str((base / value).resolve())
    return resolved


def pipeline_from_dict(raw: dict[str, Any], source: str = "<dict>") -> PipelineConfig:
    """Validate a plain dict (as parsed from YAML) into a ``PipelineConfig``."""
    return build_dataclass(PipelineConfig, {**raw, "source": source}, source, "")


def to_dict(config: Any) -> Any:
    """A config as plain JSON-able data (for manifests and hashing)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, tuple | list):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def build_dataclass(cls: type, raw: Any, source: str, where: str) -> Any:
    """Build dataclass ``cls`` from ``raw``, checking keys and types field by field.

    Used for pipeline files and for tool parameters alike; errors name ``source`` and
    the dotted field path ``where``.
    """
    label = where or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {label}: expected a mapping, got {show_value(raw)}")
    hints, fields = field_types(cls)
    for key in raw:
        renamed = RENAMED_FIELDS.get((cls, key))
        if renamed is not None:
            raise ConfigError(f"{source}: {_join(where, key)}: renamed to {_join(where, renamed)}")
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=2)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            allowed = ", ".join(n for n in fields if n != "source")
            raise ConfigError(
                f"{source}: {_join(where, key)}: unknown field{hint}; allowed: {allowed}"
            )
    values = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: {_join(where, name)}: required field is missing")
            continue
        values[name] = _coerce(hints[name], raw[name], source, _join(where, name))
    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(f"{source}: {label}: {exc}") from None


@functools.cache
def field_types(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field]]:
    """A dataclass's resolved type hints and fields, once per class: resolving the string
    annotations dominated parsing a store's thousands of inventory entries."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def _coerce(hint: Any, value: Any, source: str, where: str) -> Any:
    """Check ``value`` against a type hint, converting lists to tuples."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, source, where)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint_text = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"{source}: {where}: {show_value(value)} is not one of "
                f"{', '.join(map(str, args))}{hint_text}"
            )
        return value
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, source, where)
    if origin is tuple:
        items = [value] if isinstance(value, str | dict) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{source}: {where}: expected a list, got {show_value(value)}")
        return tuple(_coerce(args[0], v, source, f"{where}[{i}]") for i, v in enumerate(items))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where}: expected a mapping, got {show_value(value)}")
        _check_plain(value, source, where)
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {where}: expected true or false, got {show_value(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {where}: expected an integer, got {show_value(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {where}: expected a number, got {show_value(value)}")
        _check_plain(value, source, where)
        return float(value)
    if hint is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(
                f"{source}: {where}: expected a non-empty string, got {show_value(value)}"
            )
        return value
    if hint is Any:
        _check_plain(value, source, where)
        return value
    raise TypeError(f"unsupported config type {hint!r} at {where}")  # a bug, not user input


def _check_plain(value: Any, source: str, where: str) -> None:
    """Refuse what a free-form value (``model.config``, tool params) may not hold: a
    non-finite number (YAML's ``.nan``, ``.inf``, which JSON manifests cannot store and
    no size or rate means), or a mapping key that is not text (HF config overrides and
    tool parameters are keywords)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: {where}: expected a finite number, got {value}")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{source}: {_join(where, str(key))}: keys must be text")
            _check_plain(item, source, _join(where, key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, source, f"{where}[{i}]")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def show_value(value: Any) -> str:
    """A value as a config error message shows it: its repr, cut at 60 characters."""
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."
