"""A run's manifest: a typed, versioned record of what the run is and how it went.

``manifest.json`` (schema: ``schemas/manifest.v2.schema.json``) is written by the harvest
driver alone. It holds the model's shape, the hooks, the shard plan, the stages, the
status, the timings, the fingerprints and the resolved config, so anything in the
store explains itself. Tools do not rewrite it: each tool call records itself in its
own file ``tools/<tool>.json`` beside it, written atomically. Two ``analyze`` calls on
one run at once therefore never lose each other's record, on a local disk or on an
object store, which has no locks. ``read_manifest`` joins the two.

A version-1 manifest (before this type existed) is upgraded on read, in memory; when
the harvest next rewrites it (a resume), its inline tool records move to ``tools/``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import types
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from arrakis_ray.config import ModelConfig, build_dataclass, to_dict
from arrakis_ray.errors import ConfigError, StoreError
from arrakis_ray.hooks import family_spec
from arrakis_ray.store.atomic import atomic_open
from arrakis_ray.store.inventory import FileEntry, read_json
from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.manifest_v1 import upgrade_v1

log = logging.getLogger(__name__)

MANIFEST_VERSION = 2

Status = Literal["running", "complete", "failed"]


@dataclass(frozen=True)
class ModelShape:
    """The model's shape: all a tool, a planner or a reader needs to know of it."""

    arch: str
    """Architecture (gpt2, llama, ...): which adapter maps its modules."""
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    """Key/value heads (fewer than n_heads under grouped-query attention)."""
    d_head: int
    d_vocab: int
    norm: Literal["layernorm", "rmsnorm", "none"]
    """LayerNorm (centres, may have a bias), RMSNorm (scales only), or none (a custom
    model without norms)."""
    positional: Literal["learned", "rotary", "none"]
    """Learned position embeddings (hook_pos_embed exists), rotary, or none (a custom
    model that takes no positions, or says it adds them some other way)."""
    parallel_blocks: bool
    """Attention and MLP both read resid_pre (then there is no resid_mid)."""


def family_width(shape: ModelShape, family: str) -> int | None:
    """Length of one stored vector of a hook family (None for attention patterns)."""
    dims = {"d_model": shape.d_model, "d_mlp": shape.d_mlp, "d_head": shape.d_head}
    return family_spec(family).width_in({**dims, "d_vocab": shape.d_vocab})


@dataclass(frozen=True)
class Shard:
    """A contiguous range of input documents in one file: the unit of work and resume."""

    shard: int
    file: str
    format: str
    offset: int
    """Byte offset (jsonl, text) or row offset (parquet, npy) of the first document."""
    count: int
    """Documents in the shard."""
    first_doc: int
    """Global id of the first document."""

    def to_dict(self) -> dict:
        return to_dict(self)


@dataclass(frozen=True)
class DataInfo:
    """Where the run's documents came from."""

    path: str
    fingerprint: str
    n_documents: int
    n_sequences: int
    """Sequences harvested (in packed mode known once the harvest has tokenized)."""
    n_shards: int


@dataclass(frozen=True)
class HarvestCall:
    """One ``harvest`` call that did work on the run (a resumed run has several),
    rebuilt from the shard inventories: a killed call counts the shards it finished."""

    finished_at: str
    shards: int
    tokens: int
    bytes: int
    sequences: int
    seconds: float
    """Wall time; for a call killed before it could record it, its start to its last
    finished shard."""
    started_at: str | None = None
    """The call's id in the inventories (None: a call recorded before inventories)."""


@dataclass(frozen=True)
class HarvestRecord:
    """The harvest's progress and cost over all its calls."""

    predicted_max_bytes: int
    resumed: bool = False
    calls: tuple[HarvestCall, ...] = ()

    @property
    def n_tokens(self) -> int:
        return sum(c.tokens for c in self.calls)

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.calls)

    @property
    def seconds(self) -> float:
        return round(sum(c.seconds for c in self.calls), 3)

    @property
    def tokens_per_s(self) -> float | None:
        return round(self.n_tokens / self.seconds, 1) if self.seconds else None


@dataclass(frozen=True)
class ToolRecord:
    """One tool's last call on the run (``tools/<tool>.json``)."""

    params: dict[str, Any]
    outputs: tuple[str, ...]
    schema_version: int
    shards: int
    rows: int
    seconds: float
    finished_at: str
    files: tuple[FileEntry, ...] = ()
    """The result files the call wrote (its inventory: ``store/inventory.py``)."""


