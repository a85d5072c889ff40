"""Queries at LLM widths and 1M rows: store layout 2 against layout 1 and a numpy scan.

    .venv/bin/python benchmarks/scale.py --quick     # 200k rows per layer: ~6 min, 7 GB disk
    .venv/bin/python benchmarks/scale.py             # 1M rows: ~35 GB of disk at the peak
    .venv/bin/python benchmarks/scale.py --quick --explain   # + every EXPLAIN ANALYZE

``--quick`` spends ~4.5 CPU-minutes (writing ~20 GB: both layouts and the compaction), so
its wall time depends on the other tenants of a 2-core machine (6 to 14 minutes seen).

Three synthetic runs are written through the project's own writer (``RunWriter``: one file
per (layer, column block of 512 dimensions, shard), the tokens, the vocabulary, completion
markers, a typed manifest from ``tests/runs.py``), then compacted as the harvest driver
does (``store/compact.py``):

- A: ``mlp_post`` at width 14,336, one layer, N rows (N = 1,048,576, or 200,704 with
  ``--quick``), in store 1;
- B: ``resid_post`` at width 4,096, two layers, N/5 rows, in store 1 (cosine, the mean of
  a neuron per layer, a token across layers);
- C: ``resid_post`` at width 512, two layers, N rows, in store 2 (the small-width
  comparison; its own store: beside B, every ``vectors()`` and ``cosine_topk()`` call on
  ``resid_post`` would need ``run_id :=``, the family having two widths).

Values are float16 from a student-t (df 5) pool of 2^24 values drawn once: column j of a
shard is a window of the pool at a random offset (a zero-copy view), and neurons 7, 313,
1337 and 3000 are scaled by 8, so that no RNG or copying dominates the write. Sequences
are 1,024 positions; shards hold as many sequences as the harvest's automatic
``shard_size`` gives the run (``harvest.plan``: ~128 MiB of activations per shard, at
least 16 sequences, at least 4 shards), so at width 14,336 a shard holds 16 sequences
(448 MiB: the 16-sequence floor wins); ``--shard-seqs`` overrides it.

The baseline, layout 1, is run A again (same seeds, same values) as one file per shard
with every dimension as a column, written with the store's Parquet options (snappy,
dictionaries and statistics on the key columns only, ~64 MiB row groups, key-value
metadata ``activation.dense`` v1), and queried with plain DuckDB over
``read_parquet('.../shard-*.parquet')`` with the SQL the old ``top_contexts`` macro ran. It
is written, measured and deleted before layout 2 is written, so that the disk never holds
both copies; compaction likewise deletes each directory's shard files as soon as its
parts exist (the driver writes every part before the manifest; here the manifest is
written after the first directories' parts, before any shard file goes, which matters only
to a reader running meanwhile, and none does).

Timed (warm: best of 3 in the same process after one warm-up run, which is an EXPLAIN
(ANALYZE, FORMAT JSON) that profiles it; the page cache is warm in every case; "cold" is a
fresh process). Writes and compaction also report this process's CPU seconds, which
depend less on other tenants' load than wall time does.

- ``topk_neuron``: ``top_contexts('mlp_post', 0, 1337, 20)`` (with token text), warm through
  ``Store.sql`` and cold as ``arrakis-ray sql STORE "..."`` (wall time from the start of
  the interpreter, max RSS from ``/usr/bin/time``), best of 3 too;
- ``mean_per_layer``: ``avg(value)`` of ``neuron('resid_post', NULL, 1337)`` per layer (B);
- ``cosine_topk``: ``cosine_topk('resid_post', 0, <random direction>, 20)`` (B);
- ``vector``: ``vectors('mlp_post', 0)`` of one token (A), and ``token_across_layers`` (B);

against layout 1 (top-20 warm in-process and cold in a ``python -c`` DuckDB subprocess,
its RSS) and a pyarrow -> numpy scan of the bytes a question needs (top-20: the column
and keys of the ``layer=0/block=2`` files, then argpartition; cosine: every column of
layer 0 as float32, ``X @ d / norms``, argpartition). Every answer is checked against
the generated values or the numpy scan.

Bytes: ``bytes_read_per_neuron_query`` is DuckDB's EXPLAIN ANALYZE "Data Read" of the
top-20 query in a freshly opened Store (footers not cached yet: what every CLI call
reads, the tokens join included), taken exactly from the JSON profile's
``io.total_bytes_read`` (the text rendering rounds it to 0.1 MiB; both are printed); the
warm figure (footers cached), the footer bytes of
the files it opens (pyarrow ``serialized_size``) and the neuron's own data (rows x 2
bytes) are printed beside it. ``bytes_per_value``: activation bytes on disk, footers
included, / (rows x width x layers). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from arrakis_ray.harvest import tables
from arrakis_ray.harvest.plan import MIN_SHARDS, predict_bytes, shard_size_for
from arrakis_ray.store import compact, schemas
from arrakis_ray.store import parquet as store_parquet
from arrakis_ray.store.catalog import Store
from arrakis_ray.store.layout import BLOCK_DIMS, RunLayout
from arrakis_ray.store.manifest import RunManifest, Shard, read_manifest, write_manifest
from arrakis_ray.store.writer import RunWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from runs import shard_plan, synthetic_manifest, synthetic_shape, vocab_table  # noqa: E402

CONTEXT = 1024  # positions per sequence: row = seq_id * CONTEXT + pos
NEURON = 1337  # the neuron of the one-neuron questions: block 2, column d313
SMALL_NEURON = NEURON % BLOCK_DIMS  # the same column at width 512 (run C)
HEAVY = (7, SMALL_NEURON, NEURON, 3000)  # neurons scaled by HEAVY_SCALE
HEAVY_SCALE = 8.0  # a power of two: exact in float16
TOP = 20
POOL_VALUES = 1 << 24  # the generated pool (a window of it is one column of one shard)
VOCAB = 4096
SEED = 2026
TOKEN_POS = 577  # position of the token of the vector questions
KEYS = ["run_id", "layer", "seq_id", "pos"]
REPEATS = 3  # warm timings: best of REPEATS after one warm-up
_UNITS = {"bytes": 1, "kB": 1 << 10, "KiB": 1 << 10, "MB": 1 << 20, "MiB": 1 << 20}
_UNITS |= {"GB": 1 << 30, "GiB": 1 << 30, "TB": 1 << 40}
MB = 1 << 20
TIME = "/usr/bin/time" if Path("/usr/bin/time").exists() else None  # GNU time: max RSS


@dataclass(frozen=True)
class RunSpec:
    """One synthetic run: its family, width, layers and sequences."""

    name: str
    run_id: str
    family: str
    width: int
    layers: tuple[int, ...]
    sequences: int
    seqs_per_shard: int | None = None  # None: the harvest's automatic shard size

    @property
    def hooks(self) -> list[str]:
        if self.family == "mlp_post":
            return [f"blocks.{layer}.mlp.hook_post" for layer in self.layers]
        return [f"blocks.{layer}.hook_{self.family}" for layer in self.layers]

    @property
    def rows(self) -> int:
        """Rows per layer."""
        return self.sequences * CONTEXT

    @property
    def shard_seqs(self) -> int:
        """Sequences per shard: what ``harvest.plan.auto_shard_size`` gives this run."""
        if self.seqs_per_shard:
            return self.seqs_per_shard
        shapes = tuple((hook, "dense", self.width, 1) for hook in self.hooks)
        per_sequence = predict_bytes(shapes, CONTEXT, CONTEXT, "float16")
        return max(1, min(shard_size_for(per_sequence), -(-self.sequences // MIN_SHARDS)))

    @property
    def shards(self) -> tuple[Shard, ...]:
        return shard_plan(self.sequences, self.shard_seqs)

    @property
    def token(self) -> tuple[int, int]:
        """(seq_id, pos) of the token of the vector questions."""
        return self.sequences // 2, TOKEN_POS

    def manifest(self, seconds: float) -> RunManifest:
        dims = {"d_mlp": self.width} if self.family == "mlp_post" else {"d_model": self.width}
        shape = synthetic_shape(n_layers=max(self.layers) + 1, d_vocab=VOCAB, **dims)
        return synthetic_manifest(
            self.run_id,
            self.hooks,
            shape,
            self.shards,
            storage_dtype="float16",
            context_length=CONTEXT,
            n_tokens=self.rows,
            seconds=seconds,
            model_source="synthetic (benchmarks/scale.py)",
        )


# -- the synthetic values ---------------------------------------------------------------


def make_pool() -> np.ndarray:
    """Heavy-tailed float16 values (student-t, 5 degrees of freedom)."""
    rng = np.random.default_rng(SEED)
    return rng.standard_t(5, POOL_VALUES).astype(np.float16)


def columns(pool: np.ndarray, spec: RunSpec, shard: int, layer: int, n: int) -> list[np.ndarray]:
    """The ``width`` columns (float16, ``n`` rows) of one shard of one layer, the same on
    every call: windows of the pool at random offsets, the heavy neurons scaled."""
    rng = np.random.default_rng([SEED, spec.width, shard, layer])
    starts = rng.integers(0, len(pool) - n, spec.width)
    cols = [pool[s : s + n] for s in starts.tolist()]
    for h in HEAVY:
        if h < spec.width:
            cols[h] = cols[h] * np.float16(HEAVY_SCALE)
    return cols


def token_ids(spec: RunSpec, shard: Shard) -> np.ndarray:
    rng = np.random.default_rng([SEED, 7, shard.shard])
    return rng.integers(0, VOCAB, (shard.count, CONTEXT))


def key_arrays(run_id: str, layer: int, shard: Shard) -> list[pa.Array]:
    n = shard.count * CONTEXT
    seq = np.repeat(np.arange(shard.first_doc, shard.first_doc + shard.count), CONTEXT)
    return [
        pa.array(np.full(n, run_id, dtype=object), pa.string()),
        pa.array(np.full(n, layer, np.int16)),
        pa.array(seq.astype(np.int64)),
        pa.array(np.tile(np.arange(CONTEXT, dtype=np.int32), shard.count)),
    ]


@dataclass
class Truth:
    """What the answers must be, kept while writing: the values of the one-neuron
    questions' neuron per layer (in row order) and the vector of ``spec.token``."""

    neuron: dict[int, np.ndarray] = field(default_factory=dict)
    vector: dict[int, np.ndarray] = field(default_factory=dict)

    def add(self, spec: RunSpec, shard: Shard, layer: int, cols: list[np.ndarray]) -> None:
        neuron = NEURON if spec.width > NEURON else SMALL_NEURON
        values = self.neuron.setdefault(layer, np.empty(spec.rows, np.float16))
        first = shard.first_doc * CONTEXT
        values[first : first + len(cols[0])] = cols[neuron]
        seq, pos = spec.token
        if shard.first_doc <= seq < shard.first_doc + shard.count:
            row = (seq - shard.first_doc) * CONTEXT + pos
            self.vector[layer] = np.array([c[row] for c in cols], np.float16)


