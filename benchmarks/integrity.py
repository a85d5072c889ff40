"""What the file inventories of store layout 3 cost: the checksum on the harvest, and
the inventory on opening a store and on queries.

    .venv/bin/python benchmarks/integrity.py --quick     # < 3 min on 2 CPU cores
    .venv/bin/python benchmarks/integrity.py             # more shards and repeats, < 10 min
    .venv/bin/python benchmarks/integrity.py --profile   # + cProfile of one open per layout

(1) checksum - the harvest actor's class (``HarvestStage``, in this process without Ray,
    called from ``CONCURRENT_SHARDS`` threads as Ray Data calls the actor) over the same
    shards of benchmarks/harvest.py's random-init gpt2 (6 layers, d_model 256, every
    ``blocks.*.hook_resid_post`` and ``blocks.*.mlp.hook_post`` in float16), alternately
    with ``arrakis_ray.store.parquet.checksum_file`` timed (checksums on) and replaced by
    a constant (the baseline). Reported: the median walls and their ratio (the cost
    itself, but within the noise of two walls), and the checksum timed directly inside
    ``checksum_file``, summed over the actor's 4 write threads, over the harvest's wall:
    - ``checksum_cpu_over_wall``, its CPU seconds / the wall: the figure to read. The
      writes run beside the next shard's forward, so the checksum adds at most its CPU
      time to the wall (on a quiet machine): an upper bound on the cost;
    - ``checksum_share``, its wall seconds / the wall: also counts the time a hashing
      thread waits for a core (2 torch threads and 4 writers on 2 cores, and any other
      tenant), so it overstates the cost, the more the busier the machine;
    - ``checksum_cpu_share``, its CPU seconds / the process's: its share of the work.
    Also xxh3_128's throughput on a 256 MiB buffer and through ``checksum_file`` on a
    256 MiB file in the page cache, per wall and per CPU second. The Parquet page CRCs
    (``write_page_checksum``) are on in both passes, so not measured here.
(2) open    - one synthetic store written by the current code (``tests/runs.py``'s
    ``write_run``: RunWriter + ``mark_complete``): R runs x S shards x 2 families
    (resid_post d 64, mlp_post d 256) x 4 layers, 128 tokens per shard (small files,
    so that per-file costs show), each run with one tool result; uncompacted, and a
    compacted copy. A layout-2 copy of each: an empty ``shard-N.done`` per inventory, no
    ``parts.json`` or ``vocab.json``, tool records without "files", marker version 2,
    the Parquet files hard-linked (both layouts read the same pages). Commit 730277d's
    code (layout 2: views over globs), extracted with ``git archive`` into the work
    directory and put first on PYTHONPATH, opens the layout-2 copies; the current code
    opens the layout-3 stores, as shipped and with the per-query bounds lifted
    (``timeout_s=None, max_result_bytes=None``: they came with layout 3, but are not the
    inventory). Each open is a fresh subprocess (the same imports, a warm page cache),
    the sides taking turns to go first; timed, by wall and by CPU seconds: the
    ``Store(root)`` call and three queries (a count over one layer, ``top_contexts``, a
    join of tokens with activations for one sequence), the first call after the open
    (what ``arrakis-ray sql`` pays) and the best of the next ones. Every side answers
    the same.

Medians over the repeats and the ratios new/old; the targets: the checksum <= 3 % of the
harvest, open and queries within 10 %. The last line printed is one JSON object with
every figure."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
import harvest as bench_harvest  # noqa: E402

OLD_COMMIT = "730277d"  # store layout 2: empty .done markers, views over globs
TARGETS = {"checksum_share": 0.03, "open_over_old": 1.10, "query_over_old": 1.10}
HASH_BUFFER = 256 << 20  # bytes hashed for the throughput figure
CONSTANT = "xxh3_128:" + "0" * 32  # the baseline's checksum: no bytes read

# the synthetic store of (2): tiny shards, so that per-file costs show
SEQS, POSITIONS = 4, 32  # sequences per shard, tokens per sequence
LAYERS, D_MODEL, D_MLP, VOCAB = 4, 64, 256, 512
FAMILIES = {"resid_post": "blocks.{}.hook_resid_post", "mlp_post": "blocks.{}.mlp.hook_post"}
TOOL, OUTPUT = "neuron_dashboard", "neuron_stats"  # one result table per run
QUERIES = {
    "count_layer": "SELECT count(*) AS n FROM act_resid_post WHERE layer = 2",
    "top_contexts": "SELECT * FROM top_contexts('mlp_post', 2, 7, 10)",
    "sequence_join": """
        SELECT t.pos, t.token_text, a.d0, a.d5 FROM tokens t
        JOIN act_resid_post a USING (run_id, seq_id, pos)
        WHERE t.run_id = 'run-1' AND t.seq_id = 77 AND a.layer = 1 ORDER BY t.pos""",
}


@dataclass(frozen=True)
class Mode:
    """Sizes of one invocation."""

    docs: int
    """Documents harvested per pass in (1), each 128 tokens."""
    shard_size: int
    """Documents per harvest shard."""
    harvest_repeats: int
    """Passes with checksums and without, alternating."""
    runs: int
    """Runs in the synthetic store of (2)."""
    shards: int
    """Shards per run."""
    open_repeats: int
    """Subprocess opens per (layout, store)."""
    query_repeats: int
    """Calls of each query per open (the first, then the best of the rest)."""


MODES = {
    "quick": Mode(64, 16, 3, 4, 32, 5, 3),
    "full": Mode(256, 32, 5, 4, 64, 7, 4),
}

log = logging.getLogger("bench")


# -- (1) the checksum on the harvest -------------------------------------------------


class Hashing:
    """Stands in for ``parquet.checksum_file``: the real one timed, or a constant."""

    def __init__(self, real):
        self.real = real
        self.lock = threading.Lock()  # the actor hashes in its write threads
        self.reset()

    def reset(self) -> None:
        self.seconds = self.cpu = 0.0
        self.bytes = self.files = 0

    def timed(self, path) -> str:
        t0, c0 = time.perf_counter(), time.thread_time()
        digest = self.real(path)
        seconds, cpu = time.perf_counter() - t0, time.thread_time() - c0
        size = path.stat().st_size
        with self.lock:
            self.seconds += seconds
            self.cpu += cpu
            self.bytes += size
            self.files += 1
        return digest

    @staticmethod
    def constant(_path) -> str:
        return CONSTANT


def harvest_step(work: Path, mode: Mode):
    """The harvest actor's class over a fresh store, and its tokenized shards."""
    import numpy as np

    from arrakis_ray.config import ModelConfig, pipeline_from_dict
    from arrakis_ray.harvest import actor, tokenize
    from arrakis_ray.harvest.inputs import plan_shards
    from arrakis_ray.harvest.model_source import describe_model, load_tokenizer
    from arrakis_ray.store.layout import init_store

    tokenizer = load_tokenizer(ModelConfig(zoo=bench_harvest.TOKENIZER.removeprefix("zoo:")))
    model_dir = bench_harvest.build_model(work / "model")
    corpus = work / "corpus.jsonl"
    bench_harvest.write_corpus(corpus, mode.docs, tokenizer, seed=1)
    raw = bench_harvest.pipeline("integrity", model_dir, corpus, mode.shard_size)
    config = pipeline_from_dict(raw, source="benchmark:integrity")
    hooks = describe_model(config.model).resolve_hooks(config.harvest.hooks)
    store = init_store(work / "harvest-store")
    stages = [(0, bench_harvest.MODEL["num_hidden_layers"])]
    step = actor.HarvestStage(config, "integrity", store, hooks, stages, 0)
    tokenize_step = tokenize.TokenizeShard(config)
    shards = plan_shards(config.data.path, config.harvest.shard_size)
    inputs = [tokenize_step({k: np.array([v]) for k, v in s.to_dict().items()}) for s in shards]
    return step, inputs, actor.CONCURRENT_SHARDS


