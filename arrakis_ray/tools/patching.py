"""What activation patching and attribution patching share: pairs, components, metric.

A *pair* is a clean prompt and a corrupted one of the same length in tokens (``the
capital of france is`` / ``the capital of germany is``), with the clean answer and the
corrupted answer, one token each. The metric is the logit difference at the last
position, ``LD = logit[answer] - logit[wrong]``, and a patch's effect is reported
normalised: ``(LD_patched - LD_corrupted) / (LD_clean - LD_corrupted)``, 0 = as
corrupted, 1 = as clean (Wang et al. 2022; Heimersheim & Nanda 2024).

A *component* is one place a clean activation can be patched in: a dense family
(``resid_pre``, ``resid_post``, ``attn_out``, ``mlp_out``) at one (layer, position), or
one head of ``attn_z`` at every position (``pos`` null).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from arrakis_ray.errors import ToolError
from arrakis_ray.hooks import family_hook

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from arrakis_ray.live.model import LiveModel

PAIR_COLUMNS = ("clean", "corrupted", "answer", "wrong")
DENSE_FAMILIES = ("resid_pre", "resid_post", "attn_out", "mlp_out")
HEAD_FAMILY = "attn_z"
FAMILIES = (*DENSE_FAMILIES, HEAD_FAMILY)
# the denominator of the normalised metric below this is "clean and corrupted agree"
SAME_LOGIT_DIFF = 1e-6


@dataclass(frozen=True)
class Pair:
    """One tokenized pair and its answer token ids."""

    item: int
    clean: list[int]
    corrupted: list[int]
    answer: int
    wrong: int
    tokens: list[str]
    """The clean prompt's token texts, for labels."""


@dataclass(frozen=True)
class Component:
    """One place to patch: a hook, and a position (dense) or a head (``attn_z``)."""

    family: str
    layer: int
    hook: str
    pos: int | None = None
    head: int | None = None


def check_families(families: tuple[str, ...], tool: str) -> None:
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ToolError(
            f"{tool}: families {unknown or '[]'} unknown; choose from {', '.join(FAMILIES)}"
        )


def tokenize_pairs(items: pa.Table, model: LiveModel, tool: str) -> list[Pair]:
    """The slice's pairs, each checked: same length, single-token answers."""
    pairs = []
    for row in items.to_pylist():
        where = f"{tool}: prompts row {row['item'] + 1}: "
        clean, corrupted = model.encode(row["clean"]), model.encode(row["corrupted"])
        if len(clean) != len(corrupted):
            raise ToolError(
                f"{where}clean and corrupted prompts differ in length "
                f"({len(clean)} and {len(corrupted)} tokens); patching needs equal lengths"
            )
        answer = model.token_id(row["answer"], where=f"{where}answer ")
        wrong = model.token_id(row["wrong"], where=f"{where}wrong ")
        texts = [model.tokenizer.decode([i]) for i in clean]
        pairs.append(Pair(int(row["item"]), clean, corrupted, answer, wrong, texts))
    return pairs


def pairs_by_length(items: pa.Table, model: LiveModel, tool: str) -> list[tuple[int, list[Pair]]]:
    """The slice's pairs grouped by prompt length (tokens), shortest first: pairs of one
    length can share a forward."""
    by_length: dict[int, list[Pair]] = {}
    for pair in tokenize_pairs(items, model, tool):
        by_length.setdefault(len(pair.clean), []).append(pair)
    return sorted(by_length.items())


def components(model: LiveModel, families: tuple[str, ...], n_pos: int) -> list[Component]:
    """Every component of ``families`` for prompts of ``n_pos`` tokens, in layer order."""
    found = []
    for layer in range(model.n_layers):
        for family in families:
            hook = family_hook(family, layer)
            if family == HEAD_FAMILY:
                found += [Component(family, layer, hook, head=h) for h in range(model.n_heads)]
            else:
                found += [Component(family, layer, hook, pos=p) for p in range(n_pos)]
    return found


def logit_diff(answer: torch.Tensor, wrong: torch.Tensor):
    """The metric: ``logits [batch, pos, vocab] -> [batch]``, answer minus wrong at the
    last position; ``answer``/``wrong`` hold one token id per row."""

    def metric(logits):
        last = logits[:, -1, :].float()  # a bfloat16 difference keeps ~3 digits
        rows = range(len(last))
        return last[rows, answer.to(last.device)] - last[rows, wrong.to(last.device)]

    return metric


def normalised(patched: float, clean: float, corrupted: float) -> float:
    """0 = as corrupted, 1 = as clean; NaN when clean and corrupted agree."""
    span = clean - corrupted
    return (patched - corrupted) / span if abs(span) > SAME_LOGIT_DIFF else float("nan")


def table(rows: list[tuple], run_id: str, schema: pa.Schema) -> pa.Table:
    """Result rows ``(pair, component, logit_diff, clean_ld, corrupted_ld)`` as Arrow."""
    import pyarrow as pa

    columns: dict[str, list] = {name: [] for name in schema.names}
    for pair, comp, patched, clean, corrupted in rows:
        columns["run_id"].append(run_id)
        columns["item"].append(pair.item)
        columns["token"].append(None if comp.pos is None else pair.tokens[comp.pos])
        columns["family"].append(comp.family)
        columns["layer"].append(comp.layer)
        columns["pos"].append(comp.pos)
        columns["head"].append(comp.head)
        columns["metric"].append(normalised(patched, clean, corrupted))
        columns["logit_diff"].append(patched)
        columns["clean_logit_diff"].append(clean)
        columns["corrupted_logit_diff"].append(corrupted)
    return pa.table(columns, schema=schema)
