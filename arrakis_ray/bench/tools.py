"""The bench's tools: what ``@exp.use_tools(name)`` injects.

``builtin_tools(model, store)`` gives every registered analysis tool
(``arrakis_ray.tools.TOOLS``) as a :class:`BenchTool` bound to the bench's model and
store, under its own name and under the original Arrakis key that maps to it:

============== ============================== =========================================
Arrakis key    tool                           why this one
============== ============================== =========================================
attention      attention_tools                AttentionTools: per-head pattern scores
composer       attention_head_composition     AttentionComposer: Q/K/V composition
logit          logit_attribution              LogitAttributor: per-component logit
logit_lens     logit_lens                     LogitLens
knowledge      knowledge_prober               the original bound KnowledgeProber here
kg_extractor   knowledge_graph_extractor      KnowledgeGraphExtractor
causal         causal_tracing                 CausalTracer (ROME-style restoration)
decomposer     residual_decomposition         ResidualDecomposer
superposition  superposition_disentangler     SuperpositionDisentangler (an SAE)
sparsity       sparsity_analyzer              SparsityAnalyzer
write_read     read_write_heads               WriteReadAnalyzer: :class:`WriteRead`
residual       residual_tools                 ResidualTools: norms and layer-to-layer
k_prober       knowledge_prober               KnowledgeProber (linear probes)
surgery        model_surgery                  ModelSurgery
feature_viz    neuron_dashboard               FeatureViz: per-neuron top contexts
============== ============================== =========================================

A key and the tool's own name give the same object. Each tool runs on a stored run of
the bench's store (``run=``: the runner, through Ray) or on small inputs given in Python
(``inputs=``: in this process, on the bench's model; ``bench/tool_runs.py``), and both
return the tool's result tables as polars DataFrames, equal row for row.
"""

from __future__ import annotations

import math
from functools import cached_property
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from arrakis_ray.errors import ToolError

if TYPE_CHECKING:
    from pathlib import Path

    import polars as pl
    import pyarrow as pa

    from arrakis_ray.live.model import LiveModel
    from arrakis_ray.models.hooked import HookedModel
    from arrakis_ray.store.reader import RunReader
    from arrakis_ray.tools.base import Tool

ARRAKIS_KEYS: dict[str, str] = {
    "attention": "attention_tools",
    "composer": "attention_head_composition",
    "logit": "logit_attribution",
    "logit_lens": "logit_lens",
    "knowledge": "knowledge_prober",
    "kg_extractor": "knowledge_graph_extractor",
    "causal": "causal_tracing",
    "decomposer": "residual_decomposition",
    "superposition": "superposition_disentangler",
    "sparsity": "sparsity_analyzer",
    "write_read": "read_write_heads",
    "residual": "residual_tools",
    "k_prober": "knowledge_prober",
    "surgery": "model_surgery",
    "feature_viz": "neuron_dashboard",
}
"""Original Arrakis tool key -> the registered tool it maps to (table above)."""


class ModelHere:
    """The bench's HookedModel as the tools meet it in this process: its LiveModel (one
    stage, no Ray), its vocabulary's texts and its tokenizer, each built once."""

    def __init__(self, model: HookedModel):
        self.model = model

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
    """Every registered tool bound to ``model`` and ``store`` (a local path or s3://
    URI of an initialised store), by name and by original Arrakis key."""
    from arrakis_ray.tools import TOOLS

    here = ModelHere(model)  # one live model and vocabulary, shared by the tools
    tools: dict[str, object] = {
        name: WriteRead(here, store) if name == WriteRead.tool_name else BenchTool(cls, here, store)
        for name, cls in TOOLS.items()
    }
    tools.update({key: tools[name] for key, name in ARRAKIS_KEYS.items() if name in tools})
    return tools


class BenchTool:
    """One analysis tool bound to the bench's model and store.

    ``run(inputs=None, *, run=None, **params)``: the tool's result, a DataFrame for a
    tool with one output, else a dict output name -> DataFrame. ``params`` are the
    tool's parameters (``arrakis-ray tools`` lists them), checked as ``analyze`` checks
    them. ``run``: a run id (or unique prefix) or run directory of the bench's store,
    analysed by ``arrakis_ray.tools.runner.analyze`` (Ray, with the run's own model),
    its results then read back from the store. ``inputs``: texts, token ids (a list of
    id lists, a 2-D array or tensor), or for a live tool a prompt table (a list of
    dicts, a polars or pandas DataFrame, a pyarrow Table) with its ``prompt_columns``;
    computed in this process on the bench's model, as run ``live``.

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
        from arrakis_ray.store.layout import open_store, resolve_run
        from arrakis_ray.store.reader import RunReader
        from arrakis_ray.tools.runner import analyze

        if self.store is None:
            raise ToolError(f"tool {self.name}: run={run!r} needs the bench's store; it has none")
        layout = resolve_run(run, self.store)
        ours = open_store(self.store)
        if not _same_place(layout.store_root, ours):
            raise ToolError(
                f"tool {self.name}: run {run} is in the store {layout.store_root}, not the "
                f"bench's store {ours}: the experiment could not join it to its runs"
            )
        analyze(layout.run_id, tool.name, params, store=ours)
        if layout.run_id not in self.runs_used:
            self.runs_used.append(layout.run_id)
        return read_results(RunReader(layout), tool)


def read_results(reader: RunReader, tool: Tool) -> dict[str, pa.Table]:
    """The tool's recorded tables of a run, by output (an output it wrote no file for:
    its schema's empty table)."""
    return {
        output: reader.result(output)
        if reader.has_result(output)
        else tool.result_schema(output).empty_table()
        for output in tool.output_names()
    }


