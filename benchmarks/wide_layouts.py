"""Parquet layouts for activation caches at LLM widths, measured with DuckDB.

    .venv/bin/python benchmarks/wide_layouts.py      # 200k rows x 14,336: 31 min at load 4-14
    .venv/bin/python benchmarks/wide_layouts.py --rows 8000 --width 2048 --cos-width 1024 \
        --repeats 1                                  # smoke run, ~30 s

Disk: ~13 GB at most under a temporary directory, deleted at the end.

The follow-up of ``benchmarks/layouts.py`` (width 512) at the widths of real models. One
synthetic float16 matrix (normal, a lognormal scale per row for heavy-tailed norms, a few
neurons 8x heavier) is generated chunk by chunk from a fixed pool, so every candidate gets
the same values without holding them in memory. Candidates, each written with the store's
writer options (snappy; dictionaries and statistics on the key columns only):

- ``wide``: one file per ~128 MiB shard, ``run_id, layer, seq_id, pos, d0..d14335``, one
  row group per file (the v1 layout);
- ``blocked B`` (B = 256, 512, 1024): the same shards cut into blocks of B dimensions,
  ``fam/layer=0/block=b/shard-s.parquet`` with local columns ``d0..d{B-1}``, read through
  ``hive_partitioning`` (one-neuron queries filter ``block = 1337 // B``, or name the
  block's directory: both are timed);
- ``compacted B``: the shard files of each block merged into one file per block, with row
  groups of 16,384, 32,768 and 65,536 rows, and 65,536 with a page index (1,024 rows per
  page); 16k and 32k, and every size at B = 256, get only neuron 1337's block;
- ``vector``: one ``FixedSizeList<float16>[w]`` column ``vec``, one file per shard; at width
  14,336 only the token's shard and 4 on each side are written (its writes are slow).

Questions: (a) top-20 rows of neuron 1337; (b) its mean; (c) top-20 rows by cosine with a
random direction at width 4,096, against a pyarrow -> numpy scan; (d) one token's whole
vector (also at 4,096, with and without a page index); (e) bytes per value, footers and
write CPU time; and whether POSITIONAL JOIN across block globs keeps rows aligned. Each
query is timed cold (a fresh DuckDB connection: footers parsed again, the OS page cache
stays warm) and warm (the second run in the same connection, ``parquet_metadata_cache =
true``), best of ``--repeats`` (scans of every value: one cold run plus EXPLAIN ANALYZE's
time, ``repeats - 1`` warm runs); the bytes read come from EXPLAIN ANALYZE's ``Data Read``
(DuckDB prints KiB/MiB as kB/MB), the footer bytes of the files opened from pyarrow.
Every answer is checked against values kept while generating. The last line printed is
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

NEURON = 1337  # the neuron of (a) and (b); one of the heavy ones
HEAVY = (7, NEURON, 3000)  # neurons scaled by HEAVY_SCALE
HEAVY_SCALE = 8.0
TOP = 20
CONTEXT = 1024  # positions per sequence: seq_id = row // CONTEXT, pos = row % CONTEXT
TOKEN_ROW = 123_457  # the token of (d): seq_id 120, pos 577
SHARD_BYTES = 128 << 20  # float16 bytes per harvest shard
POOL = 4096  # rows of the generated pool that every chunk is drawn from
RUN_ID = "run-2026-11-23-abcdef"
KEYS = ["run_id", "layer", "seq_id", "pos"]
HIVE = "hive_partitioning = true, hive_types = {'layer': 'SMALLINT', 'block': 'SMALLINT'}"
_UNITS = {"bytes": 1, "kB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


# -- data ---------------------------------------------------------------------------------


class Activations:
    """Deterministic synthetic activations, yielded as column-major float16 shards."""

    def __init__(self, rows: int, width: int, seed: int) -> None:
        self.rows, self.width, self.seed = rows, width, seed
        rng = np.random.default_rng(seed)
        pool = rng.standard_normal((width, POOL), dtype=np.float32)
        pool[[h for h in HEAVY if h < width]] *= HEAVY_SCALE
        self.pool = pool.astype(np.float16)  # [width, POOL]: a column gather is a take
        self.shard_rows = SHARD_BYTES // (2 * width)

    def shards(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(shard index, first row, values [width, n] float16), the same on every call."""
        rng = np.random.default_rng(self.seed + 1)
        for shard, start in enumerate(range(0, self.rows, self.shard_rows)):
            n = min(self.shard_rows, self.rows - start)
            cols = np.take(self.pool, rng.integers(0, POOL, n), axis=1)
            scale = rng.lognormal(0.0, 0.5, n).astype(np.float16)  # heavy-tailed row norms
            np.multiply(cols, scale[None, :], out=cols)
            yield shard, start, cols