def checksum_cost(work: Path, mode: Mode) -> dict:
    """(1): harvest passes with and without the checksum, alternating, in this process."""
    import numpy as np

    from arrakis_ray.store import parquet as store_parquet

    step, inputs, concurrent = harvest_step(work, mode)
    real = store_parquet.checksum_file
    hashing = Hashing(real)
    passes: dict[str, list[dict]] = {"on": [], "off": []}
    pool = ThreadPoolExecutor(concurrent, thread_name_prefix="bench-shard")
    try:
        store_parquet.checksum_file = hashing.timed
        step(inputs[0])  # warm-up: first-call costs (allocator, lazy imports)
        for r in range(mode.harvest_repeats):
            for which in ("on", "off") if r % 2 == 0 else ("off", "on"):
                hashing.reset()
                store_parquet.checksum_file = hashing.timed if which == "on" else hashing.constant
                t0, c0 = time.perf_counter(), time.process_time()
                list(pool.map(step, inputs))  # two shards at once, as Ray Data calls it
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                passes[which].append(
                    {
                        "wall_s": wall,
                        "cpu_s": cpu,
                        "checksum_s": hashing.seconds,
                        "checksum_cpu_s": hashing.cpu,
                        "bytes_hashed": hashing.bytes,
                        "files_hashed": hashing.files,
                    }
                )
            log.info(
                "harvest pass %d: on %.2f s (checksum %.3f s), off %.2f s (load %.1f)",
                r, passes["on"][-1]["wall_s"], passes["on"][-1]["checksum_s"],
                passes["off"][-1]["wall_s"], os.getloadavg()[0],
            )  # fmt: skip
    finally:
        store_parquet.checksum_file = real
        pool.shutdown()
    on, off = passes["on"], passes["off"]
    wall_on = statistics.median(p["wall_s"] for p in on)
    wall_off = statistics.median(p["wall_s"] for p in off)
    tokens = sum(int(np.sum(x["lengths"][0])) for x in inputs)
    return {
        "tokens_per_pass": tokens,
        "shards_per_pass": len(inputs),
        "bytes_hashed_per_pass": on[0]["bytes_hashed"],
        "files_hashed_per_pass": on[0]["files_hashed"],
        "wall_on_s": wall_on,
        "wall_off_s": wall_off,
        "wall_on_over_off": wall_on / wall_off,
        "wall_on_spread_s": _spread([p["wall_s"] for p in on]),
        "wall_off_spread_s": _spread([p["wall_s"] for p in off]),
        "checksum_s_per_pass": statistics.median(p["checksum_s"] for p in on),
        "checksum_cpu_s_per_pass": statistics.median(p["checksum_cpu_s"] for p in on),
        # the figure to read: CPU seconds in checksum_file (over the write threads) / wall
        "checksum_cpu_over_wall": statistics.median(p["checksum_cpu_s"] / p["wall_s"] for p in on),
        "checksum_share": statistics.median(p["checksum_s"] / p["wall_s"] for p in on),
        "checksum_cpu_share": statistics.median(p["checksum_cpu_s"] / p["cpu_s"] for p in on),
        "checksum_gb_per_s_in_harvest": statistics.median(
            p["bytes_hashed"] / p["checksum_s"] / 1e9 for p in on
        ),
        "checksum_gb_per_cpu_s_in_harvest": statistics.median(
            p["bytes_hashed"] / p["checksum_cpu_s"] / 1e9 for p in on
        ),
        "passes": {k: [_round(p) for p in v] for k, v in passes.items()},
    }