@dataclass(frozen=True)
class RunManifest:
    """Everything that explains one run (``runs/<run_id>/manifest.json``)."""

    run_id: str
    name: str
    status: Status
    created_at: str
    config: dict[str, Any]
    """The resolved pipeline config (``config.to_dict``)."""
    hooks: tuple[str, ...]
    """Concrete hook names harvested, in the model's order."""
    shape: ModelShape
    model_source: str
    """zoo:NAME, a local path, or random:ARCH."""
    model_fingerprint: str
    data: DataInfo
    shard_plan: tuple[Shard, ...]
    stages: tuple[tuple[int, ...], ...]
    """[start, stop) block ranges, one per pipeline stage."""
    schemas: dict[str, Any]
    """Table name -> the schema version this arrakis-ray writes, for every known table."""
    harvest: HarvestRecord
    versions: dict[str, Any]
    """Package versions of the harvest."""
    updated_at: str | None = None
    error: str | None = None
    """Why the last harvest call failed (status "failed")."""
    shards_per_part: int | None = None
    """Set once the run's activations are compacted: every ``layer=L/block=B`` directory
    then holds ``part-NNNNN.parquet`` files of this many consecutive shards each, instead
    of one file per shard (``store/compact.py``)."""
    results: dict[str, Any] = field(default_factory=dict)
    """Tool name -> ToolRecord, joined from ``tools/*.json`` on read."""
    version: int = MANIFEST_VERSION

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    def stage_of_layer(self, layer: int) -> int | None:
        """The pipeline stage holding block ``layer`` (None outside the blocks)."""
        for i, (start, stop) in enumerate(self.stages):
            if start <= layer < stop:
                return i
        return None

    @property
    def model_config(self) -> ModelConfig:
        """The model section of the run's config, typed: how to load the model again."""
        try:
            return build_dataclass(ModelConfig, self.config.get("model"), "manifest", "model")
        except ConfigError as exc:
            raise StoreError(f"run {self.run_id}: corrupt manifest: {exc}") from None

    @property
    def kept_columns(self) -> tuple[str, ...]:
        """Input columns stored in the run's documents table (``data.keep_columns``)."""
        return tuple((self.config.get("data") or {}).get("keep_columns") or ())

    @property
    def data_path(self) -> str | None:
        """The run's input data (``data.path``, resolved): a live tool's default prompts."""
        return (self.config.get("data") or {}).get("path")

    @property
    def context_length(self) -> int | None:
        """Tokens per harvested sequence (``data.context_length``)."""
        return (self.config.get("data") or {}).get("context_length")

    def with_changes(self, **changes: Any) -> RunManifest:
        """A copy with some fields replaced (manifests are immutable values)."""
        return replace(self, **changes)

    def to_json(self) -> dict:
        """The JSON object written to ``manifest.json`` (plus derived harvest totals)."""
        data = to_dict(self)
        data.pop("results")  # lives in tools/*.json
        h = self.harvest
        data["harvest"].update(
            n_tokens=h.n_tokens, bytes=h.bytes, seconds=h.seconds, tokens_per_s=h.tokens_per_s
        )
        return data

    @classmethod
    def from_json(cls, data: Any, where: str) -> RunManifest:
        """Parse a manifest object (version 1 or 2); StoreError naming ``where`` and the field."""
        if not isinstance(data, dict):
            raise StoreError(f"{where}: corrupt manifest (a JSON object expected)")
        version = data.get("version", 1)
        if not isinstance(version, int) or version > MANIFEST_VERSION:
            raise StoreError(
                f"{where}: manifest version {version!r} is newer than this arrakis-ray "
                f"(knows up to {MANIFEST_VERSION}); upgrade arrakis-ray to read this run"
            )
        if version == 1:
            data = upgrade_v1(data, where)
        data = dict(data)
        harvest = dict(data.get("harvest") or {})
        for derived in ("n_tokens", "bytes", "seconds", "tokens_per_s"):
            harvest.pop(derived, None)
        data["harvest"] = harvest
        try:
            return build_dataclass(cls, data, where, "")
        except ConfigError as exc:
            raise StoreError(f"corrupt manifest: {exc}") from None


