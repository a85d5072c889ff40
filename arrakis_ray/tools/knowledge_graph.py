"""Knowledge graph extraction: (subject, relation) prompts -> the objects the model predicts.

Each prompt of the dataset states a subject and a relation and stops where the object
would come ("the capital of france is"). The model's next-token distribution at the
last position gives the predicted object (its ``top_k`` most likely tokens, one row
each) with its probability and rank. ``first_layer`` says where the object appears:
the first layer whose residual stream, read through the final norm and unembedding
(the logit lens), already has it as top-1; -1 is the embeddings
(``blocks.0.hook_resid_pre``), null if no layer does (possible for ranks > 1).

With an answer column (``answer_column``), each row also records the expected object,
whether this row's object is it, and the expected object's probability and rank, so
precision is one SQL query. "What does the model know about france" is::

    SELECT relation, object, probability, first_layer
    FROM results_knowledge_graph WHERE subject = 'france' AND rank = 1

This is the original Arrakis "knowledge graph extraction" tool, run on the live model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from arrakis_ray.errors import ToolError
from arrakis_ray.tools import live_metrics
from arrakis_ray.tools.base import Tool

if TYPE_CHECKING:
    import pyarrow as pa
    from torch import Tensor

    from arrakis_ray.live.model import LiveModel
    from arrakis_ray.store.manifest import RunManifest

LENS_HOOKS = ("blocks.0.hook_resid_pre", "blocks.*.hook_resid_post")
"""The residual states read by the lens: the embeddings (layer -1), then each block's."""


