"""Each plot type of ``plot_results``: its frame, computed from one run's cache, and its chart.

A frame function takes ``(model, spec, cache, tokens)``, the cache of the first sequence
(``[1, ...]`` tensors keyed by hook, in forward order), and returns a Polars frame with
one row per drawn cell or point; ``chart_of`` draws it. Charts carry their rows inline
(``{"values": [...]}``), so the Vega-Lite JSON saved with an experiment renders offline
and is not cut by Altair's 5000-row limit for DataFrames.

- attention: ``weight`` = pattern[head, q_pos, k_pos], one panel per head (columns) and
  hook (rows).
- logit_lens: ``unembed(ln_final(resid))`` per state and position, the top-1 token and
  the actual next token's probability and rank; ``layer`` is L for
  ``blocks.L.hook_resid_post`` and L - 1 for ``blocks.L.hook_resid_pre`` (the same
  state; -1 is the embeddings), as the logit_lens tool numbers them.
- residual_norms: the L2 norm of each position's vector, one line per position and the
  mean over positions in black.
- neuron_activations: per hook, the ``top_k`` units by max |activation| over positions;
  activations: the ``top_k`` by variance over positions (population variance); ties go
  to the lower index. Heatmap position x unit, diverging around 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import altair as alt
import numpy as np
import polars as pl

from arrakis_ray.bench.plots import token_texts
from arrakis_ray.reports.charts import logit_lens_heatmap

if TYPE_CHECKING:
    import torch

    from arrakis_ray.bench.plots import PlotData, PlotSpec
    from arrakis_ray.models.hooked import HookedModel

_CELL = 18  # attention / activation heatmap cell in pixels
# position labels ("3: fox") sorted by position: as text, "10: x" would precede "2: y"
_BY_POS = alt.EncodingSortField(field="pos", op="min", order="ascending")


def _labels(model: HookedModel, tokens: list[int]) -> list[str]:
    return [f"{pos}: {text}" for pos, text in enumerate(token_texts(model, tokens))]


# ---------------------------------------------------------------------- frames


def attention_frame(
    model: HookedModel, spec: PlotSpec, cache: dict[str, torch.Tensor], tokens: list[int]
) -> pl.DataFrame:
    """One row per (hook, head, q_pos, k_pos): the attention weight."""
    labels = np.array(_labels(model, tokens), dtype=object)
    parts = []
    for hook, pattern in cache.items():
        weights = pattern[0].float().cpu().numpy()  # [head, q, k]
        head, q, k = (a.ravel() for a in np.indices(weights.shape))
        parts.append(
            pl.DataFrame(
                {
                    "hook": hook,
                    "layer": model.layer_of(hook),
                    "head": head,
                    "q_pos": q,
                    "k_pos": k,
                    "q_label": labels[q].tolist(),
                    "k_label": labels[k].tolist(),
                    "weight": weights.ravel().astype(np.float64),
                }
            )
        )
    return pl.concat(parts)


def logit_lens_frame(
    model: HookedModel, spec: PlotSpec, cache: dict[str, torch.Tensor], tokens: list[int]
) -> pl.DataFrame:
    """One row per (residual state, position), with the logit_lens tool's columns."""
    import torch

    texts = token_texts(model, tokens)
    n = len(tokens)
    targets = torch.tensor(tokens[1:] + [0])  # the last position has no next token
    has_target = [True] * (n - 1) + [False]
    parts, seen = [], set()
    for hook, resid in cache.items():
        layer = model.layer_of(hook) - (1 if hook.endswith("hook_resid_pre") else 0)
        if layer in seen:  # blocks.L.hook_resid_pre is blocks.(L-1).hook_resid_post
            continue
        seen.add(layer)
        logits = model.unembed(model.ln_final(resid[0])).float().cpu()  # [pos, vocab]
        logp = torch.log_softmax(logits, dim=-1)
        best = logp.max(dim=-1)
        target_logit = logits.gather(1, targets[:, None])
        rank = (logits > target_logit).sum(dim=-1) + 1
        top1 = best.indices.tolist()
        parts.append(
            pl.DataFrame(
                {
                    "hook": hook,
                    "layer": layer,
                    "pos": list(range(n)),
                    "token_id": tokens,
                    "token_text": texts,
                    "top1_id": top1,
                    "top1_token": token_texts(model, top1),
                    "top1_prob": best.values.exp().double().tolist(),
                    "target_id": _masked(targets.tolist(), has_target),
                    "target_token": _masked(texts[1:] + [""], has_target),
                    "target_prob": _masked(
                        logp.gather(1, targets[:, None])[:, 0].exp().double().tolist(), has_target
                    ),
                    "target_rank": _masked(rank.tolist(), has_target),
                }
            )
        )
    return pl.concat(parts)


