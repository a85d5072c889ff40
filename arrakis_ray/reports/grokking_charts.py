"""Altair charts of the grokking study (``grokking_report.py`` assembles the page).

Each function takes pandas frames as the report's SQL returns them and gives one chart.
Heatmaps over the 113 x 113 inputs carry 12,769 cells each; they are drawn as ``rect``
marks with compact field names so the page stays a few MB.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SQUARE = 300  # pixels: side of a 113 x 113 heatmap


def compact(frame: Any, digits: int = 4) -> Any:
    """The frame with its float columns rounded to ``digits`` significant digits of their
    largest value: the 113 x 113 heatmaps embed ~150,000 values, and their JSON is most
    of the page."""
    for name in frame.columns:
        if frame[name].dtype.kind == "f" and len(frame):
            top = float(np.nanmax(np.abs(frame[name].to_numpy()))) or 1.0
            frame[name] = (
                frame[name].astype(np.float64).round(digits - 1 - int(np.floor(np.log10(top))))
            )
    return frame


def phase_rules(phases: list[tuple[str, float, float]]):
    """Shaded spans, one per phase ``(name, start, end)``, labelled at the top."""
    import altair as alt
    import pandas as pd

    frame = pd.DataFrame(phases, columns=["phase", "start", "end"])
    spans = (
        alt.Chart(frame)
        .mark_rect(opacity=0.12)
        .encode(
            x="start:Q",
            x2="end:Q",
            color=alt.Color("phase:N", legend=alt.Legend(title="phase"), sort=list(frame["phase"])),
        )
    )
    return spans


def loss_curves(curves: Any, phases: list[tuple[str, float, float]], metric: str, log_y: bool):
    """Train and test ``metric`` per epoch (log y for losses), over the shaded phases."""
    import altair as alt

    data = curves[(curves["metric"] == metric) & curves["split"].isin(["train", "test"])]
    scale = alt.Scale(type="log") if log_y else alt.Scale(domain=[0, 1])
    lines = (
        alt.Chart(data)
        .mark_line()
        .encode(
            x=alt.X("step:Q", title="epoch"),
            y=alt.Y("value:Q", title=metric, scale=scale),
            strokeDash=alt.StrokeDash("split:N", sort=["train", "test"]),
            tooltip=["split", "step", "value"],
        )
    )
    return alt.layer(phase_rules(phases), lines).properties(width=640, height=300)


def progress_curves(curves: Any, phases: list[tuple[str, float, float]]):
    """Restricted and excluded loss against the train and test loss (log y)."""
    import altair as alt

    wanted = {
        ("train", "loss"): "train loss",
        ("test", "loss"): "test loss",
        ("progress", "restricted_loss"): "restricted loss",
        ("progress", "excluded_loss"): "excluded loss",
    }
    keys = list(zip(curves["split"], curves["metric"], strict=True))
    data = curves[[k in wanted for k in keys]].copy()
    data["series"] = [wanted[k] for k in zip(data["split"], data["metric"], strict=True)]
    lines = (
        alt.Chart(data)
        .mark_line()
        .encode(
            x=alt.X("step:Q", title="epoch"),
            y=alt.Y("value:Q", title="loss", scale=alt.Scale(type="log")),
            stroke=alt.Stroke("series:N", sort=list(wanted.values())),
            tooltip=["series", "step", "value"],
        )
    )
    return alt.layer(phase_rules(phases), lines).properties(width=640, height=300)


def measure_curve(curves: Any, metrics: dict[str, str], title: str, phases):
    """One or more ``progress/*`` series per epoch."""
    import altair as alt

    data = curves[(curves["split"] == "progress") & curves["metric"].isin(list(metrics))].copy()
    data["series"] = data["metric"].map(metrics)
    lines = (
        alt.Chart(data)
        .mark_line()
        .encode(
            x=alt.X("step:Q", title="epoch"),
            y=alt.Y("value:Q", title=title, scale=alt.Scale(zero=False)),
            stroke="series:N",
            tooltip=["series", "step", "value"],
        )
    )
    return alt.layer(phase_rules(phases), lines).properties(width=640, height=220)


def heatmap(
    frame: Any,
    x: str,
    y: str,
    value: str,
    *,
    title_x: str,
    title_y: str,
    scheme="redblue",
    size=SQUARE,
    sort_y=None,
):
    """A rect heatmap of ``value`` over ``x`` and ``y`` (ordinal axes, labels thinned)."""
    import altair as alt

    limit = float(np.abs(frame[value]).max() or 1.0)
    color_scale = (
        alt.Scale(scheme=scheme, domain=[-limit, limit], reverse=True)
        if scheme == "redblue"
        else alt.Scale(scheme=scheme)
    )
    chart = (
        alt.Chart(frame)
        .mark_rect()
        .encode(
            x=alt.X(f"{x}:O", title=title_x, axis=alt.Axis(values=_ticks(frame[x]))),
            y=alt.Y(f"{y}:O", title=title_y, sort=sort_y, axis=alt.Axis(values=_ticks(frame[y]))),
            color=alt.Color(f"{value}:Q", scale=color_scale, title=value),
            tooltip=[x, y, value],
        )
    )
    return chart.properties(width=size, height=size) if size else chart


def _ticks(column: Any) -> list:
    values = [v.item() if hasattr(v, "item") else v for v in dict.fromkeys(column)]
    step = max(1, len(values) // 8)
    return values[::step]


def bar(
    frame: Any,
    x: str,
    y: str,
    *,
    color: str | None = None,
    title_x: str = "",
    title_y: str = "",
    width=640,
):
    """A bar chart, optionally coloured by a boolean/nominal field."""
    import altair as alt

    enc = {
        "x": alt.X(f"{x}:O", title=title_x or x, axis=alt.Axis(values=_ticks(frame[x]))),
        "y": alt.Y(f"{y}:Q", title=title_y or y),
        "tooltip": list(frame.columns),
    }
    if color:
        enc["color"] = alt.Color(f"{color}:N")
    return alt.Chart(frame).mark_bar().encode(**enc).properties(width=width, height=220)


def lines_by(frame: Any, x: str, y: str, by: str, *, title_x: str, title_y: str, columns: int = 5):
    """Small multiples: ``y`` over ``x``, one panel per value of ``by``."""
    import altair as alt

    return (
        alt.Chart(frame)
        .mark_line()
        .encode(x=alt.X(f"{x}:Q", title=title_x), y=alt.Y(f"{y}:Q", title=title_y))
        .properties(width=150, height=100)
        .facet(facet=alt.Facet(f"{by}:N"), columns=columns)
    )


def checkpoint_points(frame: Any, metric: str, title: str):
    """A tool's value per shipped checkpoint (epoch on x)."""
    import altair as alt

    data = frame[frame["metric"] == metric]
    return (
        alt.Chart(data)
        .mark_line(point=True)
        .encode(
            x=alt.X("epoch:Q", title="epoch of the checkpoint"),
            y=alt.Y("value:Q", title=title, scale=alt.Scale(zero=False)),
            tooltip=["epoch", "value"],
        )
        .properties(width=640, height=200)
    )