def hash_throughput(work: Path) -> dict:
    """xxh3_128 over a 256 MiB buffer, and ``checksum_file`` over the same bytes in a
    file (in the page cache, just written): GB/s, best of three."""
    import numpy as np
    import xxhash

    from arrakis_ray.store.checksum import checksum_file

    buffer = np.random.default_rng(0).bytes(HASH_BUFFER)
    path = work / "hash-buffer.bin"
    path.write_bytes(buffer)

    def rates(fn) -> tuple[float, float]:
        """GB/s by the wall and by this thread's CPU time (kernel time included: the
        file's reads), best of three."""
        wall, cpu = [], []
        for _ in range(3):
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
        return HASH_BUFFER / min(wall) / 1e9, HASH_BUFFER / min(cpu) / 1e9

    memory = rates(lambda: xxhash.xxh3_128(buffer).hexdigest())
    file = rates(lambda: checksum_file(path))
    assert checksum_file(path) == "xxh3_128:" + xxhash.xxh3_128(buffer).hexdigest()
    path.unlink()
    return {
        "bytes": HASH_BUFFER,
        "memory_gb_per_s": memory[0],
        "memory_gb_per_cpu_s": memory[1],
        "file_gb_per_s": file[0],
        "file_gb_per_cpu_s": file[1],
    }


# -- (2) the inventory on open and queries ---------------------------------------------