def _same_place(a: Any, b: Any) -> bool:
    """Whether two store roots are one place (local paths through their symlinks)."""
    from pathlib import Path

    if isinstance(a, Path) and isinstance(b, Path):
        return a.resolve() == b.resolve()
    return str(a).rstrip("/") == str(b).rstrip("/")


class HeadScore(NamedTuple):
    """One attention head and its score (a tuple: JSON writes it as a list)."""

    layer: int
    head: int
    score: float


class WriteRead(BenchTool):
    """The original Arrakis' WriteReadAnalyzer, on the verified ``read_write_heads`` math.

    A direction in the residual stream is one of ``token`` (its text exactly as in the
    vocabulary) or ``token_id`` (the token's centred unembedding direction, with the
    final norm folded in when ``fold_ln``), ``dim_idx`` (the basis direction
    ``e_dim_idx``) or ``direction`` (d_model floats). Per head, all in [0, 1]
    (``arrakis_ray.tools.read_write_heads``): ``write_weight = ||W_OV u|| / ||W_OV||_F``,
    ``read_q``, ``read_k`` (through W_QK) and ``read_v`` (through W_OV). With ``fold_ln``
    each head reads through its ln1 as in the tool. ``run(...)`` runs the
    ``read_write_heads`` tool itself (its activation scores too), as any BenchTool.
    """

    tool_name = "read_write_heads"

    def __init__(self, model: HookedModel | ModelHere, store: Any = None):
        super().__init__(self.tool_name, model, store)

    def scores(
        self,
        layer_idx: int | None = None,
        *,
        token: str | None = None,
        token_id: int | None = None,
        dim_idx: int | None = None,
        direction: Any = None,
        fold_ln: bool = True,
    ) -> pl.DataFrame:
        """Every head's (or ``layer_idx``'s heads') ``ov_norm`` (||W_OV||_F) and
        ``qk_norm`` (||W_QK||_F), and with a direction its ``direction`` label,
        ``write_weight``, ``read_q``, ``read_k`` and ``read_v``."""
        import polars as pl
        import torch

        from arrakis_ray.models.circuits import layer_factors
        from arrakis_ray.tools.read_write_heads import WEIGHT_COLUMNS, weight_scores

        model = self.here.model
        layers = range(model.n_layers) if layer_idx is None else [self._layer(layer_idx)]
        resolved = self._direction(token, token_id, dim_idx, direction, fold_ln)
        with torch.inference_mode():
            factors = [layer_factors(model, layer, fold_ln) for layer in layers]
            ov = np.stack([f.ov_norm().float().cpu().numpy() for f in factors])
            qk = np.stack([f.qk_norm().float().cpu().numpy() for f in factors])
        layer, head = (
            a.ravel() for a in np.meshgrid(list(layers), range(model.n_heads), indexing="ij")
        )
        columns: dict[str, Any] = {
            "layer": pl.Series(layer, dtype=pl.Int16),
            "head": pl.Series(head, dtype=pl.Int16),
        }
        if resolved is not None:
            u, label = resolved
            by_column = weight_scores(model, u, fold_ln)  # [n_layers, n_heads] each
            columns["direction"] = [label] * len(layer)
            for name in WEIGHT_COLUMNS:
                columns[name] = pl.Series(by_column[name][list(layers)].ravel(), dtype=pl.Float32)
        columns["ov_norm"] = pl.Series(ov.ravel(), dtype=pl.Float32)
        columns["qk_norm"] = pl.Series(qk.ravel(), dtype=pl.Float32)
        return pl.DataFrame(columns)

    def identify_write_heads(
        self,
        layer_idx: int,
        *,
        token: str | None = None,
        token_id: int | None = None,
        dim_idx: int | None = None,
        direction: Any = None,
        top_k: int | None = None,
        threshold: float | None = None,
        fold_ln: bool = True,
    ) -> list[HeadScore]:
        """The heads of ``layer_idx`` by how much they write, best first: along a
        direction, ``write_weight``; with no direction, how much they write at all,
        ``||W_OV||_F`` (the head's output size for iid unit inputs, in residual units).
        Kept: scores >= ``threshold``, then the first ``top_k``."""
        scores = self.scores(
            layer_idx, token=token, token_id=token_id, dim_idx=dim_idx,
            direction=direction, fold_ln=fold_ln,
        )  # fmt: skip
        column = "write_weight" if "write_weight" in scores.columns else "ov_norm"
        return _ranked(scores, column, top_k, threshold)

    def identify_read_heads(
        self,
        layer_idx: int,
        *,
        dim_idx: int | None = None,
        token: str | None = None,
        token_id: int | None = None,
        direction: Any = None,
        read: str = "q",
        top_k: int | None = None,
        threshold: float | None = None,
        fold_ln: bool = True,
    ) -> list[HeadScore]:
        """The heads of ``layer_idx`` by how much they read a direction, best first:
        ``read`` = "q" (its queries, ``read_q``), "k" (its keys) or "v" (its values).
        Kept: scores >= ``threshold``, then the first ``top_k``."""
        if read not in ("q", "k", "v"):
            raise ToolError(f"write_read: read={read!r}: give 'q', 'k' or 'v'")
        if all(v is None for v in (dim_idx, token, token_id, direction)):
            raise ToolError(
                "write_read: identify_read_heads reads a direction: give dim_idx, token, "
                "token_id or direction"
            )
        scores = self.scores(
            layer_idx, token=token, token_id=token_id, dim_idx=dim_idx,
            direction=direction, fold_ln=fold_ln,
        )  # fmt: skip
        return _ranked(scores, f"read_{read}", top_k, threshold)

    def _layer(self, layer_idx: Any) -> int:
        n_layers = self.here.model.n_layers
        if not isinstance(layer_idx, Integral) or isinstance(layer_idx, bool):
            raise ToolError(f"write_read: layer_idx must be an integer, got {layer_idx!r}")
        if not 0 <= layer_idx < n_layers:
            raise ToolError(
                f"write_read: layer_idx {layer_idx} is out of range: the model has "
                f"{n_layers} layers (0..{n_layers - 1})"
            )
        return int(layer_idx)

    def _direction(self, token, token_id, dim_idx, direction, fold_ln: bool):
        """``(unit vector, label)`` of the one direction given, or None if none is."""
        from arrakis_ray.tools.read_write_heads import ReadWriteParams, resolve_direction

        given = {
            name: value
            for name, value in (
                ("token", token), ("token_id", token_id),
                ("dim_idx", dim_idx), ("direction", direction),
            )
            if value is not None
        }  # fmt: skip
        if not given:
            return None
        if len(given) > 1:
            raise ToolError(
                f"write_read: give one direction, not {' and '.join(given)} "
                "(token, token_id, dim_idx or direction)"
            )
        model = self.here.model
        if token is not None and model.tokenizer is None:
            raise ToolError(
                f"write_read: token {token!r}: this model has no tokenizer; give token_id"
            )
        if dim_idx is not None:
            if not isinstance(dim_idx, Integral) or not 0 <= dim_idx < model.d_model:
                raise ToolError(
                    f"write_read: dim_idx {dim_idx!r} is not a residual dimension of this "
                    f"model (0..{model.d_model - 1}, d_model = {model.d_model})"
                )
            direction = np.eye(model.d_model)[int(dim_idx)]
        if direction is not None:
            if hasattr(direction, "detach"):  # a torch tensor
                direction = direction.detach().cpu().numpy()
            direction = tuple(float(x) for x in np.asarray(direction, dtype=np.float64).ravel())
        try:
            params = ReadWriteParams(
                token=token, token_id=token_id, direction=direction, fold_ln=fold_ln
            )
        except ValueError as exc:
            raise ToolError(f"write_read: {exc}") from None
        # only a token needs the vocabulary's texts (decoding it takes a while)
        vocab = self.here.vocab if direction is None else np.array([], dtype=object)
        u, label = resolve_direction(params, model, vocab)
        return u, (f"dim:{int(dim_idx)}" if dim_idx is not None else label)


def _ranked(
    scores: pl.DataFrame, column: str, top_k: int | None, threshold: float | None
) -> list[HeadScore]:
    """Heads by ``column``, best first (ties: lower head first), filtered."""
    import polars as pl

    if top_k is not None and (not isinstance(top_k, Integral) or top_k < 1):
        raise ToolError(f"write_read: top_k must be a positive integer, got {top_k!r}")
    if threshold is not None and (not isinstance(threshold, Real) or not math.isfinite(threshold)):
        raise ToolError(f"write_read: threshold must be a finite number, got {threshold!r}")
    ranked = scores.sort([column, "head"], descending=[True, False])
    if threshold is not None:
        ranked = ranked.filter(pl.col(column) >= threshold)
    if top_k is not None:
        ranked = ranked.head(int(top_k))
    return [
        HeadScore(int(layer), int(head), float(score))
        for layer, head, score in ranked.select("layer", "head", column).iter_rows()
    ]
