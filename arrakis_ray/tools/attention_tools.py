"""Attention tools: what each attention head looks at, scored per (layer, head).

From the stored patterns (``blocks.*.attn.hook_pattern``, long form: one row per
layer, sequence, head, query position ``q`` and key position ``k <= q``):

- ``entropy``: mean over every query position (``q = 0`` included, whose entropy is 0)
  of ``-sum_k w log w``, in nats;
- ``bos_attention``: mean weight on ``k = 0`` (the BOS token the harvest prepends), over
  queries ``q > 0``;
- ``prev_token_score``: mean weight on ``k = q - 1``, over queries ``q >= 1``;
- ``duplicate_token_score``: mean total weight on earlier positions holding the same
  token id as the query, over queries that have at least one such earlier position
  (null if no query of the run has one);
- ``induction_score`` (Olsson et al. 2022): from the live model, on sequences it makes
  itself: BOS, then ``induction_seq_len`` distinct random non-special tokens, then the
  same tokens again. A query in the second half at ``q`` sees its token first at
  ``q - seq_len``; the score is the mean weight on the token right after that,
  ``k = q - seq_len + 1``, over every second-half query of every sequence.

Design: shard tasks return per-(layer, head) *sums* (and counts), which ``reduce``
adds up and divides, so every mean is over all queries of the run, whatever the shard
sizes. The induction score needs no stored data, so it is computed once, in ``reduce``,
from the model (``induction_sequences = 0`` skips it and leaves the column null).

``attention_top_positions`` keeps, for every query of every (sequence, layer, head),
its ``top_k`` keys by weight, BOS excluded unless ``include_bos`` (BOS is a sink that
would top most lists; ``bos_attention`` already measures it). Per query, because that
is what a reader asks ("what does head 3.1 read from this token?"); the top pairs of a
whole sequence are a subset of these rows (a pair among a sequence's top k has fewer
than k pairs above it, so also within its query), one ``QUALIFY`` away in SQL.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from arrakis_ray.errors import ToolError
from arrakis_ray.hooks import family_hook
from arrakis_ray.numerics import rank_within_groups
from arrakis_ray.tools.base import ShardInputs, Tool

if TYPE_CHECKING:
    from arrakis_ray.store.manifest import RunManifest

log = logging.getLogger(__name__)

INDUCTION_BATCH = 8  # random sequences per forward pass of the induction check

# Per-(layer, head) sums a shard task hands to reduce (added up there, never written).
_SUM_COLUMNS = (
    "n_queries",  # queries (one diagonal row each)
    "n_after_first",  # queries with q >= 1
    "n_duplicate_queries",
    "entropy_sum",
    "bos_sum",
    "prev_sum",
    "duplicate_sum",
)


@dataclass(frozen=True)
class AttentionToolsParams:
    """Parameters of the attention tools."""

    layers: tuple[int, ...] = ()
    """Layers to score; empty = every layer of the run."""
    top_k: int = 3
    """Keys kept per query in attention_top_positions."""
    include_bos: bool = False
    """Let position 0 (BOS) appear in attention_top_positions."""
    induction_seq_len: int = 20
    """Random tokens per half of an induction sequence (BOS + 2 halves must fit the
    model's context)."""
    induction_sequences: int = 8
    """Random repeated sequences for the induction score; 0 skips it (null column)."""
    seed: int = 0
    """Seed of the random induction sequences."""

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.induction_seq_len < 2:
            raise ValueError(f"induction_seq_len must be >= 2, got {self.induction_seq_len}")
        if self.induction_sequences < 0:
            raise ValueError(f"induction_sequences must be >= 0, got {self.induction_sequences}")


class AttentionTools(Tool):
    """Per-head entropy, BOS, previous-token, duplicate-token and induction scores."""

    name = "attention_tools"
    summary = (
        "per (layer, head): attention entropy, BOS / previous-token / duplicate-token / "
        "induction scores; per query: top attended positions"
    )
    reference = "Olsson et al., 'In-context Learning and Induction Heads' (2022)"
    Params = AttentionToolsParams
    reduce_needs_weights = True  # the induction score runs the live model, once, in reduce
    outputs = ("attention_head_scores", "attention_top_positions")
    reduced_outputs = ("attention_head_scores",)  # top positions are final per shard

    def _layers(self, manifest: RunManifest) -> list[int]:
        return self.selected_layers(manifest, self.params.layers)

    def required_hooks(self, manifest: RunManifest) -> list[str]:
        return [family_hook("attn_pattern", layer) for layer in self._layers(manifest)]

    def compute_shard(self, inputs: ShardInputs, model=None) -> dict:
        """Partial sums per (layer, head) and the shard's top positions per query."""
        import pyarrow as pa

        n_heads = inputs.shape.n_heads
        rows = _pattern_rows(inputs, self._layers(inputs.manifest))
        sums = head_sums(rows, _token_grid(inputs.tokens), n_heads)
        layer, head = np.divmod(np.arange(len(sums["n_queries"])), n_heads)
        keep = sums["n_queries"] > 0  # the (layer, head) pairs present in this shard
        partial = pa.table(
            {"layer": layer[keep], "head": head[keep], **{c: sums[c][keep] for c in _SUM_COLUMNS}}
        )
        top = top_positions(rows, self.params.top_k, self.params.include_bos)
        n = len(top["q_pos"])
        top_table = pa.Table.from_arrays(
            [
                pa.array(np.full(n, inputs.run_id, dtype=object), pa.string()),
                pa.array(top["layer"].astype(np.int16)),
                pa.array(top["seq_id"].astype(np.int64)),
                pa.array(top["head"].astype(np.int16)),
                pa.array(top["q_pos"].astype(np.int32)),
                pa.array(top["rank"].astype(np.int16)),
                pa.array(top["k_pos"].astype(np.int32)),
                pa.array(top["weight"].astype(np.float32)),
            ],
            schema=self.result_schema("attention_top_positions"),
        )
        return {"attention_head_scores": partial, "attention_top_positions": top_table}

    def reduce(self, partials: dict, manifest: RunManifest, model=None) -> dict:
        """Add the shards' sums up, divide, and add the induction score (live model).

        ``model``: the run's HookedModel (needed only for the induction score).
        """
        import pyarrow as pa

        sums = pa.concat_tables(partials["attention_head_scores"])
        sums = sums.group_by(["layer", "head"]).aggregate([(c, "sum") for c in _SUM_COLUMNS])
        # aggregate names its outputs "<column>_sum": strip that one suffix
        sums = sums.rename_columns([c.removesuffix("_sum") for c in sums.column_names])
        sums = sums.sort_by([("layer", "ascending"), ("head", "ascending")])
        col = {c: sums.column(c).to_numpy() for c in sums.column_names}
        layers, heads = col["layer"].astype(np.int64), col["head"].astype(np.int64)

        induction = np.full(len(layers), np.nan)
        if self.params.induction_sequences > 0:
            if model is None:
                raise ToolError("attention_tools: the induction score needs the model")
            scores = induction_scores(
                model,
                sorted(set(layers.tolist())),
                self.params.induction_seq_len,
                self.params.induction_sequences,
                self.params.seed,
            )
            induction = np.array(
                [scores[layer][head] for layer, head in zip(layers, heads, strict=True)]
            )

        n, n_after = col["n_queries"], col["n_after_first"]
        n_dup = col["n_duplicate_queries"]
        with np.errstate(invalid="ignore", divide="ignore"):
            columns = [
                pa.array(np.full(len(layers), manifest.run_id, dtype=object), pa.string()),
                pa.array(layers.astype(np.int16)),
                pa.array(heads.astype(np.int16)),
                pa.array(col["entropy_sum"] / n),
                pa.array(col["bos_sum"] / n_after, mask=n_after == 0),
                pa.array(col["prev_sum"] / n_after, mask=n_after == 0),
                pa.array(col["duplicate_sum"] / n_dup, mask=n_dup == 0),
                pa.array(induction, mask=np.isnan(induction)),
                pa.array(n.astype(np.int64)),
                pa.array(n_dup.astype(np.int64)),
            ]
        scores_table = pa.Table.from_arrays(
            columns, schema=self.result_schema("attention_head_scores")
        )
        return {"attention_head_scores": scores_table}


def _pattern_rows(inputs: ShardInputs, layers: list[int]) -> dict[str, np.ndarray]:
    """The shard's pattern rows of ``layers`` as numpy columns (weights in float64)."""
    import pyarrow.compute as pc

    table = inputs.activations["attn_pattern"]
    table = table.filter(pc.is_in(table.column("layer"), value_set=_int_array(layers)))
    present = set(np.unique(table.column("layer").to_numpy()).tolist())
    missing = [layer for layer in layers if layer not in present]
    if missing:
        raise ToolError(
            f"attention_tools: shard {inputs.shard} of run {inputs.run_id} has no "
            f"attention pattern rows for layers {missing}"
        )
    rows = {
        c: table.column(c).to_numpy().astype(np.int64)
        for c in ("layer", "seq_id", "head", "q_pos", "k_pos")
    }
    rows["weight"] = table.column("weight").to_numpy().astype(np.float64)
    return rows


def _int_array(values: list[int]):
    import pyarrow as pa

    return pa.array(values, pa.int16())


def _token_grid(tokens) -> dict:
    """Token ids as a [sequence, position] grid (-1 past a sequence's end)."""
    seq = tokens.column("seq_id").to_numpy()
    pos = tokens.column("pos").to_numpy().astype(np.int64)
    seq_ids = np.unique(seq)
    grid = np.full((len(seq_ids), int(pos.max()) + 1), -1, dtype=np.int64)
    grid[np.searchsorted(seq_ids, seq), pos] = tokens.column("token_id").to_numpy()
    return {"seq_ids": seq_ids, "grid": grid}


def head_sums(rows: dict[str, np.ndarray], tokens: dict, n_heads: int) -> dict[str, np.ndarray]:
    """Per-(layer, head) sums and counts, indexed ``layer * n_heads + head``.

    Every query has exactly one diagonal row (``k = q``: the causal softmax always
    includes the query itself), so diagonal rows count the queries.
    """
    layer, head, q, k, w = (rows[c] for c in ("layer", "head", "q_pos", "k_pos", "weight"))
    group = layer * n_heads + head
    size = int(group.max()) + 1 if len(group) else 0
    seq_index = np.searchsorted(tokens["seq_ids"], rows["seq_id"])
    grid = tokens["grid"]
    if len(seq_index) and (
        seq_index.max() >= len(tokens["seq_ids"])
        or (tokens["seq_ids"][seq_index] != rows["seq_id"]).any()
        or q.max() >= grid.shape[1]
        or (grid[seq_index, q] < 0).any()
    ):
        raise ToolError("attention_tools: pattern rows refer to positions missing from tokens")

    def by_group(weights: np.ndarray, mask: np.ndarray) -> np.ndarray:
        # float64 even when the mask is empty (bincount then returns integers)
        return np.bincount(group[mask], weights=weights[mask], minlength=size).astype(np.float64)

    everything = np.ones(len(w), dtype=bool)
    diagonal = k == q
    plogp = np.where(w > 0, -w * np.log(np.where(w > 0, w, 1.0)), 0.0)
    duplicate = (k < q) & (grid[seq_index, k] == grid[seq_index, q])
    # a query counts once however many earlier copies of its token it has
    query_key = (group * len(tokens["seq_ids"]) + seq_index) * grid.shape[1] + q
    dup_queries = np.unique(query_key[duplicate])
    n_dup = np.bincount(
        dup_queries // (len(tokens["seq_ids"]) * grid.shape[1]), minlength=size
    ).astype(np.int64)
    return {
        "n_queries": np.bincount(group[diagonal], minlength=size).astype(np.int64),
        "n_after_first": np.bincount(group[diagonal & (q > 0)], minlength=size).astype(np.int64),
        "n_duplicate_queries": n_dup,
        "entropy_sum": by_group(plogp, everything),
        "bos_sum": by_group(w, (k == 0) & (q > 0)),
        "prev_sum": by_group(w, k == q - 1),
        "duplicate_sum": by_group(w, duplicate),
    }


def top_positions(rows: dict[str, np.ndarray], top_k: int, include_bos: bool) -> dict:
    """Each query's ``top_k`` keys by weight (ties: lower k_pos first), with their rank."""
    keep = np.ones(len(rows["k_pos"]), dtype=bool) if include_bos else rows["k_pos"] > 0
    cols = {c: v[keep] for c, v in rows.items()}
    top, rank = rank_within_groups(
        [cols[c] for c in ("layer", "seq_id", "head", "q_pos")],
        [-cols["weight"], cols["k_pos"]],
        k=top_k,
    )
    return {**{c: v[top] for c, v in cols.items()}, "rank": rank}


def induction_tokens(
    n_sequences: int, seq_len: int, candidates: np.ndarray, bos: int | None, seed: int
) -> np.ndarray:
    """``[n_sequences, (1) + 2 * seq_len]``: (BOS,) r, r with r distinct random candidates."""
    if len(candidates) < seq_len:
        raise ToolError(
            f"attention_tools: induction_seq_len {seq_len} exceeds the {len(candidates)} "
            "non-special tokens of the vocabulary"
        )
    rng = np.random.default_rng(seed)
    halves = np.stack([rng.choice(candidates, seq_len, replace=False) for _ in range(n_sequences)])
    parts = [halves, halves]
    if bos is not None:
        parts.insert(0, np.full((n_sequences, 1), bos))
    return np.concatenate(parts, axis=1).astype(np.int64)


def induction_score_from_patterns(pattern: np.ndarray, seq_len: int, offset: int) -> np.ndarray:
    """Mean induction-offset weight per head from patterns ``[batch, head, q, k]``.

    The first half starts at ``offset`` (1 after a BOS). For a second-half query ``q``
    (``offset + seq_len <= q < offset + 2 * seq_len``) the token after its first
    occurrence sits at ``k = q - seq_len + 1``.
    """
    q = np.arange(offset + seq_len, offset + 2 * seq_len)
    return pattern[:, :, q, q - seq_len + 1].mean(axis=(0, 2))


def induction_scores(
    model, layers: list[int], seq_len: int, n_sequences: int, seed: int
) -> dict[int, np.ndarray]:
    """layer -> induction score per head, from the live model on repeated random tokens."""
    import torch

    tokenizer = model.tokenizer
    if tokenizer is not None:
        special = set(tokenizer.all_special_ids)
        n_tokens = min(model.vocab_size, len(tokenizer))
        bos = tokenizer.bos_token_id
    else:
        declared = model.backend.special_ids()
        special = set(declared.values())
        n_tokens = model.vocab_size
        bos = declared["bos_token_id"]
    offset = 0 if bos is None else 1
    context = model.max_positions
    if context is not None and offset + 2 * seq_len > context:
        raise ToolError(
            f"attention_tools: induction sequences of {offset + 2 * seq_len} tokens exceed "
            f"the model's context of {context}; lower induction_seq_len"
        )
    candidates = np.array([i for i in range(n_tokens) if i not in special], dtype=np.int64)
    ids = induction_tokens(n_sequences, seq_len, candidates, bos, seed)
    hooks = {layer: family_hook("attn_pattern", layer) for layer in layers}
    totals = {layer: np.zeros(model.n_heads) for layer in layers}
    for lo in range(0, n_sequences, INDUCTION_BATCH):
        batch = torch.from_numpy(ids[lo : lo + INDUCTION_BATCH])
        _, cache = model.run_with_cache(batch, hooks=list(hooks.values()))
        for layer in layers:
            pattern = cache[hooks[layer]].float().cpu().numpy()
            totals[layer] += induction_score_from_patterns(pattern, seq_len, offset) * len(batch)
    log.info("induction scores over %d sequences of 2 x %d tokens", n_sequences, seq_len)
    return {layer: total / n_sequences for layer, total in totals.items()}
