"""SQL over a real arrakis-ray store of 2M+ token rows, against scanning every value.

    .venv/bin/python benchmarks/query.py --quick             # < 5 min on 2 cores
    .venv/bin/python benchmarks/query.py --quick --explain   # + EXPLAIN ANALYZE profiles
    .venv/bin/python benchmarks/query.py                     # more repeats, more shard sizes

The store is written with the project's own writer (``RunWriter``: tables checked
against ``activation_schema("dense", 512, "float16")`` and the tokens and vocab schemas,
completion markers, a typed manifest from ``tests/runs.py``, the tests' shared
synthetic-run fixture): one hook
(``blocks.3.mlp.hook_post``, width 512) over 16,384 sequences of 128 tokens, with
synthetic values (normal, a few neurons 8x heavier) instead of a model forward, which
would take too long here. Shards hold as many sequences as the harvest's automatic
``shard_size`` gives this hook (~128 MiB per shard: 960 sequences, 18 files); copies with
64 (the old default: 8,192 rows, 256 files) and, in the full mode, 256 sequences per shard
show what the file count costs. The stores are cached under
/tmp/arrakis-bench-query-v2 (~2.2 GB each) and reused; delete the directory to rebuild.

Timed through ``arrakis_ray.store.catalog.Store(store).sql`` (the read-only surface):

- ``topk_neuron``: top-20 contexts of neuron 123 of layer 3, joined to tokens for the text;
- ``macro_topk_neuron``: the same through the catalog's ``top_contexts`` macro, if present;
- ``mean_dims``: the mean of every dimension of layer 3;
- ``cosine_topk``: top-20 rows by cosine similarity with a random direction;
- ``count_rows``: ``count(*)``, which reads only the files' footers;
- ``dashboard_lookup``: the top-20 contexts of neuron 123 read from a precomputed per-neuron
  table (``result.neuron_top_contexts``, sorted by layer, neuron, rank; built here with
  numpy from the stored values, written with the project's writer).

The baseline reads every value (pyarrow -> numpy over the same Parquet files, all
columns, plus the tokens) and answers with numpy; its time per question is the scan plus
that question's compute. All answers are checked against the baseline (ties broken by
seq_id, pos; cosine scores to 1e-5). The ``metadata_cache`` variant is the catalog with
``SET parquet_metadata_cache = true`` before it locks its configuration. Timings are the
best of the repeats with the (min, max) spread, on a warm page cache. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from arrakis_ray.errors import QueryError
from arrakis_ray.harvest.plan import predict_bytes, shard_size_for
from arrakis_ray.store import schemas
from arrakis_ray.store.catalog import Store
from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.writer import RunWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from runs import shard_plan, synthetic_manifest, synthetic_shape, vocab_table  # noqa: E402

WIDTH = 512
CONTEXT = 128  # tokens per sequence
SEQUENCES = 16_384  # x CONTEXT = 2,097,152 token rows
BLOCK = 64  # sequences per generated block (every shard size is a multiple)
FAMILY, LAYER, HOOK = "mlp_post", 3, "blocks.3.mlp.hook_post"


# the harvest's automatic shard size for this hook (harvest.plan.auto_shard_size), rounded
# down to whole generated blocks
HARVEST_SHARD = shard_size_for(
    predict_bytes(((HOOK, "dense", WIDTH, 1),), CONTEXT, CONTEXT, "float16")
)
HARVEST_SHARD -= HARVEST_SHARD % BLOCK
NEURON, TOP = 123, 20
HEAVY = (7, NEURON, 300)  # neurons scaled by 8, as a few dimensions of real activations are
VOCAB = 4096
SEED = 1234
RUN_ID = "synthetic-2m"
CACHE = Path("/tmp/arrakis-bench-query-v2")  # -v2: store layout 2 (a layout-1 cache is refused)
VERSION = 3  # bump when the generated data or the store layout changes
DASHBOARD = "neuron_top_contexts"
TARGETS = {"topk_neuron_s": 0.2, "dashboard_lookup_s": 0.05, "topk_over_baseline": 20.0}
WINDOW = 8  # context tokens each side of a top token, as the neuron_dashboard tool's default
# The neuron_dashboard tool's table; this copy is used only where schemas/ lacks it (the
# repository's own schema directory wins).
DASHBOARD_SCHEMA = {
    "name": f"result.{DASHBOARD}",
    "version": 1,
    "doc": "Top contexts of every neuron: one row per (family, layer, neuron, rank).",
    "fields": [
        {"name": n, "type": t, "nullable": False}
        for n, t in [
            ("run_id", "string"),
            ("family", "string"),
            ("layer", "int16"),
            ("neuron", "int32"),
            ("rank", "int32"),
            ("seq_id", "int64"),
            ("pos", "int32"),
            ("activation", "float32"),
            ("context", "string"),
        ]
    ],
}
log = logging.getLogger("benchmarks.query")


# -- the synthetic store -------------------------------------------------------------


def _block(b: int, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values [WIDTH, rows] float16 (one contiguous array per neuron) and token ids.

    Each neuron's values are a random slice of one pool of normal samples: drawing 1G
    normals would take most of the build on 2 cores, and a slice is as random to Parquet.
    """
    rng = np.random.default_rng([SEED, b])
    n = BLOCK * CONTEXT
    start = rng.integers(0, len(pool) - n, WIDTH)
    values = np.stack([pool[s : s + n] for s in start])
    values[list(HEAVY)] *= 8.0  # a power of two: exact in float16
    return values, rng.integers(0, VOCAB, n, dtype=np.int32)


