"""Input documents: find the files, plan shards, read one shard's texts or token ids.

The driver scans the inputs once to build a *shard plan*: contiguous document ranges
of at most ``shard_size`` documents, each inside one file, with the byte offset (text
formats) or row offset (Parquet, .npy) where it starts. Document ids are global and follow
file order, so a rerun assigns every document the same id; a shard is the unit of
work, of output files and of resume. The plan holds offsets, never texts: the driver
does not hold the dataset.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from arrakis_ray.errors import DataError
from arrakis_ray.store.manifest import Shard

if TYPE_CHECKING:
    from arrakis_ray.config import DataConfig

FORMATS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".txt": "text",
    ".npy": "npy",  # token ids: a 2-D integer array, one document per row
}
ROW_FORMATS = ("parquet", "npy")  # shard offsets count rows, not bytes


def input_files(path: str | Path) -> list[Path]:
    """The input files under ``path`` (a file, or a directory scanned in name order)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    files = [p for p in files if p.suffix in FORMATS]
    if not files:
        raise DataError(f"data.path: {path} holds no input file ({', '.join(sorted(FORMATS))})")
    return files


def plan_shards(path: str | Path, shard_size: int, max_documents: int | None = None) -> list[Shard]:
    """Split the inputs into shards of at most ``shard_size`` documents."""
    shards: list[Shard] = []
    next_doc = 0
    for file in input_files(path):
        fmt = FORMATS[file.suffix]
        starts = _ROW_STARTS[fmt](file) if fmt in ROW_FORMATS else _line_starts(file)
        if max_documents is not None:
            starts = starts[: max(0, max_documents - next_doc)]
        for i in range(0, len(starts), shard_size):
            count = min(shard_size, len(starts) - i)
            shards.append(Shard(len(shards), str(file), fmt, starts[i], count, next_doc + i))
        next_doc += len(starts)
        if max_documents is not None and next_doc >= max_documents:
            break
    if not shards:
        raise DataError(f"data.path: {path} holds no documents")
    return shards


def shard_bytes(shard: Shard) -> int:
    """Bytes of input behind one shard's documents: their lines (text formats, blank
    lines between them included), or the shard's share of the file by rows (Parquet,
    .npy)."""
    path = Path(shard.file)
    if shard.format in ROW_FORMATS:
        rows = len(_ROW_STARTS[shard.format](path))
        return path.stat().st_size * shard.count // max(1, rows)
    size, seen = 0, 0
    with open(path, "rb") as f:
        f.seek(shard.offset)
        while seen < shard.count:
            raw = f.readline()
            if not raw:
                raise DataError(f"{shard.file}: ended early (changed since the shard plan?)")
            size += len(raw)
            seen += bool(raw.strip())
    return size


def read_shard_texts(shard: Shard, text_column: str) -> list[str]:
    """The texts of one shard's documents, in document order."""
    texts = read_shard_column(shard, text_column)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(
                f"{shard.file}: document {shard.first_doc + i}: '{text_column}' "
                f"(data.text_column) is not text: {text!r:.40}"
            )
    return texts


def read_shard_tokens(shard: Shard, token_column: str | None, vocab_size: int) -> list[np.ndarray]:
    """The token ids of one shard's documents (int64, in document order), each checked
    to be a list of integers in ``[0, vocab_size)``. A .npy file's rows are its
    documents; other formats need ``token_column``."""
    if shard.format == "npy":
        rows = _load_npy(Path(shard.file))[shard.offset : shard.offset + shard.count]
        values, what = list(rows), "the row"
    elif token_column is None:
        raise DataError(f"{shard.file}: holds texts, not token ids (set data.token_column)")
    else:
        values = read_shard_column(shard, token_column)
        what = f"'{token_column}' (data.token_column)"
    return [_token_ids(v, shard, i, what, vocab_size) for i, v in enumerate(values)]


def check_columns(shards: list[Shard], data: DataConfig) -> None:
    """Fail before any work if an input file lacks a column the pipeline reads: the
    text or token column (none for .npy) and ``data.keep_columns``. Parquet files are
    checked on their schema, JSONL files on their first document."""
    firsts: dict[str, Shard] = {}
    for shard in shards:
        firsts.setdefault(shard.file, shard)
    for shard in firsts.values():
        columns = list(data.keep_columns)
        if shard.format != "npy":
            columns.insert(0, data.token_column or data.text_column)
        if shard.format == "parquet":
            _parquet_column_check(shard.file, columns)
            continue
        first = Shard(shard.shard, shard.file, shard.format, shard.offset, 1, shard.first_doc)
        for column in columns:
            read_shard_column(first, column)


def read_shard_column(shard: Shard, column: str) -> list:
    """The values of ``column`` for one shard's documents (a plain .txt has only 'text',
    a .npy file no column)."""
    if shard.format == "parquet":
        return _read_parquet_column(shard, column)
    if shard.format == "npy":
        raise DataError(f"{shard.file}: a .npy file holds only token ids, no column '{column}'")
    values = []
    with open(shard.file, "rb") as f:
        f.seek(shard.offset)
        line_no = _line_number(shard)
        while len(values) < shard.count:
            offset = f.tell()
            raw = f.readline()
            if not raw:
                raise DataError(f"{shard.file}: ended early (changed since the shard plan?)")
            line_no += 1
            if raw.strip():
                text = _decode(raw, shard.file, line_no, offset)
                values.append(_parse_line(text, shard, column, line_no))
    return values


