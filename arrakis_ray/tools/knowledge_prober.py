"""Knowledge prober: a linear probe per layer for a label of the input documents.

For every layer of one dense hook family, each sequence is represented by one vector
(its last token, the mean over its tokens, or the token at a given position) and a
multinomial logistic regression (softmax over the classes, L2 penalty on the weights,
features standardised on the training split, fit by L-BFGS in torch) predicts the
sequence's document label from it (Alain & Bengio 2016, "Understanding intermediate
layers using linear classifier probes"). The split into training and held-out
documents is seeded and shared by every layer. Per layer the result holds held-out
accuracy, macro one-vs-rest AUROC (ranks, ties averaged), and the accuracy of always
answering the training split's most frequent class.

Labels come from the run's ``documents`` table: harvest with the label's input column
in ``data.keep_columns``.

Memory: activations are streamed one shard at a time; only one vector per sequence
and layer is kept (the probe's dataset).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from arrakis_ray import hooks
from arrakis_ray.errors import ToolError
from arrakis_ray.store.reader import RunReader
from arrakis_ray.tools.base import Tool
from arrakis_ray.tools.decompose import layer_matrix

if TYPE_CHECKING:
    from arrakis_ray.store.manifest import RunManifest

log = logging.getLogger(__name__)

# Dense hook families a probe reads: one model-space vector per token (not a scale, not
# logits).
PROBE_FAMILIES = tuple(
    s.family for s in hooks.FAMILIES.values() if s.kind == "dense" and s.width not in (1, "d_vocab")
)


@dataclass(frozen=True)
class ProbeParams:
    """Parameters of the knowledge prober."""

    label_column: str
    """Input column holding each document's label (e.g. relation), kept with the run at
    harvest time: it must be in the pipeline's ``data.keep_columns``."""
    hook: str = "resid_post"
    """Hook family probed at every harvested layer (resid_post, mlp_post, attn_out, ...)."""
    position: Any = "last"
    """Token representing a sequence: "last", "mean" (over its tokens), or a position
    (an integer; negative counts from the end, -1 = last)."""
    test_fraction: float = 0.25
    """Share of the documents held out for evaluation (seeded split by document)."""
    l2: float = 1e-3
    """L2 penalty on the probe's weights (features are standardised first)."""
    max_iter: int = 200
    """L-BFGS iterations per layer."""
    seed: int = 0
    """Seeds the train/test split."""

    def __post_init__(self) -> None:
        if self.hook not in PROBE_FAMILIES:
            raise ValueError(
                f"hook {self.hook!r} is not a dense hook family; use one of "
                f"{', '.join(PROBE_FAMILIES)}"
            )
        pos = self.position
        if pos not in ("last", "mean") and (isinstance(pos, bool) or not isinstance(pos, int)):
            raise ValueError(f'position must be "last", "mean" or an integer, got {pos!r}')
        if not 0 < self.test_fraction < 1:
            raise ValueError("test_fraction must be between 0 and 1")
        if self.l2 < 0 or self.max_iter < 1:
            raise ValueError("l2 must be >= 0 and max_iter >= 1")


class KnowledgeProber(Tool):
    """Held-out accuracy and AUROC of a linear probe for a document label, per layer."""

    name = "knowledge_prober"
    summary = "per layer: a linear probe's held-out accuracy/AUROC for a document label"
    reference = "Alain & Bengio 2016, 'Understanding intermediate layers using linear probes'"
    Params = ProbeParams
    scope = "run"
    outputs = ("probe_layers",)

    def required_hooks(self, manifest: RunManifest) -> list[str]:
        family = self.params.hook
        harvested = [h for h in manifest.hooks if _family(h) == family]
        # nothing harvested: name every layer's hook so the runner's refusal is explicit
        every = (hooks.family_hook(family, i) for i in range(manifest.shape.n_layers))
        return harvested or list(dict.fromkeys(every))

    def compute_run(self, inputs: RunReader, model) -> Any:
        import pyarrow as pa

        p = self.params
        labels = inputs.documents(p.label_column)  # before streaming any activation
        docs, per_layer = gather_vectors(inputs, p.hook, p.position)
        missing = sorted(set(docs.tolist()) - set(labels))
        if missing:
            raise ToolError(f"run {inputs.run_id}: documents {missing[:5]} have no input row")
        values = [labels[d] for d in docs.tolist()]
        keep = np.array([v is not None for v in values], dtype=bool)
        if not keep.all():
            log.warning("%d sequences without a %s label skipped", (~keep).sum(), p.label_column)
        names = np.array([str(v) for v in values], dtype=object)[keep]
        classes, y = np.unique(names, return_inverse=True)
        docs = docs[keep]
        test = _test_mask(docs, p.test_fraction, p.seed)
        if len(np.unique(y[~test])) < 2:
            raise ToolError(
                f"knowledge_prober: label {p.label_column!r} of run {inputs.run_id} has fewer "
                f"than 2 classes among the {int((~test).sum())} training sequences"
            )
        majority = np.bincount(y[~test], minlength=len(classes)).argmax()
        rows = []
        for layer, x in sorted(per_layer.items()):
            x = x[keep]
            probs, train_acc = fit_and_predict(x[~test], y[~test], x[test], len(classes), p)
            rows.append(
                {
                    "run_id": inputs.run_id,
                    "hook": hooks.family_hook(p.hook, layer),
                    "layer": layer,
                    "label_column": p.label_column,
                    "position": str(p.position),
                    "accuracy": float((probs.argmax(1) == y[test]).mean()),
                    "auroc": macro_auroc(probs, y[test]),
                    "baseline_accuracy": float((y[test] == majority).mean()),
                    "train_accuracy": train_acc,
                    "n_train": int((~test).sum()),
                    "n_test": int(test.sum()),
                    "n_classes": len(classes),
                }
            )
            log.info("probe %s layer %d: accuracy %.3f", p.hook, layer, rows[-1]["accuracy"])
        schema = self.result_schema("probe_layers")
        return pa.Table.from_pylist(rows, schema=schema)