def _keys(first_seq: int, n_seqs: int) -> tuple[np.ndarray, np.ndarray]:
    seq = np.repeat(np.arange(first_seq, first_seq + n_seqs, dtype=np.int64), CONTEXT)
    return seq, np.tile(np.arange(CONTEXT, dtype=np.int32), n_seqs)


class StoreWriter:
    """Writes the shards of one run, ``seqs_per_shard`` sequences per file."""

    def __init__(self, root: Path, seqs_per_shard: int, vocab: np.ndarray) -> None:
        self.writer = RunWriter(root, RUN_ID)
        self.shards = shard_plan(SEQUENCES, seqs_per_shard)
        self.vocab, self.pending, self.next = vocab, [], 0
        self.writer.write_vocab(vocab_table(vocab))

    def add(self, values: np.ndarray, tokens: np.ndarray) -> None:
        """Queue one generated block; a shard is written when enough blocks are queued."""
        self.pending.append((values, tokens))
        if len(self.pending) * BLOCK == self.shards[self.next].count:
            self._flush()

    def _flush(self) -> None:
        shard = self.shards[self.next]
        values = np.concatenate([v for v, _ in self.pending], axis=1)
        tokens = np.concatenate([t for _, t in self.pending])
        seq, pos = _keys(shard.first_doc, shard.count)
        n, run = len(seq), self.writer.run_id
        run_col = pa.array(np.full(n, run, dtype=object), pa.string())
        act_schema = schemas.activation_schema("dense", WIDTH, "float16")
        cols = [run_col, pa.array(np.full(n, LAYER, np.int16)), pa.array(seq), pa.array(pos)]
        act = pa.Table.from_arrays(cols + [pa.array(v) for v in values], schema=act_schema)
        self.writer.write_activations(FAMILY, shard.shard, act)
        # one document per sequence: doc_id = seq_id, doc_pos = pos
        token_cols = [seq, pos, seq, pos, tokens, self.vocab[tokens]]
        tok = pa.Table.from_arrays(
            [run_col, *(pa.array(c) for c in token_cols)], schema=schemas.tokens_schema()
        )
        self.writer.write_tokens(shard.shard, tok)
        self.writer.mark_complete(shard.shard)  # last, as the harvest does
        self.pending, self.next = [], self.next + 1

    def finish(self, dashboard: pa.Table, seconds: float) -> None:
        """Write the dashboard table and the manifest (after every shard)."""
        assert not self.pending and self.next == len(self.shards), "every shard is written"
        schema = schemas.load_schema(f"result.{DASHBOARD}")
        self.writer.write_result(DASHBOARD, 0, dashboard, schema.arrow(), schema.version)
        shape = synthetic_shape(n_layers=LAYER + 1, d_mlp=WIDTH, d_vocab=VOCAB)
        manifest = synthetic_manifest(
            RUN_ID,
            [HOOK],
            shape,
            self.shards,
            storage_dtype="float16",
            context_length=CONTEXT,
            n_tokens=SEQUENCES * CONTEXT,
            seconds=seconds,
            model_source="synthetic (benchmarks/query.py)",
        )
        self.writer.write_manifest(manifest)