def build_store(root: Path, mode: Mode) -> None:
    """``mode.runs`` runs of ``mode.shards`` shards written by the current code, each
    with one tool result (recorded with its file list, as the tool runner does)."""
    import numpy as np
    import pyarrow as pa

    sys.path.insert(0, str(REPO / "tests"))
    from runs import synthetic_shape, write_run

    from arrakis_ray.store.layout import RunLayout
    from arrakis_ray.store.manifest import ToolRecord
    from arrakis_ray.store.schemas import load_schema
    from arrakis_ray.store.writer import RunWriter

    vocab = [f" tok{i}" for i in range(VOCAB)]
    shape = synthetic_shape(n_layers=LAYERS, d_model=D_MODEL, d_mlp=D_MLP, d_vocab=VOCAB)
    n_seq = mode.shards * SEQS
    schema = load_schema(f"result.{OUTPUT}")
    for r in range(mode.runs):
        rng = np.random.default_rng(r)
        activations = {
            hook.format(layer): rng.standard_normal(
                (n_seq, POSITIONS, D_MODEL if family == "resid_post" else D_MLP), np.float32
            )
            for family, hook in FAMILIES.items()
            for layer in range(LAYERS)
        }
        token_ids = rng.integers(0, VOCAB, (n_seq, POSITIONS), dtype=np.int32)
        run_id = f"run-{r}"
        write_run(
            root, run_id, token_ids, vocab, activations,
            shard_size=SEQS, dtype="float16", shape=shape, seconds=1.0,
        )  # fmt: skip
        rows = LAYERS * D_MLP
        stats = {
            "run_id": pa.array([run_id] * rows),
            "family": pa.array(["mlp_post"] * rows),
            "layer": pa.array(np.repeat(np.arange(LAYERS), D_MLP).astype(np.int16)),
            "neuron": pa.array(np.tile(np.arange(D_MLP), LAYERS).astype(np.int32)),
            "n_tokens": pa.array(np.full(rows, n_seq * POSITIONS, np.int64)),
        }
        columns = [
            stats[f.name] if f.name in stats else pa.array(rng.random(rows)) for f in schema.arrow()
        ]
        table = pa.Table.from_arrays(columns, schema=schema.arrow())
        writer = RunWriter.for_layout(RunLayout(root, run_id))
        entry = writer.write_result(OUTPUT, 0, table, schema.arrow(), schema.version)
        record = ToolRecord(
            {}, (OUTPUT,), schema.version, 1, rows, 0.0, "2025-01-02T00:00:00Z", (entry,)
        )
        writer.record_tool(TOOL, record)


def compact_store(root: Path) -> None:
    """Compact every run, in the order the harvest does: parts, their inventory, the
    manifest's ``shards_per_part``, then the shard files go."""
    from arrakis_ray.store import compact
    from arrakis_ray.store.inventory import PartsInventory, write_parts_inventory
    from arrakis_ray.store.layout import RunLayout, list_run_ids
    from arrakis_ray.store.manifest import read_manifest
    from arrakis_ray.store.writer import RunWriter

    for run_id in list_run_ids(root):
        layout = RunLayout(root, run_id)
        manifest = read_manifest(layout)
        n_shards = len(manifest.shard_plan)
        per_part = compact.plan_parts(layout, n_shards)
        assert per_part > 1, "the synthetic shards are small enough to compact"
        directories = compact.block_directories(layout)
        entries = sorted(
            (
                e
                for d in directories
                for e in compact.compact_directory(layout, d, n_shards, per_part)
            ),
            key=lambda e: e.path,
        )
        write_parts_inventory(layout, PartsInventory(per_part, tuple(entries)))
        RunWriter.for_layout(layout).write_manifest(manifest.with_changes(shards_per_part=per_part))
        for d in directories:
            compact.remove_shard_files(layout, d, n_shards)