def dims_names(width: int) -> list[str]:
    return KEYS + [f"d{i}" for i in range(width)]


# -- writing ----------------------------------------------------------------------------


@dataclass
class Written:
    """What writing a run took and left on disk."""

    spec: RunSpec
    truth: Truth
    write_s: float = 0.0
    write_cpu_s: float = 0.0  # this process's CPU seconds, all threads: steadier under load
    compact_s: float = 0.0
    compact_cpu_s: float = 0.0
    shards_per_part: int = 1
    files_before: int = 0
    files_after: int = 0
    activation_bytes: int = 0
    footer_bytes: int = 0

    @property
    def bytes_per_value(self) -> float:
        return self.activation_bytes / (self.spec.rows * self.spec.width * len(self.spec.layers))


def write_layout2(store: Path, spec: RunSpec, pool: np.ndarray) -> Written:
    """Write a run through ``RunWriter``, two shards at a time (the harvest encodes a
    shard's files in parallel threads too), then its vocab and manifest."""
    writer = RunWriter(store, spec.run_id)
    vocab = np.array([f" tok{i}" for i in range(VOCAB)], dtype=object)
    writer.write_vocab(vocab_table(list(vocab)))
    truth = Truth()
    names = dims_names(spec.width)

    def shard_job(shard: Shard) -> tuple[int, list]:
        written, kept = 0, []
        for layer in spec.layers:
            cols = columns(pool, spec, shard.shard, layer, shard.count * CONTEXT)
            arrays = key_arrays(spec.run_id, layer, shard) + [pa.array(c) for c in cols]
            table = pa.Table.from_arrays(arrays, names=names)
            written += writer.write_activations(spec.family, shard.shard, table)
            kept.append((layer, cols))
        written += writer.write_tokens(shard.shard, tokens_table(spec, shard, vocab))
        writer.mark_complete(shard.shard)  # last, as the harvest does
        return written, kept

    start, cpu = time.perf_counter(), time.process_time()
    written = 0
    with ThreadPoolExecutor(max_workers=2) as threads:  # pyarrow encodes without the GIL
        for shard, (nbytes, kept) in zip(
            spec.shards, threads.map(shard_job, spec.shards), strict=True
        ):
            written += nbytes
            for layer, cols in kept:
                truth.add(spec, shard, layer, cols)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    manifest = spec.manifest(seconds)
    (call,) = manifest.harvest.calls
    harvest = replace(manifest.harvest, calls=(replace(call, bytes=written),))
    writer.write_manifest(manifest.with_changes(harvest=harvest))
    out = Written(spec, truth, write_s=seconds, write_cpu_s=cpu)
    out.files_before = len(list(writer.layout.activations_root.rglob("*.parquet")))
    return out