def _dashboard(
    cands: list[tuple[np.ndarray, ...]], tokens: np.ndarray, vocab: np.ndarray
) -> pa.Table:
    """Top-TOP rows per neuron from per-block candidates (every row >= the block's k-th)."""
    neuron, row, value = (np.concatenate(c) for c in zip(*cands, strict=True))
    order = np.lexsort((row, -value.astype(np.float32), neuron))  # neuron, value desc, row
    neuron, row, value = neuron[order], row[order], value[order]
    rank = np.arange(len(neuron)) - np.searchsorted(neuron, neuron)  # 0.. within a neuron
    keep = rank < TOP
    neuron, row, value, rank = neuron[keep], row[keep], value[keep], rank[keep]
    seq, pos = row // CONTEXT, row % CONTEXT
    contexts = []
    for r, p in zip(row.tolist(), pos.tolist(), strict=True):
        lo, hi = r - min(p, WINDOW), r + min(CONTEXT - 1 - p, WINDOW)
        words = list(vocab[tokens[lo : hi + 1]])
        words[r - lo] = f"[{words[r - lo]}]"
        left, right = ("…" if lo < r - p else ""), ("…" if hi < r - p + CONTEXT - 1 else "")
        contexts.append(left + "".join(words) + right)  # the vocabulary carries its spaces
    n = len(row)
    columns = {
        "run_id": pa.array(np.full(n, RUN_ID, dtype=object), pa.string()),
        "family": pa.array(np.full(n, FAMILY, dtype=object), pa.string()),
        "layer": pa.array(np.full(n, LAYER, np.int16)),
        "neuron": pa.array(neuron.astype(np.int32)),
        "rank": pa.array(rank + 1),
        "seq_id": pa.array(seq.astype(np.int64)),
        "pos": pa.array(pos.astype(np.int32)),
        "activation": pa.array(value.astype(np.float32)),
        "context": pa.array(contexts, pa.string()),
    }
    schema = schemas.load_schema(f"result.{DASHBOARD}").arrow()
    return pa.Table.from_arrays([columns[f.name].cast(f.type) for f in schema], schema=schema)


