"""An analysis tool on the bench's model, in this process, for small inputs (no Ray).

The registered tools read stored runs: a shard- or run-scope tool reads harvested
activation tables, a live tool reads a prompt table and runs the model again. To run
one on inputs given in Python, the inputs become a run of a temporary local store,
named ``live``, written exactly as a harvest writes one (the harvest's table builders,
``RunWriter``, a typed manifest, one shard), with the activations captured from the
bench's own HookedModel by the same stage forward the harvest actors run. The tool then
computes what the runner's Ray tasks would (``compute_shard`` per shard and ``reduce``,
``compute_run``, or ``prepare`` and ``compute_live`` per slice of ``items_per_task``
prompts on ``live_model_of(model)``), its tables are written and recorded as the runner
writes them, and read back. So a result here equals, row for row, what ``analyze``
gives on a stored harvest of the same inputs; only the run id (``live``) differs.

Token ids are taken as given. Texts are tokenised as the harvest tokenises them: the
model's tokenizer with its special tokens, BOS first, never truncated (a sequence
beyond the model's positions is refused). The temporary store is deleted when the
call returns: a tool's artifacts (a trained SAE's weights) are kept only by a run on a
stored run (``run=``).
"""

from __future__ import annotations

import json
import secrets
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from arrakis_ray.errors import DataError, ToolError

if TYPE_CHECKING:
    import pyarrow as pa

    from arrakis_ray.bench.tools import ModelHere
    from arrakis_ray.models.hooked import HookedModel
    from arrakis_ray.store.inventory import FileEntry
    from arrakis_ray.store.manifest import RunManifest, ToolRecord
    from arrakis_ray.store.reader import RunReader
    from arrakis_ray.tools.base import Tool

RUN_ID = "live"  # the run id of every in-process result row
INPUTS_LABEL = "<bench inputs>"  # the data path the temporary run's manifest names
TEXT_COLUMN = "text"  # an observational tool's input table: texts, other columns kept
BATCH_SIZE = 16  # sequences per captured forward


def run_in_process(tool: Tool, here: ModelHere, inputs: Any) -> dict[str, pa.Table]:
    """Every output table of ``tool`` over ``inputs`` (None: a tool that needs none)."""
    name = f"tool {tool.name}"
    with tempfile.TemporaryDirectory(prefix="arrakis-bench-") as tmp:
        root = Path(tmp) / "store"
        if tool.scope == "live":
            reader = _capture(root, here, [], [], {})  # a manifest, nothing harvested
            tool.check(reader.manifest)
            items = _live_items(tool, reader, inputs, name)
            files, units = _live(tool, here, reader, items)
        else:
            everything = _manifest(here.model, here.model.hook_names(), 0, 2)
            tool.check(everything)
            hooks = here.model.resolve_hooks(tool.required_hooks(everything))
            if inputs is None and (hooks or tool.scope == "shard"):
                raise ToolError(
                    f"{name} reads activations: give inputs= (texts or token ids) or run= "
                    "(a stored run of the bench's store)"
                )
            seqs, documents = ([], {}) if inputs is None else _sequences(inputs, here, name)
            reader = _capture(root, here, hooks, seqs, documents)
            files, units = _observe(tool, here.model, reader)
        from arrakis_ray.bench.tools import record_tables

        return record_tables(reader.layout, tool, _record(tool, reader, files, units))


# ------------------------------------------------------------------------ inputs


def _sequences(inputs: Any, here: ModelHere, where: str) -> tuple[list[np.ndarray], dict]:
    """(token id sequences, kept columns) of texts, token ids, or a table of texts in
    column ``text`` whose other columns are labels (kept as ``data.keep_columns``)."""
    from arrakis_ray.bench.versions import as_arrow_table

    documents: dict[str, list] = {}
    if isinstance(inputs, str):
        inputs = [inputs]
    elif as_arrow_table(inputs, rows=True) is not None:
        documents = _text_table(inputs, (TEXT_COLUMN,), where).to_pydict()
        inputs = documents.pop(TEXT_COLUMN)
    if isinstance(inputs, list | tuple) and inputs and all(isinstance(t, str) for t in inputs):
        seqs = here.encode(list(inputs), where)
    else:
        seqs = _token_ids(inputs, here.model.vocab_size, where)
    limit = here.model.max_positions
    longest = max(range(len(seqs)), key=lambda i: len(seqs[i]))
    if limit is not None and len(seqs[longest]) > limit:
        raise DataError(
            f"{where}: input {longest} has {len(seqs[longest])} tokens, but the model has "
            f"{limit} positions"
        )
    return seqs, documents


