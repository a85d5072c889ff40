"""Train the demo model ``facts-gpt2`` on the synthetic corpus, with plain torch.

    python -m arrakis_ray.zoo.train [--out DIR] [--steps N] [--seed S]

Writes a ``save_pretrained`` checkpoint (model, word-level tokenizer, a README card
with the held-out answer accuracy) that ``AutoModelForCausalLM`` and
``AutoTokenizer`` load offline. The same seed gives the same weights.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from arrakis_ray.zoo import corpus

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"}
DEFAULT_OUT = Path(__file__).parent / "facts_gpt2"


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (the defaults made the shipped model)."""

    steps: int = 1200
    """Optimizer steps."""
    seed: int = 0
    """Seeds the corpus stream, the initial weights and dropout."""
    batch_size: int = 64
    """Documents (one padded sequence each) per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate, reached after ``warmup`` steps, then cosine decay."""
    warmup: int = 100
    """Steps of linear warm-up."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    n_layer: int = 4
    """Transformer blocks."""
    n_embd: int = 128
    """Residual stream width."""
    n_head: int = 4
    """Attention heads per block."""
    n_positions: int = 64
    """Longest sequence the model accepts, <bos> included."""
    log_every: int = 100
    """Steps between progress lines (loss and held-out accuracy)."""


@dataclass
class TrainResult:
    """What a run did: per-step losses, the final held-out accuracy, wall time."""

    losses: list[float] = field(default_factory=list)
    heldout_accuracy: float = 0.0
    seconds: float = 0.0


def build_tokenizer():
    """The word-level tokenizer over ``corpus.vocabulary()``, with <bos> prepended.

    Returns a ``transformers.PreTrainedTokenizerFast`` (bos/eos/pad/unk set).
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    # Specials first so their ids (0..3) do not move when the vocabulary grows.
    words = list(SPECIAL_TOKENS.values()) + corpus.vocabulary()
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        padding_side="right",
        model_max_length=64,
    )


def build_model(tokenizer, cfg: TrainConfig):
    """A freshly initialised ``GPT2LMHeadModel`` sized by ``cfg`` for ``tokenizer``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def encode_batch(tokenizer, texts: list[str]):
    """Token ids (<bos> text <eos>, right-padded), attention mask and masked labels."""
    import torch

    rows = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    mask = ids.ne(tokenizer.pad_token_id).long()
    labels = ids.masked_fill(mask == 0, -100)  # -100: no loss on padding
    return ids, mask, labels


def lm_loss(model, ids, mask, labels):
    """Mean next-token cross-entropy over the non-padding positions of a batch."""
    import torch

    logits = model(input_ids=ids, attention_mask=mask).logits
    # Position t predicts token t+1; label -100 (padding) is left out of the mean.
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
    )


def answer_accuracy(model, tokenizer, docs: list[dict], batch_size: int = 256) -> float:
    """Share of fact documents whose answer is the model's argmax after the prompt."""
    import torch

    docs = [d for d in docs if d["answer"] is not None]
    if not docs:
        raise ValueError("answer_accuracy needs at least one fact document")
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(docs), batch_size):
            chunk = docs[i : i + batch_size]
            enc = tokenizer([d["prompt"] for d in chunk], padding=True, return_tensors="pt")
            logits = model(**enc).logits
            last = enc["attention_mask"].sum(dim=1) - 1  # right padding: last real token
            pred = logits[torch.arange(len(chunk)), last].argmax(dim=-1)
            answers = torch.tensor(tokenizer.convert_tokens_to_ids([d["answer"] for d in chunk]))
            correct += int((pred == answers).sum())
    model.train(was_training)
    return correct / len(docs)


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))  # cosine down to 10%


def train(out: str | Path, cfg: TrainConfig | None = None) -> TrainResult:
    """Train a model with ``cfg`` and write the checkpoint (and its card) to ``out``."""
    import torch

    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, cfg)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no decay on biases, norms
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        weight_decay=0.0,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    heldout = corpus.heldout_fact_documents(400, seed=cfg.seed)
    result = TrainResult()
    start = time.perf_counter()
    for step in range(cfg.steps):
        # A fresh batch per step, seeded by (seed, step): no dataset held in memory.
        docs = corpus.generate_documents(cfg.batch_size, seed=cfg.seed * 1_000_003 + step)
        ids, mask, labels = encode_batch(tokenizer, [d["text"] for d in docs])
        loss = lm_loss(model, ids, mask, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        result.losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            recent = result.losses[-cfg.log_every :]
            log.info(
                "step %d/%d  loss %.4f  heldout answer acc %.3f  %.0f s",
                step + 1,
                cfg.steps,
                sum(recent) / len(recent),
                answer_accuracy(model, tokenizer, heldout),
                time.perf_counter() - start,
            )
    result.seconds = time.perf_counter() - start
    result.heldout_accuracy = answer_accuracy(model, tokenizer, heldout)
    save(model, tokenizer, out, cfg, result)
    return result


def save(model, tokenizer, out: str | Path, cfg: TrainConfig, result: TrainResult) -> None:
    """Write the checkpoint, the tokenizer and a README card describing the run."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; a shipped checkpoint must be readable
    final = result.losses[-min(len(result.losses), cfg.log_every) :]
    card = _CARD.format(
        cfg=cfg,
        vocab=len(tokenizer),
        params=sum(p.numel() for p in model.parameters()),
        facts=len(list(corpus.all_facts())),
        relations=", ".join(corpus.FACTS),
        loss=sum(final) / max(1, len(final)),
        acc=result.heldout_accuracy,
        seconds=result.seconds,
        threads=torch.get_num_threads(),
    )
    (out / "README.md").write_text(card)
    log.info("wrote %s", out)


_CARD = """\
# facts-gpt2

A 4-layer GPT-2 ({params:,} parameters, vocabulary {vocab} words) trained from scratch
by `arrakis_ray.zoo.train` on the synthetic corpus of `arrakis_ray.zoo.corpus`: fact
sentences over a fixed knowledge base ({facts} facts; relations {relations}) in 4
phrasings each, mixed with narrative, counting and repeated-code sentences.

Training: `python -m arrakis_ray.zoo.train --steps {cfg.steps} --seed {cfg.seed}`;
batch {cfg.batch_size}, AdamW (peak lr {cfg.lr}, weight decay {cfg.weight_decay}),
{cfg.warmup} warm-up steps then cosine decay; {seconds:.0f} s wall time on {threads} CPU
threads. The same seed gives the same weights.
Final training loss (mean of the last {cfg.log_every} steps): {loss:.4f}.

Held-out answer accuracy: **{acc:.3f}** (argmax next token at the answer position of
400 fact sentences, each in the one phrasing of its fact that training never saw;
see `corpus.heldout_template`).

Layout: n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, n_head={cfg.n_head},
n_positions={cfg.n_positions}. The tokenizer is word-level (lower case, whitespace
and punctuation split) and prepends `<bos>`; the model was trained on
`<bos> text <eos>` sequences.
"""


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: parse arguments, train, write the checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed, help="random seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = TrainConfig(steps=args.steps, seed=args.seed)
    result = train(args.out, cfg)
    log.info(
        "done in %.0f s: final loss %.4f, heldout answer accuracy %.3f",
        result.seconds,
        result.losses[-1],
        result.heldout_accuracy,
    )


if __name__ == "__main__":
    main()