def write_manifest(layout: RunLayout, manifest: RunManifest) -> None:
    """Write the run's manifest atomically (sorted keys, indent 2). Harvest driver only."""
    path = layout.manifest_path
    try:
        text = json.dumps(manifest.to_json(), sort_keys=True, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise StoreError(f"{path}: manifest is not JSON-serialisable ({e})") from None
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    for tool, record in manifest.results.items():  # a version-1 manifest's inline records
        if not layout.tool_record_path(tool).exists():
            write_tool_record(layout, tool, record)


def read_manifest(layout: RunLayout) -> RunManifest:
    """The run's manifest with its tool records; StoreError naming the file if it is
    missing or corrupt."""
    path = layout.manifest_path
    data = read_json(path, "manifest", f"manifest is missing (run {layout.run_id!r})")
    manifest = RunManifest.from_json(data, str(path))
    # a version-1 manifest kept its tool records inline
    results = {name: _tool_record(raw, str(path)) for name, raw in manifest.results.items()}
    return replace(manifest, results=results | read_tool_records(layout))


def read_tool_records(layout: RunLayout) -> dict[str, ToolRecord]:
    """Every tool's record on the run (``tools/*.json``), by record key (``record_key``:
    the tool's name, or ``<tool>.<variant>``)."""
    results = {}
    if layout.tool_records_dir.is_dir():
        for record_path in sorted(layout.tool_records_dir.glob("*.json")):
            try:  # one bad record must not make the run unreadable
                data = read_json(record_path, "tool record")
                results[record_path.stem] = _tool_record(data, str(record_path))
            except StoreError as exc:
                log.warning("%s (record skipped)", exc)
    return results


def record_key(tool: str, variant: str | None = None) -> str:
    """The name of a tool's record on a run: ``<tool>`` for the run's own call of it,
    ``<tool>.<variant>`` for one parameter setting among several (a sweep's, which shares
    the harvest between settings: ``tools/runner.tool_variant``)."""
    return tool if variant is None else f"{tool}.{variant}"


def split_record_key(key: str) -> tuple[str, str | None]:
    """(tool, variant or None) of a record's name (tool names hold no dot)."""
    tool, dot, variant = key.partition(".")
    return tool, (variant if dot else None)


def write_tool_record(layout: RunLayout, tool: str, record: ToolRecord) -> None:
    """Record one tool call under its record key (atomically, in its own file: no lock
    needed)."""
    path = layout.tool_record_path(tool)
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(to_dict(record), sort_keys=True, indent=2) + "\n")


def _tool_record(data: Any, where: str) -> ToolRecord:
    try:
        return build_dataclass(ToolRecord, data, where, "")
    except ConfigError as exc:
        raise StoreError(f"corrupt tool record: {exc}") from None


def json_schema() -> dict:
    """The JSON Schema of ``manifest.json`` (``schemas/manifest.v2.schema.json`` is this,
    written out; a test keeps the two equal)."""
    import typing

    def of(hint: Any) -> dict:
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            inner = [a for a in args if a is not type(None)]
            return {"anyOf": [of(inner[0]), {"type": "null"}]}
        if origin is Literal:
            return {"enum": list(args)}
        if origin is tuple:
            return {"type": "array", "items": of(args[0])}
        if origin is dict:
            return {"type": "object"}
        if dataclasses.is_dataclass(hint):
            hints = typing.get_type_hints(hint)
            fields = dataclasses.fields(hint)
            return {
                "type": "object",
                "description": (hint.__doc__ or "").strip(),
                "properties": {f.name: of(hints[f.name]) for f in fields},
                "required": [
                    f.name
                    for f in fields
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                ],
                "additionalProperties": False,
            }
        return {int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"},
                bool: {"type": "boolean"}, Any: {}}[hint]  # fmt: skip

    schema = of(RunManifest)
    del schema["properties"]["results"]  # in tools/<tool>.json, not in manifest.json
    schema["properties"]["version"] = {"const": MANIFEST_VERSION}
    schema["properties"]["harvest"]["properties"].update(
        n_tokens={"type": "integer"},
        bytes={"type": "integer"},
        seconds={"type": "number"},
        tokens_per_s={"anyOf": [{"type": "number"}, {"type": "null"}]},
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"arrakis-ray run manifest, version {MANIFEST_VERSION}",
        **schema,
        "$defs": {"tool_record": of(ToolRecord)},
    }
