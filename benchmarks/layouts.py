"""Which Parquet layout for activation vectors: measured with DuckDB on one synthetic table.

    .venv/bin/python benchmarks/layouts.py            # 200k rows x 512 dims, ~2 min
    .venv/bin/python benchmarks/layouts.py --rows 50000 --repeats 3

One float16 matrix (random normal, a few dimensions 8x heavier, as residual streams
have) is written in each layout with the store's writer settings (snappy, dictionary
encoding and statistics on the non-float columns only, ~64 MiB row groups: the options
of ``arrakis_ray/store/parquet.py``), then DuckDB answers on each file:

(a) top-20 rows by one dimension (a neuron's top contexts);
(b) the mean of every dimension;
(c) top-20 rows by cosine similarity with a random direction;

and we record (d) bytes on disk and (e) write time. Layouts:

- ``wide``: one FLOAT16 column per dimension (``d0..d511``), the current store layout;
- ``list16``: one FixedSizeList<float16>[512] column ``vec`` (DuckDB reads ``FLOAT[]``);
- ``list32``: the same list in float32 (in case the float16 list is slow to cast);
- ``both``: the wide columns and a float16 ``vec`` in one file (twice the bytes);
- ``long``: neuron-major, one row per (neuron, token), sorted by neuron, statistics on
  the neuron column (what a second, per-neuron copy of a table would look like).

On ``wide`` the cosine rebuilds the vector in SQL: ``[d0, ..., d511]::FLOAT[512]``.
Every timing is the best of ``--repeats`` runs (the spread is printed too); the answers
of every layout are checked against numpy. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from arrakis_ray.store import parquet as store_parquet

DIM = 123  # the dimension of the top-k query; one of the heavy ones
HEAVY = (7, DIM, 300)  # dimensions scaled by HEAVY_SCALE
HEAVY_SCALE = 8.0
TOP = 20
CONTEXT = 128  # tokens per sequence: seq_id = row // CONTEXT, pos = row % CONTEXT
LAYOUTS = ("wide", "list16", "list32", "both", "long")


def make_data(rows: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(values [rows, width] float16, direction [width] float32)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, width), dtype=np.float32)
    x[:, [h for h in HEAVY if h < width]] *= HEAVY_SCALE
    return x.astype(np.float16), rng.standard_normal(width).astype(np.float32)


def _keys(n: int) -> list[tuple[str, pa.Array]]:
    row = np.arange(n)
    return [
        ("layer", pa.array(np.full(n, 6, np.int16))),
        ("seq_id", pa.array((row // CONTEXT).astype(np.int64))),
        ("pos", pa.array((row % CONTEXT).astype(np.int32))),
    ]


def _vec(values: np.ndarray, dtype: type) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(values, dtype=dtype).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def build_table(layout: str, values: np.ndarray) -> pa.Table:
    """The Arrow table of one layout."""
    n, width = values.shape
    cols = _keys(n)
    if layout in ("wide", "both"):
        by_dim = np.ascontiguousarray(values.T)  # contiguous columns: zero-copy into Arrow
        cols += [(f"d{i}", pa.array(by_dim[i])) for i in range(width)]
    if layout in ("list16", "both"):
        cols.append(("vec", _vec(values, np.float16)))
    if layout == "list32":
        cols.append(("vec", _vec(values, np.float32)))
    if layout == "long":
        row = np.arange(n)
        cols = [
            ("layer", pa.array(np.full(n * width, 6, np.int16))),
            ("neuron", pa.array(np.repeat(np.arange(width, dtype=np.int16), n))),
            ("seq_id", pa.array(np.tile((row // CONTEXT).astype(np.int64), width))),
            ("pos", pa.array(np.tile((row % CONTEXT).astype(np.int32), width))),
            ("value", pa.array(np.ascontiguousarray(values.T).reshape(-1))),
        ]
    return pa.Table.from_arrays([c for _, c in cols], names=[name for name, _ in cols])


def write_like_store(table: pa.Table, path: Path) -> None:
    """``pq.write_table`` with the options of ``arrakis_ray.store.parquet.write_table``.

    Unlike the store's writer (which treats every non-float column as a key), list columns
    get neither dictionaries nor statistics here, as float columns do.
    """
    keys = [
        f.name
        for f in table.schema
        if not pa.types.is_floating(f.type) and not pa.types.is_fixed_size_list(f.type)
    ]
    bytes_per_row = max(1, table.nbytes // max(1, table.num_rows))
    row_group = max(
        store_parquet.MIN_ROW_GROUP_ROWS,
        min(store_parquet.MAX_ROW_GROUP_ROWS, store_parquet.ROW_GROUP_BYTES // bytes_per_row),
    )
    pq.write_table(
        table,
        path,
        compression=store_parquet.COMPRESSION,
        use_dictionary=keys,
        write_statistics=keys,
        row_group_size=row_group,
    )


def _vector_sql(layout: str, width: int) -> str:
    if layout == "wide":
        return "[" + ", ".join(f"d{i}" for i in range(width)) + f"]::FLOAT[{width}]"
    return f"vec::FLOAT[{width}]"  # DuckDB reads a FixedSizeList as FLOAT[]


def queries(layout: str, path: Path, width: int, direction: np.ndarray) -> dict[str, str]:
    """SQL of the three questions on one layout's file (absent where it cannot answer)."""
    src = f"read_parquet('{path}')"
    lit = "[" + ", ".join(repr(float(v)) for v in direction) + f"]::FLOAT[{width}]"
    if layout == "long":
        return {
            "topk": f"SELECT seq_id, pos, value AS v FROM {src} WHERE neuron = {DIM} "
            f"ORDER BY v DESC, seq_id, pos LIMIT {TOP}",
            "mean": f"SELECT neuron AS k, avg(value) AS m FROM {src} GROUP BY neuron ORDER BY k",
        }
    if layout in ("wide", "both"):
        topk = f"SELECT seq_id, pos, d{DIM} AS v FROM {src} ORDER BY v DESC, seq_id, pos"
        mean = f"SELECT avg(COLUMNS('^d[0-9]+$')) FROM {src}"
    else:
        topk = f"SELECT seq_id, pos, vec[{DIM + 1}] AS v FROM {src} ORDER BY v DESC, seq_id, pos"
        mean = (
            f"SELECT k, avg(v) AS m FROM (SELECT unnest(vec) AS v, unnest(range({width})) AS k "
            f"FROM {src}) GROUP BY k ORDER BY k"
        )
    vector = _vector_sql("list16" if layout == "both" else layout, width)
    cosine = (
        f"SELECT seq_id, pos, array_cosine_similarity({vector}, {lit}) AS v FROM {src} "
        f"ORDER BY v DESC, seq_id, pos LIMIT {TOP}"
    )
    return {"topk": f"{topk} LIMIT {TOP}", "mean": mean, "cosine": cosine}


