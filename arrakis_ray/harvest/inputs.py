"""Input documents: find the files, plan shards, read one shard's texts.

The driver scans the inputs once to build a *shard plan*: contiguous document ranges
of at most ``shard_size`` documents, each inside one file, with the byte offset (text
formats) or row offset (Parquet) where it starts. Document ids are global and follow
file order, so a rerun assigns every document the same id; a shard is the unit of
work, of output files and of resume. The plan holds offsets, never texts: the driver
does not hold the dataset.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from arrakis_ray.errors import DataError

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text"}


@dataclass(frozen=True)
class Shard:
    """A contiguous range of documents in one input file."""

    shard: int
    file: str
    format: str
    offset: int  # byte offset (jsonl, text) or row offset (parquet) of the first document
    count: int  # documents in the shard
    first_doc: int  # global id of the first document

    def to_dict(self) -> dict:
        return asdict(self)


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
        starts = _parquet_starts(file) if fmt == "parquet" else _line_starts(file)
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


def read_shard_column(shard: Shard, column: str) -> list:
    """The values of ``column`` for one shard's documents (a plain .txt has only 'text')."""
    if shard.format == "parquet":
        return _read_parquet_column(shard, column)
    values = []
    with open(shard.file, "rb") as f:
        f.seek(shard.offset)
        line_no = _line_number(shard)
        while len(values) < shard.count:
            raw = f.readline()
            if not raw:
                raise DataError(f"{shard.file}: ended early (changed since the shard plan?)")
            line_no += 1
            if raw.strip():
                values.append(_parse_line(raw, shard, column, line_no))
    return values


def data_fingerprint(shards: list[Shard], text_column: str) -> str:
    """sha256 of the input bytes and the plan over them (not of where the files lie, so
    the same data in another checkout or mount gets the same run id)."""
    digest = hashlib.sha256(text_column.encode())
    for file in dict.fromkeys(s.file for s in shards):  # plan order, each file once
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    plan = [(s.format, s.offset, s.count, s.first_doc) for s in shards]
    digest.update(json.dumps(plan).encode())
    return digest.hexdigest()


def _line_starts(file: Path) -> list[int]:
    """Byte offsets of the non-empty lines of a text file (one document per line)."""
    starts, offset = [], 0
    with open(file, "rb") as f:
        for raw in f:
            if raw.strip():
                starts.append(offset)
            offset += len(raw)
    return starts


def _parquet_starts(file: Path) -> list[int]:
    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(file).metadata.num_rows
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataError(f"{file}: not a readable Parquet file: {exc}") from None
    return list(range(rows))


def _line_number(shard: Shard) -> int:
    """Line number just before ``shard.offset`` (for error messages only)."""
    with open(shard.file, "rb") as f:
        return f.read(shard.offset).count(b"\n")


def _parse_line(raw: bytes, shard: Shard, column: str, line_no: int):
    if shard.format == "text":
        if column != "text":
            raise DataError(f"{shard.file}: a .txt file has only the column 'text', not '{column}'")
        return raw.decode("utf-8", errors="replace").rstrip("\r\n")
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"{shard.file}:{line_no}: not valid JSON: {exc.msg}") from None
    if not isinstance(record, dict) or column not in record:
        raise DataError(f"{shard.file}:{line_no}: expected an object with a field '{column}'")
    return record[column]


def _read_parquet_column(shard: Shard, column: str) -> list:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(shard.file)
    if column not in pf.schema_arrow.names:
        raise DataError(
            f"{shard.file}: no column '{column}'; columns: {', '.join(pf.schema_arrow.names)}"
        )
    return pf.read(columns=[column]).slice(shard.offset, shard.count).column(column).to_pylist()
