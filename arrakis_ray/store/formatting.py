"""Render a query result for people (aligned text) or programs (CSV, JSON, Parquet)."""

from __future__ import annotations

import io
import json
import math
import re

import polars as pl

from arrakis_ray.errors import ConfigError

FORMATS = ("table", "csv", "json", "parquet")
MAX_ROWS = 100  # rows shown by the "table" format before "… N more rows"
MAX_CELL = 60  # characters shown of one text cell
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _cell(value: object) -> str:
    """Text of one value in the aligned table."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_cell(v)}" for k, v in value.items()) + "}"
    # Escape control characters so one row stays one line (tokens are often "\n").
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(value))
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def _table(df: pl.DataFrame, max_rows: int) -> str:
    if df.width == 0:
        return "(no columns)"
    shown = df.head(max_rows)
    columns = [[_cell(v) for v in shown.get_column(name).to_list()] for name in df.columns]
    widths = [
        max([len(name), *(len(c) for c in cells)])
        for name, cells in zip(df.columns, columns, strict=True)
    ]
    right = [dtype.is_numeric() for dtype in df.dtypes]

    def line(cells: list[str]) -> str:
        parts = [
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)
        ]
        return "  ".join(parts).rstrip()

    lines = [line(list(df.columns)), line(["-" * w for w in widths])]
    lines += [line([col[i] for col in columns]) for i in range(shown.height)]
    if df.height == 0:
        lines.append("(no rows)")
    elif df.height > shown.height:
        more = df.height - shown.height
        lines.append(f"… {more} more row{'s' if more != 1 else ''}")
    return "\n".join(lines)


def _csv(df: pl.DataFrame) -> str:
    # CSV has no nested values: lists and structs become JSON text in their cell.
    nested = [name for name, dtype in df.schema.items() if dtype.is_nested()]
    if nested:
        df = df.with_columns(
            pl.Series(
                name,
                [None if v is None else json.dumps(v, default=str) for v in df[name].to_list()],
                dtype=pl.String,
            )
            for name in nested
        )
    return df.write_csv()


def format_frame(df: pl.DataFrame, fmt: str, *, max_rows: int = MAX_ROWS) -> str | bytes:
    """``df`` as ``fmt``: "table" (aligned text, at most ``max_rows`` rows shown), "csv",
    "json" (a list of records) or "parquet" (bytes)."""
    if fmt == "table":
        return _table(df, max_rows)
    if fmt == "csv":
        return _csv(df)
    if fmt == "json":
        return df.write_json()
    if fmt == "parquet":
        buf = io.BytesIO()
        df.write_parquet(buf)
        return buf.getvalue()
    raise ConfigError(f"unknown output format {fmt!r} (formats: {', '.join(FORMATS)})")