def _token_ids(inputs: Any, vocab_size: int, where: str) -> list[np.ndarray]:
    """Sequences of given token ids: a list of id lists, or a 1-D / 2-D array or tensor."""
    if hasattr(inputs, "detach"):  # a torch tensor
        inputs = inputs.detach().cpu().numpy()
    if isinstance(inputs, np.ndarray):
        inputs = list(np.atleast_2d(inputs)) if inputs.ndim <= 2 else None
    if not isinstance(inputs, list | tuple) or not inputs:
        given = "an array of 3 or more dimensions" if inputs is None else type(inputs).__name__
        raise DataError(
            f"{where}: inputs must be texts, token ids (a list of id lists, a 2-D array or "
            f"tensor) or a table, not {'an empty ' if isinstance(inputs, list | tuple) else ''}"
            f"{given}"
        )
    if all(np.ndim(x) == 0 for x in inputs):  # one flat list of ids: one sequence
        inputs = [inputs]
    seqs = []
    for i, row in enumerate(inputs):
        ids = np.asarray(row)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise DataError(f"{where}: input {i} is not a non-empty list of integer token ids")
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        if bad.size:
            raise DataError(
                f"{where}: input {i} holds token id {int(bad[0])}, outside the model's "
                f"vocabulary [0, {vocab_size})"
            )
        seqs.append(ids.astype(np.int64))
    return seqs


def _text_table(inputs: Any, columns: tuple[str, ...], where: str) -> pa.Table:
    """``inputs`` as a table with rows whose ``columns`` all hold text, or one refusal."""
    from arrakis_ray.bench.versions import as_arrow_table
    from arrakis_ray.live.prompts import check_text_columns

    table = as_arrow_table(inputs, rows=True)
    if table is None:
        raise DataError(
            f"{where}: inputs must be a table with columns {', '.join(columns)} (a list of "
            f"dicts, a polars or pandas DataFrame, or a pyarrow Table), not "
            f"{type(inputs).__name__}"
        )
    check_text_columns(table, columns, where, "the inputs table")
    return table


def _live_items(tool: Tool, reader: RunReader, inputs: Any, where: str) -> pa.Table:
    """A live tool's prompt rows with ``item`` and ``run_id``, as the runner builds them:
    the inputs table, else ``params.prompts`` (or one row for a tool without prompts)."""
    import pyarrow as pa

    from arrakis_ray.live.runner import prompt_items

    columns = tuple(tool.prompt_columns)
    if inputs is None:
        if columns and getattr(tool.params, "prompts", None) is None:
            raise ToolError(
                f"{where} runs on prompts: give inputs= (a table with columns "
                f"{', '.join(columns)}), params prompts=FILE, or run= (a stored run)"
            )
        return prompt_items(tool, reader)
    if not columns:
        raise DataError(f"{where} reads no prompts: call it without inputs")
    table = _text_table(inputs, columns, where).select(list(columns))
    n = table.num_rows
    table = table.append_column("item", pa.array(range(n), pa.int64()))
    return table.append_column("run_id", pa.array([RUN_ID] * n, pa.string()))


# ------------------------------------------------------------- the temporary run