def expected(values: np.ndarray, direction: np.ndarray) -> dict[str, np.ndarray]:
    """The three answers computed with numpy: row ids of the top-k and the means."""
    col = values[:, DIM].astype(np.float32)
    rows = np.arange(len(col))
    x = values.astype(np.float32)
    cos = (x @ direction) / (np.linalg.norm(x, axis=1) * np.linalg.norm(direction))
    return {
        "topk": np.lexsort((rows, -col))[:TOP],
        "mean": values.astype(np.float64).mean(axis=0),
        "cosine": np.argsort(-cos, kind="stable")[:TOP],
        "cosine_values": np.sort(cos)[::-1][:TOP],
    }


def check(name: str, layout: str, result: list[tuple], want: dict[str, np.ndarray]) -> None:
    """Raise AssertionError if a layout's answer differs from numpy's."""
    if name == "mean":
        means = np.array(result[0], dtype=np.float64) if len(result) == 1 else None
        if means is None:  # long / list: one row per dimension
            means = np.array([m for _k, m in result], dtype=np.float64)
        err = np.abs(means - want["mean"]).max()
        assert err < 1e-4, f"{layout}: mean per dimension off by {err}"
        return
    got = np.array([s * CONTEXT + p for s, p, _v in result])
    if name == "topk":
        assert np.array_equal(got, want["topk"]), f"{layout}: top-k rows differ"
        return
    # cosine: DuckDB and numpy round differently in float32; the scores must agree and
    # the rows may only differ where two scores tie within rounding
    values = np.array([v for _s, _p, v in result])
    assert np.allclose(values, want["cosine_values"], atol=1e-5), f"{layout}: cosine scores"
    cut = want["cosine_values"][-1]
    sure = {
        int(r) for r, v in zip(want["cosine"], want["cosine_values"], strict=True) if v > cut + 1e-5
    }
    missing = sure - set(got.tolist())
    assert not missing, f"{layout}: cosine top-k lacks rows {sorted(missing)}"


