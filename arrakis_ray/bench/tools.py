"""The bench's tools: what ``@exp.use_tools(name)`` injects.

``builtin_tools(model, store)`` gives every registered analysis tool
(``arrakis_ray.tools.TOOLS``) as a :class:`BenchTool` bound to the bench's model and
store, under its own name and under the original Arrakis key that maps to it
(``ARRAKIS_KEYS``); a key and the tool's own name give the same object.
``read_write_heads`` (key ``write_read``) is a ``WriteRead``, which adds the original's
head rankings (``bench/write_read.py``).

Each tool runs on a stored run of the bench's store (``run=``: the run's recorded
results when they were computed with the same parameters, else the runner, through Ray)
or on small inputs given in Python (``inputs=``: in this process, on the bench's model;
``bench/tool_runs.py``), and both return the tool's result tables as polars DataFrames,
equal row for row.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from arrakis_ray.errors import ToolError

if TYPE_CHECKING:
    from pathlib import Path

    import polars as pl
    import pyarrow as pa

    from arrakis_ray.live.model import LiveModel
    from arrakis_ray.models.hooked import HookedModel
    from arrakis_ray.store.layout import RunLayout
    from arrakis_ray.store.manifest import ToolRecord
    from arrakis_ray.tools.base import Tool

ARRAKIS_KEYS: dict[str, str] = {
    "attention": "attention_tools",  # AttentionTools: per-head pattern scores
    "composer": "attention_head_composition",  # AttentionComposer: Q/K/V composition
    "logit": "logit_attribution",  # LogitAttributor: per-component logit
    "logit_lens": "logit_lens",  # LogitLens
    "knowledge": "knowledge_prober",  # the original bound KnowledgeProber here
    "kg_extractor": "knowledge_graph_extractor",  # KnowledgeGraphExtractor
    "causal": "causal_tracing",  # CausalTracer (ROME-style restoration)
    "decomposer": "residual_decomposition",  # ResidualDecomposer
    "superposition": "superposition_disentangler",  # SuperpositionDisentangler (an SAE)
    "sparsity": "sparsity_analyzer",  # SparsityAnalyzer
    "write_read": "read_write_heads",  # WriteReadAnalyzer: bench/write_read.py
    "residual": "residual_tools",  # ResidualTools: norms and layer-to-layer
    "k_prober": "knowledge_prober",  # KnowledgeProber (linear probes)
    "surgery": "model_surgery",  # ModelSurgery
    "feature_viz": "neuron_dashboard",  # FeatureViz: per-neuron top contexts
}
"""Original Arrakis tool key -> the registered tool it maps to (what it was, beside)."""
READ_ATTEMPTS = 3  # run= calls: how often to look again when a concurrent call interferes


class ModelHere:
    """The bench's HookedModel as the tools meet it in this process: its LiveModel (one
    stage, no Ray), its vocabulary's texts and its tokenizer, each built once."""

    def __init__(self, model: HookedModel):
        self.model = model

    def __getstate__(self) -> dict:
        """The model alone: the cached LiveModel holds a lock, which cannot be pickled (a
        bench goes to Ray workers by ``exp.map``); it and the vocabulary are built again
        on first use."""
        return {"model": self.model}

    @cached_property
    def live(self) -> LiveModel:
        from arrakis_ray.live.model import live_model_of

        return live_model_of(self.model)

    @cached_property
    def vocab(self) -> np.ndarray:
        """Token id -> text, as a harvest stores it (``<id N>`` without a tokenizer)."""
        from arrakis_ray.harvest.model_source import vocab_texts

        tokenizer, size = self.model.tokenizer, self.model.vocab_size
        texts = vocab_texts(tokenizer, size) if tokenizer is not None else []
        return np.array(texts or [f"<id {i}>" for i in range(size)], dtype=object)

    def encode(self, texts: list[str], where: str) -> list[np.ndarray]:
        if self.model.tokenizer is None:
            raise ToolError(
                f"{where}: this {self.model.arch} model has no tokenizer to encode texts; "
                "give token ids (a list of id lists, or a 2-D array) instead"
            )
        return [np.asarray(self.live.encode(text), dtype=np.int64) for text in texts]


def builtin_tools(model: HookedModel, store: Any) -> dict[str, object]:
    """Every built-in tool bound to ``model`` and ``store`` (a local path or s3:// URI
    of an initialised store), by name and by original Arrakis key.

    Tools registered from other packages are not included: ``exp.map`` ships the bench
    to Ray workers, which may not import their modules. Add one with
    ``exp.tools["name"] = BenchTool(MyTool, exp.model, exp.store)``."""
    from arrakis_ray.bench.write_read import WriteRead  # it subclasses BenchTool
    from arrakis_ray.tools import TOOLS

    here = ModelHere(model)  # one live model and vocabulary, shared by the tools
    tools: dict[str, object] = {
        name: WriteRead(here, store) if name == WriteRead.tool_name else BenchTool(cls, here, store)
        for name, cls in TOOLS.items()
        if cls.__module__.startswith("arrakis_ray.")
    }
    tools.update({key: tools[name] for key, name in ARRAKIS_KEYS.items() if name in tools})
    return tools


