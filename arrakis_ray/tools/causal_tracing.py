"""Causal tracing (Meng et al. 2022, ROME): which hidden states carry a fact to its answer.

For each prompt ("the capital of germany is", subject "germany", answer "berlin"):

1. Clean run: the answer's probability at the last position (``clean_prob``), caching
   every layer's ``hook_resid_post``, ``hook_mlp_out`` and ``hook_attn_out``.
2. Corrupted runs: Gaussian noise added to the subject tokens' embeddings
   (``hook_embed``), ``samples`` noise draws stacked along the batch. The answer's mean
   probability over the draws is ``corrupted_prob``.
3. Restored runs: the corrupted run again, with one clean state copied back in: the
   block output (``resid``: ``blocks.L.hook_resid_post``) at one (layer, position), or
   the MLP / attention outputs (``mlp`` / ``attn``) of a window of ``window`` layers
   centred on L at one position. The answer's mean probability is the row's ``effect``;
   ROME's indirect effect is ``effect - corrupted_prob``.

Every restoration of a prompt uses the same noise draws (one seeded draw per prompt and
``seed``, whatever slice the prompt lands in), so differences between cells are the
restorations' alone: a position before the subject, never corrupted, recovers exactly
``corrupted_prob``. All restorations x draws of a prompt run as one batch, cut into
forwards of at most ``max_batch`` rows.

The noise scale is ``noise_scale`` times the standard deviation of the ``hook_embed``
values (token embeddings only, without position embeddings) over every token of every
prompt, BOS included: ``prepare`` measures it once over the whole dataset. ROME
measures the std of subject embeddings over a corpus; these prompts are the corpus here.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from arrakis_ray.errors import ToolError
from arrakis_ray.live.prompts import find_span
from arrakis_ray.tools.base import Tool

if TYPE_CHECKING:
    import pyarrow as pa
    from torch import Tensor

    from arrakis_ray.live.model import LiveModel

KINDS = ("resid", "mlp", "attn")
HOOK_OF_KIND = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}


@dataclass(frozen=True)
class CausalTracingParams:
    """Parameters of causal tracing."""

    prompts: str | None = None
    """Prompt dataset (JSONL or Parquet) with columns prompt, subject, answer; default:
    the run's own data file."""
    noise_scale: float = 3.0
    """Noise std added to the subject embeddings, in multiples of the std of the
    prompts' token embeddings (hook_embed). 0: no corruption."""
    samples: int = 10
    """Noise draws per prompt; every probability is their mean."""
    seed: int = 0
    """Seeds the noise (a prompt's draws depend on the seed and its item only)."""
    window: int = 10
    """MLP / attention restorations restore this many layers around L (clipped to the
    model): layers [L - window // 2, L + ceil(window / 2))."""
    kinds: tuple[Literal["resid", "mlp", "attn"], ...] = KINDS
    """What is restored: resid (block output at one layer), mlp, attn (windows)."""
    max_batch: int = 256
    """Rows (restorations x noise draws) per forward: bounds memory."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_scale) and self.noise_scale >= 0):
            raise ValueError(f"noise_scale must be a finite number >= 0, got {self.noise_scale}")
        for name in ("samples", "window", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        kinds = tuple(self.kinds)
        if not kinds or len(set(kinds)) != len(kinds) or not set(kinds) <= set(KINDS):
            raise ValueError(
                f"kinds must be distinct values among {', '.join(KINDS)}, got {list(kinds)}"
            )


@dataclass(frozen=True)
class _Prompt:
    """One prompt, tokenized and checked."""

    item: int
    text: str
    subject: str
    answer: str
    ids: list[int]
    start: int  # the subject's tokens are ids[start:stop]
    stop: int
    answer_id: int


@dataclass(frozen=True)
class _Restoration:
    """One traced cell: clean ``kind`` states of layers [start, stop) put back at ``pos``."""

    kind: str
    layer: int
    pos: int
    start: int
    stop: int


class CausalTracing(Tool):
    """The answer's probability recovered by restoring one clean state in a corrupted run."""

    name = "causal_tracing"
    summary = "per fact, kind, layer, position: answer prob recovered by restoring a clean state"
    reference = "Meng et al. 2022, 'Locating and Editing Factual Associations in GPT' (ROME)"
    Params = CausalTracingParams
    scope = "live"
    prompt_columns = ("prompt", "subject", "answer")
    items_per_task = 8  # a prompt is ~3 x layers x positions x samples rows of forwards
    outputs = ("causal_tracing", "causal_tracing_prompts")

    def prepare(self, items: pa.Table, model: LiveModel) -> float:
        """The std of the token embeddings over every prompt (sets the noise scale)."""
        return embedding_std(
            model, [model.encode(text) for text in items.column("prompt").to_pylist()]
        )

    def compute_live(self, items: pa.Table, model: LiveModel, prepared: Any = None) -> Any:
        import pyarrow as pa

        prompts = [_checked_prompt(model, row) for row in items.to_pylist()]  # all, first
        if prepared is None:  # run without prepare (a local call): these prompts' std
            prepared = embedding_std(model, [p.ids for p in prompts])
        sigma = self.params.noise_scale * float(prepared)
        run_ids = items.column("run_id").to_pylist()
        cells, summaries = [], []
        for prompt, run_id in zip(prompts, run_ids, strict=True):
            restorations = self._restorations(model.n_layers, len(prompt.ids))
            clean, corrupted, effects = self._trace(model, prompt, restorations, sigma)
            cells.append(
                self._cell_rows(model, run_id, prompt, restorations, effects, clean, corrupted)
            )
            summaries.append(
                {
                    "run_id": run_id,
                    "item": prompt.item,
                    "prompt": prompt.text,
                    "subject": prompt.subject,
                    "answer": prompt.answer,
                    "answer_token_id": prompt.answer_id,
                    "n_tokens": len(prompt.ids),
                    "subject_start": prompt.start,
                    "subject_stop": prompt.stop,
                    "clean_prob": clean,
                    "corrupted_prob": corrupted,
                    "noise_std": sigma,
                    "samples": self.params.samples,
                }
            )
        schema = self.result_schema("causal_tracing")
        traced = pa.concat_tables([pa.table(c, schema=schema) for c in cells])
        prompts_table = pa.Table.from_pylist(
            summaries, self.result_schema("causal_tracing_prompts")
        )
        return {"causal_tracing": traced, "causal_tracing_prompts": prompts_table}

    # ------------------------------------------------------------------ tracing

    def _restorations(self, n_layers: int, n_tokens: int) -> list[_Restoration]:
        """Every cell to trace, in output order (kind, layer, position)."""
        cells = []
        for kind in self.params.kinds:
            for layer in range(n_layers):
                start, stop = window_of(kind, layer, self.params.window, n_layers)
                cells += [_Restoration(kind, layer, p, start, stop) for p in range(n_tokens)]
        return cells

    def _trace(
        self, model: LiveModel, prompt: _Prompt, restorations: list[_Restoration], sigma: float
    ) -> tuple[float, float, np.ndarray]:
        """(clean prob, corrupted prob, effect per restoration) of one prompt."""
        import torch

        p = self.params
        metric = AnswerProb(prompt.answer_id)
        ids = torch.tensor([prompt.ids])
        hooks = sorted(
            {_hook(r.kind, layer) for r in restorations for layer in range(r.start, r.stop)}
        )
        clean_run = model.run(ids, hooks=hooks, metric=metric, keep_logits=False)
        clean = {name: value[0].detach().cpu() for name, value in clean_run.cache.items()}
        noise = subject_noise(
            p.seed, prompt.item, p.samples, prompt.stop - prompt.start, model.d_model
        )
        noise = torch.from_numpy(noise) * sigma

        conditions: list[_Restoration | None] = [None, *restorations]  # None: corrupted only
        n_rows = len(conditions) * p.samples  # row r: condition r // samples, draw r % samples
        probs = np.empty(n_rows, dtype=np.float64)
        for lo in range(0, n_rows, p.max_batch):
            rows = np.arange(lo, min(n_rows, lo + p.max_batch))
            fns = {"hook_embed": AddNoise(noise[rows % p.samples], prompt.start, prompt.stop)}
            fns.update(_restorers(conditions, rows, p.samples, clean))
            batch = ids.repeat(len(rows), 1)
            out = model.run(batch, interventions=fns, metric=metric, keep_logits=False)
            probs[rows] = out.values.detach().float().cpu().numpy()
        means = probs.reshape(len(conditions), p.samples).mean(axis=1)
        return float(clean_run.values[0]), float(means[0]), means[1:]

    def _cell_rows(self, model, run_id, prompt, restorations, effects, clean, corrupted) -> dict:
        """The result columns of one prompt's cells."""
        n = len(restorations)
        tokens = [model.tokenizer.decode([i]) for i in prompt.ids]
        roles = position_roles(len(prompt.ids), prompt.start, prompt.stop)
        return {
            "run_id": [run_id] * n,
            "item": [prompt.item] * n,
            "kind": [r.kind for r in restorations],
            "layer": [r.layer for r in restorations],
            "pos": [r.pos for r in restorations],
            "token": [tokens[r.pos] for r in restorations],
            "role": [roles[r.pos] for r in restorations],
            "is_subject": [prompt.start <= r.pos < prompt.stop for r in restorations],
            "window_start": [r.start for r in restorations],
            "window_stop": [r.stop for r in restorations],
            "effect": effects.astype(np.float32),
            "clean_prob": [clean] * n,
            "corrupted_prob": [corrupted] * n,
            "samples": [self.params.samples] * n,
        }