def _manifest(
    model: HookedModel,
    hooks: list[str],
    n_sequences: int,
    context: int,
    keep_columns: tuple[str, ...] = (),
) -> RunManifest:
    """The manifest of the temporary run: a complete one-shard harvest of ``hooks``."""
    from arrakis_ray.config import DataConfig, HarvestConfig, ModelConfig, PipelineConfig, to_dict
    from arrakis_ray.harvest.plan import model_shape
    from arrakis_ray.store import schemas
    from arrakis_ray.store.manifest import DataInfo, HarvestRecord, RunManifest, Shard

    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    config = to_dict(
        PipelineConfig(
            name="bench",
            model=ModelConfig(arch=model.arch),
            data=DataConfig(
                path=INPUTS_LABEL, keep_columns=keep_columns, context_length=max(2, context)
            ),
            harvest=HarvestConfig(
                hooks=tuple(hooks) or ("logits",),
                shard_size=max(1, n_sequences),
                storage_dtype="float32",  # in-process values, kept exact
            ),
        )
    )
    config["harvest"]["hooks"] = list(hooks)  # what was captured: none for a live tool
    shard = Shard(0, INPUTS_LABEL, "bench", 0, n_sequences, 0)
    return RunManifest(
        run_id=RUN_ID,
        name="bench",
        status="complete",
        created_at=now,
        updated_at=now,
        config=config,
        hooks=tuple(hooks),
        shape=model_shape(model),
        model_source=f"bench:{model.arch}",
        model_fingerprint="in-process",
        data=DataInfo(INPUTS_LABEL, "in-process", n_sequences, n_sequences, 1),
        shard_plan=(shard,),
        stages=((0, model.n_layers),),
        schemas={n: schemas.load_schema(n).version for n in schemas.known_schemas()},
        harvest=HarvestRecord(predicted_max_bytes=0),
        versions={},
    )


def _capture(
    root: Path, here: ModelHere, hooks: list[str], seqs: list[np.ndarray], documents: dict
) -> RunReader:
    """Harvest ``seqs`` (sequence i: seq_id and doc_id i) into a one-shard run of
    ``root``: the vocabulary, tokens, every hook's table per layer, the kept columns,
    the completion marker, then the manifest, as the harvest writes them (no sequence:
    the manifest alone)."""
    import pyarrow as pa
    import torch

    from arrakis_ray.harvest import tables
    from arrakis_ray.harvest.tokenize import documents_table
    from arrakis_ray.models.stage import StageModel
    from arrakis_ray.store import schemas
    from arrakis_ray.store.layout import hook_family
    from arrakis_ray.store.reader import RunReader
    from arrakis_ray.store.writer import RunWriter

    model = here.model
    writer = RunWriter(root, RUN_ID)
    if seqs:  # decoding every token once per model: not for a live tool's run
        vocab = here.vocab
        writer.write_vocab(
            pa.Table.from_arrays(
                [pa.array(range(len(vocab)), pa.int32()), pa.array(vocab, pa.string())],
                schema=schemas.vocab_schema(),
            )
        )
    stage = StageModel(model, 0, model.n_layers)  # the forward a harvest actor runs
    pad = getattr(model.tokenizer, "pad_token_id", None) or 0
    per_layer: dict[tuple[str, int], list] = defaultdict(list)
    token_parts = []
    for lo in range(0, len(seqs), BATCH_SIZE):
        batch = seqs[lo : lo + BATCH_SIZE]
        lengths = np.array([len(s) for s in batch])
        ids = np.full((len(batch), lengths.max()), pad, dtype=np.int64)
        mask = np.zeros(ids.shape, dtype=bool)
        for j, s in enumerate(batch):
            ids[j, : len(s)], mask[j, : len(s)] = s, True
        seq_ids = np.arange(lo, lo + len(batch), dtype=np.int64)
        with torch.inference_mode():
            cache, _ = stage.run(
                torch.from_numpy(ids).to(model.device),
                torch.from_numpy(mask).long().to(model.device),
                hooks,
                None,
            )
        for name in hooks:
            kind, width = model.hook_shape(name)
            schema = schemas.activation_schema(kind, width, "float32")
            layer = model.layer_of(name)
            value = cache[name].detach()
            if kind == "pattern":
                table = tables.pattern_table(
                    schema, RUN_ID, layer, value.float().cpu().numpy(), lengths, seq_ids
                )
            else:
                build = tables.head_table if kind == "head" else tables.dense_table
                table = build(schema, RUN_ID, layer, value, mask, seq_ids)
            per_layer[(hook_family(name), layer)].append(table)
        doc_ids = np.repeat(seq_ids[:, None], ids.shape[1], axis=1)
        doc_pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
        token_parts.append(
            tables.tokens_table(
                schemas.tokens_schema(), RUN_ID, seq_ids, doc_ids, doc_pos, ids, mask, vocab
            )
        )
    for (family, layer), parts in per_layer.items():
        writer.write_activations(family, 0, pa.concat_tables(parts), layer)
    if seqs:
        writer.write_tokens(0, pa.concat_tables(token_parts))
        if documents:
            writer.write_documents(0, documents_table(RUN_ID, 0, json.dumps(documents)))
        writer.mark_complete(0, sequences=len(seqs))
    context = max((len(s) for s in seqs), default=2)
    manifest = _manifest(model, hooks, len(seqs), context, tuple(documents))
    writer.write_manifest(manifest)
    return RunReader(writer.layout, manifest)