class BenchTool:
    """One analysis tool bound to the bench's model and store.

    ``run(inputs=None, *, run=None, **params)``: the tool's result, a DataFrame for a
    tool with one output, else a dict output name -> DataFrame. ``params`` are the
    tool's parameters (``arrakis-ray tools`` lists them), checked as ``analyze`` checks
    them. ``inputs``: texts, token ids (a list of id lists, a 2-D array or tensor), or
    for a live tool a prompt table (a list of dicts, a polars or pandas DataFrame, a
    pyarrow Table) with its ``prompt_columns``; computed in this process on the bench's
    model, as run ``live``.

    ``run``: a run id (or unique prefix) or run directory of the bench's store. A run
    whose record of the tool has the same parameters (defaults filled in by its Params)
    and schema version: its stored tables, nothing written (a prompts file edited since
    is not noticed). Otherwise ``arrakis_ray.tools.runner.analyze`` runs it (Ray, the
    run's own model), which REPLACES the run's record of the tool and deletes the
    previous call's files, exactly as ``arrakis-ray analyze`` does. Tables are read from
    the files of a record with the requested parameters, never "the current record":
    concurrent calls with other parameters (``exp.map``) never get each other's tables
    (one that keeps finding its record replaced gives up with a ToolError).

    ``runs_used``: the ids of the stored runs read since the bench last cleared the list
    (each once, in order), so that an experiment call joins to ``runs``.
    """

    def __init__(self, tool: str | type[Tool], model: HookedModel | ModelHere, store: Any = None):
        from arrakis_ray.tools import register_tool
        from arrakis_ray.tools.runner import tool_class

        cls = tool_class(tool) if isinstance(tool, str) else register_tool(tool)
        self.tool_class = cls
        self.name: str = cls.name
        self.here = model if isinstance(model, ModelHere) else ModelHere(model)
        self.store = store
        self.runs_used: list[str] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, scope={self.tool_class.scope!r})"

    def run(
        self, inputs: Any = None, *, run: str | Path | None = None, **params: Any
    ) -> pl.DataFrame | dict[str, pl.DataFrame]:
        """The tool's result tables over a stored run or over ``inputs`` (see the class)."""
        import polars as pl

        from arrakis_ray.tools.runner import make_tool

        if run is not None and inputs is not None:
            raise ToolError(f"tool {self.name}: give inputs= or run=, not both")
        tool = make_tool(self.tool_class, params, source="BenchTool.run")
        if run is not None:
            tables = self._on_stored_run(tool, run, params)
        else:
            from arrakis_ray.bench.tool_runs import run_in_process

            tables = run_in_process(tool, self.here, inputs)
        frames = {output: pl.from_arrow(table) for output, table in tables.items()}
        return frames if len(frames) > 1 else next(iter(frames.values()))

    def _on_stored_run(self, tool: Tool, run: str | Path, params: dict) -> dict:
        from arrakis_ray.errors import StoreError
        from arrakis_ray.store.layout import open_store, resolve_run
        from arrakis_ray.store.manifest import read_tool_records
        from arrakis_ray.tools.runner import analyze, stored_record

        if self.store is None:
            raise ToolError(f"tool {self.name}: run={run!r} needs the bench's store; it has none")
        layout = resolve_run(run, self.store)
        ours = open_store(self.store)
        if not _same_place(layout.store_root, ours):
            raise ToolError(
                f"tool {self.name}: run {run} is in the store {layout.store_root}, not the "
                f"bench's store {ours}: the experiment could not join it to its runs"
            )
        for _attempt in range(READ_ATTEMPTS):
            record = stored_record(layout, tool)
            if record is None:  # never computed so: compute it (replacing the record)
                analyze(layout.run_id, tool.name, params, store=ours)
                record = stored_record(layout, tool)  # None: replaced by a concurrent call
            tables = None if record is None else record_tables(layout, tool, record)
            if tables is not None:
                if layout.run_id not in self.runs_used:
                    self.runs_used.append(layout.run_id)
                return tables
            if record is not None and read_tool_records(layout).get(tool.name) == record:
                raise StoreError(f"run {layout.run_id}: a result file of {self.name} is gone")
        raise ToolError(
            f"tool {self.name}: concurrent calls with other parameters kept replacing run "
            f"{layout.run_id}'s record of it before this call could read its results; make "
            "calls of one tool on one run with different parameters one after another"
        )


def record_tables(layout: RunLayout, tool: Tool, record: ToolRecord) -> dict[str, pa.Table] | None:
    """The tool's tables, by output, read from exactly the files ``record`` lists (an
    output it wrote no file for: its schema's empty table). None if one of them is gone
    (a later call replaced the record and deleted them)."""
    from arrakis_ray.errors import StoreError
    from arrakis_ray.store.parquet import check_file_schema, read_files

    tables = {}
    for output in tool.output_names():
        mine = [e for e in record.files if e.path.startswith(f"results/{output}/")]
        paths = [e.location(layout) for e in sorted(mine, key=lambda e: e.path)]
        if not paths:
            tables[output] = tool.result_schema(output).empty_table()
            continue
        try:
            for path in paths:
                check_file_schema(path, f"result.{output}", tool.schema_version)
            tables[output] = read_files(paths)
        except StoreError:
            if all(path.exists() for path in paths):
                raise
            return None
    return tables


def _same_place(a: Any, b: Any) -> bool:
    """Whether two store roots are one place (local paths through their symlinks)."""
    from pathlib import Path

    if isinstance(a, Path) and isinstance(b, Path):
        return a.resolve() == b.resolve()
    return str(a).rstrip("/") == str(b).rstrip("/")
