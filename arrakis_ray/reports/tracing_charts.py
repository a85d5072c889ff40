"""Charts of causal tracing (``results_causal_tracing``): ROME's three heatmaps.

Each function takes a Polars or pandas DataFrame from SQL over the result view and
returns an Altair chart; nothing here reads the store. A heatmap shows one prompt: its
tokens top to bottom (the corrupted subject tokens starred), layers left to right, the
colour the answer's probability with that state restored. ``tracing_role_heatmap``
averages many prompts by position group (subject's last token, last token, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import altair as alt

from arrakis_ray.errors import DataError
from arrakis_ray.reports.charts import _check_frame

TRACING_COLUMNS = ("item", "kind", "layer", "pos", "token", "is_subject", "effect")
KINDS = ("resid", "mlp", "attn")
VALUES = ("effect", "indirect_effect")
ROLES = (
    "prefix",
    "subject_first",
    "subject_middle",
    "subject_last",
    "after_first",
    "after_further",
    "last",
)
_KIND_TITLES = {"resid": "hidden state (resid)", "mlp": "MLP outputs", "attn": "attention outputs"}
_SCHEMES = {"resid": "purples", "mlp": "greens", "attn": "reds"}  # ROME's figures' colours
_CELL = 22  # pixels per (position, layer) cell


def tracing_heatmap(
    df: Any,
    *,
    kind: str = "resid",
    item: int | None = None,
    value: str = "effect",
    title: str | None = None,
) -> alt.Chart:
    """Position (token) x layer heatmap of one prompt's restorations of ``kind``.

    ``df`` holds ``results_causal_tracing`` rows; with several items, ``item`` picks
    one. ``value``: ``effect`` (the answer's probability with the state restored) or
    ``indirect_effect`` (minus the corrupted probability; needs ``corrupted_prob``).
    """
    _check_kind_value(kind, value, "tracing_heatmap")
    needed = TRACING_COLUMNS + (("corrupted_prob",) if value == "indirect_effect" else ())
    _check_frame(df, "tracing_heatmap", needed)
    item = _one_item(df, item, "tracing_heatmap")
    base = (
        alt.Chart(df)
        .transform_filter((alt.datum.kind == kind) & (alt.datum.item == item))
        .transform_calculate(
            # ROME stars the corrupted tokens; the position keeps repeated tokens apart
            position="datum.pos + ' ' + datum.token + (datum.is_subject ? '*' : '')",
        )
    )
    base = _with_value(base, value)
    chart = (
        base.mark_rect()
        .encode(
            x=alt.X("layer:O", title="layer", axis=alt.Axis(labelAngle=0)),
            y=alt.Y(
                "position:N",
                sort=alt.EncodingSortField(field="pos", op="min"),
                title=None,
            ),
            color=alt.Color(f"{value}:Q", scale=_scale(kind, value), title=_legend(value)),
            tooltip=[
                alt.Tooltip("position:N", title="token"),
                alt.Tooltip("layer:O"),
                alt.Tooltip(f"{value}:Q", format=".4f"),
            ],
        )
        .properties(width=alt.Step(_CELL), height=alt.Step(_CELL))
    )
    return chart.properties(title=title or f"item {item}: restoring {_KIND_TITLES[kind]}")


def tracing_heatmaps(
    df: Any,
    *,
    item: int | None = None,
    kinds: Sequence[str] = KINDS,
    value: str = "effect",
) -> alt.HConcatChart:
    """ROME's figure: one prompt's resid, MLP and attention heatmaps side by side."""
    kinds = tuple(kinds)
    if not kinds:
        raise DataError("tracing_heatmaps: kinds is empty; name at least one of resid, mlp, attn")
    charts = [tracing_heatmap(df, kind=k, item=item, value=value) for k in kinds]
    return alt.hconcat(*charts).resolve_scale(color="independent")


def tracing_role_heatmap(
    df: Any, *, kind: str = "resid", value: str = "effect", title: str | None = None
) -> alt.Chart:
    """Position group x layer heatmap of ``value`` averaged over every item in ``df``.

    Prompts differ in length; ROME compares them by position group (``role``: the
    subject's first / middle / last token, the token after it, later tokens, the last).
    """
    _check_kind_value(kind, value, "tracing_role_heatmap")
    needed = ("item", "kind", "layer", "role", "effect")
    needed += ("corrupted_prob",) if value == "indirect_effect" else ()
    _check_frame(df, "tracing_role_heatmap", needed)
    base = _with_value(alt.Chart(df).transform_filter(alt.datum.kind == kind), value)
    chart = (
        base.mark_rect()
        .encode(
            x=alt.X("layer:O", title="layer", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("role:N", sort=list(ROLES), title=None),
            color=alt.Color(
                f"mean({value}):Q", scale=_scale(kind, value), title=f"mean {_legend(value)}"
            ),
            tooltip=[
                alt.Tooltip("role:N"),
                alt.Tooltip("layer:O"),
                alt.Tooltip(f"mean({value}):Q", format=".4f", title=f"mean {value}"),
                alt.Tooltip("distinct(item):Q", title="prompts"),
            ],
        )
        .properties(width=alt.Step(_CELL), height=alt.Step(_CELL))
    )
    return chart.properties(title=title or f"mean over prompts: restoring {_KIND_TITLES[kind]}")


def _check_kind_value(kind: str, value: str, where: str) -> None:
    if kind not in KINDS:
        raise DataError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if value not in VALUES:
        raise DataError(f"{where}: value must be one of {', '.join(VALUES)}, got {value!r}")


def _one_item(df: Any, item: int | None, where: str) -> int:
    """``item``, or the frame's only item; a heatmap shows one prompt."""
    items = sorted({int(i) for i in df["item"].to_list()}) if len(df) else []
    if item is None:
        if len(items) != 1:
            raise DataError(
                f"{where}: the DataFrame holds {len(items)} items; pass item= (one of "
                f"{items[:8]}{' ...' if len(items) > 8 else ''})"
            )
        return items[0]
    if item not in items:
        raise DataError(f"{where}: item {item} is not in the DataFrame (it has {items[:8]})")
    return int(item)


def _with_value(chart: alt.Chart, value: str) -> alt.Chart:
    if value == "indirect_effect":
        return chart.transform_calculate(indirect_effect="datum.effect - datum.corrupted_prob")
    return chart


def _scale(kind: str, value: str) -> alt.Scale:
    if value == "indirect_effect":
        return alt.Scale(scheme="redblue", domainMid=0, reverse=True)
    return alt.Scale(scheme=_SCHEMES[kind], domainMin=0)


def _legend(value: str) -> str:
    return "p(answer) restored" if value == "effect" else "p(restored) - p(corrupted)"