# ------------------------------------------------------------------ computing


def _observe(tool: Tool, model: HookedModel, reader: RunReader) -> tuple[list[FileEntry], int]:
    """A shard- or run-scope tool over the temporary run, as the runner's tasks do it
    (the model only where the tool asks for it); (the files written, units of work)."""
    from arrakis_ray.tools.runner import as_outputs, shard_inputs, write_outputs

    layout, call = reader.layout, _call()
    reader.call = call  # where a run-scope tool's artifacts go
    weights = model if tool.needs_weights else None
    if tool.scope == "run":
        return write_outputs(tool, layout, tool.compute_run(reader, weights), 0, call), 1
    shards = reader.shards  # one: a shard tool without inputs was refused before
    files: list[FileEntry] = []
    partials: dict[str, list] = defaultdict(list)
    reduced: tuple[str, ...] = ()
    if tool.reduce is not None:
        reduced = tool.output_names() if tool.reduced_outputs is None else tool.reduced_outputs
    for shard in shards:
        result = as_outputs(tool, tool.compute_shard(shard_inputs(tool, reader, shard), weights))
        final = {name: table for name, table in result.items() if name not in reduced}
        if final:  # rows written per shard, as the shard tasks write them
            files += write_outputs(tool, layout, final, shard, call)
        for name in reduced:
            if name in result:
                partials[name].append(result[name])
    if tool.reduce is not None:
        at_reduce = model if tool.reduce_needs_weights else None
        files += write_outputs(
            tool, layout, tool.reduce(dict(partials), reader.manifest, at_reduce), 0, call
        )
    return files, len(shards)


def _live(
    tool: Tool, here: ModelHere, reader: RunReader, items: pa.Table
) -> tuple[list[FileEntry], int]:
    """A live tool on the in-process LiveModel: ``prepare`` once over every prompt, then
    ``compute_live`` per slice of ``items_per_task`` rows, as the live actors run it."""
    from arrakis_ray.live.runner import slices
    from arrakis_ray.tools.runner import write_outputs

    call = _call()
    prepared = tool.prepare(items, here.live) if tool.prepare is not None else None
    work = slices(items, tool.items_per_task)
    files: list[FileEntry] = []
    for index, part in enumerate(work):
        result = tool.compute_live(part, here.live, prepared)
        files += write_outputs(tool, reader.layout, result, index, call)
    return files, len(work)


def _record(tool: Tool, reader: RunReader, files: list[FileEntry], units: int) -> ToolRecord:
    """Record the call in the temporary run as ``analyze`` records one (the tables are
    read back through that record, as a ``run=`` call reads them); returns it."""
    from arrakis_ray.config import to_dict
    from arrakis_ray.store.manifest import ToolRecord
    from arrakis_ray.store.writer import RunWriter

    files = sorted(files, key=lambda e: e.path)
    record = ToolRecord(
        params=to_dict(tool.params),
        outputs=tool.output_names(),
        schema_version=tool.schema_version,
        shards=units,
        rows=sum(e.rows for e in files),
        seconds=0.0,
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        files=tuple(files),
    )
    RunWriter.for_layout(reader.layout).record_tool(tool.name, record)
    return record


def _call() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