# ---------------------------------------------------------------------- interventions


class AddNoise:
    """Adds ``noise [rows, stop - start, d_model]`` to positions [start, stop) of hook_embed."""

    def __init__(self, noise: Tensor, start: int, stop: int):
        self.noise, self.start, self.stop = noise, start, stop

    def __call__(self, value: Tensor, name: str) -> Tensor:
        value = value.clone()
        value[:, self.start : self.stop] += self.noise.to(value.device, value.dtype)
        return value


class Restore:
    """Puts clean vectors back: row ``rows[i]`` gets ``clean[i]`` at position ``pos[i]``."""

    def __init__(self, rows: list[int], pos: list[int], clean: Tensor):
        self.rows, self.pos, self.clean = rows, pos, clean

    def __call__(self, value: Tensor, name: str) -> Tensor:
        value = value.clone()
        value[self.rows, self.pos] = self.clean.to(value.device, value.dtype)
        return value


class AnswerProb:
    """Metric: the probability of one token at the last position, per row."""

    def __init__(self, token_id: int):
        self.token_id = token_id

    def __call__(self, logits: Tensor) -> Tensor:
        import torch

        return torch.softmax(logits[:, -1].float(), dim=-1)[:, self.token_id]


def _restorers(conditions, rows: np.ndarray, samples: int, clean: dict) -> dict[str, Restore]:
    """One Restore per hook that some row of this chunk restores (rows local to the chunk).

    Each carries only its own hook's clean vectors: a later stage's actor receives them
    with its interventions.
    """
    wanted: dict[str, tuple[list[int], list[int]]] = {}
    for local, row in enumerate(rows.tolist()):
        cell = conditions[row // samples]
        if cell is None:
            continue
        for layer in range(cell.start, cell.stop):
            at_rows, at_pos = wanted.setdefault(_hook(cell.kind, layer), ([], []))
            at_rows.append(local)
            at_pos.append(cell.pos)
    return {name: Restore(r, p, clean[name][p]) for name, (r, p) in wanted.items()}


# ---------------------------------------------------------------------- helpers


def _hook(kind: str, layer: int) -> str:
    return f"blocks.{layer}.{HOOK_OF_KIND[kind]}"


def window_of(kind: str, layer: int, window: int, n_layers: int) -> tuple[int, int]:
    """Layers [start, stop) restored for ``kind`` at ``layer``: resid is the one layer,
    mlp/attn the ``window`` layers centred on it (ROME's convention), clipped."""
    if kind == "resid":
        return layer, layer + 1
    return max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2)


