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
- ``agreement``: top-1 agreement and KL(base || other) between two forwards' next-token
  distributions, averaged over the positions the loss counts.
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
    """Mean of ``values [batch, n]`` over ``mask``, per row (NaN for an empty row)."""
    mask = mask.to(values.device, values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1)


def next_token_loss(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``[batch]``: mean next-token cross-entropy over each row's real tokens."""
    return masked_mean(-token_logprobs(logits, input_ids), predicted_mask(attention_mask))


def span_logprob(logits: Tensor, input_ids: Tensor, starts: Tensor, stops: Tensor) -> Tensor:
    """``[batch]``: sum of log P(token t) for t in ``[starts, stops)`` per row
    (each token read off the logits of the position before it)."""
    import torch

    logp = token_logprobs(logits, input_ids)  # column t - 1 predicts token t
    t = torch.arange(1, input_ids.shape[1], device=logp.device)
    inside = (t >= starts.to(logp.device)[:, None]) & (t < stops.to(logp.device)[:, None])
    return (logp * inside).sum(-1)


def agreement(base_logits: Tensor, logits: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``([batch], [batch])``: the fraction of positions where both forwards predict the
    same top-1 next token, and the mean KL(base || other) of their next-token
    distributions (nats), over the positions ``next_token_loss`` counts."""
    import torch

    base = torch.log_softmax(base_logits[:, :-1].float(), dim=-1)
    other = torch.log_softmax(logits[:, :-1].float().to(base.device), dim=-1)
    mask = predicted_mask(attention_mask).to(base.device)
    same = (base.argmax(-1) == other.argmax(-1)).float()
    kl = (base.exp() * (base - other)).sum(-1)
    return masked_mean(same, mask), masked_mean(kl, mask)