def tokens_table(spec: RunSpec, shard: Shard, vocab: np.ndarray) -> pa.Table:
    """One shard's tokens, built as ``tests/runs.py`` builds them (one document per
    sequence)."""
    seq_ids = np.arange(shard.first_doc, shard.first_doc + shard.count, dtype=np.int64)
    doc_ids = np.repeat(seq_ids[:, None], CONTEXT, axis=1)
    doc_pos = np.broadcast_to(np.arange(CONTEXT), doc_ids.shape)
    ids = token_ids(spec, shard)
    mask = np.ones(doc_ids.shape, bool)
    return tables.tokens_table(
        schemas.tokens_schema(), spec.run_id, seq_ids, doc_ids, doc_pos, ids, mask, vocab
    )


def compact_run(store: Path, done: Written) -> None:
    """Compact a written run as the harvest driver does (``driver._compact``), but
    removing each directory's shard files once its parts exist (bounded disk)."""
    layout = RunLayout(store, done.spec.run_id)
    n_shards = len(done.spec.shards)
    start, cpu = time.perf_counter(), time.process_time()
    per_part = compact.plan_parts(layout, n_shards)
    if per_part > 1:
        directories = compact.block_directories(layout)
        manifest = read_manifest(layout)

        def job(directory, remove: bool = True) -> None:
            compact.compact_directory(layout, directory, n_shards, per_part)
            if remove:
                compact.remove_shard_files(layout, directory, n_shards)

        with ThreadPoolExecutor(max_workers=2) as threads:  # the driver: 2 Ray tasks
            list(threads.map(partial(job, remove=False), directories[:2]))
            write_manifest(layout, manifest.with_changes(shards_per_part=per_part))
            for directory in directories[:2]:
                compact.remove_shard_files(layout, directory, n_shards)
            list(threads.map(job, directories[2:]))
    done.compact_s = time.perf_counter() - start
    done.compact_cpu_s = time.process_time() - cpu
    done.shards_per_part = per_part
    files = sorted(layout.activations_root.rglob("*.parquet"))
    done.files_after = len(files)
    done.activation_bytes = sum(f.stat().st_size for f in files)
    done.footer_bytes = sum(footer_size(f) for f in files)


def footer_size(path: Path) -> int:
    """Bytes of a Parquet file's footer: the metadata, its length and the magic."""
    return pq.ParquetFile(path).metadata.serialized_size + 8


def write_layout1(root: Path, spec: RunSpec, pool: np.ndarray) -> Written:
    """Run ``spec`` in layout 1: one file per shard, every layer and dimension in it, with
    the store writer's options (``store_parquet.write_table``) and the v1 schema."""
    expected = schemas.load_schema("activation.dense", 1).arrow(spec.width, "float16")
    vocab = np.array([f" tok{i}" for i in range(VOCAB)], dtype=object)
    names = dims_names(spec.width)
    truth = Truth()

    def shard_job(shard: Shard) -> None:
        parts = []
        for layer in spec.layers:
            cols = columns(pool, spec, shard.shard, layer, shard.count * CONTEXT)
            arrays = key_arrays(spec.run_id, layer, shard) + [pa.array(c) for c in cols]
            parts.append(pa.Table.from_arrays(arrays, names=names))
            truth.add(spec, shard, layer, cols)
        store_parquet.write_table(
            pa.concat_tables(parts),
            root / "activations" / spec.family / f"shard-{shard.shard:05d}.parquet",
            schema_name="activation.dense",
            schema_version=1,
            expected=expected,
        )
        tokens = schemas.load_schema("tokens")
        store_parquet.write_table(
            tokens_table(spec, shard, vocab),
            root / "tokens" / f"shard-{shard.shard:05d}.parquet",
            schema_name="tokens",
            schema_version=tokens.version,
            expected=tokens.arrow(),
        )

    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(max_workers=2) as threads:
        list(threads.map(shard_job, spec.shards))
    out = Written(spec, truth, write_s=time.perf_counter() - start)
    out.write_cpu_s = time.process_time() - cpu
    files = sorted((root / "activations").rglob("*.parquet"))
    out.files_before = out.files_after = len(files)
    out.activation_bytes = sum(f.stat().st_size for f in files)
    out.footer_bytes = sum(footer_size(f) for f in files)
    return out


# -- measuring --------------------------------------------------------------------------


def best_of(fn: Callable[[], object], repeats: int = REPEATS, warmup: int = 1) -> dict:
    """Best wall time of ``repeats`` calls after ``warmup`` calls, the spread, the answer."""
    for _ in range(warmup):
        fn()
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return {"s": min(times), "spread": [round(min(times), 4), round(max(times), 4)], "out": result}