def _masked(values: list, keep: list[bool]) -> list:
    return [v if k else None for v, k in zip(values, keep, strict=True)]


def residual_norms_frame(
    model: HookedModel, spec: PlotSpec, cache: dict[str, torch.Tensor], tokens: list[int]
) -> pl.DataFrame:
    """One row per (hook, position): the L2 norm of the vector there."""
    labels = _labels(model, tokens)
    parts = []
    for order, (hook, value) in enumerate(cache.items()):
        norms = value[0].float().norm(dim=-1).double().cpu().tolist()
        parts.append(
            pl.DataFrame(
                {
                    "hook": hook,
                    "order": order,  # forward order of the hooks, for the x axis
                    "layer": model.layer_of(hook),
                    "pos": list(range(len(tokens))),
                    "pos_label": labels,
                    "norm": norms,
                }
            )
        )
    return pl.concat(parts)


def _top_units(
    model: HookedModel,
    spec: PlotSpec,
    cache: dict[str, torch.Tensor],
    tokens: list[int],
    unit: str,
    score_name: str,
) -> pl.DataFrame:
    """One row per (hook, chosen unit, position); units ranked by ``score_name``."""
    import torch

    labels = _labels(model, tokens)
    n = len(tokens)
    parts = []
    for hook, value in cache.items():
        act = value[0].float().cpu()  # [pos, width]
        score = act.abs().amax(dim=0) if score_name == "max_abs" else act.var(0, unbiased=False)
        chosen = torch.argsort(score, descending=True, stable=True)[: spec.top_k].tolist()
        cells = act[:, chosen].T  # [unit, pos]
        parts.append(
            pl.DataFrame(
                {
                    "hook": hook,
                    "rank": np.repeat(np.arange(len(chosen)), n),
                    unit: np.repeat(chosen, n),
                    "pos": np.tile(np.arange(n), len(chosen)),
                    "pos_label": labels * len(chosen),
                    "activation": cells.reshape(-1).double().numpy(),
                    score_name: np.repeat(score[chosen].double().numpy(), n),
                }
            )
        )
    return pl.concat(parts)


def neuron_activations_frame(model, spec, cache, tokens) -> pl.DataFrame:
    """The ``top_k`` neurons of each hook by max |activation| over positions."""
    return _top_units(model, spec, cache, tokens, "neuron", "max_abs")


def activations_frame(model, spec, cache, tokens) -> pl.DataFrame:
    """The ``top_k`` dimensions of each hook by variance over positions."""
    return _top_units(model, spec, cache, tokens, "dim", "variance")


FRAMES = {
    "attention": attention_frame,
    "logit_lens": logit_lens_frame,
    "residual_norms": residual_norms_frame,
    "neuron_activations": neuron_activations_frame,
    "activations": activations_frame,
}


# ---------------------------------------------------------------------- charts


def chart_of(data: PlotData) -> alt.TopLevelMixin:
    """The chart of a plot's frame, titled, with its notes as subtitle and description."""
    plot_type, frame = data.spec.plot_type, data.frame
    if plot_type == "attention":
        chart = attention_chart(frame)
    elif plot_type == "logit_lens":
        chart = _inline(logit_lens_heatmap(frame), frame)
    elif plot_type == "residual_norms":
        chart = residual_norms_chart(frame)
    else:
        unit = "neuron" if plot_type == "neuron_activations" else "dim"
        chart = top_units_chart(frame, unit)
    title = alt.TitleParams(data.title, subtitle=data.notes) if data.notes else data.title
    chart = chart.properties(title=title)
    if data.notes:
        chart = chart.properties(description="; ".join(data.notes))
    return chart


def _values(frame: pl.DataFrame) -> alt.Data:
    return alt.Data(values=frame.to_dicts())


