"""Train the grokking transformer at the paper's settings and write the shipped files.

    python -m arrakis_ray.studies.grokking.train [--out DIR]

Settings (Nanda et al. 2023): full-batch AdamW, lr 1e-3, weight decay 1.0, betas
(0.9, 0.98), a linear warm-up over the first 10 epochs, 30 % of the 113^2 pairs for
training, only the ``=`` position unembedded, cross-entropy in float64. Training
stops ``--after-grok`` epochs after the test accuracy first reaches 99 %, or at
``--epochs``.

Written to ``--out``:

- ``epoch_NNNNN.safetensors``: the final weights and a few picked on the way (the
  memorisation point, two points of circuit formation, the first epoch at 99 % test
  accuracy), stored as ``--dtype`` (float16 by default; the model computes in float32);
- ``curves.parquet``: one row per ``--eval-every`` epochs with columns ``epoch``,
  ``train/loss``, ``train/accuracy``, ``test/loss``, ``test/accuracy`` and, every
  ``--measure-every`` epochs, the progress measures ``progress/*`` (with the final
  model's key frequencies);
- ``tokenizer/``: a word-level HF tokenizer, tokens ``"0"``..``"112"`` and ``"="``;
- ``training.json``: the settings, the wall time, the key frequencies, the picks.

The run is deterministic for a given seed and thread count: a rerun wrote byte-identical
checkpoints. The shipped checkpoints are ``--threads 1`` at the paper's settings:
memorised by epoch 200, 99 % test accuracy at epoch 6,600, stopped at 9,510; 25 to 29
minutes of wall time (1,524 s and 1,756 s in two runs) on 2 CPU cores that other jobs
shared (about 0.14 s per epoch on an idle core).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from arrakis_ray.studies.grokking import fourier, task
from arrakis_ray.studies.grokking.model import GrokkingTransformer, P

log = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).parent / "checkpoints"


def answer_internals(
    model: GrokkingTransformer, ids: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """``(logits [rows, p], neuron activations [rows, d_mlp])`` at ``=``, as float64 numpy."""
    captured: dict[str, torch.Tensor] = {}
    mlp = model.blocks[0].mlp
    handle = mlp.w_out.register_forward_pre_hook(lambda _m, args: captured.update(post=args[0]))
    try:
        with torch.no_grad():
            logits = model.answer_logits(ids)
    finally:
        handle.remove()
    return logits.double().numpy(), captured["post"][:, -1].double().numpy()


def progress_measures(
    model: GrokkingTransformer, freqs: list[int], split: np.ndarray
) -> dict[str, float]:
    """The paper's measures for one state: restricted/excluded loss, Gini, weight norm."""
    ids = torch.from_numpy(task.all_pairs())
    logits, _ = answer_internals(model, ids)
    w_e = model.embed.weight.detach().double().numpy()[:P]
    w_nl = (model.unembed.weight[:P] @ model.blocks[0].mlp.w_out.weight).detach().double().numpy()
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    measures = fourier.progress_measures(
        logits, w_e, w_nl, fourier.weight_norm_sq(weights), task.labels(), split, freqs
    )
    return {f"progress/{k}": v for k, v in measures.items()}


def evaluate(
    model: GrokkingTransformer, ids: torch.Tensor, labels: torch.Tensor, split: torch.Tensor
) -> dict[str, float]:
    """Loss and accuracy on the train and test rows."""
    with torch.no_grad():
        logits = model.answer_logits(ids).double()
    out = {}
    for name, rows in (("train", split), ("test", ~split)):
        out[f"{name}/loss"] = torch.nn.functional.cross_entropy(logits[rows], labels[rows]).item()
        out[f"{name}/accuracy"] = (logits[rows].argmax(-1) == labels[rows]).double().mean().item()
    return out