def key_columns(start: int, n: int) -> list[pa.Array]:
    row = np.arange(start, start + n)
    return [
        pa.array([RUN_ID] * n, pa.string()),
        pa.array(np.zeros(n, np.int16)),
        pa.array((row // CONTEXT).astype(np.int64)),
        pa.array((row % CONTEXT).astype(np.int32)),
    ]


# -- layouts ------------------------------------------------------------------------------


@dataclass(eq=False)  # hashable by identity: a dict key
class Layout:
    """The files of one candidate: footer size per path, bytes, writer options and times.

    ``write_cpu_s`` is the writing thread's CPU time (steady under load from other
    tenants), ``write_s`` its wall time.
    """

    name: str
    root: Path
    options: dict = field(default_factory=dict)  # extra pq.write_table options
    footers: dict[Path, int] = field(default_factory=dict)
    bytes: int = 0
    values: int = 0  # activation values in its files
    write_s: float = 0.0
    write_cpu_s: float = 0.0

    def add(self, path: Path) -> None:
        meta = pq.read_metadata(path)
        self.footers[path] = meta.serialized_size + 8  # + footer length and magic
        self.bytes += path.stat().st_size
        if meta.num_columns == len(KEYS) + 1:  # the vector layout: one list column
            width = pq.read_schema(path).field("vec").type.list_size
        else:
            width = meta.num_columns - len(KEYS)
        self.values += meta.num_rows * width

    def footer_bytes(self, under: Path | None = None) -> int:
        return sum(v for p, v in self.footers.items() if under is None or under in p.parents)

    def timed(self, fn: Callable[[], None]) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        fn()
        self.write_s += time.perf_counter() - wall
        self.write_cpu_s += time.thread_time() - cpu

    def delete(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def write_parquet(table: pa.Table, path: Path, row_group: int, **options) -> None:
    """``pq.write_table`` with the store writer's options (see ``store/parquet.py``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        table,
        path,
        compression="snappy",
        use_dictionary=KEYS,
        write_statistics=KEYS,
        row_group_size=row_group,
        **options,
    )


def block_dir(root: Path, block: int) -> Path:
    return root / "fam" / "layer=0" / f"block={block}"


def write_wide(lay: Layout, shard: int, keys: list[pa.Array], cols: np.ndarray) -> None:
    names = KEYS + [f"d{i}" for i in range(len(cols))]
    table = pa.Table.from_arrays(keys + [pa.array(c) for c in cols], names=names)
    path = lay.root / f"shard-{shard:05d}.parquet"
    write_parquet(table, path, table.num_rows, **lay.options)


def blocked_writer(block: int) -> Writer:
    """Writes one shard of every block of ``block`` dimensions."""

    def write(lay: Layout, shard: int, keys: list[pa.Array], cols: np.ndarray) -> None:
        names = KEYS + [f"d{i}" for i in range(block)]
        for b in range(0, len(cols) // block):
            part = cols[b * block : (b + 1) * block]
            table = pa.Table.from_arrays(keys + [pa.array(c) for c in part], names=names)
            path = block_dir(lay.root, b) / f"shard-{shard:05d}.parquet"
            write_parquet(table, path, table.num_rows, **lay.options)

    return write


def write_vector(lay: Layout, shard: int, keys: list[pa.Array], cols: np.ndarray) -> None:
    flat = pa.array(np.ascontiguousarray(cols.T).reshape(-1))  # row-major: one vector a row
    vec = pa.FixedSizeListArray.from_arrays(flat, len(cols))
    table = pa.Table.from_arrays(keys + [vec], names=KEYS + ["vec"])
    path = lay.root / f"shard-{shard:05d}.parquet"
    write_parquet(table, path, table.num_rows, **lay.options)


Writer = Callable[[Layout, int, list[pa.Array], np.ndarray], None]


def only_shards(write: Writer, shards: range) -> Writer:
    """``write``, skipping the shards outside ``shards``."""

    def some(lay: Layout, shard: int, keys: list[pa.Array], cols: np.ndarray) -> None:
        if shard in shards:
            write(lay, shard, keys, cols)

    return some


@dataclass
class Truth:
    """What the answers must be, kept while generating."""

    neuron: np.ndarray | None = None  # float16 [rows]
    token: np.ndarray | None = None  # float16 [width]
    cosine: np.ndarray | None = None  # float64 [rows], against ``direction``


def write_all(data: Activations, writers: dict[Layout, Writer], direction=None) -> Truth:
    """Generate the shards once and write each with every writer, two threads at a time."""
    truth = Truth(neuron=np.empty(data.rows, np.float16))
    if direction is not None:
        truth.cosine = np.empty(data.rows)
    with ThreadPoolExecutor(max_workers=2) as pool:  # pyarrow encodes without the GIL
        for shard, start, cols in data.shards():
            n = cols.shape[1]
            if NEURON < data.width:
                truth.neuron[start : start + n] = cols[NEURON]
            if start <= TOKEN_ROW < start + n:
                truth.token = cols[:, TOKEN_ROW - start].copy()
            if direction is not None:
                x = cols.astype(np.float32)
                norms = np.sqrt(np.einsum("ij,ij->j", x, x, dtype=np.float64))
                scores = (direction @ x) / (norms * np.linalg.norm(direction))
                truth.cosine[start : start + n] = scores
            keys = key_columns(start, n)
            jobs = [
                pool.submit(lay.timed, partial(w, lay, shard, keys, cols))
                for lay, w in writers.items()
            ]
            for job in jobs:
                job.result()  # the next shard reuses nothing, but bounds memory to one shard
    for lay in writers:
        for path in sorted(lay.root.rglob("*.parquet")):
            lay.add(path)
    return truth


def compact(
    blocked: Layout, block: int, targets: dict[Layout, list[int]], row_groups: dict[Layout, int]
) -> None:
    """Merge each block's shard files into one file per target layout.

    A target's ``write_s`` = reading the block's shards (shared by the targets) + writing
    its file. ``targets`` maps each compacted layout to the blocks it gets.
    """
    blocks = sorted({b for bs in targets.values() for b in bs})
    with ThreadPoolExecutor(max_workers=2) as pool:
        for b in blocks:
            t0, c0 = time.perf_counter(), time.thread_time()
            files = sorted(block_dir(blocked.root, b).glob("*.parquet"))
            table = pa.concat_tables([pq.ParquetFile(f).read() for f in files])
            read_s, read_cpu = time.perf_counter() - t0, time.thread_time() - c0
            todo = [lay for lay, bs in targets.items() if b in bs]
            jobs = []
            for lay in todo:
                path = block_dir(lay.root, b) / "part-0.parquet"
                write = partial(write_parquet, table, path, row_groups[lay], **lay.options)
                jobs.append(pool.submit(lay.timed, write))
            for job, lay in zip(jobs, todo, strict=True):
                job.result()
                lay.write_s += read_s
                lay.write_cpu_s += read_cpu
                lay.add(block_dir(lay.root, b) / "part-0.parquet")
            del table
            shutil.rmtree(block_dir(blocked.root, b))  # disk: its shards are measured


# -- measuring ----------------------------------------------------------------------------


def connect(threads: int | None = None) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()  # a new in-memory database: nothing cached from earlier runs
    con.execute("SET parquet_metadata_cache = true")
    if threads:
        con.execute(f"SET threads = {threads}")
    return con


def profile(plan: str) -> dict:
    """Data read, time, files and row groups scanned, from an EXPLAIN ANALYZE rendering."""
    plan = plan.replace(",", "")
    read = re.search(r"Data Read:\s*([\d.]+)\s*(bytes|kB|MB|GB|TB)", plan)
    total = re.search(r"Total Time:\s*([\d.]+)s", plan)
    files = [int(x) for x in re.findall(r"Total Files Read:\s*(\d+)", plan)]
    op = next((o for o in ("Positional Scan", "Positional Join") if o in plan), None)
    return {
        "data_read": int(float(read.group(1)) * _UNITS[read.group(2)]) if read else None,
        "total_s": float(total.group(1)) if total else None,
        "scanning_files": [
            f"{a}/{b}" for a, b in re.findall(r"Scanning Files:\s*(\d+)/(\d+)", plan)
        ],
        "files_read": max(files) if files else None,
        "row_groups": [
            f"{a}/{b}" for a, b in re.findall(r"Row Groups Scanned:\s*(\d+)\s*/\s*(\d+)", plan)
        ],
        "operator": op,
    }


def _run(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[float, float, list]:
    """(wall s, CPU s of this process: DuckDB's threads included, rows)."""
    t0, c0 = time.perf_counter(), time.process_time()
    rows = con.sql(sql).fetchall()
    return time.perf_counter() - t0, time.process_time() - c0, rows


def measure(
    sql: str, repeats: int, footer_bytes: int, check: Callable[[list], None], heavy: bool = False
) -> dict:
    """Cold and warm times (best of ``repeats``), the answer checked, and EXPLAIN ANALYZE.

    Cold: the first run in a fresh connection; warm: the second, same connection. A
    ``heavy`` query (a scan of every value) runs once cold and ``repeats - 1`` times warm,
    and its cold EXPLAIN ANALYZE's Total Time counts as a second cold run.
    """
    cold, warm, cpu = [], [], []
    for _ in range(1 if heavy else repeats):
        con = connect()
        wall, c, result = _run(con, sql)
        cold.append(wall)
        check(result)
        for _ in range(max(1, repeats - 1) if heavy else 1):
            wall, c, _ = _run(con, sql)
            warm.append(wall)
            cpu.append(c)
        con.close()
    con = connect()
    first = profile(con.sql(f"EXPLAIN ANALYZE {sql}").fetchall()[0][1])
    second = first if heavy else profile(con.sql(f"EXPLAIN ANALYZE {sql}").fetchall()[0][1])
    con.close()
    if heavy and first["total_s"]:
        cold.append(first["total_s"])
    return {
        "cold_s": min(cold),
        "warm_s": min(warm),
        "warm_cpu_s": min(cpu),
        "cold_spread_s": [round(min(cold), 4), round(max(cold), 4)],
        "warm_spread_s": [round(min(warm), 4), round(max(warm), 4)],
        "read_cold": first["data_read"],
        "read_warm": None if heavy else second["data_read"],
        "footer_bytes": footer_bytes,
        **{k: first[k] for k in ("scanning_files", "files_read", "row_groups", "operator")},
    }


def best_of(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def bind_s(glob: str, hive: bool, repeats: int) -> float:
    """Seconds to CREATE VIEW over a glob in a fresh connection (globs, reads one footer)."""

    def bind() -> None:
        con = connect()
        opts = f", {HIVE}" if hive else ""
        con.execute(f"CREATE VIEW v AS SELECT * FROM read_parquet('{glob}'{opts})")
        con.close()

    return best_of(bind, repeats)[0]


# -- questions ----------------------------------------------------------------------------


def source(lay: Layout, block: int | None = None) -> str:
    """read_parquet over a layout: its whole hive glob, or one block's directory."""
    if (lay.root / "fam").exists():
        if block is not None:
            return f"read_parquet('{block_dir(lay.root, block)}/*.parquet')"
        return f"read_parquet('{lay.root}/fam/*/*/*.parquet', {HIVE})"
    return f"read_parquet('{lay.root}/*.parquet')"


def neuron_sql(lay: Layout, block: int | None, via: str) -> tuple[str, str, str]:
    """(FROM clause, WHERE clause, column) of neuron NEURON; ``via`` is 'hive' or 'path'."""
    if block is None:
        return source(lay), "", f"d{NEURON}"
    col = f"d{NEURON % block}"
    if via == "path":
        return source(lay, NEURON // block), "", col
    return source(lay), f"WHERE layer = 0 AND block = {NEURON // block}", col


def check_topk(truth: Truth) -> Callable[[list], None]:
    col = truth.neuron.astype(np.float32)
    want = np.lexsort((np.arange(len(col)), -col))[:TOP]

    def check(result: list) -> None:
        got = np.array([s * CONTEXT + p for _r, s, p, _v in result])
        assert np.array_equal(got, want), f"top-k rows differ: {got[:5]} vs {want[:5]}"
        assert all(r == RUN_ID for r, *_ in result)

    return check


def check_mean(truth: Truth) -> Callable[[list], None]:
    want = truth.neuron.astype(np.float64).mean()

    def check(result: list) -> None:
        assert abs(result[0][0] - want) < 1e-6 * max(1.0, abs(want)), (result[0][0], want)

    return check


def check_token(truth: Truth, kind: str) -> Callable[[list], None]:
    def check(result: list) -> None:
        if kind == "wide":
            got = np.array(result[0], np.float32)
        elif kind == "blocked":
            got = np.concatenate([np.array(r[1:], np.float32) for r in result])
        else:
            got = np.array(result[0][0], np.float32)
        assert np.array_equal(got, truth.token.astype(np.float32)), "token vector differs"

    return check


def check_cosine(truth: Truth) -> Callable[[list], None]:
    order = np.argsort(-truth.cosine, kind="stable")[:TOP]
    values = truth.cosine[order]

    def check(result: list) -> None:
        got = np.array([v for _s, _p, v in result])
        assert np.allclose(got, values, atol=1e-4), f"cosine scores {got[:3]} vs {values[:3]}"
        rows = {s * CONTEXT + p for s, p, _v in result}
        sure = {int(r) for r, v in zip(order, values, strict=True) if v > values[-1] + 1e-4}
        assert sure <= rows, f"cosine top-k lacks rows {sorted(sure - rows)}"

    return check


def q_topk(lay: Layout, block: int | None, via: str, truth: Truth, repeats: int) -> dict:
    frm, where, col = neuron_sql(lay, block, via)
    sql = (
        f"SELECT run_id, seq_id, pos, {col} AS v FROM {frm} {where} "
        f"ORDER BY v DESC, seq_id, pos LIMIT {TOP}"
    )
    under = None if block is None else block_dir(lay.root, NEURON // block)
    return measure(sql, repeats, lay.footer_bytes(under), check_topk(truth))


def q_mean(lay: Layout, block: int | None, via: str, truth: Truth, repeats: int) -> dict:
    frm, where, col = neuron_sql(lay, block, via)
    under = None if block is None else block_dir(lay.root, NEURON // block)
    sql = f"SELECT avg({col}) FROM {frm} {where}"
    return measure(sql, repeats, lay.footer_bytes(under), check_mean(truth))


def q_token(lay: Layout, kind: str, truth: Truth, repeats: int) -> dict:
    seq, pos = TOKEN_ROW // CONTEXT, TOKEN_ROW % CONTEXT
    where = f"WHERE seq_id = {seq} AND pos = {pos}"
    if kind == "wide":
        sql = f"SELECT COLUMNS('^d[0-9]+$') FROM {source(lay)} {where}"
    elif kind == "blocked":
        sql = f"SELECT block, COLUMNS('^d[0-9]+$') FROM {source(lay)} {where} ORDER BY block"
    else:
        sql = f"SELECT vec FROM {source(lay)} {where}"
    return measure(sql, repeats, lay.footer_bytes(), check_token(truth, kind), heavy=True)


def _floats(v: np.ndarray) -> str:
    return "[" + ", ".join(f"{x:.9g}" for x in v) + f"]::FLOAT[{len(v)}]"


def _array(n: int) -> str:
    return "[" + ", ".join(f"d{i}" for i in range(n)) + f"]::FLOAT[{n}]"


def block_parts(lay: Layout, block: int, d: np.ndarray) -> list[str]:
    """Per block: keys, partial inner product with ``d`` and partial squared norm."""
    return [
        f"SELECT seq_id, pos, array_inner_product(x, {_floats(d[b * block : (b + 1) * block])})"
        f" AS dot, array_inner_product(x, x) AS sq FROM (SELECT seq_id, pos, "
        f"{_array(block)} AS x FROM {source(lay, b)})"
        for b in range(len(d) // block)
    ]


def cosine_sqls(lays: dict[str, Layout], block: int, d: np.ndarray) -> dict[str, str]:
    """The cosine top-20 in SQL on each layout (blocked: three ways to combine blocks)."""
    width, norm = len(d), float(np.linalg.norm(d))
    tail = f"ORDER BY v DESC, seq_id, pos LIMIT {TOP}"
    parts = block_parts(lays["blocked"], block, d)
    nb = len(parts)
    positional = " POSITIONAL JOIN ".join(f"({p}) AS t{b}" for b, p in enumerate(parts))
    dots = " + ".join(f"t{b}.dot" for b in range(nb))
    sqs = " + ".join(f"t{b}.sq" for b in range(nb))
    joined = f"({parts[0]}) AS t0 " + " ".join(
        f"JOIN ({p}) AS t{b} USING (seq_id, pos)" for b, p in enumerate(parts) if b
    )
    union = " UNION ALL ".join(f"({p})" for p in parts)
    cos = f"({dots}) / (sqrt({sqs}) * {norm})"
    return {
        f"wide: [d0..d{width - 1}]::FLOAT[{width}]": (
            f"SELECT seq_id, pos, array_cosine_similarity({_array(width)}, {_floats(d)}) AS v "
            f"FROM {source(lays['wide'])} {tail}"
        ),
        f"blocked{block}: POSITIONAL JOIN": (
            f"SELECT t0.seq_id AS seq_id, t0.pos AS pos, {cos} AS v FROM {positional} {tail}"
        ),
        f"blocked{block}: JOIN USING (seq_id, pos)": (
            f"SELECT seq_id, pos, {cos} AS v FROM {joined} {tail}"
        ),
        f"blocked{block}: UNION ALL + GROUP BY keys": (
            f"SELECT seq_id, pos, sum(dot) / (sqrt(sum(sq)) * {norm}) AS v FROM ({union}) "
            f"GROUP BY seq_id, pos {tail}"
        ),
        f"vector: vec::FLOAT[{width}]": (
            f"SELECT seq_id, pos, array_cosine_similarity(vec::FLOAT[{width}], {_floats(d)}) "
            f"AS v FROM {source(lays['vector'])} {tail}"
        ),
    }


def numpy_cosine(lay: Layout, kind: str, d: np.ndarray) -> list[tuple]:
    """The pyarrow -> numpy baseline: read each file, float32, X @ d / norms, top-20."""
    width = len(d)
    scores, seqs, poss = [], [], []
    for path in sorted(lay.footers):
        if kind == "wide":
            names = ["seq_id", "pos"] + [f"d{i}" for i in range(width)]
            t = pq.ParquetFile(path).read(columns=names)
            xt = np.empty((width, t.num_rows), np.float32)
            for i in range(width):
                xt[i] = t.column(2 + i).chunk(0).to_numpy()
        else:
            t = pq.ParquetFile(path).read(columns=["seq_id", "pos", "vec"])
            flat = t.column("vec").combine_chunks().flatten().to_numpy()
            xt = flat.reshape(t.num_rows, width).astype(np.float32).T
        norms = np.sqrt(np.einsum("ij,ij->j", xt, xt))
        scores.append((d @ xt) / (norms * np.linalg.norm(d)))
        seqs.append(t.column("seq_id").to_numpy())
        poss.append(t.column("pos").to_numpy())
    s, seq, pos = np.concatenate(scores), np.concatenate(seqs), np.concatenate(poss)
    top = np.argpartition(-s, TOP)[:TOP]
    top = top[np.lexsort((pos[top], seq[top], -s[top]))]
    return [(int(seq[i]), int(pos[i]), float(s[i])) for i in top]


def positional_check(
    lay: Layout, parts: list[str], threads: int, what: str, missing: bool = False
) -> dict:
    """Rows whose keys differ across the block inputs of a POSITIONAL JOIN.

    ``parts``: one SELECT per block with ``seq_id, pos`` (and ``dot`` when the inputs are
    computed, not raw scans; it is used so that the optimizer keeps the computation).
    ``missing``: block 1 lacks its last shard file, as a half-written block would.
    """
    if missing:
        files = sorted(block_dir(lay.root, 1).glob("*.parquet"))[:-1]
        parts = list(parts)
        parts[1] = (
            "SELECT seq_id, pos FROM read_parquet([" + ", ".join(f"'{f}'" for f in files) + "])"
        )
    bad = " OR ".join(
        f"t0.seq_id IS DISTINCT FROM t{b}.seq_id OR t0.pos IS DISTINCT FROM t{b}.pos"
        + (f" OR t{b}.dot IS NULL" if "dot" in parts[b] else "")
        for b in range(1, len(parts))
    )
    frm = " POSITIONAL JOIN ".join(f"({p}) AS t{b}" for b, p in enumerate(parts))
    sql = f"SELECT count(*), count(*) FILTER (WHERE {bad}) FROM {frm}"
    con = connect(threads)
    wall, _cpu, result = _run(con, sql)
    plan = con.sql(f"EXPLAIN {sql}").fetchall()[0][1]
    con.close()
    rows, mismatched = result[0]
    op = next((o for o in ("Positional Scan", "Positional Join") if o in plan), None)
    return {
        "layout": lay.name,
        "inputs": what,
        "threads": threads,
        "rows": rows,
        "mismatched": mismatched,
        "seconds": wall,
        "operator": op,
        "missing_file": missing,
    }


def raw_parts(lay: Layout, blocks: int) -> list[str]:
    return [f"SELECT * FROM {source(lay, b)}" for b in range(blocks)]


# -- the run ------------------------------------------------------------------------------


class Run:
    """The figures, the disk in use and progress lines (stderr) of one benchmark run."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work, self.t0 = args, work, time.perf_counter()
        self.truth = Truth()
        self.fig: dict = {
            "rows": args.rows,
            "width": args.width,
            "cos_width": args.cos_width,
            "repeats": args.repeats,
            "duckdb": duckdb.__version__,
            "pyarrow": pa.__version__,
            "threads": int(connect().sql("SELECT current_setting('threads')").fetchall()[0][0]),
            "storage": {},
            "topk": {},
            "mean": {},
            "token": {},
            "token_cos_width": {},
            "cosine": {},
            "bind_s": {},
            "compacted": {},
            "positional": [],
            "peak_disk_gb": 0.0,
            "load": [],
        }

    def log(self, msg: str) -> None:
        load = os.getloadavg()[0]
        self.fig["load"].append(round(load, 1))
        elapsed = time.perf_counter() - self.t0
        print(f"[{elapsed:6.0f} s, load {load:4.1f}] {msg}", file=sys.stderr, flush=True)

    def disk(self) -> None:
        used = sum(p.stat().st_size for p in self.work.rglob("*.parquet"))
        self.fig["peak_disk_gb"] = max(self.fig["peak_disk_gb"], used / 1e9)

    def storage(self, lay: Layout) -> None:
        values = lay.values
        self.fig["storage"][lay.name] = {
            "files": len(lay.footers),
            "bytes": lay.bytes,
            "footer_bytes": lay.footer_bytes(),
            "footer_per_file": lay.footer_bytes() // max(1, len(lay.footers)),
            "bytes_per_value": lay.bytes / values,
            "write_s": lay.write_s,
            "write_cpu_s": lay.write_cpu_s,
            "write_cpu_ns_per_value": lay.write_cpu_s / values * 1e9,
        }


def phase_wide(run: Run, blocks: tuple[int, ...], with_wide: bool) -> dict[int, Layout]:
    """Write wide / vector / blocked at ``--width``; (a), (b), (d) and binding on each."""
    a, r, f = run.args, run.args.repeats, run.fig
    writers: dict[Layout, Writer] = {}
    wide = vector = None
    if with_wide:
        # the vector layout gets the token's shard and 4 on each side: its point lookup
        # opens one file and its footers are 1.2 KB, while each shard costs ~2.7 CPU-s
        # to write (most of it in the allocator: sys time)
        shard = TOKEN_ROW // (SHARD_BYTES // (2 * a.width))
        near = range(max(0, shard - 4), shard + 5)
        wide = Layout("wide", run.work / "wide")
        vector = Layout(f"vector (shards {near.start}-{near.stop - 1})", run.work / "vector")
        writers[wide], writers[vector] = write_wide, only_shards(write_vector, near)
    blocked = {b: Layout(f"blocked{b}", run.work / f"blocked{b}") for b in blocks}
    for b, lay in blocked.items():
        writers[lay] = blocked_writer(b)
    run.log(f"writing {', '.join(x.name for x in writers)} ({a.rows} x {a.width})")
    truth = run.truth = write_all(Activations(a.rows, a.width, seed=0), writers)
    run.disk()
    for lay in writers:
        run.storage(lay)
    run.log("written; querying")
    if wide is not None:
        f["topk"]["wide"] = q_topk(wide, None, "", truth, r)
        f["mean"]["wide"] = q_mean(wide, None, "", truth, r)
        f["token"]["wide"] = q_token(wide, "wide", truth, r)
        f["token"]["vector"] = q_token(vector, "vector", truth, r)
        f["bind_s"]["wide"] = bind_s(f"{wide.root}/*.parquet", False, r)
        wide.delete()
        vector.delete()
        run.log("wide and vector queried")
    for b, lay in blocked.items():
        for via in ("hive", "path"):
            f["topk"][f"blocked{b} ({via})"] = q_topk(lay, b, via, truth, r)
            f["mean"][f"blocked{b} ({via})"] = q_mean(lay, b, via, truth, r)
        f["token"][f"blocked{b}"] = q_token(lay, "blocked", truth, r)
        f["bind_s"][f"blocked{b} shards"] = bind_s(f"{lay.root}/fam/*/*/*.parquet", True, r)
        run.log(f"blocked{b} queried")
    return blocked


def phase_compact(run: Run, blocked: Layout, block: int, full: tuple[str, ...]) -> None:
    """Compact a blocked layout into row groups of 16k/32k/64k rows (+ a page index).

    The variants named in ``full`` get every block, and (d) and binding are measured on
    them; the others get only neuron 1337's block, for (a) and (b).
    """
    a, r, f, truth = run.args, run.args.repeats, run.fig, run.truth
    page_index = {"write_page_index": True, "max_rows_per_page": 1024}
    variants = {
        "rg16k": (16384, {}),
        "rg32k": (32768, {}),
        "rg64k": (65536, {}),
        "rg64k+page index": (65536, page_index),
    }
    if block != 512:
        variants.pop("rg64k+page index")
    lays = {
        Layout(
            f"compacted{block} {k}",
            run.work / f"compacted{block}-{k.replace(' ', '_')}",
            options=opts,
        ): (k, rg)
        for k, (rg, opts) in variants.items()
    }
    everything = list(range(a.width // block))
    targets = {lay: everything if k in full else [NEURON // block] for lay, (k, _) in lays.items()}
    run.log(f"compacting blocked{block}")
    compact(blocked, block, targets, {lay: rg for lay, (_, rg) in lays.items()})
    run.disk()
    blocked.delete()
    run.log(f"compacted{block} written; querying")
    for lay, (k, rg) in lays.items():
        first = next(iter(lay.footers))
        row = {
            "block": block,
            "row_group_rows": rg,
            "blocks": len(targets[lay]),
            "row_groups_per_file": pq.read_metadata(first).num_row_groups,
            "footer_per_file": lay.footer_bytes() // len(lay.footers),
            "compact_s": lay.write_s,
            "compact_cpu_s": lay.write_cpu_s,
            "bytes_per_value": lay.bytes / lay.values,
            "topk": q_topk(lay, block, "hive", truth, r),
            "mean": q_mean(lay, block, "hive", truth, r),
        }
        if k in full:
            run.storage(lay)
            row["token"] = q_token(lay, "blocked", truth, r)
            row["bind_s"] = bind_s(f"{lay.root}/fam/*/*/*.parquet", True, r)
        f["compacted"][lay.name] = row
        lay.delete()


def phase_cosine(run: Run, block: int) -> None:
    """(c): cosine top-20 at ``--cos-width`` on wide, blocked and vector; numpy baseline.

    Also (d) at this width with and without a page index, and POSITIONAL JOIN checks.
    """
    a, r, f = run.args, run.args.repeats, run.fig
    w = a.cos_width
    d = np.random.default_rng(3).standard_normal(w).astype(np.float32)
    index = {"write_page_index": True, "max_rows_per_page": 1024}
    lays = {
        "wide": Layout(f"wide@{w}", run.work / f"wide{w}"),
        "blocked": Layout(f"blocked{block}@{w}", run.work / f"blocked{block}-{w}"),
        "vector": Layout(f"vector@{w}", run.work / f"vector{w}"),
        "wide+pi": Layout(f"wide@{w}+page index", run.work / f"wide{w}pi", options=index),
    }
    writers = {
        lays["wide"]: write_wide,
        lays["blocked"]: blocked_writer(block),
        lays["vector"]: write_vector,
        lays["wide+pi"]: write_wide,
    }
    run.log(f"writing cosine layouts ({a.rows} x {w})")
    truth = run.truth = write_all(Activations(a.rows, w, seed=2), writers, direction=d)
    run.disk()
    for lay in lays.values():
        run.storage(lay)
    for k in ("wide", "vector", "wide+pi"):
        kind = "vector" if k.startswith("vector") else "wide"
        f["token_cos_width"][lays[k].name] = q_token(lays[k], kind, truth, r)
    lays.pop("wide+pi").delete()
    run.log("(d) at cosine width done")
    check = check_cosine(truth)
    for kind in ("wide", "vector"):
        seconds, result = best_of(lambda k=kind: numpy_cosine(lays[k], k, d), max(2, r - 1))
        check(result)
        f["cosine"][f"numpy ({kind} files)"] = {"cold_s": seconds, "warm_s": seconds}
    run.log("numpy baseline done")
    for name, sql in cosine_sqls(lays, block, d).items():
        f["cosine"][name] = measure(sql, r, lays["blocked"].footer_bytes(), check, heavy=True)
        run.log(f"cosine {name}")
    parts = block_parts(lays["blocked"], block, d)
    for threads in (f["threads"], 8):
        f["positional"].append(positional_check(lays["blocked"], parts, threads, "computed"))
    run.log("positional checks done")
    for lay in lays.values():
        lay.delete()


# -- printing -----------------------------------------------------------------------------


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def print_queries(title: str, rows: dict[str, dict]) -> None:
    if not rows:
        return
    print(f"\n{title}")
    print(
        f"{'layout':28} {'cold_s':>8} {'warm_s':>8} {'warmCPU':>8} {'readMB cold':>11} "
        f"{'warm':>7} {'footerMB':>9} {'files scanned':>13} {'row groups':>14}"
    )
    for name, q in rows.items():
        files = ",".join(q["scanning_files"]) or (str(q["files_read"]) if q["files_read"] else "-")
        groups = ",".join(q["row_groups"][:2]) or "-"
        print(
            f"{name:28} {q['cold_s']:8.4f} {q['warm_s']:8.4f} {q['warm_cpu_s']:8.3f} "
            f"{_mb(q['read_cold']):>11} {_mb(q['read_warm']):>7} {_mb(q['footer_bytes']):>9} "
            f"{files:>13} {groups:>14}"
        )


def print_report(fig: dict) -> None:
    print(
        f"{fig['rows']} rows x {fig['width']} float16 (cosine at {fig['cos_width']}), "
        f"best of {fig['repeats']}, DuckDB {fig['duckdb']} ({fig['threads']} threads), "
        f"pyarrow {fig['pyarrow']}; load average {min(fig['load'])}-{max(fig['load'])}"
    )
    print(
        "MB = 10^6 bytes; cold = fresh connection (OS page cache warm); warm = 2nd run, "
        "metadata cache on; readMB = EXPLAIN ANALYZE Data Read; footerMB = footers of the "
        "files the query opens"
    )
    comp = fig["compacted"]
    print_queries(
        f"(a) top-{TOP} of neuron {NEURON}",
        {**fig["topk"], **{k: v["topk"] for k, v in comp.items()}},
    )
    print_queries(
        f"(b) mean of neuron {NEURON}", {**fig["mean"], **{k: v["mean"] for k, v in comp.items()}}
    )
    print_queries(
        f"(d) one token's whole vector at width {fig['width']}",
        {**fig["token"], **{k: v["token"] for k, v in comp.items() if "token" in v}},
    )
    print_queries(
        f"(d) one token's whole vector at width {fig['cos_width']}", fig["token_cos_width"]
    )
    print("\ncompacted files (blocks = 1: only neuron 1337's block was compacted)")
    print(
        f"{'layout':30} {'blocks':>6} {'RGs/file':>8} {'footer KB/file':>14} "
        f"{'B/value':>8} {'compact_s':>10} {'CPU s':>7}"
    )
    for k, v in comp.items():
        print(
            f"{k:30} {v['blocks']:6d} {v['row_groups_per_file']:8d} "
            f"{v['footer_per_file'] / 1e3:14.1f} {v['bytes_per_value']:8.4f} "
            f"{v['compact_s']:10.2f} {v['compact_cpu_s']:7.2f}"
        )
    cos = fig["cosine"]
    np_wide, np_vec = cos["numpy (wide files)"]["warm_s"], cos["numpy (vector files)"]["warm_s"]
    print(
        f"\n(c) cosine top-{TOP} at width {fig['cos_width']} (/np: DuckDB warm over the "
        "pyarrow -> numpy scan of the wide or the vector files)"
    )
    print(
        f"{'method':42} {'cold_s':>8} {'warm_s':>8} {'/np wide':>8} {'/np vec':>8} "
        f"{'warmCPU':>8} {'readMB':>8} {'operator':>16}"
    )
    for k, v in cos.items():
        print(
            f"{k:42} {v['cold_s']:8.3f} {v['warm_s']:8.3f} {v['warm_s'] / np_wide:8.2f} "
            f"{v['warm_s'] / np_vec:8.2f} "
            f"{v.get('warm_cpu_s', float('nan')):8.2f} {_mb(v.get('read_cold')):>8} "
            f"{v.get('operator') or '-':>16}"
        )
    print("\nPOSITIONAL JOIN across block globs: rows whose keys differ")
    for p in fig["positional"]:
        note = "  [block 1 lacks its last shard]" if p["missing_file"] else ""
        print(
            f"  {p['layout']:16} {p['inputs']:9} threads {p['threads']}: {p['mismatched']} "
            f"of {p['rows']} ({p['operator']}, {p['seconds']:.2f} s){note}"
        )
    print("\n(e) storage (write = the writing thread's CPU s; wall s under 2 writer threads)")
    print(
        f"{'layout':30} {'files':>6} {'GB':>7} {'footer MB':>10} {'KB/footer':>10} "
        f"{'B/value':>8} {'CPU s':>7} {'ns/value':>9} {'wall s':>7}"
    )
    for k, v in fig["storage"].items():
        print(
            f"{k:30} {v['files']:6d} {v['bytes'] / 1e9:7.3f} {v['footer_bytes'] / 1e6:10.2f} "
            f"{v['footer_per_file'] / 1e3:10.1f} {v['bytes_per_value']:8.4f} "
            f"{v['write_cpu_s']:7.2f} {v['write_cpu_ns_per_value']:9.2f} {v['write_s']:7.2f}"
        )
    binds = ", ".join(f"{k} {v:.4f}" for k, v in fig["bind_s"].items())
    binds += "".join(f", {k} {v['bind_s']:.4f}" for k, v in comp.items() if "bind_s" in v)
    print(f"\nCREATE VIEW over a glob, fresh connection (s, best of {fig['repeats']}): {binds}")
    print(f"peak disk {fig['peak_disk_gb']:.1f} GB, run {fig['run_s']:.0f} s")


def _times(q: dict) -> list:
    return [round(q["cold_s"], 4), round(q["warm_s"], 4), q.get("read_cold")]


def summary(fig: dict) -> dict:
    """The key figures for the JSON line (every figure goes to ``--json-out``)."""
    comp = {
        k: {
            "topk": _times(v["topk"]),
            "mean": _times(v["mean"]),
            "token": _times(v["token"]) if "token" in v else None,
            "row_groups_per_file": v["row_groups_per_file"],
            "footer_per_file": v["footer_per_file"],
            "bind_s": round(v["bind_s"], 4) if "bind_s" in v else None,
            "compact_cpu_s": round(v["compact_cpu_s"], 2),
        }
        for k, v in fig["compacted"].items()
    }
    cos = fig["cosine"]
    np_wide, np_vec = cos["numpy (wide files)"]["warm_s"], cos["numpy (vector files)"]["warm_s"]
    return {
        "rows": fig["rows"],
        "width": fig["width"],
        "cos_width": fig["cos_width"],
        "duckdb": fig["duckdb"],
        "threads": fig["threads"],
        "repeats": fig["repeats"],
        "load": [min(fig["load"]), max(fig["load"])],
        "units": "[cold_s, warm_s, data_read_bytes]",
        "topk": {k: _times(v) for k, v in fig["topk"].items()},
        "mean": {k: _times(v) for k, v in fig["mean"].items()},
        "token": {k: _times(v) for k, v in fig["token"].items()},
        "token_cos_width": {k: _times(v) for k, v in fig["token_cos_width"].items()},
        "compacted": comp,
        "cosine_over_numpy_wide_vec": {
            k: [round(v["warm_s"] / np_wide, 2), round(v["warm_s"] / np_vec, 2)]
            for k, v in cos.items()
        },
        "cosine_warm_s": {k: round(v["warm_s"], 3) for k, v in fig["cosine"].items()},
        "positional_mismatched": {
            f"{p['layout']} {p['inputs']} t{p['threads']}"
            f"{' missing-shard' if p['missing_file'] else ''}": p["mismatched"]
            for p in fig["positional"]
        },
        "storage": {
            k: {
                "bytes_per_value": round(v["bytes_per_value"], 4),
                "footer_per_file": v["footer_per_file"],
                "files": v["files"],
                "write_cpu_s": round(v["write_cpu_s"], 2),
            }
            for k, v in fig["storage"].items()
        },
        "bind_s": {k: round(v, 4) for k, v in fig["bind_s"].items()},
        "peak_disk_gb": round(fig["peak_disk_gb"], 1),
        "run_s": round(fig["run_s"]),
    }


def main() -> None:
    """Command line: ``--rows``, ``--width``, ``--cos-width``, ``--repeats``, ``--json-out``."""
    global TOKEN_ROW  # noqa: PLW0603 - smoke runs with fewer rows move the token
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--width", type=int, default=14_336)
    parser.add_argument("--cos-width", type=int, default=4_096)
    parser.add_argument("--repeats", type=int, default=3, help="timings: best of this many")
    parser.add_argument("--json-out", type=Path, help="also write every figure here")
    args = parser.parse_args()
    if args.width <= NEURON or args.width % 1024 or args.cos_width % 512:
        parser.error("--width must exceed 1337 and be a multiple of 1024; --cos-width of 512")
    if args.rows <= TOKEN_ROW:
        TOKEN_ROW = args.rows * 3 // 5
    work = Path(tempfile.mkdtemp(prefix="arrakis-wide-layouts-"))
    run = Run(args, work)
    try:
        blocked = phase_wide(run, (512,), with_wide=True)
        b512 = blocked[512]
        nb = args.width // 512
        shards = len(list(block_dir(b512.root, 1).glob("*.parquet")))
        checks = [(run.fig["threads"], False), (8, False), (run.fig["threads"], True)]
        for threads, missing in checks[: 3 if shards > 1 else 2]:
            run.fig["positional"].append(
                positional_check(b512, raw_parts(b512, nb), threads, "raw scans", missing)
            )
        phase_compact(run, b512, 512, full=("rg64k", "rg64k+page index"))
        blocked = phase_wide(run, (256, 1024), with_wide=False)
        blocked[1024].delete()
        phase_compact(run, blocked[256], 256, full=())
        phase_cosine(run, 512)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    run.fig["run_s"] = time.perf_counter() - run.t0
    if args.json_out:
        args.json_out.write_text(json.dumps(run.fig, sort_keys=True, default=str))
    print_report(run.fig)
    print(json.dumps(summary(run.fig), sort_keys=True))


if __name__ == "__main__":
    main()