def _family(hook: str) -> str | None:
    spec = hooks.find_spec(hook)
    return spec.family if spec is not None else None


def select_positions(
    seq: np.ndarray, pos: np.ndarray, x: np.ndarray, position: str | int
) -> tuple[np.ndarray, np.ndarray]:
    """(sequence ids, [n, width] vectors): one vector per sequence of rows sorted by (seq, pos).

    Sequences without the requested position (too short) are left out.
    """
    if len(seq) == 0:
        return seq, x
    starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
    ends = np.r_[starts[1:], len(seq)]
    if position == "mean":
        sums = np.add.reduceat(x.astype(np.float64), starts, axis=0)
        return seq[starts], (sums / (ends - starts)[:, None]).astype(np.float32)
    if position == "last":
        return seq[ends - 1], x[ends - 1]
    if position >= 0:
        rows = np.flatnonzero(pos == position)
        return seq[rows], x[rows]
    rows = ends + position
    ok = rows >= starts
    return seq[starts[ok]], x[rows[ok]]


def gather_vectors(
    inputs: RunReader, family: str, position: str | int
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(doc id per sequence, layer -> [n_seq, width] vectors), streamed shard by shard."""
    docs: list[np.ndarray] = []
    per_layer: dict[int, list[np.ndarray]] = {}
    for shard, table in inputs.iter_activations(family):
        seq_doc = _sequence_docs(inputs.tokens(shard), inputs.run_id, shard)
        shard_seqs = None
        for layer in sorted(set(table.column("layer").to_pylist())):
            seqs, vectors = select_positions(*layer_matrix(table, layer), position)
            if shard_seqs is None:
                shard_seqs = seqs
            elif not np.array_equal(seqs, shard_seqs):
                raise ToolError(f"run {inputs.run_id} shard {shard}: layers of {family} differ")
            per_layer.setdefault(int(layer), []).append(vectors)
        if shard_seqs is not None:
            if not np.isin(shard_seqs, list(seq_doc)).all():
                raise ToolError(f"run {inputs.run_id} shard {shard}: {family} rows lack tokens")
            docs.append(np.array([seq_doc[s] for s in shard_seqs.tolist()], dtype=np.int64))
    if not docs or sum(len(d) for d in docs) == 0:
        raise ToolError(f"run {inputs.run_id}: no {family} vectors at position {position!r}")
    return np.concatenate(docs), {k: np.concatenate(v) for k, v in per_layer.items()}


def _sequence_docs(tokens, run_id: str, shard: int) -> dict[int, int]:
    """seq_id -> doc_id; a sequence packing several documents has no single label."""
    seq = tokens.column("seq_id").to_numpy()
    doc = tokens.column("doc_id").to_numpy()
    order = np.argsort(seq, kind="stable")
    seq, doc = seq[order], doc[order]
    starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
    lo, hi = np.minimum.reduceat(doc, starts), np.maximum.reduceat(doc, starts)
    if (lo != hi).any():
        raise ToolError(
            f"run {run_id} shard {shard}: sequence {int(seq[starts[lo != hi][0]])} packs "
            "several documents; knowledge_prober needs one document per sequence"
        )
    return dict(zip(seq[starts].tolist(), lo.tolist(), strict=True))


def _test_mask(docs: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for the sequences of the held-out documents (seeded, by document)."""
    unique = np.unique(docs)
    if len(unique) < 2:
        raise ToolError(f"knowledge_prober: {len(unique)} document(s); a split needs 2")
    n_test = min(len(unique) - 1, max(1, round(fraction * len(unique))))
    held_out = np.random.default_rng(seed).permutation(unique)[:n_test]
    return np.isin(docs, held_out)


def fit_and_predict(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int, p: ProbeParams
) -> tuple[np.ndarray, float]:
    """Held-out class probabilities [n_test, n_classes] and the training accuracy."""
    import torch

    mean = x_train.mean(axis=0, dtype=np.float64)
    std = x_train.std(axis=0, dtype=np.float64)
    std[std < 1e-8] = 1.0  # constant features carry nothing: leave them at zero

    def standard(x: np.ndarray):
        return torch.from_numpy((x.astype(np.float64) - mean) / std)

    xt, yt = standard(x_train), torch.from_numpy(y_train.astype(np.int64))
    weight = torch.zeros(xt.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=p.max_iter, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ weight + bias, yt)
        loss = loss + p.l2 * (weight**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        train_acc = float(((xt @ weight + bias).argmax(1) == yt).double().mean())
        probs = torch.softmax(standard(x_test) @ weight + bias, dim=1).numpy()
    return probs, train_acc


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve via the rank-sum (Mann-Whitney) formula; ties count 1/2.

    None when the positives or the negatives are missing (the AUROC is undefined).
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # 1-based rank of each distinct value, averaged over its ties
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = average_rank[inverse][positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_auroc(probs: np.ndarray, y: np.ndarray) -> float | None:
    """Mean one-vs-rest AUROC over the classes with positives and negatives in ``y``."""
    values = [auroc(probs[:, c], y == c) for c in range(probs.shape[1])]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None