def subprocess_runs(commands: dict[str, list[str]], repeats: int = REPEATS) -> dict:
    """Each command ``repeats`` times, interleaved (load from other tenants hits all
    alike): its best wall time (interpreter start included), spread, largest max RSS
    and last stdout.

    The RSS comes from ``/usr/bin/time``: a child's own ``ru_maxrss`` (``os.wait4``)
    also counts this large process's pages until the child's exec, which this process
    forks, so it would report this benchmark's size rather than the command's.
    """
    times = {name: [] for name in commands}
    rss = {name: [] for name in commands}
    out = {}
    for _ in range(repeats):
        for name, argv in commands.items():
            with tempfile.TemporaryDirectory() as tmp:
                usage = Path(tmp) / "usage"
                timed = [TIME, "-f", "%M", "-o", str(usage)] if TIME else []
                t0 = time.perf_counter()
                proc = subprocess.run(timed + argv, capture_output=True, text=True)
                times[name].append(time.perf_counter() - t0)
                if proc.returncode:
                    raise RuntimeError(f"{argv[:3]} failed: {proc.stderr[-2000:]}")
                out[name] = proc.stdout
                if TIME:
                    rss[name].append(int(usage.read_text().split()[-1]) / 1024)  # KiB
    return {
        name: {
            "s": min(times[name]),
            "spread": [round(min(times[name]), 4), round(max(times[name]), 4)],
            "rss_mb": max(rss[name]) if rss[name] else None,
            "out": out[name],
        }
        for name in commands
    }


def data_read(plan: str) -> int | None:
    """Bytes of EXPLAIN ANALYZE's "Data Read" (DuckDB prints KiB as kB)."""
    m = re.search(r"Data Read:\s*([\d.,]+)\s*(bytes|[kKMGT]i?B)", plan)
    return int(float(m.group(1).replace(",", "")) * _UNITS[m.group(2)]) if m else None


