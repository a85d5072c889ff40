"""Prompt datasets for live tools: which file, which columns, and token positions.

A live tool reads a table of prompts (JSONL or Parquet): patching pairs, facts with
their subjects, texts to measure a loss on. The tool names the columns it needs; a
missing column, an unreadable file or an empty one is refused in the driver, before
any actor starts, with the file's name. Each row gets ``item``, its 0-based row number
in the file, which every result row carries back.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from arrakis_ray.errors import DataError

if TYPE_CHECKING:
    import pyarrow as pa

FORMATS = (".jsonl", ".json", ".parquet")


def read_prompts(path: str | Path, columns: tuple[str, ...], where: str = "prompts") -> pa.Table:
    """The prompt table of ``path`` with ``columns`` (and ``item``), refused clearly."""
    import pyarrow as pa

    if "://" in str(path):
        raise DataError(f"{where}: {path}: give a local file (prompts are read by the driver)")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{where}: {path} does not exist")
    if path.suffix not in FORMATS:
        raise DataError(f"{where}: {path}: give a {' or '.join(FORMATS)} file")
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow.json as pj

            table = pj.read_json(path)
    except (pa.ArrowInvalid, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{where}: {path}: cannot read it: {first}") from None
    check_text_columns(table, columns, where, str(path), first_row=1)
    table = table.select(list(columns))
    return table.append_column("item", pa.array(range(table.num_rows), pa.int64()))


def find_span(ids: list[int], part: list[int]) -> tuple[int, int] | None:
    """(start, stop) of the last occurrence of token ids ``part`` in ``ids``, or None."""
    n = len(part)
    for start in range(len(ids) - n, -1, -1):
        if ids[start : start + n] == part:
            return start, start + n
    return None


def check_text_columns(
    table: pa.Table, columns: Sequence[str], where: str, source: str, first_row: int = 0
) -> None:
    """DataError, naming ``source`` and the row (counted from ``first_row``), unless
    ``table`` has rows and every column of ``columns``, as text without gaps."""
    import pyarrow as pa

    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(
            f"{where}: {source} lacks column(s) {', '.join(missing)} "
            f"(it has {', '.join(table.column_names) or 'none'})"
        )
    if table.num_rows == 0:
        raise DataError(f"{where}: {source} holds no rows")
    for column in columns:
        kind = table.schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{where}: {source}: column {column} holds {kind}; give text")
        if table.column(column).null_count:
            row = table.column(column).to_pylist().index(None)
            raise DataError(f"{where}: {source}: row {row + first_row}: column {column} is empty")