def _inline(chart: alt.LayerChart, frame: pl.DataFrame) -> alt.LayerChart:
    """A layer chart whose layers share ``frame``, with the rows inlined once at the top."""
    for layer in chart.layer:
        layer.data = alt.Undefined
    chart.data = _values(frame)
    return chart


def _facet_rows(frame: pl.DataFrame) -> dict[str, Any]:
    """A row per hook when there are several (in forward order, as in the frame)."""
    hooks = frame["hook"].unique(maintain_order=True).to_list()
    return {"row": alt.Row("hook:N", sort=hooks, title=None)} if len(hooks) > 1 else {}


def attention_chart(frame: pl.DataFrame) -> alt.FacetChart:
    """Query rows by key columns per head; weights 0..1."""
    heat = (
        alt.Chart(_values(frame))
        .mark_rect()
        .encode(
            x=alt.X(
                "k_label:O",
                sort=alt.EncodingSortField(field="k_pos", op="min"),
                title="key",
                axis=alt.Axis(labelAngle=-40, labelLimit=100),
            ),
            y=alt.Y(
                "q_label:O", sort=alt.EncodingSortField(field="q_pos", op="min"), title="query"
            ),
            color=alt.Color(
                "weight:Q", scale=alt.Scale(domain=[0, 1], scheme="viridis"), title="attention"
            ),
            tooltip=[
                alt.Tooltip("hook:N"),
                alt.Tooltip("head:O"),
                alt.Tooltip("q_label:N", title="query"),
                alt.Tooltip("k_label:N", title="key"),
                alt.Tooltip("weight:Q", format=".3f"),
            ],
        )
        .properties(width=alt.Step(_CELL), height=alt.Step(_CELL))
    )
    return heat.facet(column=alt.Column("head:O", title="head"), **_facet_rows(frame))


def residual_norms_chart(frame: pl.DataFrame) -> alt.LayerChart:
    """The norm at each hook (forward order), a thin line per position, the mean in black."""
    hooks = frame.sort("order")["hook"].unique(maintain_order=True).to_list()
    x = alt.X("hook:N", sort=hooks, title=None, axis=alt.Axis(labelAngle=-40, labelLimit=220))
    base = alt.Chart(_values(frame))
    per_pos = base.mark_line(point=True, strokeWidth=1, opacity=0.6).encode(
        x=x,
        y=alt.Y("norm:Q", title="L2 norm"),
        color=alt.Color("pos_label:N", sort=_BY_POS, title="position"),
        tooltip=[
            alt.Tooltip("hook:N"),
            alt.Tooltip("pos_label:N"),
            alt.Tooltip("norm:Q", format=".3f"),
        ],
    )
    mean = base.mark_line(color="black", strokeWidth=3).encode(
        x=x, y=alt.Y("mean(norm):Q", title="L2 norm")
    )
    return alt.layer(per_pos, mean).properties(width=max(240, 40 * len(hooks)), height=240)


def top_units_chart(frame: pl.DataFrame, unit: str) -> alt.VConcatChart:
    """Per hook, its units (ranked, top first) down and positions across; one colour
    scale, diverging around 0, shared by every hook."""
    extent = float(frame["activation"].abs().max() or 1.0)
    color = alt.Color(
        "activation:Q",
        scale=alt.Scale(scheme="redblue", domain=[-extent, extent]),
        title="activation",
    )
    charts = []
    # one chart per hook rather than facet rows: each hook has its own units
    for hook in frame["hook"].unique(maintain_order=True).to_list():
        rows = frame.filter(pl.col("hook") == hook)
        heat = (
            alt.Chart(_values(rows), title=hook)
            .mark_rect()
            .encode(
                x=alt.X(
                    "pos_label:O",
                    sort=_BY_POS,
                    title="position: token",
                    axis=alt.Axis(labelAngle=-40, labelLimit=100),
                ),
                y=alt.Y(f"{unit}:O", sort=alt.EncodingSortField(field="rank", op="min")),
                color=color,
                tooltip=[
                    alt.Tooltip("hook:N"),
                    alt.Tooltip(f"{unit}:O"),
                    alt.Tooltip("pos_label:N", title="position"),
                    alt.Tooltip("activation:Q", format=".4f"),
                ],
            )
            .properties(width=alt.Step(_CELL), height=alt.Step(_CELL))
        )
        charts.append(heat)
    return alt.vconcat(*charts)