def timed(fn: Callable[[], object], repeats: int) -> tuple[list[float], object]:
    """Wall times of ``repeats`` calls and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def run(rows: int, width: int, repeats: int, layouts: tuple[str, ...], workdir: Path) -> dict:
    """Write every layout, time the questions, check the answers; returns the figures."""
    values, direction = make_data(rows, width)
    want = expected(values, direction)
    con = duckdb.connect()
    figures: dict = {
        "rows": rows,
        "width": width,
        "repeats": repeats,
        "threads": int(con.sql("SELECT current_setting('threads')").fetchall()[0][0]),
        "duckdb": duckdb.__version__,
        "pyarrow": pa.__version__,
        "layouts": {},
    }
    for layout in layouts:
        path = workdir / f"{layout}.parquet"
        table = build_table(layout, values)
        writes, _ = timed(lambda t=table, p=path: write_like_store(t, p), min(repeats, 3))
        del table
        meta = pq.read_metadata(path)
        out = {
            "bytes": path.stat().st_size,
            "write_s": min(writes),
            "row_groups": meta.num_row_groups,
        }
        for name, sql in queries(layout, path, width, direction).items():
            times, result = timed(lambda q=sql: con.sql(q).fetchall(), repeats)
            check(name, layout, result, want)
            out[f"{name}_s"] = min(times)
            out[f"{name}_spread_s"] = [round(min(times), 4), round(max(times), 4)]
            out[f"{name}_median_s"] = statistics.median(times)
        figures["layouts"][layout] = out
        path.unlink()
    return figures


def print_table(figures: dict) -> None:
    """One line per layout: best times, bytes, write time."""
    head = f"{'layout':8} {'topk_s':>8} {'mean_s':>8} {'cosine_s':>9} {'MB':>8} {'write_s':>8}"
    print(
        f"{figures['rows']} rows x {figures['width']} dims float16, best of "
        f"{figures['repeats']}, DuckDB {figures['duckdb']} ({figures['threads']} threads)"
    )
    print(head)
    for layout, f in figures["layouts"].items():
        cos = f"{f['cosine_s']:9.3f}" if "cosine_s" in f else f"{'-':>9}"
        print(
            f"{layout:8} {f['topk_s']:8.4f} {f['mean_s']:8.3f} {cos} "
            f"{f['bytes'] / 1e6:8.1f} {f['write_s']:8.3f}"
        )
    print("spread (min, max) per query:")
    for layout, f in figures["layouts"].items():
        parts = [f"{k[:-9]} {v}" for k, v in f.items() if k.endswith("_spread_s")]
        print(f"  {layout:8} " + "; ".join(parts))


def main() -> None:
    """Command line: ``--rows``, ``--width``, ``--repeats``, ``--layouts``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="timings: best of this many")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated")
    args = parser.parse_args()
    layouts = tuple(x for x in args.layouts.split(",") if x)
    unknown = set(layouts) - set(LAYOUTS)
    if unknown or args.width <= DIM:
        parser.error(f"unknown layouts {sorted(unknown)} or width <= {DIM}")
    workdir = Path(tempfile.mkdtemp(prefix="arrakis-layouts-"))
    try:
        figures = run(args.rows, args.width, args.repeats, layouts, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(figures)
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