def copy_store(src: Path, dst: Path, layout2: bool) -> None:
    """A copy of a store, its Parquet files hard-linked (the same pages in the cache);
    with ``layout2``, as layout 2 had it: an empty ``shard-N.done`` per inventory, no
    parts or vocab inventory, tool records without "files", no call ids in the
    manifest, the marker at version 2."""
    for directory, _dirs, names in os.walk(src):
        here = Path(directory)
        there = dst / here.relative_to(src)
        there.mkdir(parents=True, exist_ok=True)
        for name in names:
            source, target = here / name, there / name
            if name.endswith(".parquet"):
                os.link(source, target)
            elif not layout2:
                shutil.copy2(source, target)
            elif here.name == "completions":
                if name.startswith("shard-"):
                    (there / name.replace(".json", ".done")).touch()
                # parts.json and vocab.json: layout 2 had none
            elif here.name == "tools":
                record = json.loads(source.read_text())
                record.pop("files", None)
                target.write_text(json.dumps(record, sort_keys=True, indent=2) + "\n")
            elif name == "manifest.json":
                manifest = json.loads(source.read_text())
                for call in manifest["harvest"]["calls"]:
                    call.pop("started_at", None)
                target.write_text(json.dumps(manifest, sort_keys=True, indent=1) + "\n")
            elif name == "arrakis-store.json":
                marker = json.loads(source.read_text())
                target.write_text(json.dumps({**marker, "version": 2}) + "\n")
            else:
                shutil.copy2(source, target)


def old_code(dst: Path) -> Path:
    """Commit OLD_COMMIT's package (and its schemas, as its data package) under ``dst``:
    ``PYTHONPATH=dst`` imports it before the editable install. ``git archive`` reads
    the repository and changes nothing in it."""
    for path, prefix in (("arrakis_ray", ""), ("schemas", "arrakis_ray/")):
        out = subprocess.run(
            ["git", "-C", str(REPO), "archive", f"--prefix={prefix}", OLD_COMMIT, path],
            check=True,
            capture_output=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(out)) as tar:
            tar.extractall(dst, filter="data")
    return dst


def store_facts(root: Path) -> dict:
    files = [Path(d) / n for d, _dirs, names in os.walk(root) for n in names]
    parquet = [f for f in files if f.suffix == ".parquet"]
    return {
        "files": len(files),
        "parquet_files": len(parquet),
        "parquet_bytes": sum(f.stat().st_size for f in parquet),
        "inventories": sum(1 for f in files if f.parent.name == "completions"),
    }


SIDES = {  # (layout of the store, code, catalog options)
    "old": "layout 2, commit 730277d's code",
    "new": "layout 3, the current code as shipped",
    # the current code without the per-query bounds (store/bounds.py, a timer thread and
    # a batched fetch per query), which came with layout 3 but are not the inventory
    "new_unbounded": "layout 3, the current code, timeout_s=None, max_result_bytes=None",
}