@dataclass(frozen=True)
class KnowledgeGraphParams:
    """Parameters of the knowledge graph extractor."""

    prompts: str | None = None
    """Prompt dataset (JSONL or Parquet) with columns prompt, subject, relation (and
    the answer column); default: the run's own data file."""
    answer_column: str | None = "answer"
    """Column holding the expected object (one token); null: the dataset has none, and
    expected, correct, expected_probability and expected_rank stay null."""
    top_k: int = 1
    """Objects per prompt: the k most likely next tokens, one row each (rank 1..k)."""
    batch_size: int = 16
    """Prompts per forward."""

    def __post_init__(self) -> None:
        for name in ("top_k", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


class KnowledgeGraphExtractor(Tool):
    """(subject, relation) -> predicted object, its probability, rank and first layer."""

    name = "knowledge_graph_extractor"
    summary = "per (subject, relation) prompt: predicted object, probability, rank, first layer"
    reference = "Arrakis knowledge graph extraction; logit lens (nostalgebraist 2020)"
    Params = KnowledgeGraphParams
    scope = "live"
    prompt_columns = ("prompt", "subject", "relation")
    outputs = ("knowledge_graph",)

    def __init__(self, params: KnowledgeGraphParams):
        super().__init__(params)
        answer = params.answer_column
        if answer and answer not in self.prompt_columns:
            # the runner reads exactly these columns: the answer is required when named.
            # Set per instance from the parameters, so every actor's tool (rebuilt from
            # them by make_tool) reads the same columns as the driver's.
            self.prompt_columns = (*type(self).prompt_columns, answer)

    def check(self, manifest: RunManifest) -> None:
        _check_top_k(self.params.top_k, manifest.shape.d_vocab, self.name)

    def compute_live(self, items: pa.Table, model: LiveModel, prepared=None) -> pa.Table:
        import pyarrow as pa

        missing = [
            c for c in ("run_id", "item", *self.prompt_columns) if c not in items.schema.names
        ]
        if missing:
            raise ToolError(
                f"tool {self.name}: the prompt items lack column(s) {', '.join(missing)} "
                f"(they have {', '.join(items.schema.names)})"
            )
        _check_top_k(self.params.top_k, model.vocab_size, self.name)
        columns = items.to_pydict()
        expected = self._expected_ids(columns, model)
        rows: dict[str, list] = {name: [] for name in self.result_schema().names}
        size = self.params.batch_size
        for lo in range(0, items.num_rows, size):
            batch = range(lo, min(lo + size, items.num_rows))
            found = _predict(model, [columns["prompt"][i] for i in batch])
            for j, i in enumerate(batch):
                self._add_rows(rows, columns, i, found, j, expected[i], model)
        return pa.table(rows, schema=self.result_schema())

    def _expected_ids(self, columns: dict, model: LiveModel) -> list[int | None]:
        """The expected object's token id per row (None without an answer column)."""
        answer = self.params.answer_column
        if not answer:
            return [None] * len(columns["item"])
        return [
            model.token_id(str(word).strip(), where=f"tool {self.name}: item {item}: answer ")
            for item, word in zip(columns["item"], columns[answer], strict=True)
        ]

    def _add_rows(self, rows, columns, i, found, j, expected, model) -> None:
        """The ``top_k`` rows of prompt ``i`` (row ``j`` of its batch's predictions)."""
        logits, lens_top1, layers = found["logits"][j], found["lens_top1"][:, j], found["layers"]
        logp = logits.log_softmax(-1)
        top = logp.topk(self.params.top_k)
        answer = self.params.answer_column
        for token, value in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            rows["run_id"].append(columns["run_id"][i])
            rows["item"].append(columns["item"][i])
            rows["prompt"].append(columns["prompt"][i])
            rows["subject"].append(columns["subject"][i])
            rows["relation"].append(columns["relation"][i])
            rows["object"].append(_word(model, token))
            rows["object_token_id"].append(token)
            rows["probability"].append(math.exp(value))
            rows["rank"].append(_rank(logits, token))
            rows["first_layer"].append(_first_layer(lens_top1, layers, token))
            rows["expected"].append(str(columns[answer][i]) if answer else None)
            rows["correct"].append(None if expected is None else token == expected)
            rows["expected_probability"].append(
                None if expected is None else math.exp(logp[expected].item())
            )
            rows["expected_rank"].append(None if expected is None else _rank(logits, expected))


class LastPositions:
    """Each row's activation at its last real position, ``[batch, width]`` (rows are
    right-padded; ``last`` holds each row's position): a probe at a residual hook, or a
    metric on the logits. An object rather than a closure, so it travels to a stage in
    another actor as plain data."""

    def __init__(self, last: Tensor):
        self.last = last

    def __call__(self, value: Tensor, _hook: str | None = None) -> Tensor:
        import torch

        rows = torch.arange(value.shape[0], device=value.device)
        return value[rows, self.last.to(value.device)]


def _predict(model: LiveModel, prompts: list[str]) -> dict:
    """One forward over ``prompts``: the last position's logits ``[batch, vocab]`` and the
    lens's top-1 token per state ``[states, batch]`` with the states' layers."""
    import torch

    ids, mask, last = _padded(model, prompts)
    hooks = model.resolve_hooks(list(LENS_HOOKS))
    at_last = LastPositions(last)
    # every layer sends back one vector per prompt, not its whole [batch, pos, d_model],
    # and the last stage only the last positions' logits
    run = model.run(
        ids, mask, probes=dict.fromkeys(hooks, at_last), metric=at_last, keep_logits=False
    )
    logits = run.values.float().cpu()
    # the states may come from stages on different devices: gathered here, then read
    # through the final norm and unembedding where those are
    states = torch.stack([run.probes[h].cpu() for h in hooks])
    lens_top1 = model.final_logits(states).argmax(-1).cpu()
    # blocks.0.hook_resid_pre sits in block 0, but it is the embeddings: layer -1
    layers = [-1 if h == LENS_HOOKS[0] else model.layer_of(h) for h in hooks]
    return {"logits": logits, "lens_top1": lens_top1, "layers": layers}


def _padded(model: LiveModel, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, attention mask, last real position) of BOS-prefixed prompts, right-padded:
    a causal model never lets a real token see the padding after it."""
    ids, mask = live_metrics.pad_right(
        [model.encode(p) for p in prompts], model.tokenizer.pad_token_id
    )
    return ids, mask, mask.sum(-1) - 1


def _check_top_k(top_k: int, vocab: int, tool: str) -> None:
    if top_k > vocab:
        raise ToolError(f"tool {tool}: top_k {top_k} exceeds the vocabulary ({vocab} tokens)")


def _first_layer(lens_top1, layers: list[int], token: int) -> int | None:
    """The first layer whose lens has ``token`` as top-1, or None."""
    for layer, top1 in zip(layers, lens_top1.tolist(), strict=True):
        if top1 == token:
            return layer
    return None


def _rank(logits, token: int) -> int:
    """1 + the number of tokens with a strictly larger logit (1 = top)."""
    return int((logits > logits[token]).sum()) + 1


def _word(model: LiveModel, token: int) -> str:
    """A token's text without the leading space a BPE word token carries."""
    return model.tokenizer.decode([token]).strip()
