"""Chart functions: a DataFrame from SQL in, an Altair chart out.

Each function takes a Polars or pandas DataFrame (the result of a DuckDB query,
``con.sql(q).pl()``), checks that the columns it needs are there, and returns an
``alt.Chart``. Nothing here touches the store or the filesystem: reports are assembled
by :mod:`arrakis_ray.reports.html`.
"""

from __future__ import annotations

import logging
from typing import Any

import altair as alt

from arrakis_ray.errors import DataError

log = logging.getLogger(__name__)

# Altair refuses to inline more rows than this unless told otherwise; charts over
# bigger frames still work (write_report lifts the limit) but belong in SQL aggregates.
ALTAIR_MAX_ROWS = 5000

LOGIT_LENS_COLUMNS = (
    "layer",
    "pos",
    "token_text",
    "top1_token",
    "top1_prob",
    "target_token",
    "target_prob",
    "target_rank",
)

# Heatmap cell size in pixels: wide enough for a short token in the cell and on the axis.
_CELL_WIDTH = 64
_CELL_HEIGHT = 26
_MISSING_COLOR = "#e4e4e4"  # cells whose target probability is null


def _check_frame(df: Any, where: str, columns: tuple[str, ...]) -> None:
    """Fail clearly unless ``df`` is an eager Polars/pandas DataFrame with ``columns``."""
    module = type(df).__module__.split(".")[0]
    kind = type(df).__name__
    if module == "duckdb":
        raise DataError(
            f"{where}: got a DuckDB relation; pass a DataFrame instead (e.g. con.sql(q).pl())"
        )
    if module not in ("polars", "pandas") or kind != "DataFrame":
        hint = " (call .collect() first)" if kind == "LazyFrame" else ""
        raise DataError(
            f"{where}: expected a polars or pandas DataFrame, got {module}.{kind}{hint}"
        )
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{where}: DataFrame lacks column(s) {missing}; it has {list(df.columns)}")
    if len(df) == 0:
        log.warning("%s: the DataFrame is empty; the chart will show no marks", where)
    elif len(df) > ALTAIR_MAX_ROWS:
        log.warning(
            "%s: %d rows will be embedded in the chart; aggregate in SQL first for "
            "smaller, faster reports",
            where,
            len(df),
        )


def _field(shorthand: str) -> str:
    """The column name inside an Altair shorthand such as ``mean(norm):Q``."""
    return alt.utils.parse_shorthand(shorthand).get("field", shorthand)


def logit_lens_heatmap(df: Any, *, title: str | None = None) -> alt.LayerChart:
    """Heatmap of a logit-lens result: layers (last on top) by token positions.

    ``df`` has one row per (layer, pos) with the columns in ``LOGIT_LENS_COLUMNS``;
    ``layer == -1`` is the embedding output and is labelled ``embed``. Cell colour is
    the probability of the actual next token (0..1), the text in the cell is the
    layer's top-1 prediction, and the x axis reads ``"pos: token_text"`` in position
    order.
    """
    _check_frame(df, "logit_lens_heatmap", LOGIT_LENS_COLUMNS)
    # Newlines and tabs would vanish from SVG labels; show them as escapes instead.
    visible = "replace(replace({0}, regexp('\\n', 'g'), '\\\\n'), regexp('\\t', 'g'), '\\\\t')"
    base = alt.Chart(df).transform_calculate(
        pos_label=f"datum.pos + ': ' + {visible.format('datum.token_text')}",
        top1_label=visible.format("datum.top1_token"),
    )
    x = alt.X(
        "pos_label:O",
        # Sorting by the label's text would put "10: x" before "2: y".
        sort=alt.EncodingSortField(field="pos", op="min", order="ascending"),
        title="position: input token",
        axis=alt.Axis(labelAngle=-40, labelLimit=140),
    )
    y = alt.Y(
        "layer:O",
        sort="descending",
        title="layer",
        axis=alt.Axis(labelExpr="datum.value === -1 ? 'embed' : datum.label"),
    )
    tooltip = [
        alt.Tooltip("layer:O"),
        alt.Tooltip("pos:O"),
        alt.Tooltip("token_text:N"),
        alt.Tooltip("top1_token:N"),
        alt.Tooltip("top1_prob:Q", format=".3f"),
        alt.Tooltip("target_token:N"),
        alt.Tooltip("target_prob:Q", format=".3f"),
        alt.Tooltip("target_rank:Q"),
    ]
    # Cells with no target (the last position of a sequence) have a null probability,
    # which Vega-Lite drops from a colour scale: grey them so they read as "no data".
    missing = base.mark_rect(color=_MISSING_COLOR).encode(x=x, y=y)
    cells = base.mark_rect().encode(
        x=x,
        y=y,
        color=alt.Color(
            "target_prob:Q",
            scale=alt.Scale(domain=[0, 1], scheme="viridis"),
            title="p(target)",
        ),
        tooltip=tooltip,
    )
    text = base.mark_text(fontSize=10, limit=_CELL_WIDTH - 4).encode(
        x=x,
        y=y,
        text=alt.Text("top1_label:N"),
        # viridis is dark below ~0.5: white text there, black on light and grey cells.
        color=alt.condition(
            "isValid(datum.target_prob) && datum.target_prob <= 0.55",
            alt.value("white"),
            alt.value("black"),
        ),
        tooltip=tooltip,
    )
    chart = alt.layer(missing, cells, text).properties(
        width=alt.Step(_CELL_WIDTH), height=alt.Step(_CELL_HEIGHT)
    )
    if title:
        chart = chart.properties(title=title)
    return chart


def layer_line_chart(
    df: Any, *, x: str, y: str, color: str | None = None, title: str | None = None
) -> alt.Chart:
    """Line chart of ``y`` against ``x``, one line per value of ``color`` if given.

    ``x``, ``y`` and ``color`` are column names or Altair shorthands (``"layer:O"``,
    ``"mean(norm):Q"``); e.g. the mean residual norm per layer, one line per run.
    """
    shorthands = [s for s in (x, y, color) if s]
    _check_frame(df, "layer_line_chart", tuple(_field(s) for s in shorthands))
    encoding: dict[str, Any] = {"x": x, "y": y, "tooltip": shorthands}
    if color:
        encoding["color"] = color
    chart = alt.Chart(df).mark_line(point=True).encode(**encoding)
    if title:
        chart = chart.properties(title=title)
    return chart


def bar_chart(df: Any, *, x: str, y: str, title: str | None = None) -> alt.Chart:
    """Bar chart of ``y`` per ``x`` (column names or Altair shorthands)."""
    _check_frame(df, "bar_chart", (_field(x), _field(y)))
    chart = alt.Chart(df).mark_bar().encode(x=x, y=y, tooltip=[x, y])
    if title:
        chart = chart.properties(title=title)
    return chart
