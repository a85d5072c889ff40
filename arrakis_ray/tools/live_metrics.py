"""What live tools measure on a forward: next-token loss, an answer's log-prob, agreement.

Live tools run batches of prompts of different lengths, padded on the right: a real
token never attends to the padding after it, and position ids count only real tokens
(``HookedModel.run_with_cache``), so each row's real positions equal an unpadded
forward. Every function here takes the padded batch and its attention mask and
returns one value per row, in float32 whatever the model's dtype.

- ``next_token_loss``: mean cross-entropy of every real token after the first (BOS),
  each predicted from the position before it.
- ``span_logprob``: log P(tokens[start:stop] | tokens[:start]), the sum of the span's
  teacher-forced log-probs: for a one-token answer, its log-prob after the prompt.

The metric classes compute these where the logits are (the last stage), so a tool
runs with ``keep_logits=False`` and only per-row figures travel back. They are objects
carrying plain tensors rather than closures, so they travel to a stage in another
actor as data.

- ``LossAndSpan``: (loss, span log-prob) per row.
- ``NextTokenLogprobs`` and ``Agreement``: the unmodified forward's next-token
  log-probs, then, on a modified forward, (loss, base loss, top-1 agreement,
  KL(base || this)) per row, over the positions the loss counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from arrakis_ray.errors import DataError

if TYPE_CHECKING:
    from torch import Tensor

    from arrakis_ray.live.model import LiveModel


def pad_right(
    sequences: Sequence[Sequence[int]], pad_id: int | None, length: int | None = None
) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), both ``[batch, length]`` int64, padded on the right.

    ``length`` defaults to the longest sequence; ``pad_id`` None pads with 0 (the mask
    hides it, so any id will do).
    """
    import torch

    length = length or max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id or 0, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


# ---------------------------------------------------------------------- prompts


def refuse_longer(ids: Sequence[int], limit: int | None, where: str, hint: str = "") -> None:
    """DataError (``where`` first) if ``ids`` has more tokens than ``limit``."""
    if limit is not None and len(ids) > limit:
        raise DataError(
            f"{where}{len(ids)} tokens (BOS included), but the model has {limit} positions{hint}"
        )


def encode_with_answer(model: LiveModel, prompt: str, answer: str, where: str) -> tuple[list, int]:
    """Token ids of ``prompt + " " + answer`` (BOS first) and where the answer starts.

    The whole text is tokenized at once, as the model reads it; the answer is what
    follows the prompt's own tokens. A tokenizer that merges across the boundary (the
    prompt's tokens change when the answer follows) is refused: the answer's span
    would be ambiguous.
    """
    prompt_ids = model.encode(prompt)
    ids = model.encode(f"{prompt} {answer}")
    if ids[: len(prompt_ids)] != prompt_ids:
        raise DataError(f"{where}the prompt's tokens change when the answer follows it")
    if len(ids) == len(prompt_ids):
        raise DataError(f"{where}the answer {answer!r} adds no token")
    return ids, len(prompt_ids)


# ---------------------------------------------------------------------- per-row figures


def token_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """``[batch, pos - 1]``: log P(token t+1 | tokens <= t) for every t (float32)."""
    import torch

    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = input_ids[:, 1:].to(logp.device)
    return logp.gather(-1, target[..., None])[..., 0]


def predicted_mask(attention_mask: Tensor) -> Tensor:
    """``[batch, pos - 1]`` bool: positions t whose next token t+1 is a real token."""
    return attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values [..., n]`` over ``mask``, along the last axis (NaN when empty)."""
    mask = mask.to(values.device, values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1)


def next_token_loss(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``[batch]``: mean next-token cross-entropy over each row's real tokens."""
    return masked_mean(-token_logprobs(logits, input_ids), predicted_mask(attention_mask))


def span_logprob(logits: Tensor, input_ids: Tensor, starts: Tensor, stops: Tensor) -> Tensor:
    """``[batch]``: sum of log P(token t) for t in ``[starts, stops)`` per row
    (each token read off the logits of the position before it)."""
    return _span_sum(token_logprobs(logits, input_ids), starts, stops)


def _span_sum(picked: Tensor, starts: Tensor, stops: Tensor) -> Tensor:
    import torch

    t = torch.arange(1, picked.shape[1] + 1, device=picked.device)  # column t - 1: token t
    inside = (t >= starts.to(picked.device)[:, None]) & (t < stops.to(picked.device)[:, None])
    return (picked * inside).sum(-1)


# ---------------------------------------------------------------------- metrics


class LossAndSpan:
    """Metric: ``[rows, 2]`` = (next-token loss, log-prob of tokens [start, stop)) per row."""

    def __init__(self, input_ids: Tensor, attention_mask: Tensor, starts: Tensor, stops: Tensor):
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.starts, self.stops = starts, stops

    def __call__(self, logits: Tensor) -> Tensor:
        import torch

        picked = token_logprobs(logits, self.input_ids)  # one float32 log-softmax
        loss = masked_mean(-picked, predicted_mask(self.attention_mask))
        return torch.stack([loss, _span_sum(picked, self.starts, self.stops)], dim=-1)


def _row_logprobs(logits_row: Tensor) -> Tensor:
    """``[pos - 1, vocab]`` float32 next-token log-probs of one row. Both forwards a row
    compares go through this one function, so an unchanged forward agrees bit for bit."""
    import torch

    return torch.log_softmax(logits_row[:-1].float(), dim=-1)


class NextTokenLogprobs:
    """Metric: ``[rows, pos - 1, vocab]`` float32 next-token log-probs, computed row by
    row (one row's float32 copy at a time besides the result). What ``Agreement``
    compares a modified forward with."""

    def __call__(self, logits: Tensor) -> Tensor:
        import torch

        rows, n_pos, vocab = logits.shape
        out = torch.empty((rows, n_pos - 1, vocab), dtype=torch.float32, device=logits.device)
        for row in range(rows):
            out[row] = _row_logprobs(logits[row])
        return out


AGREEMENT_FIELDS = ("loss", "base_loss", "top1_agreement", "kl")


class Agreement:
    """Metric: ``[rows, 4]`` = ``AGREEMENT_FIELDS`` of a forward against the unmodified
    one's next-token log-probs ``base_logprobs`` (``NextTokenLogprobs``): its loss, the
    unmodified loss, the fraction of positions where both predict the same top-1 token
    and the mean KL(base || this) in nats, over the positions ``next_token_loss`` counts.

    Row by row, so besides the logits only one row's float32 log-probs exist at a time;
    every figure, the base loss included, is computed where the logits are, so the
    forwards being compared are read alike.
    """

    def __init__(self, base_logprobs: Tensor, input_ids: Tensor, attention_mask: Tensor):
        self.base_logprobs = base_logprobs
        self.input_ids, self.attention_mask = input_ids, attention_mask

    def __call__(self, logits: Tensor) -> Tensor:
        import torch

        device = logits.device
        targets = self.input_ids[:, 1:, None].to(device)
        counted = predicted_mask(self.attention_mask).to(device)
        rows = []
        for row in range(logits.shape[0]):
            logp = _row_logprobs(logits[row])
            base = self.base_logprobs[row].to(device)
            nll = -logp.gather(-1, targets[row])[:, 0]
            base_nll = -base.gather(-1, targets[row])[:, 0]
            same = (base.argmax(-1) == logp.argmax(-1)).float()
            kl = (base.exp() * (base - logp)).sum(-1)
            rows.append(masked_mean(torch.stack([nll, base_nll, same, kl]), counted[row]))
        return torch.stack(rows)
