"""Harvest throughput, bytes on disk and memory: arrakis-ray against a bare forward
and against the do-it-yourself baseline, on one random-init gpt2 model.

    .venv/bin/python benchmarks/harvest.py --quick     # < 3 min on 2 CPU cores
    .venv/bin/python benchmarks/harvest.py             # full corpus, < 15 min
    .venv/bin/python benchmarks/harvest.py --wide      # a 2-layer Llama at 4096/14336, ~6 min

Measured in one process, on the same model (6 layers, d_model 256, 8 heads, d_mlp 1024,
context 128) and the same corpus (every document fills the 128-token context, so token
counts are exact), batch 16:

(a) forward  - HF forward over the corpus: no hooks, no writes (model load excluded);
(b) harvest  - ``arrakis_ray.harvest.driver.harvest`` through Ray to Parquet of every
               ``blocks.*.hook_resid_post`` and ``blocks.*.mlp.hook_post`` in float16:
               wall time of the call, and the steady rate between the first and the
               last shard completion (no Ray / actor start-up);
(c) diy      - HF forward with ``output_hidden_states=True`` + a forward hook on each
               ``mlp.act``, ``torch.save`` of the same float16 values per batch.

Peak RSS is the sum over the driver and every descendant process (GCS, raylet, Ray
workers and actors), sampled every 200 ms, during a harvest of the corpus (1x) and of a
corpus ten times larger (10x). ``--profile`` also times the sections of a shard in the
harvest actor's class (run in this process, without Ray) and prints a cProfile summary.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import io
import json
import logging
import os
import platform
import pstats
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

CONTEXT = 128  # tokens per sequence; every document fills it
BATCH = 16  # sequences per forward pass, in all three measurements
HOOKS = ["blocks.*.hook_resid_post", "blocks.*.mlp.hook_post"]
MODEL = dict(  # gpt2 architecture; generic HF names, which tiny_config honours
    num_hidden_layers=6,
    hidden_size=256,
    num_attention_heads=8,
    intermediate_size=1024,  # d_mlp = 4 d_model, as in gpt2
    max_position_embeddings=CONTEXT,
    vocab_size=386,  # the zoo:facts-gpt2 tokenizer's vocabulary
)
# --wide: the shape of the store-scale issue, a 2-layer Llama at Llama-3-8B widths, where
# the forward is costly and the write (and compaction) should hide behind it
WIDE_MODEL = dict(
    num_hidden_layers=2,
    hidden_size=4096,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    max_position_embeddings=CONTEXT,
    vocab_size=386,
)
WIDE_DOCS, WIDE_SHARD = 32, 8  # 4,096 tokens in 4 shards: compacted after the harvest


def values_per_token(model: dict) -> int:
    return model["num_hidden_layers"] * (model["hidden_size"] + model["intermediate_size"])


VALUES_PER_TOKEN = values_per_token(MODEL)
TOKENIZER = "zoo:facts-gpt2"
# (documents of the 1x corpus, shard_size, repeats)
MODES = {"quick": (32, 32, 2), "full": (256, 64, 3)}

log = logging.getLogger("bench")


class ProcessTree(threading.Thread):
    """Samples this process and all its descendants (GCS, raylet, Ray workers) until
    stopped: the peak of their summed RSS, the RSS per role at that peak, and the CPU
    seconds each role used (a process's CPU is charged to the role it has when sampled).
    """

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        import psutil  # ray vendors psutil and puts it on sys.path once imported

        self.psutil = psutil
        self.interval = interval
        self.root = psutil.Process()
        self.peak = self.peak_single = 0
        self.peak_roles: dict[str, int] = {}
        self.cpu: dict[str, float] = {}
        self.samples = 0
        self.own_cpu = 0.0
        self._last_cpu: dict[int, float] = {}
        self._procs: dict[int, object] = {}
        self._stop_event = threading.Event()
        self._sample(charge=False)  # CPU used before the start is not ours to count

    def _role(self, p) -> str:
        if p.pid == self.root.pid:
            return "driver"
        name = p.name()
        if name.startswith("ray::"):
            title = (p.cmdline() or [name])[0]
            # the harvest actor is a Ray Data MapWorker; tokenize runs as plain tasks
            for key, role in (("MapWorker", "harvest actor"), ("_tokenize", "tokenize tasks")):
                if key in title:
                    return role
            return "idle workers" if title.startswith("ray::IDLE") else "ray agents"
        return "ray system"  # gcs_server, raylet, monitor, log_monitor, dashboard

    def _sample(self, charge: bool = True) -> None:
        seen = {self.root.pid: self.root}
        for p in self.root.children(recursive=True):
            seen[p.pid] = self._procs.get(p.pid, p)  # keep Process objects: cpu_times is cached
        self._procs = seen
        rss_by_role: dict[str, int] = {}
        total = single = 0
        for pid, p in seen.items():
            try:
                with p.oneshot():
                    rss = p.memory_info().rss
                    times = p.cpu_times()
                    role = self._role(p)
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                continue
            cpu = times.user + times.system
            if charge:
                # a process born during the run is charged from zero
                self.cpu[role] = self.cpu.get(role, 0.0) + cpu - self._last_cpu.get(pid, 0.0)
            self._last_cpu[pid] = cpu
            rss_by_role[role] = rss_by_role.get(role, 0) + rss
            total += rss
            single = max(single, rss)
        if total > self.peak:
            self.peak, self.peak_roles = total, rss_by_role
        self.peak_single = max(self.peak_single, single)
        self.samples += 1

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self._sample()
        self.own_cpu = time.thread_time()  # this sampler's cost, charged to "driver" above

    def __enter__(self) -> ProcessTree:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop_event.set()
        self.join()
        self._sample()

    def cpu_seconds(self) -> float:
        return sum(self.cpu.values())


def build_model(out: Path, arch: str = "gpt2", shape: dict | None = None) -> Path:
    """A random-init model (seed 0, gpt2 by default) saved as an HF checkpoint directory."""
    from arrakis_ray.models import build_model as build

    hooked = build(arch, seed=0, **(shape or MODEL))
    hooked.model.save_pretrained(out)
    return out


def write_corpus(path: Path, n_docs: int, tokenizer, seed: int) -> None:
    """JSONL of ``n_docs`` documents, each zoo corpus sentences joined up to >= CONTEXT tokens."""
    from arrakis_ray.zoo.corpus import generate_documents

    sentences = iter(generate_documents(n_docs * 20, seed=seed))
    with open(path, "w") as f:
        for _ in range(n_docs):
            words: list[str] = []
            while len(words) < CONTEXT + 8:  # BOS + >= CONTEXT words: truncated, never short
                words += next(sentences)["text"].split()
            text = " ".join(words)
            assert len(tokenizer(text)["input_ids"]) >= CONTEXT, "document shorter than context"
            f.write(json.dumps({"text": text}) + "\n")


def token_batches(path: Path, tokenizer) -> list:
    """The corpus as [BATCH, CONTEXT] id tensors, tokenized as the harvest does (BOS first)."""
    import torch

    rows = []
    for line in open(path):
        ids = tokenizer(json.loads(line)["text"])["input_ids"]
        if ids[0] != tokenizer.bos_token_id:
            ids = [tokenizer.bos_token_id, *ids]
        rows.append(ids[:CONTEXT])
    ids = torch.tensor(rows, dtype=torch.long)
    return list(ids.split(BATCH))


def bench_forward(hf_model, batches) -> dict:
    """A bare forward over every batch (after one warm-up batch): no hooks, no writes."""
    import torch

    with torch.inference_mode():
        hf_model(batches[0], use_cache=False)
        with ProcessTree() as tree:
            t0 = time.perf_counter()
            for ids in batches:
                hf_model(ids, use_cache=False)
            wall = time.perf_counter() - t0
    return _rates(len(batches) * BATCH * CONTEXT, wall, tree)


def bench_diy(hf_model, batches, out_dir: Path) -> dict:
    """Forward with ``output_hidden_states`` + mlp forward hooks + ``torch.save`` per batch."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    mlp_post: list = []
    handles = [
        block.mlp.act.register_forward_hook(lambda _m, _i, out: mlp_post.append(out))
        for block in hf_model.transformer.h
    ]
    try:
        with torch.inference_mode():
            hf_model(batches[0], use_cache=False)  # warm-up, as for (a)
            mlp_post.clear()
            with ProcessTree() as tree:
                t0 = time.perf_counter()
                for i, ids in enumerate(batches):
                    out = hf_model(ids, use_cache=False, output_hidden_states=True)
                    # hidden_states[1:] are the block outputs (HF applies ln_f to the last
                    # one; same bytes as resid_post, which is what is measured here)
                    resid = torch.stack(out.hidden_states[1:]).half()
                    mlp = torch.stack(mlp_post).half()
                    mlp_post.clear()
                    torch.save({"resid_post": resid, "mlp_post": mlp}, out_dir / f"batch-{i}.pt")
                wall = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    out = _rates(len(batches) * BATCH * CONTEXT, wall, tree)
    out["bytes"] = sum(p.stat().st_size for p in out_dir.iterdir())
    shutil.rmtree(out_dir)
    return out


def _rates(tokens: int, wall: float, tree: ProcessTree) -> dict:
    return {
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "cpu_s": tree.cpu_seconds(),
        "tokens_per_cpu_s": tokens / max(tree.cpu_seconds(), 1e-9),
        "cpu_by_role_s": dict(sorted(tree.cpu.items())),
        "sampler_cpu_s": tree.own_cpu,
    }


def pipeline(name: str, model_dir: Path, data: Path, shard_size: int) -> dict:
    """A pipeline dict (as from YAML) harvesting HOOKS of the saved model over ``data``."""
    return {
        "name": name,
        "model": {"path": str(model_dir), "tokenizer": TOKENIZER},
        "data": {"path": str(data), "context_length": CONTEXT},
        "harvest": {
            "hooks": HOOKS,
            "batch_size": BATCH,
            "shard_size": shard_size,
            "storage_dtype": "float16",
        },
    }


def bench_harvest(raw: dict, store: Path, values: int = VALUES_PER_TOKEN) -> dict:
    """One harvest call into a fresh store: wall and CPU time, shard timeline, bytes, RSS.

    Shard times come from the completion markers' mtimes, written by the actor when a
    shard's files are complete (the driver sees results later and out of order).
    """
    from arrakis_ray.config import pipeline_from_dict
    from arrakis_ray.harvest.driver import harvest

    shutil.rmtree(store, ignore_errors=True)
    config = pipeline_from_dict(raw, source=f"benchmark:{raw['name']}")
    with ProcessTree() as tree:
        t0, epoch0 = time.perf_counter(), time.time()
        result = harvest(config, store)
        wall = time.perf_counter() - t0
    out = _rates(result.tokens, wall, tree)
    done = sorted(p.stat().st_mtime for p in (result.run_dir / "completions").iterdir())
    per_shard = result.tokens / result.shards_done  # every shard is full
    gaps = [b - a for a, b in zip(done, done[1:], strict=False)]
    act_files = list((result.run_dir / "activations").rglob("*.parquet"))
    act_bytes = sum(p.stat().st_size for p in act_files)
    # compaction runs after the last shard: until its last part file is written
    parts = [p.stat().st_mtime for p in act_files if p.name.startswith("part-")]
    compaction = max(parts) - done[-1] if parts else 0.0
    span = done[-1] - done[0]
    out.update(
        {
            "shards": result.shards_done,
            "first_shard_done_s": done[0] - epoch0,
            "last_shard_to_return_s": wall - (done[-1] - epoch0),
            "steady_tokens_per_s": per_shard * len(gaps) / span if gaps else None,
            "compaction_s": compaction,
            "steady_with_compaction_tokens_per_s": (
                per_shard * len(gaps) / (span + compaction) if gaps else None
            ),
            "shard_gap_s": _spread(gaps) if gaps else None,
            "activation_bytes": act_bytes,
            "bytes_per_value": act_bytes / (result.tokens * values),
            "peak_rss_mb": tree.peak / 2**20,
            "peak_rss_by_role_mb": {k: round(v / 2**20) for k, v in tree.peak_roles.items()},
            "peak_rss_one_process_mb": tree.peak_single / 2**20,
        }
    )
    return out


def profile_shard(raw: dict, work: Path, n_shards: int = 4) -> dict:
    """Where a shard's time goes inside the harvest actor (run in this process, no Ray).

    The package is not edited: a subclass and wrappers around bound methods take the
    times (minimum over shards: other tenants only ever add time). Then one batch goes
    through the bare HF forward and through ``run_with_cache``, interleaved (hook and
    mask overhead), and cProfile runs over one more shard.
    """
    import numpy as np
    import torch

    from arrakis_ray.config import pipeline_from_dict
    from arrakis_ray.harvest import actor, tokenize
    from arrakis_ray.harvest.inputs import plan_shards
    from arrakis_ray.harvest.model_source import describe_model

    config = pipeline_from_dict(raw, source="benchmark:profile")
    hooks = describe_model(config.model).resolve_hooks(config.harvest.hooks)
    times: dict[str, float] = {}

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                times[key] = times.get(key, 0.0) + time.perf_counter() - t0
                times[key + " cpu"] = times.get(key + " cpu", 0.0) + time.process_time() - c0

        return wrapper

    # the step class is HarvestStage (replica = one stage) or, before stages, HarvestShard
    step_cls = getattr(actor, "HarvestStage", None) or actor.HarvestShard
    extra = {}
    if "stages" in inspect.signature(step_cls).parameters:
        extra = {"stages": [(0, MODEL["num_hidden_layers"])], "stage": 0}

    class Timed(step_cls):
        def _table(self, *args):
            return timed("tables (f16 cast, layout, Arrow)", super()._table)(*args)

        def _write_family(self, *args):
            return timed("parquet (concat, write, fsync)", super()._write_family)(*args)

    step = Timed(config, "profile", str(work / "profile-store"), hooks, **extra)
    owner, attr = (step.stage, "run") if hasattr(step, "stage") else (step.model, "run_with_cache")
    setattr(owner, attr, timed("forward + hooks", getattr(owner, attr)))
    tokenizer_step = tokenize.TokenizeShard(config)
    shards = plan_shards(config.data.path, config.harvest.shard_size)[: n_shards + 2]
    t0 = time.perf_counter()
    inputs = [tokenizer_step({k: np.array([v]) for k, v in s.to_dict().items()}) for s in shards]
    tokenize_s = (time.perf_counter() - t0) / len(shards)
    step(inputs[0])  # warm-up: first-call costs (allocator, lazy imports)
    runs = []
    for batch in inputs[1:-1]:
        times.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        step(batch)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        walls = sum(v for k, v in times.items() if not k.endswith(" cpu"))
        runs.append({**times, "other (padding, tokens table, marker)": wall - walls,
                     "total": wall, "total cpu": cpu})  # fmt: skip
    sections = {k: round(min(r[k] for r in runs), 3) for k in runs[0]}

    hooked = step.model  # the same batch: bare HF forward vs run_with_cache, interleaved
    ids = torch.from_numpy(np.asarray(inputs[1]["token_ids"][0], dtype=np.int64))
    ids = ids.reshape(-1, CONTEXT)[:BATCH]
    mask = torch.ones_like(ids)
    calls = {
        "bare": lambda: hooked.model(ids, use_cache=False),
        "bare+mask": lambda: hooked.model(ids, attention_mask=mask, use_cache=False),
        "run_with_cache": lambda: hooked.run_with_cache(ids, attention_mask=mask, hooks=hooks),
    }
    batch_s: dict[str, list[float]] = {k: [] for k in calls}
    with torch.inference_mode():
        for _ in range(5):
            for key, call in calls.items():
                t0 = time.perf_counter()
                call()
                batch_s[key].append(time.perf_counter() - t0)

    profiler = cProfile.Profile()
    profiler.enable()
    step(inputs[-1])
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(14)
    return {
        "tokens_per_shard": config.harvest.shard_size * CONTEXT,
        "tokenize_s_per_shard": round(tokenize_s, 4),
        "shard_sections_min_s": sections,
        "batch_forward_min_s": {k: round(min(v), 4) for k, v in batch_s.items()},
        "cprofile": text.getvalue(),
    }


def _spread(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "n": len(values),
    }


def _round(value):
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    return round(value, 3) if isinstance(value, float) else value


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print progress, then the figures as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small corpus, < 3 min")
    parser.add_argument("--repeats", type=int, help="repeats of (a), (b), (c) on the 1x corpus")
    parser.add_argument("--profile", action="store_true", help="time the sections of a shard")
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temp dir)")
    parser.add_argument(
        "--wide", action="store_true", help="only harvest/forward of a 2-layer 4096/14336 Llama"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("arrakis_ray").setLevel(logging.WARNING)

    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from arrakis_ray.config import ModelConfig
    from arrakis_ray.harvest.model_source import load_tokenizer

    if args.wide:
        return wide(args.workdir)
    mode = "quick" if args.quick else "full"
    n_docs, shard_size, repeats = MODES[mode]
    repeats = args.repeats or repeats
    work = args.workdir or Path(tempfile.mkdtemp(prefix="arrakis-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    tokenizer = load_tokenizer(ModelConfig(zoo=TOKENIZER.removeprefix("zoo:")))
    model_dir = build_model(work / "model")
    write_corpus(work / "corpus-1x.jsonl", n_docs, tokenizer, seed=1)
    write_corpus(work / "corpus-10x.jsonl", 10 * n_docs, tokenizer, seed=2)
    batches = token_batches(work / "corpus-1x.jsonl", tokenizer)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    log.info(
        "%s mode: %d documents x %d tokens (10x: %d), shards of %d, %d torch threads",
        mode, n_docs, CONTEXT, 10 * n_docs, shard_size, torch.get_num_threads(),
    )  # fmt: skip

    # one local cluster for the whole invocation; it idles during (a) and (c) as well
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with ProcessTree() as idle:
            time.sleep(2.0)
        raw1 = pipeline("bench-1x", model_dir, work / "corpus-1x.jsonl", shard_size)
        raw10 = pipeline("bench-10x", model_dir, work / "corpus-10x.jsonl", shard_size)
        forward, diy, harvests = [], [], []
        for r in range(repeats):  # interleaved: load from other tenants hits all three
            forward.append(bench_forward(hf_model, batches))
            diy.append(bench_diy(hf_model, batches, work / "diy"))
            harvests.append(bench_harvest(raw1, work / "store-1x"))
            log.info(
                "repeat %d: forward %.0f, diy %.0f, harvest %.0f tokens/s (load %.1f)",
                r, forward[-1]["tokens_per_s"], diy[-1]["tokens_per_s"],
                harvests[-1]["tokens_per_s"], os.getloadavg()[0],
            )  # fmt: skip
        big = bench_harvest(raw10, work / "store-10x")
        log.info("10x: %.0f tokens/s, peak RSS %.0f MB", big["tokens_per_s"], big["peak_rss_mb"])
        # every document fills the context, so the token counts are exact
        assert all(x["tokens"] == n_docs * CONTEXT for x in harvests), "harvest lost tokens"
        assert big["tokens"] == 10 * n_docs * CONTEXT, "harvest lost tokens"
        ray.shutdown()
        profile = profile_shard(raw10, work) if args.profile else None
    finally:
        ray.shutdown()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    def med(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    # the first harvest call also starts Ray's worker processes; later calls reuse them
    warm = harvests[1:] or harvests
    f, h, d = (med(x, "tokens_per_s") for x in (forward, warm, diy))
    fc, hc, dc = (med(x, "tokens_per_cpu_s") for x in (forward, warm, diy))
    steady = [x["steady_tokens_per_s"] for x in [*warm, big] if x["steady_tokens_per_s"]]
    out = {
        "mode": mode,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, CPU only ({platform.machine()})",
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "tokens_1x": n_docs * CONTEXT,
        "tokens_10x": big["tokens"],
        "forward_tokens_per_s": round(f, 1),
        "harvest_tokens_per_s": round(h, 1),
        "diy_tokens_per_s": round(d, 1),
        "harvest_over_forward": round(h / f, 3),
        "harvest_over_diy": round(h / d, 3),
        "harvest_first_call_tokens_per_s": round(harvests[0]["tokens_per_s"], 1),
        "harvest_10x_tokens_per_s": round(big["tokens_per_s"], 1),
        "harvest_10x_over_forward": round(big["tokens_per_s"] / f, 3),
        "harvest_steady_tokens_per_s": round(statistics.median(steady), 1) if steady else None,
        "harvest_steady_over_forward": round(statistics.median(steady) / f, 3) if steady else None,
        # the 10x corpus is compacted after its last shard (the 1x one is a single shard)
        "harvest_10x_compaction_s": round(big["compaction_s"], 3),
        "harvest_10x_steady_with_compaction_over_forward": (
            round(big["steady_with_compaction_tokens_per_s"] / f, 3)
            if big["steady_with_compaction_tokens_per_s"]
            else None
        ),
        # tokens per CPU-second of the whole process tree: less sensitive to other tenants
        "forward_tokens_per_cpu_s": round(fc, 1),
        "harvest_tokens_per_cpu_s": round(hc, 1),
        "diy_tokens_per_cpu_s": round(dc, 1),
        "bytes_per_value": round(big["bytes_per_value"], 4),
        "diy_bytes_per_value": round(diy[-1]["bytes"] / (diy[-1]["tokens"] * VALUES_PER_TOKEN), 4),
        "peak_rss_idle_mb": round(idle.peak / 2**20),
        "peak_rss_1x_mb": round(warm[-1]["peak_rss_mb"]),
        "peak_rss_10x_mb": round(big["peak_rss_mb"]),
        "peak_rss_10x_over_1x": round(big["peak_rss_mb"] / warm[-1]["peak_rss_mb"], 3),
        "spread": {
            "forward_tokens_per_s": _spread([x["tokens_per_s"] for x in forward]),
            "diy_tokens_per_s": _spread([x["tokens_per_s"] for x in diy]),
            "harvest_tokens_per_s": _spread([x["tokens_per_s"] for x in harvests]),
        },
        "idle_cpu_by_role_s_per_s": {k: round(v / 2.0, 3) for k, v in idle.cpu.items()},
        "runs": {
            "forward": [_round(x) for x in forward],
            "diy": [_round(x) for x in diy],
            "harvest_1x": [_round(x) for x in harvests],
            "harvest_10x": _round(big),
        },
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    if profile:
        print(profile.pop("cprofile"))
        out["profile"] = profile
    print(json.dumps(out))
    return out


def wide(workdir: Path | None) -> dict:
    """harvest/forward at Llama-3-8B widths (WIDE_MODEL): one forward, one harvest."""
    import ray
    from transformers import AutoModelForCausalLM

    from arrakis_ray.config import ModelConfig
    from arrakis_ray.harvest.model_source import load_tokenizer

    work = workdir or Path(tempfile.mkdtemp(prefix="arrakis-bench-wide-"))
    work.mkdir(parents=True, exist_ok=True)
    values = values_per_token(WIDE_MODEL)
    try:
        tokenizer = load_tokenizer(ModelConfig(zoo=TOKENIZER.removeprefix("zoo:")))
        model_dir = build_model(work / "model", "llama", WIDE_MODEL)
        write_corpus(work / "corpus.jsonl", WIDE_DOCS, tokenizer, seed=1)
        batches = token_batches(work / "corpus.jsonl", tokenizer)
        hf_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        forward = bench_forward(hf_model, batches)
        del hf_model  # the actor loads its own copy
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        raw = pipeline("bench-wide", model_dir, work / "corpus.jsonl", WIDE_SHARD)
        run = bench_harvest(raw, work / "store", values)
    finally:
        ray.shutdown()
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    f = forward["tokens_per_s"]
    out = {
        "mode": "wide",
        "model": WIDE_MODEL,
        "tokens": run["tokens"],
        "shards": run["shards"],
        "forward_tokens_per_s": round(f, 2),
        "harvest_tokens_per_s": round(run["tokens_per_s"], 2),
        "harvest_over_forward": round(run["tokens_per_s"] / f, 3),
        "harvest_steady_over_forward": round(run["steady_tokens_per_s"] / f, 3),
        "harvest_steady_with_compaction_over_forward": round(
            run["steady_with_compaction_tokens_per_s"] / f, 3
        ),
        "compaction_s": round(run["compaction_s"], 2),
        "bytes_per_value": round(run["bytes_per_value"], 4),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "runs": {"forward": _round(forward), "harvest": _round(run)},
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