def profile(explain: Callable[[str], str], query: str) -> dict:
    """Where a query's time goes, from EXPLAIN (ANALYZE, FORMAT JSON): total, CPU and
    planning seconds, bytes read, row groups scanned, and the slowest operators (their
    time is summed over DuckDB's threads)."""
    try:
        tree = json.loads(explain(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}"))
    except Exception as e:  # noqa: BLE001 (a profile is a report, never a failure)
        return {"error": f"{type(e).__name__}: {e}"[:200], "ops": []}
    ops = []

    def walk(node: dict) -> None:
        info = node.get("extra_info") or {}
        item = {"name": node.get("name"), "s": node.get("timing") or 0.0}
        item["rows"] = node.get("intermediate_rows")
        if "bytes_scanned" in node:
            item["bytes"] = node["bytes_scanned"]
        if isinstance(info, dict) and "Total Files Read" in info:
            item["files"] = int(info["Total Files Read"])
        ops.append(item)
        for child in node.get("children") or []:
            walk(child)

    for node in tree.get("operator") or []:
        walk(node)
    q = tree.get("query", {})
    return {
        "total_s": q.get("total_time"),
        "cpu_s": q.get("cpu_time"),
        "planner_s": tree.get("planner", {}).get("total_time"),
        "optimizer_s": tree.get("optimizer", {}).get("total_time"),
        "data_read": tree.get("io", {}).get("total_bytes_read"),
        "row_groups": f"{q.get('total_row_groups_scanned')}/{q.get('total_row_groups_to_scan')}",
        "ops": sorted(ops, key=lambda x: -x["s"])[:4],
    }


def check_topk(got: list[tuple[int, int]], values: np.ndarray, label: str) -> None:
    """The top rows of ``values`` (row order), ties by row, must be ``got``."""
    col = values.astype(np.float32)
    want = np.lexsort((np.arange(len(col)), -col))[:TOP]
    rows = [s * CONTEXT + p for s, p in got]
    assert rows == want.tolist(), f"{label}: top-{TOP} rows {rows[:4]} != {want[:4].tolist()}"


def numpy_topk(files: list[Path], column: str) -> list[tuple[int, int]]:
    """Top rows of one column of ``files`` (ties: seq_id, pos) read with pyarrow."""
    table = pq.read_table(
        [str(f) for f in files], columns=["seq_id", "pos", column], partitioning=None
    )
    values = table.column(column).to_numpy().astype(np.float32)
    seq, pos = table.column("seq_id").to_numpy(), table.column("pos").to_numpy()
    kth = np.partition(values, -TOP)[-TOP]
    cand = np.nonzero(values >= kth)[0]  # ties at the cut stay candidates
    order = cand[np.lexsort((pos[cand], seq[cand], -values[cand]))][:TOP]
    return list(zip(seq[order].tolist(), pos[order].tolist(), strict=True))


def numpy_cosine(layer_dir: Path, width: int, direction: np.ndarray) -> dict:
    """Cosine top rows of one layer: every column of its blocks as float32, X @ d."""
    blocks = sorted(layer_dir.glob("block=*"), key=lambda p: int(p.name.split("=")[1]))
    x, keys = None, None
    for block_dir in blocks:
        b = int(block_dir.name.split("=")[1])
        files = [str(f) for f in sorted(block_dir.glob("*.parquet"))]
        table = pq.read_table(files, partitioning=None)
        if x is None:
            x = np.empty((width, table.num_rows), np.float32)  # one row per dimension
            keys = table.column("seq_id").to_numpy(), table.column("pos").to_numpy()
        for j in range(min(BLOCK_DIMS, width - b * BLOCK_DIMS)):
            x[b * BLOCK_DIMS + j] = table.column(f"d{j}").to_numpy()
        del table
    norms = np.sqrt(np.einsum("ij,ij->j", x, x))
    scores = (direction @ x) / (norms * np.linalg.norm(direction))
    kth = np.partition(scores, -TOP)[-TOP]
    cand = np.nonzero(scores >= kth)[0]
    seq, pos = keys
    order = cand[np.lexsort((pos[cand], seq[cand], -scores[cand]))][:TOP]
    rows = list(zip(seq[order].tolist(), pos[order].tolist(), strict=True))
    return {"rows": rows, "scores": scores[order]}


def check_cosine(got: list[tuple[int, int, float]], want: dict) -> None:
    """Scores must agree to 1e-5; rows may differ only where scores tie within that."""
    scores = np.array([c for _s, _p, c in got])
    assert np.allclose(scores, want["scores"], atol=1e-5), "cosine scores differ from numpy"
    cut = want["scores"][-1]
    sure = {r for r, c in zip(want["rows"], want["scores"], strict=True) if c > cut + 1e-5}
    missing = sure - {(s, p) for s, p, _c in got}
    assert not missing, f"cosine top-{TOP} lacks rows {sorted(missing)[:4]}"


def cli(store: Path) -> list[str]:
    exe = Path(sys.executable).with_name("arrakis-ray")
    return [str(exe), "sql", str(store)] if exe.exists() else ["arrakis-ray", "sql", str(store)]


def csv_rows(text: str) -> list[tuple[int, int]]:
    """(seq_id, pos) of the CSV rows that ``arrakis-ray sql --format csv`` printed."""
    lines = [line.split(",") for line in text.strip().splitlines()]
    head = lines[0]
    s, p = head.index("seq_id"), head.index("pos")
    return [(int(r[s]), int(r[p])) for r in lines[1:]]


V1_CHILD = (
    "import sys, duckdb; con = duckdb.connect(); con.execute('SET enable_progress_bar = false'); "
    "rows = con.sql(sys.argv[1]).fetchall(); print(len(rows))"
)


def v1_topk_sql(root: Path, spec: RunSpec) -> str:
    """The old ``top_contexts`` macro's query, over layout-1 files."""
    return f"""
        WITH top AS (
            SELECT run_id, seq_id, pos, d{NEURON}::FLOAT AS activation
            FROM read_parquet('{root}/activations/{spec.family}/shard-*.parquet')
            WHERE layer = 0
            ORDER BY activation DESC, run_id, seq_id, pos
            LIMIT {TOP}
        )
        SELECT top.run_id, top.seq_id, top.pos, t.token_text, top.activation
        FROM top LEFT JOIN read_parquet('{root}/tokens/shard-*.parquet') t
            ON t.run_id = top.run_id AND t.seq_id = top.seq_id AND t.pos = top.pos
        ORDER BY top.activation DESC, top.run_id, top.seq_id, top.pos"""


def measure_layout1(root: Path, spec: RunSpec, pool: np.ndarray, explain: bool) -> dict:
    """Write run A in layout 1, time the top-20, delete it."""
    try:
        done = write_layout1(root, spec, pool)
        print(
            f"  layout 1: {done.files_after} files, {done.activation_bytes / 1e9:.2f} GB in "
            f"{done.write_s:.1f} s",
            flush=True,
        )
        query = v1_topk_sql(root, spec)
        con = duckdb.connect()
        con.execute("SET enable_progress_bar = false")  # it would print on our stdout
        cold_plan = con.sql(f"EXPLAIN ANALYZE {query}").fetchall()[0][1]
        con.execute("SET parquet_metadata_cache = true")
        warm = best_of(lambda: con.sql(query).fetchall())
        check_topk([(r[1], r[2]) for r in warm["out"]], done.truth.neuron[0], "layout 1")
        prof = profile(lambda q: con.sql(q).fetchall()[0][1], query)
        if explain:
            plan = con.sql(f"EXPLAIN ANALYZE {query}").fetchall()[0][1]
            print(f"-- EXPLAIN ANALYZE layout 1 top-20 (warm)\n{plan}")
        con.close()
        cold = subprocess_runs({"v1": [sys.executable, "-c", V1_CHILD, query]})["v1"]
        assert cold["out"].strip() == str(TOP), cold["out"]
        return {
            "v1_write_s": done.write_s,
            "v1_write_cpu_s": done.write_cpu_s,
            "v1_files": done.files_after,
            "v1_activation_bytes": done.activation_bytes,
            "v1_footer_bytes": done.footer_bytes,
            "v1_bytes_per_value": done.bytes_per_value,
            "v1_topk_warm_s": warm["s"],
            "v1_topk_warm_spread_s": warm["spread"],
            "v1_topk_cold_s": cold["s"],
            "v1_topk_cold_spread_s": cold["spread"],
            "v1_cold_rss_mb": cold["rss_mb"],
            "v1_data_read_cold": data_read(cold_plan),
            "v1_data_read_warm": prof.get("data_read"),
            "v1_topk_profile": prof,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure_layout2(
    store: Path, small_store: Path, runs: dict[str, Written], explain: bool
) -> dict:
    """Every question on layout 2, its baselines and checks; returns the figures."""
    a, b, c = runs["A"], runs["B"], runs["C"]
    f: dict = {}
    queries = {
        "topk_neuron": f"SELECT * FROM top_contexts('mlp_post', 0, {NEURON}, {TOP})",
        "mean_per_layer": f"SELECT layer, avg(value) AS mean FROM neuron('resid_post', NULL, "
        f"{NEURON}) GROUP BY layer ORDER BY layer",
        "vector": "SELECT * FROM vectors('mlp_post', 0) WHERE seq_id = {} AND pos = {}".format(
            *a.spec.token
        ),
        "token_across_layers": "SELECT * FROM token_across_layers('resid_post', "
        f"'{b.spec.run_id}', {b.spec.token[0]}, {b.spec.token[1]}, dims := [{NEURON}, 7])",
    }
    direction = np.random.default_rng([SEED, 99]).standard_normal(b.spec.width)
    direction = direction.astype(np.float32)
    literal = "[" + ", ".join(repr(float(v)) for v in direction) + "]"
    queries["cosine_topk"] = f"SELECT * FROM cosine_topk('resid_post', 0, {literal}, {TOP})"
    # the same direction as one string: DuckDB parses a 4,096-number list literal in ~0.45 s
    queries["cosine_topk_text"] = f"SELECT * FROM cosine_topk('resid_post', 0, '{literal}', {TOP})"

    # bytes of the one-neuron query in a fresh Store (no footer cached yet): DuckDB's
    # "Data Read" as EXPLAIN ANALYZE prints it (rounded to 0.1 unit), then exactly (JSON)
    with Store(store) as fresh:
        cold_plan = fresh.sql(f"EXPLAIN ANALYZE {queries['topk_neuron']}")["explain_value"][0]
    f["data_read_cold_text"] = data_read(cold_plan)
    t0 = time.perf_counter()
    db = Store(store)
    f["store_open_s"] = time.perf_counter() - t0

    def plan_of(query: str) -> str:
        return db.sql(query)["explain_value"][0]

    try:
        f["topk_neuron_cold_profile"] = profile(plan_of, queries["topk_neuron"])
        f["data_read_cold"] = f["topk_neuron_cold_profile"]["data_read"]
        answers = {}
        for name, query in queries.items():
            prof = profile(plan_of, query)  # runs the query: the warm-up
            timing = best_of(lambda q=query: db.sql(q), warmup=0)
            if timing["s"] < 1.0:  # cheap: profile again, footers cached
                prof = profile(plan_of, query)
            answers[name] = timing["out"]
            f[f"{name}_s"] = timing["s"]
            f[f"{name}_spread_s"] = timing["spread"]
            f[f"{name}_profile"] = prof
            f[f"{name}_data_read_warm"] = prof.get("data_read")
            if explain:
                plan = db.sql(f"EXPLAIN ANALYZE {query}")["explain_value"][0]
                print(f"-- EXPLAIN ANALYZE {name} (warm)\n{plan}")
    finally:
        db.close()
    if explain:
        print(f"-- EXPLAIN ANALYZE topk_neuron (fresh Store)\n{cold_plan}")
    f["topk_neuron_warm_s"] = f.pop("topk_neuron_s")
    f["topk_neuron_warm_spread_s"] = f.pop("topk_neuron_spread_s")

    # checks against the generated values
    top = answers["topk_neuron"]
    check_topk(list(zip(top["seq_id"], top["pos"], strict=True)), a.truth.neuron[0], "top-20")
    assert top["token_text"].null_count() == 0, "top-20 rows without token text"
    for layer, mean in zip(*answers["mean_per_layer"].get_columns(), strict=True):
        want = b.truth.neuron[layer].astype(np.float64).mean()
        assert abs(mean - want) < 1e-6 * max(1.0, abs(want)), (layer, mean, want)
    vec = answers["vector"]["vec"].to_list()
    assert len(vec) == 1 and np.array_equal(np.array(vec[0], np.float32), a.truth.vector[0])
    across = answers["token_across_layers"]
    for layer, norm in zip(across["layer"], across["norm"], strict=True):
        want = np.linalg.norm(b.truth.vector[layer].astype(np.float64))
        assert abs(norm - want) < 1e-6 * want, (layer, norm, want)

    # the CLI, cold: a fresh interpreter per call
    # ... and what any call costs: the imports alone, and a query that reads no file
    runs = subprocess_runs(
        {
            "topk": cli(store) + [queries["topk_neuron"], "--format", "csv"],
            "select1": cli(store) + ["SELECT 1"],
            "imports": [sys.executable, "-c", "import arrakis_ray.cli, arrakis_ray.store.catalog"],
        }
    )
    cli_run = runs["topk"]
    f["cli_select1_s"], f["cli_imports_s"] = runs["select1"]["s"], runs["imports"]["s"]
    check_topk(csv_rows(cli_run["out"]), a.truth.neuron[0], "CLI top-20")
    f["topk_neuron_cli_s"], f["topk_neuron_cli_spread_s"] = cli_run["s"], cli_run["spread"]
    f["cli_rss_mb"] = cli_run["rss_mb"]

    # numpy baselines: the bytes each question needs, read with pyarrow
    layout_a = RunLayout(store, a.spec.run_id)
    block = NEURON // BLOCK_DIMS
    needed = sorted(layout_a.block_dir("mlp_post", 0, block).glob("*.parquet"))
    scan = best_of(lambda: numpy_topk(needed, f"d{NEURON % BLOCK_DIMS}"))
    check_topk(scan["out"], a.truth.neuron[0], "numpy top-20")
    f["numpy_topk_s"], f["numpy_topk_spread_s"] = scan["s"], scan["spread"]
    layer_dir = RunLayout(store, b.spec.run_id).activation_dir("resid_post") / "layer=0"
    scan = best_of(lambda: numpy_cosine(layer_dir, b.spec.width, direction))
    cos = answers["cosine_topk"]
    check_cosine(list(zip(cos["seq_id"], cos["pos"], cos["cosine"], strict=True)), scan["out"])
    assert answers["cosine_topk_text"].equals(cos), "cosine_topk: a string direction differs"
    f["numpy_cosine_s"], f["numpy_cosine_spread_s"] = scan["s"], scan["spread"]

    # footers the one-neuron query opens, and the neuron's own data
    f["neuron_files"] = len(needed)
    f["neuron_footer_bytes"] = sum(footer_size(p) for p in needed)
    token_files = sorted(Path(store).glob("runs/*/tokens/*.parquet"))
    f["tokens_footer_bytes"] = sum(footer_size(p) for p in token_files)
    f["neuron_data_bytes"] = a.spec.rows * 2
    f["neuron_column_bytes"] = sum(column_bytes(p, f"d{NEURON % BLOCK_DIMS}") for p in needed)

    # run C: the same questions at width 512
    with Store(small_store) as small:
        q = f"SELECT * FROM top_contexts('resid_post', 0, {SMALL_NEURON}, {TOP})"
        timing = best_of(lambda: small.sql(q))
        top = timing["out"]
        check_topk(
            list(zip(top["seq_id"], top["pos"], strict=True)), c.truth.neuron[0], "width 512"
        )
        f["small_topk_neuron_warm_s"] = timing["s"]
        q = (
            f"SELECT layer, avg(value) AS mean FROM neuron('resid_post', NULL, {SMALL_NEURON}) "
            "GROUP BY layer ORDER BY layer"
        )
        f["small_mean_per_layer_s"] = best_of(lambda: small.sql(q))["s"]
        q = "SELECT * FROM vectors('resid_post', 0) WHERE seq_id = {} AND pos = {}".format(
            *c.spec.token
        )
        timing = best_of(lambda: small.sql(q))
        got = np.array(timing["out"]["vec"].to_list()[0], np.float32)
        assert np.array_equal(got, c.truth.vector[0]), "width 512: vector differs"
        f["small_vector_s"] = timing["s"]
    q = f"SELECT * FROM top_contexts('resid_post', 0, {SMALL_NEURON}, {TOP})"
    f["small_topk_cli_s"] = subprocess_runs({"cli": cli(small_store) + [q]})["cli"]["s"]
    return f


def column_bytes(path: Path, column: str) -> int:
    """Compressed bytes of one column in a Parquet file, over its row groups."""
    meta = pq.ParquetFile(path).metadata
    index = meta.schema.names.index(column)
    return sum(
        meta.row_group(g).column(index).total_compressed_size for g in range(meta.num_row_groups)
    )


# -- the report -------------------------------------------------------------------------

TARGETS = {  # key: (comparison, bound); bytes_read_per_neuron_query's bound is per run
    "topk_neuron_warm_s": ("<", 0.3),
    "topk_neuron_cli_s": ("<", 1.5),
    "topk_over_v1": (">=", 20.0),
    "cli_rss_mb": ("<", 500.0),
    "bytes_read_per_neuron_query": ("<=", None),
    "cosine_over_numpy": ("<=", 1.5),
}
_OPS = {"<": operator.lt, "<=": operator.le, ">=": operator.ge}


def verdicts(f: dict) -> dict:
    """Each target's measured value, bound and PASS/FAIL."""
    out = {}
    for key, (op, bound) in TARGETS.items():
        bound = f["bytes_read_target"] if bound is None else bound
        value = f.get(key)
        ok = value is not None and _OPS[op](value, bound)
        out[key] = {"value": value, "target": f"{op} {bound:,.6g}", "pass": ok}
    return out


def print_report(f: dict) -> None:
    print(
        f"\n{f['rows']:,} rows per layer at width {f['width']:,} (run A); "
        f"{f['runs']['B']['rows']:,} rows x 2 layers at 4,096 (B); "
        f"{f['runs']['C']['rows']:,} rows x 2 layers at 512 (C). "
        f"Load average {f['load_avg_1m']}."
    )
    print(
        f"\n{'run':4} {'width':>6} {'seq/shard':>9} {'files':>6} {'-> parts':>8} "
        f"{'write_s (cpu)':>15} {'compact_s (cpu)':>15} {'compact/write':>13} {'GB':>6} "
        f"{'B/value':>8}"
    )
    for name, r in f["runs"].items():
        print(
            f"{name:4} {r['width']:6} {r['seqs_per_shard']:9} {r['files_before']:6} "
            f"{r['files_after']:8} {r['write_s']:7.1f} ({r['write_cpu_s']:5.1f}) "
            f"{r['compact_s']:7.1f} ({r['compact_cpu_s']:5.1f}) "
            f"{r['compact_s'] / r['write_s']:13.2f} {r['activation_bytes'] / 1e9:6.2f} "
            f"{r['bytes_per_value']:8.4f}"
        )
    print(
        f"{'v1 A':4} {f['width']:6} {f['runs']['A']['seqs_per_shard']:9} {f['v1_files']:6} "
        f"{'-':>8} {f['v1_write_s']:7.1f} ({f['v1_write_cpu_s']:5.1f}) {'-':>15} {'-':>13} "
        f"{f['v1_activation_bytes'] / 1e9:6.2f} {f['v1_bytes_per_value']:8.4f}"
    )
    print(f"\n{'question':22} {'best_s':>8} {'spread_s':>18} {'baseline_s':>22} {'speedup':>9}")
    rows = [
        ("top-20 neuron, warm", "topk_neuron_warm", "v1 warm", "v1_topk_warm_s"),
        ("top-20 neuron, CLI", "topk_neuron_cli", "v1 cold subprocess", "v1_topk_cold_s"),
        ("top-20 neuron, warm", "topk_neuron_warm", "numpy (block files)", "numpy_topk_s"),
        ("cosine top-20 @4096", "cosine_topk", "numpy scan", "numpy_cosine_s"),
        ("mean per layer (B)", "mean_per_layer", None, None),
        ("vector @14336 (A)", "vector", None, None),
        ("token_across_layers", "token_across_layers", None, None),
        ("top-20 @512 (C)", "small_topk_neuron_warm", None, None),
        ("top-20 @512 CLI (C)", "small_topk_cli", None, None),
        ("mean per layer @512", "small_mean_per_layer", None, None),
        ("vector @512 (C)", "small_vector", None, None),
    ]
    for label, key, base_label, base in rows:
        spread = str(f.get(key + "_spread_s", ""))
        line = f"{label:22} {f[key + '_s']:8.4f} {spread:>18}"
        if base:
            line += f" {base_label + ' ' + format(f[base], '.3f'):>22} "
            line += f"{f[base] / f[key + '_s']:8.2f}x"
        print(line)
    print(
        f"CLI floor: 'arrakis-ray sql STORE \"SELECT 1\"' {f['cli_select1_s']:.3f} s, of which "
        f"importing the CLI and the catalog {f['cli_imports_s']:.3f} s"
    )
    print(
        f"CLI max RSS {f['cli_rss_mb'] or 0:.0f} MB; layout-1 DuckDB subprocess max RSS "
        f"{f['v1_cold_rss_mb'] or 0:.0f} MB; Store() open {f['store_open_s']:.3f} s"
    )
    print(
        f"\nbytes per one-neuron query (EXPLAIN ANALYZE 'Data Read', fresh Store): "
        f"{f['data_read_cold'] / MB:.2f} MiB (printed: {f['data_read_cold_text'] / MB:.2f}); "
        "warm (footers cached) "
        f"{f['topk_neuron_data_read_warm'] / MB:.2f} MiB; layout 1: cold "
        f"{f['v1_data_read_cold'] / MB:.2f} MiB, warm {f['v1_data_read_warm'] / MB:.2f} MiB"
    )
    print(
        f"  the neuron's data {f['neuron_data_bytes'] / MB:.2f} MiB (rows x 2; stored: "
        f"{f['neuron_column_bytes'] / MB:.2f} MiB); footers of the {f['neuron_files']} "
        f"block files {f['neuron_footer_bytes'] / MB:.2f} MiB; of the tokens files "
        f"{f['tokens_footer_bytes'] / MB:.2f} MiB; layout-1 footers "
        f"{f['v1_footer_bytes'] / MB:.2f} MiB"
    )
    print(
        "\nwhere the time goes (EXPLAIN (ANALYZE, FORMAT JSON), warm: query total, CPU, "
        "planning; the slowest operators, time summed over threads):"
    )
    keys = ("topk_neuron_cold", "topk_neuron", "v1_topk", "mean_per_layer", "cosine_topk")
    keys += ("vector",)
    for key in keys + ("token_across_layers",):
        prof = f[key + "_profile"]
        if "error" in prof:
            print(f"  {key:20} {prof['error']}")
            continue
        ops = []
        for op in prof["ops"]:
            extra = f" {op['bytes'] / MB:.1f} MiB" if op.get("bytes") else ""
            extra += f" {op['files']} files" if op.get("files") else ""
            ops.append(f"{op['name']} {op['s']:.3f}s{extra}")
        print(
            f"  {key:20} total {prof['total_s']:.3f}s cpu {prof['cpu_s']:.3f}s planning "
            f"{prof['planner_s'] + prof['optimizer_s']:.3f}s, read "
            f"{prof['data_read'] / MB:.1f} MiB, row groups {prof['row_groups']}"
        )
        print(f"  {'':20} " + "; ".join(ops))
    print("\ntargets (run A at width 14,336):")
    for key, v in f["targets"].items():
        value = v["value"]
        shown = f"{value:,.4g}" if isinstance(value, float) else f"{value:,}"
        print(f"  {'PASS' if v['pass'] else 'FAIL'}  {key:28} {shown:>14}  (target {v['target']})")
    print(
        f"total {f['total_s']:.0f} s, {f['total_cpu_s']:.0f} CPU s (this process and its children)"
    )


# -- main -------------------------------------------------------------------------------


def main() -> None:
    """Command line: ``--quick``, ``--rows``, ``--shard-seqs``, ``--explain``, ``--workdir``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200k rows per layer")
    parser.add_argument("--rows", type=int, help="rows per layer of runs A and C (N)")
    parser.add_argument("--shard-seqs", type=int, help="sequences per shard (default: auto)")
    parser.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE plans")
    parser.add_argument("--workdir", help="where the stores go (default: the temp directory)")
    args = parser.parse_args()
    rows = args.rows or (200_000 if args.quick else 1 << 20)
    seqs = -(-rows // CONTEXT)
    if seqs < 2 * MIN_SHARDS:
        parser.error(f"--rows {rows}: at least {2 * MIN_SHARDS * CONTEXT} rows")
    specs = {
        "A": RunSpec("A", "scale-a", "mlp_post", 14_336, (0,), seqs, args.shard_seqs),
        "B": RunSpec(
            "B", "scale-b", "resid_post", 4096, (0, 1), max(2, seqs // 5), args.shard_seqs
        ),
        "C": RunSpec("C", "scale-c", "resid_post", 512, (0, 1), seqs, args.shard_seqs),
    }
    t0 = time.perf_counter()
    figures: dict = {
        "rows": specs["A"].rows,
        "width": specs["A"].width,
        "quick": args.quick,
        "duckdb": duckdb.__version__,
        "pyarrow": pa.__version__,
        "load_avg_1m": [round(os.getloadavg()[0], 1)],
    }
    work = Path(tempfile.mkdtemp(prefix="arrakis-scale-", dir=args.workdir))
    try:
        pool = make_pool()
        print(f"pool of {POOL_VALUES:,} values in {time.perf_counter() - t0:.1f} s", flush=True)
        print(f"layout 1, run A ({specs['A'].rows:,} rows x {specs['A'].width:,}) ...")
        figures |= measure_layout1(work / "v1", specs["A"], pool, args.explain)
        figures["load_avg_1m"].append(round(os.getloadavg()[0], 1))
        store, small_store = work / "store", work / "store-512"
        runs = {}
        for name, spec in specs.items():
            target = small_store if name == "C" else store
            runs[name] = write_layout2(target, spec, pool)
            compact_run(target, runs[name])
            r = runs[name]
            print(
                f"layout 2, run {name}: {r.files_before} files written in {r.write_s:.1f} s, "
                f"compacted to {r.files_after} in {r.compact_s:.1f} s",
                flush=True,
            )
        del pool
        figures |= measure_layout2(store, small_store, runs, args.explain)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a = runs["A"]
    figures["runs"] = {
        name: {
            "run_id": r.spec.run_id,
            "family": r.spec.family,
            "width": r.spec.width,
            "layers": len(r.spec.layers),
            "rows": r.spec.rows,
            "seqs_per_shard": r.spec.shard_seqs,
            "shards": len(r.spec.shards),
            "shards_per_part": r.shards_per_part,
            "files_before": r.files_before,
            "files_after": r.files_after,
            "write_s": r.write_s,
            "write_cpu_s": r.write_cpu_s,
            "compact_s": r.compact_s,
            "compact_cpu_s": r.compact_cpu_s,
            "activation_bytes": r.activation_bytes,
            "footer_bytes": r.footer_bytes,
            "bytes_per_value": r.bytes_per_value,
        }
        for name, r in runs.items()
    }
    figures["write_s"], figures["compaction_s"] = a.write_s, a.compact_s
    figures["compaction_over_write"] = a.compact_s / a.write_s
    figures["compaction_over_write_cpu"] = a.compact_cpu_s / a.write_cpu_s
    figures["topk_over_v1"] = figures["v1_topk_warm_s"] / figures["topk_neuron_warm_s"]
    figures["topk_cli_over_v1_cold"] = figures["v1_topk_cold_s"] / figures["topk_neuron_cli_s"]
    figures["cosine_over_numpy"] = figures["cosine_topk_s"] / figures["numpy_cosine_s"]
    figures["cosine_text_over_numpy"] = figures["cosine_topk_text_s"] / figures["numpy_cosine_s"]
    figures["topk_over_numpy"] = figures["topk_neuron_warm_s"] / figures["numpy_topk_s"]
    figures["bytes_read_per_neuron_query"] = figures["data_read_cold"]
    figures["bytes_read_how"] = (
        "EXPLAIN ANALYZE 'Data Read' of top_contexts in a freshly opened Store: block-file "
        "and tokens footers, the neuron column, keys, the tokens join"
    )
    figures["bytes_read_target"] = 4 * figures["neuron_data_bytes"] + MB
    figures["bytes_per_value"] = a.bytes_per_value
    figures["bytes_per_value_by_width"] = {
        str(r.spec.width): r.bytes_per_value for r in runs.values()
    }
    figures["targets"] = verdicts(figures)
    figures["targets_met"] = all(v["pass"] for v in figures["targets"].values())
    figures["load_avg_1m"].append(round(os.getloadavg()[0], 1))
    figures["total_s"] = time.perf_counter() - t0
    usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    figures["total_cpu_s"] = sum(u.ru_utime + u.ru_stime for u in usage)
    print_report(figures)
    print(json.dumps(figures, sort_keys=True, default=float))


if __name__ == "__main__":
    main()
