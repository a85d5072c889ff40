"""Charts of the knock-out tools: ablation (per component) and model surgery (per plan).

Each function takes a Polars or pandas DataFrame from SQL over the tool's result view
(``results_ablation``, ``results_model_surgery``), either its per-prompt rows or rows
already averaged in SQL (one per component or plan: the mean of one row is itself),
and returns an Altair chart of the dataset means; nothing here reads the store.
"""

from __future__ import annotations

from typing import Any

import altair as alt

from arrakis_ray.errors import DataError
from arrakis_ray.reports.charts import _check_frame

ABLATION_COLUMNS = ("component", "layer")
SURGERY_COLUMNS = ("plan", "layers")
_BAR = 16  # pixels per bar


def ablation_ranking(
    df: Any, *, value: str = "loss_delta", top: int = 20, title: str | None = None
) -> alt.Chart:
    """Horizontal bars of the ``top`` components by |mean ``value``| over the prompts,
    largest first; ``value`` is loss_delta (default) or answer_logprob_delta. The
    frame must hold one run and one method (filter in SQL)."""
    _check_frame(df, "ablation_ranking", (*ABLATION_COLUMNS, value))
    if top < 1:
        raise DataError(f"ablation_ranking: top must be at least 1, got {top}")
    frame = _single_call(_pandas(df), "ablation_ranking")
    means = frame.groupby(["component", "layer"], as_index=False)[value].mean()
    means = means.reindex(means[value].abs().sort_values(ascending=False).index).head(top)
    means["rank"] = range(1, len(means) + 1)
    method = frame["method"].iloc[0] if "method" in frame and len(frame) else None
    default_title = f"{method} ablation: mean {value}" if method else f"ablation: mean {value}"
    return (
        alt.Chart(means)
        .mark_bar()
        .encode(
            y=alt.Y(
                "component:N",
                sort=alt.EncodingSortField(field="rank", op="min"),
                title="component",
            ),
            x=alt.X(f"{value}:Q", title=f"mean {value}"),
            color=alt.Color("layer:O", title="layer"),
            tooltip=[
                alt.Tooltip("component:N"),
                alt.Tooltip("layer:O"),
                alt.Tooltip(f"{value}:Q", format=".4f"),
            ],
        )
        .properties(height=alt.Step(_BAR), title=title or default_title)
    )


def surgery_bars(df: Any, *, value: str = "loss_delta", title: str | None = None) -> alt.Chart:
    """Bars of each plan's mean ``value`` (loss_delta, kl, top1_agreement, loss) over
    the texts, largest first, the block order in the tooltip."""
    _check_frame(df, "surgery_bars", (*SURGERY_COLUMNS, value))
    frame = _single_call(_pandas(df), "surgery_bars")
    means = frame.groupby(["plan", "layers"], as_index=False)[value].mean()
    means = means.sort_values(value, ascending=False, kind="stable")
    means["rank"] = range(1, len(means) + 1)
    return (
        alt.Chart(means)
        .mark_bar()
        .encode(
            x=alt.X(
                "plan:N",
                sort=alt.EncodingSortField(field="rank", op="min"),
                title="plan",
                axis=alt.Axis(labelAngle=-40),
            ),
            y=alt.Y(f"{value}:Q", title=f"mean {value}"),
            tooltip=[
                alt.Tooltip("plan:N"),
                alt.Tooltip("layers:N", title="blocks in order"),
                alt.Tooltip(f"{value}:Q", format=".4f"),
            ],
        )
        .properties(width=alt.Step(_BAR * 2), title=title or f"model surgery: mean {value}")
    )


def _pandas(df: Any):
    return df.to_pandas() if hasattr(df, "to_pandas") else df  # polars -> pandas


def _single_call(frame, where: str):
    """Refuse a frame mixing runs or ablation methods: their means would blend."""
    for column in ("run_id", "method"):
        if column in frame and frame[column].nunique() > 1:
            values = sorted(map(str, frame[column].unique()))[:3]
            raise DataError(f"{where}: the frame mixes {column}s {values}; filter it to one in SQL")
    return frame