def subject_noise(seed: int, item: int, samples: int, n_tokens: int, width: int) -> np.ndarray:
    """Standard normal noise [samples, n_tokens, width], a function of (seed, item) alone."""
    rng = np.random.default_rng([seed, item])
    return rng.standard_normal((samples, n_tokens, width), dtype=np.float32)


def embedding_std(
    model: LiveModel, id_lists: list[list[int]], rows_per_forward: int = 256
) -> float:
    """Std of the hook_embed values over every token of ``id_lists`` (repeats counted).

    A token's embedding does not depend on its context, so each distinct token is
    embedded once (as a one-token sequence) and weighted by its count.
    """
    import torch

    counts = Counter(i for ids in id_lists for i in ids)
    unique = sorted(counts)
    vectors = []
    for lo in range(0, len(unique), rows_per_forward):
        chunk = torch.tensor(unique[lo : lo + rows_per_forward])[:, None]
        vectors.append(model.run(chunk, hooks=["hook_embed"]).cache["hook_embed"][:, 0].cpu())
    values = torch.cat(vectors).double()  # [distinct tokens, d_model]
    weight = torch.tensor([counts[i] for i in unique], dtype=torch.float64)[:, None]
    n = weight.sum() * values.shape[1]
    mean = (weight * values).sum() / n
    variance = (weight * (values - mean) ** 2).sum() / max(float(n) - 1, 1.0)
    return float(variance.sqrt())


def position_roles(n_tokens: int, start: int, stop: int) -> list[str]:
    """ROME's position groups: prefix, subject_first/_middle/_last, after_first,
    after_further, last (a subject role wins over last; a one-token subject is
    subject_last)."""
    roles = []
    for pos in range(n_tokens):
        if start <= pos < stop:
            roles.append(
                "subject_last"
                if pos == stop - 1
                else "subject_first"
                if pos == start
                else "subject_middle"
            )
        elif pos == n_tokens - 1:
            roles.append("last")
        elif pos == stop:
            roles.append("after_first")
        else:
            roles.append("after_further" if pos > stop else "prefix")
    return roles


def _checked_prompt(model: LiveModel, row: dict) -> _Prompt:
    """A prompt row tokenized; a subject not in its tokens or a multi-token answer is
    refused with the row's item."""
    item = int(row["item"])
    where = f"causal_tracing: item {item}: "
    text, subject, answer = str(row["prompt"]), str(row["subject"]), str(row["answer"])
    ids = model.encode(text)
    span = None
    for form in (subject, " " + subject):  # BPE spells a mid-sentence word with its space
        part = model.tokenizer(form, add_special_tokens=False)["input_ids"]
        if part and (span := find_span(ids, list(part))):
            break
    if span is None:
        raise ToolError(f"{where}subject {subject!r} is not among the tokens of prompt {text!r}")
    answer_id = model.token_id(answer, where=f"{where}answer ")
    return _Prompt(item, text, subject, answer, ids, span[0], span[1], answer_id)