def data_fingerprint(
    shards: list[Shard],
    text_column: str,
    token_column: str | None = None,
    keep_columns: tuple[str, ...] = (),
) -> str:
    """sha256 of the input bytes, the columns read and the plan over them (not of where
    the files lie, so the same data in another checkout or mount gets the same run id).
    """
    read = text_column if token_column is None else f"tokens:{token_column}"
    digest = hashlib.sha256(read.encode())
    if keep_columns:  # texts-only runs keep the ids they had before keep_columns existed
        digest.update(json.dumps(["keep", *keep_columns]).encode())
    for file in dict.fromkeys(s.file for s in shards):  # plan order, each file once
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    plan = [(s.format, s.offset, s.count, s.first_doc) for s in shards]
    digest.update(json.dumps(plan).encode())
    return digest.hexdigest()


def _line_starts(file: Path) -> list[int]:
    """Byte offsets of the non-empty lines of a text file (one document per line).

    Every line is checked to be UTF-8 here, while the plan scans the file anyway, so
    a stray byte fails before the run starts, naming its line, in .txt and .jsonl alike.
    """
    starts, offset = [], 0
    with open(file, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            _decode(raw, file, line_no, offset)
            if raw.strip():
                starts.append(offset)
            offset += len(raw)
    return starts


def _decode(raw: bytes, file: str | Path, line_no: int, offset: int) -> str:
    """One line of a text input as str, or a DataError naming its line and byte.

    ``offset`` is where the line starts in the file; a UTF-8 byte order mark opening
    the file is not part of the first document.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{file}:{line_no}: not UTF-8 text: byte 0x{raw[exc.start]:02x} at byte offset "
            f"{offset + exc.start} (column {exc.start + 1}); re-encode the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff") if offset == 0 else text


def _parquet_starts(file: Path) -> list[int]:
    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(file).metadata.num_rows
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataError(f"{file}: not a readable Parquet file: {exc}") from None
    return list(range(rows))


def _npy_starts(file: Path) -> list[int]:
    return list(range(len(_load_npy(file))))


_ROW_STARTS = {"parquet": _parquet_starts, "npy": _npy_starts}


def _load_npy(file: Path) -> np.ndarray:
    """A .npy file memory-mapped: only the rows a shard slices are read."""
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{file}: not a readable .npy file: {exc}") from None
    if array.ndim != 2:
        raise DataError(
            f"{file}: expected a 2-D array of token ids (one document per row), "
            f"got shape {array.shape}"
        )
    return array


def _token_ids(value, shard: Shard, i: int, what: str, vocab_size: int) -> np.ndarray:
    """One document's ids as int64, or a DataError naming its file and row."""
    if isinstance(value, np.ndarray) and value.ndim == 1:  # a .npy row
        items = value.tolist() if value.dtype.kind not in "iu" else []
    elif isinstance(value, list):  # from JSON or Arrow: Python ints, never numpy's
        items = value
    else:
        raise DataError(f"{_locate(shard, i)}: {what} is not a list of token ids: {value!r:.40}")
    bad = next((p for p, v in enumerate(items) if type(v) is not int), None)  # bool too
    if bad is not None:
        raise DataError(
            f"{_locate(shard, i)}: token {bad} of {what} is not an integer: {items[bad]!r:.40}"
        )
    ids = np.asarray(value)  # object dtype for ints beyond int64: caught as out of range
    out = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if out.size:
        raise DataError(
            f"{_locate(shard, i)}: token {out[0]} of {what} is {ids[out[0]]}, outside the "
            f"model's vocabulary [0, {vocab_size})"
        )
    return ids.astype(np.int64)


def _locate(shard: Shard, i: int) -> str:
    """'file: row R: document D' (or 'file:LINE: ...') of a shard's i-th document, for
    error messages only."""
    doc = f"document {shard.first_doc + i}"
    if shard.format in ROW_FORMATS:
        return f"{shard.file}: row {shard.offset + i}: {doc}"
    line, skip = _line_number(shard), i
    with open(shard.file, "rb") as f:
        f.seek(shard.offset)
        for raw in f:
            line += 1
            if raw.strip():
                if skip == 0:
                    break
                skip -= 1
    return f"{shard.file}:{line}: {doc}"


def _line_number(shard: Shard) -> int:
    """Line number just before ``shard.offset`` (for error messages only)."""
    with open(shard.file, "rb") as f:
        return f.read(shard.offset).count(b"\n")


def _parse_line(text: str, shard: Shard, column: str, line_no: int):
    if shard.format == "text":
        if column != "text":
            raise DataError(f"{shard.file}: a .txt file has only the column 'text', not '{column}'")
        return text.rstrip("\r\n")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{shard.file}:{line_no}: not valid JSON: {exc.msg}") from None
    if not isinstance(record, dict) or column not in record:
        raise DataError(f"{shard.file}:{line_no}: expected an object with a field '{column}'")
    return record[column]


def _parquet_column_check(file: str, columns, pf=None) -> None:
    import pyarrow.parquet as pq

    names = (pf or pq.ParquetFile(file)).schema_arrow.names
    for column in columns:
        if column not in names:
            raise DataError(f"{file}: no column '{column}'; columns: {', '.join(names)}")


def _read_parquet_column(shard: Shard, column: str) -> list:
    """Reads only the row groups that hold the shard's rows."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(shard.file)
    _parquet_column_check(shard.file, [column], pf)
    groups, start, first_row = [], 0, None
    for g in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(g).num_rows
        if start + rows > shard.offset and start < shard.offset + shard.count:
            groups.append(g)
            first_row = start if first_row is None else first_row
        start += rows
    table = pf.read_row_groups(groups, columns=[column])
    return table.slice(shard.offset - (first_row or 0), shard.count).column(column).to_pylist()