def pick_checkpoints(curves: list[dict], snapshot_epochs: list[int]) -> dict[str, int]:
    """Epochs to ship, on the snapshot grid: the phases of the run and its end."""

    def first(cond) -> int:
        epoch = next((r["epoch"] for r in curves if cond(r)), curves[-1]["epoch"])
        return min((e for e in snapshot_epochs if e >= epoch), default=snapshot_epochs[-1])

    memorised = first(lambda r: r["train/accuracy"] >= 1.0)
    grokked = first(lambda r: r["test/accuracy"] >= 0.99)
    grid = lambda e: min(snapshot_epochs, key=lambda s: abs(s - e))  # noqa: E731
    return {
        "memorised": memorised,
        "circuit_1": grid(memorised + (grokked - memorised) // 3),
        "circuit_2": grid(memorised + 2 * (grokked - memorised) // 3),
        "grokked": grokked,
        "final": snapshot_epochs[-1],
    }


def write_tokenizer(out: Path) -> None:
    """A word-level HF tokenizer over the 114 tokens; no bos/eos/pad."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(task.vocabulary())}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))  # unknown words fail loudly
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(out)


def train(args: argparse.Namespace) -> None:

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = GrokkingTransformer()
    ids = torch.from_numpy(task.all_pairs())
    labels = torch.from_numpy(task.labels())
    split_np = task.train_mask()
    split = torch.from_numpy(split_np)
    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98)
    )
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(step / 10, 1.0))
    curves: list[dict] = []
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    stop_at, start = args.epochs, time.perf_counter()
    epoch = 0
    while True:
        if epoch % args.eval_every == 0:
            curves.append({"epoch": epoch, **evaluate(model, ids, labels, split)})
            row = curves[-1]
            if row["test/accuracy"] >= 0.99 and stop_at == args.epochs:
                stop_at = min(args.epochs, epoch + args.after_grok)
            if epoch % 1000 == 0:
                log.info(
                    "epoch %d %s (%.0f s)",
                    epoch,
                    {k: round(v, 4) for k, v in row.items()},
                    time.perf_counter() - start,
                )
        if epoch % args.measure_every == 0 or epoch >= stop_at:
            snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        if epoch >= stop_at:
            break
        loss = torch.nn.functional.cross_entropy(
            model.answer_logits(ids[split]).double(), labels[split]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        warmup.step()
        epoch += 1
    wall = time.perf_counter() - start
    if curves[-1]["epoch"] != epoch:
        curves.append({"epoch": epoch, **evaluate(model, ids, labels, split)})

    # the progress measures use the final model's key frequencies, as in the paper
    freqs = fourier.key_frequencies(answer_internals(model, ids)[1])
    for row in curves:
        if row["epoch"] in snapshots:
            model.load_state_dict(snapshots[row["epoch"]])
            row.update(progress_measures(model, freqs, split_np))
    picks = pick_checkpoints(curves, sorted(snapshots))
    write_outputs(args, curves, snapshots, picks, freqs, wall)


def write_outputs(args, curves, snapshots, picks, freqs, wall) -> None:
    import pandas as pd
    from safetensors.torch import save_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    for epoch in sorted(set(picks.values())):
        state = {k: v.to(dtype).contiguous() for k, v in snapshots[epoch].items()}
        save_file(state, str(out / f"epoch_{epoch:05d}.safetensors"))
    pd.DataFrame(curves).to_parquet(out / "curves.parquet", index=False)
    write_tokenizer(out / "tokenizer")
    final = curves[-1]
    meta = {
        "command": _command(args),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "optimizer": f"AdamW lr {args.lr}, weight_decay {args.weight_decay}, betas (0.9, 0.98), "
        "10-epoch warm-up, full batch",
        "train_fraction": task.FRAC_TRAIN,
        "data_seed": task.DATA_SEED,
        "wall_time_s": round(wall, 1),
        "epochs": final["epoch"],
        "key_frequencies": freqs,
        "checkpoints": {name: f"epoch_{e:05d}.safetensors" for name, e in picks.items()},
        "final": {k: v for k, v in final.items() if k != "epoch"},
    }
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("wrote %s: %s", out, json.dumps(meta["final"]))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output directory")
    parser.add_argument("--seed", type=int, default=999, help="model init seed")
    parser.add_argument("--epochs", type=int, default=30000, help="most epochs to train")
    parser.add_argument(
        "--after-grok", type=int, default=3000, help="epochs to go on after 99%% test accuracy"
    )
    parser.add_argument(
        "--eval-every", type=int, default=10, help="epochs between loss/accuracy rows"
    )
    parser.add_argument(
        "--measure-every", type=int, default=100, help="epochs between progress measures"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (paper: 1e-3)")
    parser.add_argument(
        "--weight-decay", type=float, default=1.0, help="AdamW weight decay (paper: 1.0)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument(
        "--dtype", default="float16", choices=["float16", "float32"], help="checkpoint dtype"
    )
    return parser


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (the options that differ from defaults)."""
    defaults = vars(_parser().parse_args([]))
    changed = [
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k != "out" and v != defaults[k]
    ]
    return " ".join(["python -m arrakis_ray.studies.grokking.train", *changed])


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.measure_every % args.eval_every:
        parser.error("--measure-every must be a multiple of --eval-every")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(args)


if __name__ == "__main__":
    main()
