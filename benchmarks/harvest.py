"""Harvest throughput, bytes on disk and memory: arrakis-ray against a bare forward
and against the do-it-yourself baseline, on one random-init gpt2 model.

    .venv/bin/python benchmarks/harvest.py --quick     # < 3 min on 2 CPU cores
    .venv/bin/python benchmarks/harvest.py             # full corpus, < 15 min

Measured in one process, on the same model (6 layers, d_model 256, 8 heads, d_mlp 1024,
context 128) and the same corpus (every document fills the 128-token context, so token
counts are exact), batch 16:

(a) forward  - HF forward over the corpus: no hooks, no writes (model load excluded);
(b) harvest  - ``arrakis_ray.harvest.run.harvest`` through Ray to Parquet of every
               ``blocks.*.hook_resid_post`` and ``blocks.*.mlp.hook_post`` in float16:
               wall time of the call, and the steady rate between the first and the
               last shard completion (no Ray / actor start-up);
(c) diy      - HF forward with ``output_hidden_states=True`` + a forward hook on each
               ``mlp.act``, ``torch.save`` of the same float16 values per batch.

Peak RSS is the sum over the driver and every descendant process (GCS, raylet, Ray
workers and actors), sampled every 50 ms, during a harvest of the corpus (1x) and of a
corpus ten times larger (10x). ``--profile`` also times the sections of one shard in
``HarvestShard`` (run in this process, without Ray) and prints a cProfile summary.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import cProfile
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
VALUES_PER_TOKEN = MODEL["num_hidden_layers"] * (MODEL["hidden_size"] + MODEL["intermediate_size"])
TOKENIZER = "zoo:facts-gpt2"
# (documents of the 1x corpus, shard_size, repeats)
MODES = {"quick": (64, 32, 2), "full": (512, 64, 3)}

log = logging.getLogger("bench")


class PeakRss(threading.Thread):
    """Samples the summed RSS of this process and all its descendants until stopped."""

    def __init__(self, interval: float = 0.05):
        super().__init__(daemon=True)
        import psutil  # ray vendors psutil and puts it on sys.path once imported

        self.psutil = psutil
        self.interval = interval
        self.root = psutil.Process()
        self.peak = self.peak_single = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def total(self) -> tuple[int, int]:
        procs = [self.root, *self.root.children(recursive=True)]
        sizes = []
        for p in procs:
            try:
                sizes.append(p.memory_info().rss)
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                pass
        return sum(sizes), max(sizes)

    def run(self) -> None:
        while not self._stop_event.is_set():
            total, single = self.total()
            self.peak, self.peak_single = max(self.peak, total), max(self.peak_single, single)
            self.samples += 1
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop_event.set()
        self.join()


def build_model(out: Path) -> Path:
    """A random-init gpt2 (seed 0) saved as an HF checkpoint directory."""
    from arrakis_ray.models import build_model as build

    hooked = build("gpt2", seed=0, **MODEL)
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


def bench_forward(hf_model, batches) -> float:
    """Seconds of a bare forward over every batch (one warm-up batch first)."""
    import torch

    with torch.inference_mode():
        hf_model(batches[0], use_cache=False)
        t0 = time.perf_counter()
        for ids in batches:
            hf_model(ids, use_cache=False)
        return time.perf_counter() - t0


def bench_diy(hf_model, batches, out_dir: Path) -> tuple[float, int]:
    """Seconds and bytes of forward + hidden states + mlp hooks + torch.save per batch."""
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
            t0 = time.perf_counter()
            for i, ids in enumerate(batches):
                out = hf_model(ids, use_cache=False, output_hidden_states=True)
                # hidden_states[1:] are the block outputs (HF applies ln_f to the last one;
                # the bytes are the same as resid_post's, which is what is measured here)
                resid = torch.stack(out.hidden_states[1:]).half()
                mlp = torch.stack(mlp_post).half()
                mlp_post.clear()
                torch.save({"resid_post": resid, "mlp_post": mlp}, out_dir / f"batch-{i}.pt")
            seconds = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    return seconds, sum(p.stat().st_size for p in out_dir.iterdir())


class ShardClock(logging.Handler):
    """Records when the driver logs each finished shard (run.py's per-shard line)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.done: list[tuple[float, int]] = []  # (time, cumulative tokens of this call)

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("shard "):
            self.done.append((time.perf_counter(), int(record.args[4])))

    def steady_rate(self) -> float | None:
        """Tokens/s between the first and the last shard completion."""
        if len(self.done) < 3:
            return None
        (t0, n0), (t1, n1) = self.done[0], self.done[-1]
        return (n1 - n0) / (t1 - t0)


def pipeline(name: str, model_dir: Path, data: Path, shard_size: int) -> dict:
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


def bench_harvest(raw: dict, store: Path) -> dict:
    """One harvest call into a fresh store: wall time, steady rate, bytes, peak RSS."""
    from arrakis_ray.config import pipeline_from_dict
    from arrakis_ray.harvest.run import harvest

    shutil.rmtree(store, ignore_errors=True)
    config = pipeline_from_dict(raw, source=f"benchmark:{raw['name']}")
    clock = ShardClock()
    run_log = logging.getLogger("arrakis_ray.harvest.run")
    run_log.addHandler(clock)
    run_log.setLevel(logging.INFO)
    try:
        with PeakRss() as rss:
            t0 = time.perf_counter()
            result = harvest(config, store)
            wall = time.perf_counter() - t0
    finally:
        run_log.removeHandler(clock)
    act = list((result.run_dir / "activations").rglob("*.parquet"))
    act_bytes = sum(p.stat().st_size for p in act)
    return {
        "tokens": result.tokens,
        "seconds": wall,
        "tokens_per_s": result.tokens / wall,
        "steady_tokens_per_s": clock.steady_rate(),
        "first_shard_s": clock.done[0][0] - t0 if clock.done else None,
        "shards": result.shards_done,
        "activation_bytes": act_bytes,
        "bytes_written": result.bytes_written,
        "bytes_per_value": act_bytes / (result.tokens * VALUES_PER_TOKEN),
        "peak_rss_mb": rss.peak / 2**20,
        "peak_rss_one_process_mb": rss.peak_single / 2**20,
        "rss_samples": rss.samples,
    }


def profile_shard(raw: dict, work: Path) -> dict:
    """Time the sections of one shard in ``HarvestShard``, in this process (no Ray).

    The package is not edited: a subclass and wrappers around its bound methods take the
    times, and cProfile runs over a second shard.
    """
    import numpy as np

    from arrakis_ray.config import pipeline_from_dict
    from arrakis_ray.harvest import actor
    from arrakis_ray.harvest.inputs import plan_shards

    config = pipeline_from_dict(raw, source="benchmark:profile")
    times: dict[str, float] = {}

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[key] = times.get(key, 0.0) + time.perf_counter() - t0

        return wrapper

    class Timed(actor.HarvestShard):
        def _to_numpy(self, tensor, kind):
            return timed("to_numpy (f16 cast)", super()._to_numpy)(tensor, kind)

        def _table(self, *args):
            return timed("_table (incl. to_numpy)", super()._table)(*args)

        def _write_family(self, *args):
            return timed("_write_family (concat + parquet)", super()._write_family)(*args)

    store = work / "profile-store"
    step = Timed(config, "profile", str(store), _resolved_hooks(config))
    step.model.run_with_cache = timed("run_with_cache (forward + hooks)", step.model.run_with_cache)
    tokenize = actor.TokenizeShard(config)
    shards = plan_shards(config.data.path, config.harvest.shard_size)
    batches = [
        tokenize({k: np.array([v]) for k, v in s.to_dict().items()}) for s in shards[:3]
    ]
    step(batches[0])  # warm-up: first-call costs (allocator, lazy imports)
    times.clear()
    t0 = time.perf_counter()
    step(batches[1])
    total = time.perf_counter() - t0
    sections = {k: round(v, 3) for k, v in times.items()}
    sections["total"] = round(total, 3)

    profiler = cProfile.Profile()
    profiler.enable()
    step(batches[2])
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
    return {"sections_s": sections, "cprofile_top_tottime": text.getvalue()}


def _resolved_hooks(config) -> list[str]:
    from arrakis_ray.harvest.model_source import describe_model

    return describe_model(config.model).resolve_hooks(config.harvest.hooks)


def _spread(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
        "n": len(values),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small corpus, < 3 min")
    parser.add_argument("--repeats", type=int, help="repeats of (a), (b), (c) on the 1x corpus")
    parser.add_argument("--profile", action="store_true", help="time the sections of a shard")
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("arrakis_ray").setLevel(logging.WARNING)

    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from arrakis_ray.config import ModelConfig
    from arrakis_ray.harvest.model_source import load_tokenizer

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
    n_tokens = n_docs * CONTEXT
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    log.info("%s mode: %d documents x %d tokens, %d threads", mode, n_docs, CONTEXT,
             torch.get_num_threads())

    # one local cluster for the whole invocation; it idles during (a) and (c) as well
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with PeakRss() as idle:
        time.sleep(1.0)
    forward, diy, harvests = [], [], []
    diy_bytes = 0
    for r in range(repeats):
        forward.append(n_tokens / bench_forward(hf_model, batches))
        seconds, diy_bytes = bench_diy(hf_model, batches, work / f"diy-{r}")
        diy.append(n_tokens / seconds)
        shutil.rmtree(work / f"diy-{r}")
        raw = pipeline("bench-1x", model_dir, work / "corpus-1x.jsonl", shard_size)
        harvests.append(bench_harvest(raw, work / "store-1x"))
        log.info("repeat %d: forward %.0f, diy %.0f, harvest %.0f (steady %s) tokens/s",
                 r, forward[-1], diy[-1], harvests[-1]["tokens_per_s"],
                 harvests[-1]["steady_tokens_per_s"])
    raw10 = pipeline("bench-10x", model_dir, work / "corpus-10x.jsonl", shard_size)
    big = bench_harvest(raw10, work / "store-10x")
    log.info("10x: %.0f tokens/s (steady %s), peak RSS %.0f MB",
             big["tokens_per_s"], big["steady_tokens_per_s"], big["peak_rss_mb"])
    ray.shutdown()

    profile = profile_shard(raw10, work) if args.profile else None
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)

    # the first harvest call also starts Ray's worker processes: repeats after it are warm
    warm = harvests[1:] or harvests
    f_med = statistics.median(forward)
    h_med = statistics.median(h["tokens_per_s"] for h in warm)
    d_med = statistics.median(diy)
    steady = [h["steady_tokens_per_s"] for h in [*harvests, big] if h["steady_tokens_per_s"]]
    out = {
        "mode": mode,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, CPU ({platform.processor() or platform.machine()})",
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "tokens_1x": n_tokens,
        "tokens_10x": big["tokens"],
        "forward_tokens_per_s": round(f_med, 1),
        "harvest_tokens_per_s": round(h_med, 1),
        "diy_tokens_per_s": round(d_med, 1),
        "harvest_over_forward": round(h_med / f_med, 3),
        "harvest_over_diy": round(h_med / d_med, 3),
        "harvest_steady_tokens_per_s": round(max(steady), 1) if steady else None,
        "harvest_10x_tokens_per_s": round(big["tokens_per_s"], 1),
        "harvest_10x_over_forward": round(big["tokens_per_s"] / f_med, 3),
        "bytes_per_value": round(big["bytes_per_value"], 4),
        "diy_bytes_per_value": round(diy_bytes / (n_tokens * VALUES_PER_TOKEN), 4),
        "peak_rss_idle_mb": round(idle.peak / 2**20),
        "peak_rss_1x_mb": round(warm[-1]["peak_rss_mb"]),
        "peak_rss_10x_mb": round(big["peak_rss_mb"]),
        "peak_rss_10x_over_1x": round(big["peak_rss_mb"] / warm[-1]["peak_rss_mb"], 3),
        "spread": {
            "forward_tokens_per_s": _spread(forward),
            "diy_tokens_per_s": _spread(diy),
            "harvest_tokens_per_s": _spread([h["tokens_per_s"] for h in harvests]),
            "harvest_first_call_tokens_per_s": round(harvests[0]["tokens_per_s"], 1),
        },
        "harvest_runs": [{k: _round(v) for k, v in h.items()} for h in [*harvests, big]],
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    if profile:
        print(profile["cprofile_top_tottime"])
        out["profile_sections_s"] = profile["sections_s"]
    print(json.dumps(out))
    return out


def _round(v):
    return round(v, 3) if isinstance(v, float) else v


if __name__ == "__main__":
    main()