def build_stores(cache: Path, shard_sizes: tuple[int, ...]) -> dict[int, Path]:
    """The cached stores (one per shard size); those missing are built, from the same values."""
    schema_dir = cache / "schemas"
    schema_dir.mkdir(parents=True, exist_ok=True)
    path = schema_dir / f"result.{DASHBOARD}.v1.json"
    path.write_text(json.dumps(DASHBOARD_SCHEMA, indent=1))
    schemas.add_schema_dir(schema_dir)
    roots = {s: cache / f"store-{s}" for s in shard_sizes}
    stamp = {"version": VERSION, "sequences": SEQUENCES, "width": WIDTH}
    stamps = {s: cache / f"store-{s}.json" for s in shard_sizes}
    missing = [s for s in shard_sizes if not _stamped(stamps[s], stamp)]
    if not missing:
        return roots
    start = time.perf_counter()
    for s in missing:
        shutil.rmtree(roots[s], ignore_errors=True)
    vocab = np.array([f" tok{i}" for i in range(VOCAB)], dtype=object)
    writers = [StoreWriter(roots[s], s, vocab) for s in missing]
    cands, all_tokens = [], []
    pool = np.random.default_rng(SEED).standard_normal(1 << 24, np.float32).astype(np.float16)
    for b in range(SEQUENCES // BLOCK):
        values, tokens = _block(b, pool)
        for w in writers:
            w.add(values, tokens)
        # every row at or above the block's TOP-th value (ties at the cut stay candidates);
        # positive float16 values order as their int16 bits, which numpy sorts far faster
        bits = values.view(np.int16)
        kth = np.partition(bits, -TOP, axis=1)[:, -TOP]
        assert (kth > 0).all(), "a block's top values are positive"
        neuron, local = np.nonzero(bits >= kth[:, None])
        cands.append((neuron, local + b * BLOCK * CONTEXT, values[neuron, local]))
        all_tokens.append(tokens)
    dashboard = _dashboard(cands, np.concatenate(all_tokens), vocab)
    for s, w in zip(missing, writers, strict=True):
        w.finish(dashboard, time.perf_counter() - start)
        stamps[s].write_text(json.dumps(stamp))
    log.info("built %s in %.1f s", ", ".join(map(str, missing)), time.perf_counter() - start)
    return roots


def _stamped(path: Path, stamp: dict) -> bool:
    try:
        return json.loads(path.read_text()) == stamp
    except (OSError, ValueError):
        return False


# -- the questions, in SQL and with numpy ----------------------------------------------


def sql_queries(direction: np.ndarray) -> dict[str, str]:
    """The four questions through the catalog's views (ties broken by seq_id, pos)."""
    vector = "[" + ", ".join(f"d{i}" for i in range(WIDTH)) + f"]::FLOAT[{WIDTH}]"
    lit = "[" + ", ".join(repr(float(v)) for v in direction) + f"]::FLOAT[{WIDTH}]"
    return {
        "topk_neuron": f"""
            WITH top AS (
                SELECT run_id, seq_id, pos, d{NEURON} AS activation FROM act_{FAMILY}
                WHERE layer = {LAYER} ORDER BY activation DESC, seq_id, pos LIMIT {TOP})
            SELECT seq_id, pos, activation, token_text FROM top
            JOIN tokens USING (run_id, seq_id, pos) ORDER BY activation DESC, seq_id, pos""",
        "macro_topk_neuron": f"SELECT * FROM top_contexts('{FAMILY}', {LAYER}, {NEURON}, {TOP})",
        "dashboard_lookup": f"""
            SELECT seq_id, pos, activation, context FROM results_{DASHBOARD}
            WHERE family = '{FAMILY}' AND layer = {LAYER} AND neuron = {NEURON} ORDER BY rank""",
        # reads only footers: what opening the files costs
        "count_rows": f"SELECT count(*) AS n FROM act_{FAMILY}",
        "mean_dims": f"SELECT avg(COLUMNS('^d[0-9]+$')) FROM act_{FAMILY} WHERE layer = {LAYER}",
        "cosine_topk": f"""
            SELECT seq_id, pos, array_cosine_similarity({vector}, {lit}) AS score
            FROM act_{FAMILY} WHERE layer = {LAYER}
            ORDER BY score DESC, seq_id, pos LIMIT {TOP}""",
    }


class Scan:
    """The baseline's data: every value of the hook [WIDTH, rows] and the tokens."""

    def __init__(self, root: Path) -> None:
        layout = RunLayout(root, RUN_ID)
        # one layer, one column block at this width: d<i> is dimension i
        files = sorted(layout.activation_dir(FAMILY).rglob("*.parquet"))
        n = sum(pq.read_metadata(f).num_rows for f in files)
        self.values = np.empty((WIDTH, n), np.float16)  # by neuron, as the files store it
        keys, lo = [], 0
        for f in files:
            table = pq.read_table(f, partitioning=None)  # every column, as a DIY reader does
            hi = lo + table.num_rows
            for i in range(WIDTH):
                self.values[i, lo:hi] = table.column(f"d{i}").to_numpy()
            keys.append(_key(table))
            lo = hi
        self.key = np.concatenate(keys)
        tokens = pa.concat_tables(
            pq.read_table(f) for f in sorted(layout.tokens_dir.glob("shard-*.parquet"))
        )
        token_key = _key(tokens)
        self.token_order = np.argsort(token_key, kind="stable")
        self.token_key = token_key[self.token_order]
        self.token_text = tokens.column("token_text")

    def top(self, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row indices, scores) of the TOP best rows, ties by (seq_id, pos)."""
        kth = np.partition(score, -TOP)[-TOP]
        cand = np.nonzero(score >= kth)[0]
        best = cand[np.lexsort((self.key[cand], -score[cand]))][:TOP]
        return best, score[best]

    def text(self, rows: np.ndarray) -> list[str]:
        """token_text of activation rows, joined on (seq_id, pos)."""
        at = np.searchsorted(self.token_key, self.key[rows])
        return self.token_text.take(pa.array(self.token_order[at])).to_pylist()


def _key(table: pa.Table) -> np.ndarray:
    return table.column("seq_id").to_numpy() * CONTEXT + table.column("pos").to_numpy()


def baseline_answers(scan: Scan, direction: np.ndarray) -> dict[str, Callable[[], object]]:
    """The questions answered from the scanned values (time: scan + this)."""

    def topk() -> dict:
        rows, score = scan.top(scan.values[NEURON].astype(np.float32))
        return {"key": scan.key[rows], "value": score, "text": scan.text(rows)}

    def mean() -> np.ndarray:
        total, n, step = np.zeros(WIDTH), scan.values.shape[1], 1 << 16
        for lo in range(0, n, step):
            total += scan.values[:, lo : lo + step].astype(np.float32).sum(axis=1, dtype=np.float64)
        return total / n

    def cosine() -> dict:
        n, step, parts = scan.values.shape[1], 1 << 16, []
        for lo in range(0, n, step):
            x = scan.values[:, lo : lo + step].astype(np.float32)
            parts.append((direction @ x) / np.sqrt(np.einsum("ij,ij->j", x, x)))
        rows, score = scan.top(np.concatenate(parts) / np.linalg.norm(direction))
        return {"key": scan.key[rows], "value": score}

    return {"topk_neuron": topk, "mean_dims": mean, "cosine_topk": cosine}


def check(name: str, got, want) -> None:
    """Raise AssertionError where the catalog's answer differs from the baseline's."""
    if name == "count_rows":
        assert got["n"][0] == want, f"count_rows: {got['n'][0]} rows, expected {want}"
        return
    if name == "mean_dims":
        err = float(np.abs(got.to_numpy()[0].astype(np.float64) - want).max())
        assert err < 1e-5, f"mean_dims: off by {err}"
        return
    key = got["seq_id"].to_numpy() * CONTEXT + got["pos"].to_numpy()
    column = "score" if name == "cosine_topk" else "activation"
    value = got[column].to_numpy()
    if name == "cosine_topk":  # float32 sums in another order: scores to 1e-5, near-ties
        assert np.allclose(value, want["value"], atol=1e-5), "cosine_topk: scores differ"
        sure = set(want["key"][want["value"] > want["value"][-1] + 1e-5].tolist())
        assert sure <= set(key.tolist()), "cosine_topk: rows differ"
        return
    assert np.array_equal(key, want["key"]), f"{name}: rows differ"
    assert np.array_equal(value, want["value"]), f"{name}: activations differ"
    if "context" in got.columns:  # the dashboard: the centre token is in [brackets]
        texts = [f"[{t}]" in c for c, t in zip(got["context"].to_list(), want["text"], strict=True)]
        assert all(texts), f"{name}: context lacks the token"
    else:
        assert got["token_text"].to_list() == want["text"], f"{name}: token_text differs"


def column_baseline(root: Path) -> pl.DataFrame:
    """Top-k reading only the columns it needs with pyarrow: the fairest hand-written rival."""
    layout = RunLayout(root, RUN_ID)

    def read(directory: Path, columns: list[str]) -> pa.Table:
        files = sorted(directory.rglob("shard-*.parquet"))  # activations: layer=3/block=0/
        return pa.concat_tables(pq.read_table(f, columns=columns, partitioning=None) for f in files)

    act = read(layout.activation_dir(FAMILY), ["seq_id", "pos", f"d{NEURON}"])
    tokens = read(layout.tokens_dir, ["seq_id", "pos", "token_text"])
    score, key, token_key = act.column(2).to_numpy().astype(np.float32), _key(act), _key(tokens)
    kth = np.partition(score, -TOP)[-TOP]
    cand = np.nonzero(score >= kth)[0]
    best = cand[np.lexsort((key[cand], -score[cand]))][:TOP]
    at = [int(np.nonzero(token_key == k)[0][0]) for k in key[best]]
    return pl.DataFrame(
        {
            "seq_id": key[best] // CONTEXT,
            "pos": key[best] % CONTEXT,
            "activation": score[best],
            "token_text": tokens.column(2).take(at).to_pylist(),
        }
    )


# -- timing ----------------------------------------------------------------------------


class MetadataCachedStore(Store):
    """The catalog with the proposed change: Parquet footers cached across queries."""

    def _lock_down(self) -> None:
        self._require_open().execute("SET parquet_metadata_cache = true")
        super()._lock_down()


def timed(fn: Callable[[], object], repeats: int) -> tuple[dict, object]:
    """Best, (min, max) spread and median of ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    spread = [round(min(times), 4), round(max(times), 4)]
    return {"best": min(times), "spread": spread, "median": statistics.median(times)}, result


def measure(store: Store, queries: dict[str, str], repeats: dict[str, int], want: dict) -> dict:
    """Time each query through ``store.sql`` and check its answer against the baseline."""
    out = {}
    for name, sql in queries.items():
        if repeats.get(name, 0) < 1:
            continue
        try:
            t, result = timed(lambda q=sql: store.sql(q), repeats[name])
        except QueryError as e:  # the catalog's macros are optional here
            log.warning("%s: %s", name, e)
            continue
        check("topk_neuron" if name.endswith("topk_neuron") else name, result, want[name])
        out[f"{name}_s"], out[f"{name}_spread_s"] = t["best"], t["spread"]
    return out


def store_facts(root: Path) -> dict:
    """Files, row groups and footer sizes of the activation directory."""
    files = sorted(RunLayout(root, RUN_ID).activation_dir(FAMILY).rglob("*.parquet"))
    metas = [pq.read_metadata(f) for f in files]
    groups = sum(m.num_row_groups for m in metas)
    return {
        "activation_files": len(files),
        "row_groups": groups,
        "rows_per_row_group": sum(m.num_rows for m in metas) // groups,
        "footer_bytes_per_file": int(statistics.mean(m.serialized_size for m in metas)),
        "bytes": sum(f.stat().st_size for f in files),
    }


def baseline(root: Path, direction: np.ndarray, repeats: int) -> tuple[dict, dict]:
    """(figures, answers) of the scan-everything baseline; each question pays the scan."""
    scan_t, scan = timed(lambda: Scan(root), repeats)
    figures = {"baseline_scan_s": scan_t["best"], "baseline_scan_spread_s": scan_t["spread"]}
    want = {}
    for name, fn in baseline_answers(scan, direction).items():
        t, want[name] = timed(fn, 1)
        figures[f"baseline_{name}_s"] = scan_t["best"] + t["best"]
    want["dashboard_lookup"] = want["macro_topk_neuron"] = want["topk_neuron"]
    want["count_rows"] = SEQUENCES * CONTEXT
    figures["baseline_dashboard_lookup_s"] = figures["baseline_topk_neuron_s"]
    col_t, col_answer = timed(lambda: column_baseline(root), repeats)
    check("topk_neuron", col_answer, want["topk_neuron"])
    figures["topk_column_baseline_s"] = col_t["best"]
    return figures, want


def main() -> None:
    """Command line: ``--quick``, ``--explain``, ``--cache DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shard sizes")
    parser.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE profiles")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the stores are kept")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    shard_sizes = (HARVEST_SHARD, 64) if args.quick else (HARVEST_SHARD, 64, 256)
    fast, slow, other = (5, 3, 1) if args.quick else (9, 5, 3)
    reps = {k: fast for k in ("topk_neuron", "dashboard_lookup", "macro_topk_neuron", "count_rows")}
    figures: dict = {
        "rows": SEQUENCES * CONTEXT,
        "width": WIDTH,
        "load_avg_1m": [os.getloadavg()[0]],
    }

    start = time.perf_counter()
    roots = build_stores(args.cache, shard_sizes)
    figures["build_s"] = time.perf_counter() - start
    direction = np.random.default_rng([SEED, 999]).standard_normal(WIDTH).astype(np.float32)
    queries = sql_queries(direction)
    base, want = baseline(roots[HARVEST_SHARD], direction, 1 if args.quick else 2)
    figures |= base

    # the catalog as it is, on a store sharded as the harvest does by default; then the
    # same questions with fewer files and with cached footers (slow ones fewer times: the
    # footers are a small part of a full scan)
    variants = {}
    for size in shard_sizes:
        for cls in (Store, MetadataCachedStore):
            headline = size == HARVEST_SHARD and cls is Store
            label = f"shards_{size}" + ("" if cls is Store else "_metadata_cache")
            open_t, store = timed(lambda c=cls, s=size: c(roots[s]), 1)
            with store:
                n = slow if headline else (other if cls is Store else 0)
                r = reps | {"mean_dims": n, "cosine_topk": n}
                variants[label] = store_facts(roots[size]) | {"open_s": open_t["best"]}
                variants[label] |= measure(store, queries, r, want)
                if args.explain and (headline or size == 64):
                    for name in ("topk_neuron", "dashboard_lookup"):
                        print(f"-- EXPLAIN ANALYZE {name} ({label})")
                        print(store.sql("EXPLAIN ANALYZE " + queries[name])[0, -1])
    figures |= {k: v for k, v in variants[f"shards_{HARVEST_SHARD}"].items() if k.endswith("_s")}
    figures["harvest_shard_size"] = HARVEST_SHARD
    for name in ("topk_neuron", "dashboard_lookup", "mean_dims", "cosine_topk"):
        short = name.split("_")[0]
        figures[f"{short}_over_baseline"] = figures[f"baseline_{name}_s"] / figures[f"{name}_s"]
    figures["variants"] = variants
    figures["targets"] = TARGETS
    figures["targets_met"] = {
        k: (figures[k] >= v if k.endswith("baseline") else figures[k] < v)
        for k, v in TARGETS.items()
    }
    figures["load_avg_1m"].append(os.getloadavg()[0])
    figures["total_s"] = time.perf_counter() - t0
    print_report(figures)
    print(json.dumps(figures, sort_keys=True))


def print_report(f: dict) -> None:
    """A readable table of the headline figures and the variants."""
    print(
        f"\n{f['rows']:,} rows x {f['width']} float16; build {f['build_s']:.1f} s; "
        f"baseline scan {f['baseline_scan_s']:.2f} s; load average {f['load_avg_1m']}"
    )
    print(f"{'question':18} {'ours_s':>8} {'spread':>18} {'baseline_s':>11} {'x':>7}")
    for name in ("topk_neuron", "dashboard_lookup", "mean_dims", "cosine_topk"):
        ratio = f[f"{name.split('_')[0]}_over_baseline"]
        spread = str(f[name + "_spread_s"])
        base = f["baseline_" + name + "_s"]
        print(f"{name:18} {f[name + '_s']:8.4f} {spread:>18} {base:11.2f} {ratio:7.1f}")
    print(f"top-k by pyarrow reading only its columns: {f['topk_column_baseline_s']:.3f} s")
    keys = ("count_rows", "topk_neuron", "macro_topk_neuron", "dashboard_lookup")
    keys += ("mean_dims", "cosine_topk")
    print(f"\n{'variant':27} {'files':>5} {'rows/rg':>7} {'open_s':>6} " + " ".join(keys))
    for label, v in f["variants"].items():
        cells = " ".join(f"{v[k + '_s']:.4f}" if k + "_s" in v else "-" for k in keys)
        print(f"{label:27} {v['activation_files']:5} {v['rows_per_row_group']:7} ", end="")
        print(f"{v['open_s']:6.3f} {cells}")
    print(f"targets met: {f['targets_met']}; total {f['total_s']:.0f} s")


if __name__ == "__main__":
    main()