def open_child(root: Path, query_repeats: int, unbounded: bool, profile: bool) -> None:
    """In a fresh process: import the catalog, open ``root``, run QUERIES; print JSON.
    Wall and CPU seconds (the process's, every thread): on a busy machine the CPU
    seconds are the steadier measure."""
    t0 = time.perf_counter()
    from arrakis_ray.store.catalog import Store

    out: dict = {"import_s": time.perf_counter() - t0, "queries": {}}
    options = {"timeout_s": None, "max_result_bytes": None} if unbounded else {}
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t0, c0 = time.perf_counter(), time.process_time()
    store = Store(root, **options)
    out["open_s"], out["open_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    if profiler is not None:
        import pstats

        profiler.disable()
        for order, n in (("cumulative", 25), ("tottime", 15)):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(n)
            out[f"profile_{order}"] = text.getvalue()
    with store:
        for name, sql in QUERIES.items():
            wall, cpu = [], []
            for _ in range(query_repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                frame = store.sql(sql)
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            out["queries"][name] = {
                "first_s": wall[0],
                "first_cpu_s": cpu[0],
                "warm_s": min(wall[1:] or wall),
                "warm_cpu_s": min(cpu[1:] or cpu),
                "answer": repr(frame.rows()),
            }
    print(json.dumps(out))


def run_child(root: Path, code: Path | None, mode: Mode, side: str, profile: bool = False) -> dict:
    """``open_child`` in a subprocess: the current code, or ``code``'s on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    command = [sys.executable, __file__, "--child", str(root)]
    command += ["--query-repeats", str(mode.query_repeats)]
    command += ["--unbounded"] if side == "new_unbounded" else []
    command += ["--profile"] if profile else []
    done = subprocess.run(
        command, env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"open of {root} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def open_cost(work: Path, mode: Mode, profile: bool) -> dict:
    """(2): the stores, their layout-2 copies, and alternating subprocess opens."""
    t0 = time.perf_counter()
    stores = {"shards": work / "store-3-shards", "parts": work / "store-3-parts"}
    build_store(stores["shards"], mode)
    copy_store(stores["shards"], stores["parts"], layout2=False)
    compact_store(stores["parts"])
    old = {name: work / f"store-2-{name}" for name in stores}
    for name, root in stores.items():
        copy_store(root, old[name], layout2=True)
    code = old_code(work / "old-code")
    build_s = time.perf_counter() - t0
    log.info("stores built in %.1f s", build_s)

    opens = {name: {side: [] for side in SIDES} for name in stores}
    order = list(SIDES)
    for r in range(mode.open_repeats):
        for name in stores:
            where = {"old": (old[name], code)} | {s: (stores[name], None) for s in order[1:]}
            for side in order[r % 3 :] + order[: r % 3]:  # each side first in turn
                opens[name][side].append(run_child(*where[side], mode, side))
            log.info(
                "open %d %s: old %.3f s, new %.3f s (load %.1f)",
                r, name, opens[name]["old"][-1]["open_s"], opens[name]["new"][-1]["open_s"],
                os.getloadavg()[0],
            )  # fmt: skip
    out: dict = {
        "build_s": build_s,
        "sides": SIDES,
        "queries": {k: " ".join(v.split()) for k, v in QUERIES.items()},
    }
    for name in stores:
        runs = opens[name]
        for query in QUERIES:  # every side answers the same
            answers = {o["queries"][query]["answer"] for side in runs.values() for o in side}
            assert len(answers) == 1, f"{name} {query}: the layouts answer differently"
        figures = {"layout3": store_facts(stores[name]), "layout2": store_facts(old[name])}
        for key in ("import_s", "open_s", "open_cpu_s"):
            figures[key.removesuffix("_s")] = _compare(
                {s: [o[key] for o in runs[s]] for s in SIDES}
            )
        for query in QUERIES:
            for key in ("first_s", "first_cpu_s", "warm_s", "warm_cpu_s"):
                times = {s: [o["queries"][query][key] for o in runs[s]] for s in SIDES}
                figures[f"{query}_{key.removesuffix('_s')}"] = _compare(times)
        out[name] = figures
    if profile:  # where an open's time goes, on the uncompacted store
        out["profile"] = {
            "old": run_child(old["shards"], code, mode, "old", profile=True),
            "new": run_child(stores["shards"], None, mode, "new", profile=True),
        }
    return out


def _compare(times: dict[str, list[float]]) -> dict:
    """Median seconds of each side, their ratios to the old code's, and the spreads."""
    medians = {side: statistics.median(t) for side, t in times.items()}
    out = {f"{side}_s": m for side, m in medians.items()}
    out |= {f"{side}_over_old": m / medians["old"] for side, m in medians.items() if side != "old"}
    out["spread_s"] = {side: _spread(t) for side, t in times.items()}
    return out


# -- reporting --------------------------------------------------------------------------


def _spread(values: list[float]) -> list[float]:
    return [round(min(values), 4), round(max(values), 4)]


def _round(value):
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return round(value, 4) if isinstance(value, float) else value


def print_report(f: dict) -> None:
    """The headline figures, readable."""
    c, h = f["checksum"], f["hash_throughput"]
    print(
        f"\n(1) checksum on the harvest: {c['shards_per_pass']} shards, "
        f"{c['tokens_per_pass']:,} tokens, {c['bytes_hashed_per_pass'] / 1e6:.0f} MB in "
        f"{c['files_hashed_per_pass']} files hashed per pass"
    )
    print(
        f"  wall with checksums {c['wall_on_s']:.2f} s {c['wall_on_spread_s']}, without "
        f"{c['wall_off_s']:.2f} s {c['wall_off_spread_s']}: ratio {c['wall_on_over_off']:.3f}"
    )
    print(
        f"  timed directly: {c['checksum_cpu_s_per_pass']:.3f} CPU s of checksum per pass = "
        f"{100 * c['checksum_cpu_over_wall']:.2f} % of the wall (the figure to read; target "
        f"<= {100 * TARGETS['checksum_share']:.0f} %), {100 * c['checksum_cpu_share']:.2f} % "
        f"of the CPU; its wall seconds {c['checksum_s_per_pass']:.3f} s = "
        f"{100 * c['checksum_share']:.2f} % (with waits for a core)"
    )
    print(
        f"  xxh3_128 on {h['bytes'] >> 20} MiB: {h['memory_gb_per_s']:.2f} GB/s in memory "
        f"({h['memory_gb_per_cpu_s']:.2f} per CPU second), {h['file_gb_per_s']:.2f} GB/s "
        f"through checksum_file ({h['file_gb_per_cpu_s']:.2f}); in the harvest "
        f"{c['checksum_gb_per_s_in_harvest']:.2f} GB/s "
        f"({c['checksum_gb_per_cpu_s_in_harvest']:.2f})"
    )
    o = f["open"]
    n = f["mode_sizes"]["open_repeats"]
    print(f"\n(2) inventory on open and queries, median of {n} subprocesses each:")
    print(f"{'store':6} {'what':20} {'old_s':>8} {'new_s':>8} {'new/old':>8} {'unbounded/old':>14}")
    for name in ("shards", "parts"):
        s = o[name]
        print(
            f"{name:6} layout 2: {s['layout2']['parquet_files']} Parquet files; layout 3: "
            f"the same + {s['layout3']['inventories']} inventories"
        )
        keys = ["import", "open", "open_cpu"]
        keys += [f"{q}_{k}" for q in QUERIES for k in ("first", "first_cpu", "warm", "warm_cpu")]
        for key in keys:
            v = s[key]
            print(
                f"{name:6} {key:20} {v['old_s']:8.4f} {v['new_s']:8.4f} {v['new_over_old']:8.3f} "
                f"{v['new_unbounded_over_old']:14.3f}"
            )
    print(f"targets met: {f['targets_met']}; load average {f['load_avg_1m']}")


def main(argv: list[str] | None = None) -> dict | None:
    """Run the benchmark; print progress, the report, then the figures as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shards and repeats, < 3 min")
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temp dir)")
    parser.add_argument("--profile", action="store_true", help="cProfile one open per layout")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # (2)'s subprocess
    parser.add_argument("--query-repeats", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--unbounded", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        open_child(args.child, args.query_repeats, args.unbounded, args.profile)
        return None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("arrakis_ray").setLevel(logging.WARNING)
    name = "quick" if args.quick else "full"
    mode = MODES[name]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="arrakis-bench-integrity-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load = [round(os.getloadavg()[0], 2)]
    try:
        opened = open_cost(work, mode, args.profile)
        hashed = hash_throughput(work)
        checksum = checksum_cost(work, mode)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    load.append(round(os.getloadavg()[0], 2))

    def worst(side: str, keys: list[str]) -> float:
        return max(opened[s][k][f"{side}_over_old"] for s in ("shards", "parts") for k in keys)

    queries = [f"{q}_{k}" for q in QUERIES for k in ("first", "warm")]
    queries_cpu = [f"{q}_{k}_cpu" for q in QUERIES for k in ("first", "warm")]
    profile = opened.pop("profile", None)
    out = {
        "mode": name,
        "mode_sizes": asdict(mode),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores",
        "load_avg_1m": load,
        "old_commit": OLD_COMMIT,
        "checksum": checksum,
        "hash_throughput": hashed,
        "open": opened,
        "targets": TARGETS,
        "targets_met": {
            "checksum_share": checksum["checksum_cpu_over_wall"] <= TARGETS["checksum_share"],
            "open_over_old": worst("new", ["open"]) <= TARGETS["open_over_old"],
            "open_cpu_over_old": worst("new", ["open_cpu"]) <= TARGETS["open_over_old"],
            "query_over_old": worst("new", queries) <= TARGETS["query_over_old"],
            "query_cpu_over_old": worst("new", queries_cpu) <= TARGETS["query_over_old"],
            "query_cpu_over_old_unbounded": worst("new_unbounded", queries_cpu)
            <= TARGETS["query_over_old"],
        },
        "seconds_total": time.perf_counter() - started,
    }
    out = _round(out)
    if profile:
        for side in ("old", "new"):
            print(f"-- cProfile of one open, layout {2 if side == 'old' else 3} ({side} code)")
            print(profile[side]["profile_cumulative"])
            print(profile[side]["profile_tottime"])
    print_report(out)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
