"""Read/write heads: how strongly each attention head reads from and writes to a direction.

The direction ``d`` lives in the residual stream (width d_model). It is one of:

- ``token`` / ``token_id``: the token's unembedding direction. Softmax ignores a shift of
  every logit, so the direction is ``W_U[:, t] - mean_j W_U[:, j]`` (``center_unembed``):
  ``x . d`` is the token's logit minus the mean logit. With ``fold_ln`` the final norm is
  folded in as well: ``logit_t - mean = (P x / rms) . (gamma_f * d)``, so the residual
  direction is ``P (gamma_f * d)`` (``P`` removes the mean for LayerNorm families);
- ``direction``: a list of d_model floats; ``direction_file``: a ``.npy`` file holding one
  (read by the workers: use a path they can see). Used as given.

``d`` is normalised to a unit vector ``u``. Weight-based scores, per head, all in
[0, 1] and all "the square root of a fraction of variance" under isotropic inputs
(a random direction scores about ``1/sqrt(d_model)``), in row-vector form
(``W_OV = W_V[h] @ W_O[h]``, ``W_QK = W_Q[h] @ W_K[h]^T``, TransformerLens shapes):

- ``write_weight = ||W_OV u|| / ||W_OV||_F``: for inputs ``x`` with iid unit entries,
  ``E[(x W_OV . u)^2] / E[||x W_OV||^2]`` is this squared: the share of the head's
  output that lands along u;
- ``read_q = ||u^T W_QK|| / ||W_QK||_F``: the share of the attention-score variance
  (isotropic queries and keys) driven by the query's component along u;
- ``read_k = ||W_QK u|| / ||W_QK||_F``: the same for the key's component;
- ``read_v = ||u^T W_OV|| / ||W_OV||_F``: the share of the output driven by the value
  input's component along u.

Reading through the circuits (W_QK, W_OV) rather than W_Q, W_K, W_V alone means a read
that the rest of the head discards does not count. With ``fold_ln`` (default) each
head reads through its ln1 (scale folded into W_Q/W_K/W_V, LayerNorm's centering too)
and, in LayerNorm families, writes are centered (what every later norm sees), exactly
as in ``attention_head_composition`` (both use ``models/circuits.py``). Everything is
computed from d_head-sized factors.

Activation-based scores (``activations``, needs ``blocks.*.attn.hook_z``): the head's
actual output at a token is ``z[h] @ W_O[h]`` (b_O belongs to no head); its projection on
u is ``z[h] . (W_O[h] u)``, in residual-stream units, from the raw (unfolded) W_O. Per
(layer, head) over the run: mean, mean of the absolute value, std, max and min, plus the
``top_k`` tokens with the largest projection (table ``read_write_heads_top``). Shards
return each head's count, mean and central M2 (``arrakis_ray.numerics.Moments``), which
``reduce`` merges: raw sums of squares would cancel for heads whose projections have a
large mean next to their spread.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from arrakis_ray.errors import ToolError
from arrakis_ray.hooks import family_hook
from arrakis_ray.numerics import Moments, rank_within_groups
from arrakis_ray.tools.base import ShardInputs, Tool

if TYPE_CHECKING:
    import pyarrow as pa
    from torch import Tensor

    from arrakis_ray.models.hooked import HookedModel
    from arrakis_ray.store.manifest import RunManifest

log = logging.getLogger(__name__)

WEIGHT_COLUMNS = ("write_weight", "read_q", "read_k", "read_v")


@dataclass(frozen=True)
class ReadWriteParams:
    """Parameters of read/write heads: exactly one of token, token_id, direction, direction_file."""

    token: str | None = None
    """A token's text, exactly as in the run's vocab (its unembedding direction)."""
    token_id: int | None = None
    """A token id (its unembedding direction)."""
    direction: tuple[float, ...] | None = None
    """A residual-stream direction: d_model floats."""
    direction_file: str | None = None
    """A .npy file holding one d_model vector (readable by the workers)."""
    center_unembed: bool = True
    """Token directions: subtract the mean unembedding column (logit minus mean logit)."""
    fold_ln: bool = True
    """Fold ln1 into each head's reads and the final norm into token directions."""
    activations: bool = True
    """Also score each head's actual outputs from the harvested blocks.*.attn.hook_z."""
    top_k: int = 10
    """Tokens kept per head in read_write_heads_top (largest projection); 0 = none."""

    def __post_init__(self) -> None:
        given = [
            n
            for n in ("token", "token_id", "direction", "direction_file")
            if getattr(self, n) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of token, token_id, direction, direction_file"
                f" (got {', '.join(given) if given else 'none'})"
            )
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def _load_file(path: str) -> np.ndarray:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ToolError(f"read_write_heads: direction_file {path} does not exist")
    try:
        return np.load(file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ToolError(
            f"read_write_heads: direction_file {path} is not a .npy array: {exc}"
        ) from None


def _as_vector(value: np.ndarray, d_model: int, where: str) -> np.ndarray:
    vec = np.asarray(value, dtype=np.float64)
    if vec.ndim == 2 and 1 in vec.shape:
        vec = vec.reshape(-1)
    if vec.ndim != 1 or vec.shape[0] != d_model:
        raise ToolError(
            f"read_write_heads: {where} has shape {tuple(np.shape(value))}; the model's "
            f"residual stream needs a vector of width d_model = {d_model}"
        )
    if not np.all(np.isfinite(vec)) or not np.any(vec):
        raise ToolError(f"read_write_heads: {where} must be finite and nonzero")
    return vec


def _token_id(params: ReadWriteParams, vocab: np.ndarray) -> int:
    if params.token_id is not None:
        if not 0 <= params.token_id < len(vocab):
            raise ToolError(
                f"read_write_heads: token_id {params.token_id} is outside the vocab "
                f"(0..{len(vocab) - 1})"
            )
        return int(params.token_id)
    ids = np.flatnonzero(vocab == params.token)
    if len(ids) == 0:
        close = difflib.get_close_matches(params.token, [str(t) for t in vocab], n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ToolError(f"read_write_heads: token {params.token!r} is not in the run's vocab{hint}")
    if len(ids) > 1:
        raise ToolError(
            f"read_write_heads: token {params.token!r} has several ids {ids[:5].tolist()}; "
            "pass token_id instead"
        )
    return int(ids[0])


def resolve_direction(
    params: ReadWriteParams, model: HookedModel, vocab: np.ndarray
) -> tuple[Tensor, str]:
    """``(unit direction [d_model] float32, label)`` of the params' direction."""
    import torch

    from arrakis_ray.models.norms import final_norm
    from arrakis_ray.models.weights import unembed_weights

    if params.direction is not None:
        vec, label = _as_vector(np.array(params.direction), model.d_model, "direction"), "direction"
    elif params.direction_file is not None:
        where = f"direction_file {params.direction_file}"
        vec, label = (
            _as_vector(_load_file(params.direction_file), model.d_model, where),
            f"file:{params.direction_file}",
        )
    else:
        tid = _token_id(params, vocab)
        W_U, _ = unembed_weights(model)
        d = W_U[:, tid].double()
        if params.center_unembed:
            d = d - W_U.double().mean(dim=1)
        if params.fold_ln:
            norm = final_norm(model)
            d = norm.centre(norm.gain.to(d) * d)
        vec, label = (
            _as_vector(d.cpu().numpy(), model.d_model, f"token {tid}"),
            f"token:{vocab[tid]} (id {tid})",
        )
    unit = vec / np.linalg.norm(vec)
    return torch.from_numpy(unit).to(device=model.device, dtype=torch.float32), label


def weight_scores(model: HookedModel, u: Tensor, fold_ln: bool) -> dict[str, np.ndarray]:
    """``{write_weight, read_q, read_k, read_v} -> [n_layers, n_heads]`` for unit vector ``u``."""
    import torch

    from arrakis_ray.models.circuits import layer_factors

    def ratio(num: Tensor, den: Tensor) -> Tensor:
        return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)

    def tvec(T: Tensor, v: Tensor) -> Tensor:  # ||T[h] @ v[h]|| per head
        return torch.einsum("hij,hj->hi", T, v).norm(dim=-1)

    out: dict[str, list] = {c: [] for c in WEIGHT_COLUMNS}
    with torch.inference_mode():
        for layer in range(model.n_layers):
            f = layer_factors(model, layer, fold_ln)
            qk, ov = f.qk_norm(), f.ov_norm()  # ||W_QK||_F, ||W_OV||_F
            # u^T W_Q W_K^T = (u^T W_Q) T_K^T Q^T: the orthonormal Q keeps norms
            read_q = tvec(f.T_K, torch.einsum("d,hde->he", u, f.W_Q))
            read_k = tvec(f.T_Q, torch.einsum("d,hde->he", u, f.W_K))
            read_v = tvec(f.T_O, torch.einsum("d,hde->he", u, f.W_V))
            write = tvec(f.T_V, torch.einsum("hed,d->he", f.W_O, u))
            for name, num, den in (
                ("write_weight", write, ov),
                ("read_q", read_q, qk),
                ("read_k", read_k, qk),
                ("read_v", read_v, ov),
            ):
                out[name].append(ratio(num, den).cpu().numpy())
    return {name: np.stack(rows).astype(np.float32) for name, rows in out.items()}


def head_projections(z_table: pa.Table, model: HookedModel, u: Tensor) -> np.ndarray:
    """Per row of a stored attn_z table: ``z . (W_O[layer][head] u)`` in float64."""
    import torch

    from arrakis_ray.models.weights import attention_weights

    with torch.inference_mode():
        per_layer = [
            torch.einsum("hed,d->he", attention_weights(model, L).W_O, u)
            for L in range(model.n_layers)
        ]
    w = torch.stack(per_layer).double().cpu().numpy()  # [n_layers, n_heads, d_head]
    rows_w = w[z_table.column("layer").to_numpy(), z_table.column("head").to_numpy()]
    proj = np.zeros(z_table.num_rows)
    # one dimension column at a time: no [rows, d_head] copy of the table
    for i in range(model.d_head):
        proj += z_table.column(f"d{i}").to_numpy().astype(np.float32) * rows_w[:, i]
    return proj


class ReadWriteHeads(Tool):
    """Per head: weight- and activation-based reads from / writes to one direction."""

    name = "read_write_heads"
    summary = (
        "per head: how strongly it reads from / writes to a direction (weights and activations)"
    )
    reference = "Elhage et al. 2021 (read/write subspaces of the residual stream)"
    Params = ReadWriteParams
    needs_weights = True
    scope = "shard"
    outputs = ("read_write_heads", "read_write_heads_top")

    def required_hooks(self, manifest: RunManifest) -> list[str]:
        # checked here, in the driver, so a wrong width fails before any task starts
        d_model = manifest.shape.d_model
        if self.params.direction is not None:
            _as_vector(np.array(self.params.direction), d_model, "direction")
        if self.params.direction_file is not None:
            where = f"direction_file {self.params.direction_file}"
            _as_vector(_load_file(self.params.direction_file), d_model, where)
        if not self.params.activations:
            return []
        return [family_hook("attn_z", layer) for layer in range(manifest.shape.n_layers)]

    def compute_shard(self, inputs: ShardInputs, model: HookedModel | None) -> dict:
        import pyarrow as pa

        if model is None:
            raise ToolError(f"tool {self.name} needs the model's weights, but got none")
        u, label = resolve_direction(self.params, model, inputs.vocab)
        scores = weight_scores(model, u, self.params.fold_ln)
        n_layers, n_heads = model.n_layers, model.n_heads
        size = n_layers * n_heads
        layer, head = np.divmod(np.arange(size), n_heads)
        stats = {**Moments.of(np.zeros((0, size)), order=2).to_arrays(), "sum_abs": np.zeros(size)}
        stats["max"] = np.full(size, -np.inf)
        stats["min"] = np.full(size, np.inf)
        top = _empty_top()
        if self.params.activations:
            z = inputs.activations["attn_z"]
            proj = head_projections(z, model, u)
            key = (
                z.column("layer").to_numpy().astype(np.int64) * n_heads
                + z.column("head").to_numpy()
            )
            stats.update(Moments.of_groups(proj, key, size, order=2).to_arrays())
            stats["sum_abs"] = np.bincount(key, np.abs(proj), minlength=size)
            np.maximum.at(stats["max"], key, proj)
            np.minimum.at(stats["min"], key, proj)
            if self.params.top_k:
                top = _top_rows(key, proj, z, n_heads, self.params.top_k)
        partial = {
            "direction": np.full(len(layer), label, dtype=object),
            "layer": layer,
            "head": head,
            **{k: v.ravel() for k, v in scores.items()},
            **stats,
        }
        return {"read_write_heads": pa.table(partial), "read_write_heads_top": pa.table(top)}

    def reduce(
        self, partials: dict[str, list[pa.Table]], manifest: RunManifest, model=None
    ) -> dict:
        import pyarrow as pa

        run_id = manifest.run_id
        parts = [t.to_pydict() for t in partials["read_write_heads"]]
        first = parts[0]
        moments = Moments.merge_all(Moments.from_arrays(p) for p in parts)
        sum_abs = np.sum([p["sum_abs"] for p in parts], axis=0)
        hi = np.max([p["max"] for p in parts], axis=0)
        lo = np.min([p["min"] for p in parts], axis=0)
        n = moments.n
        has = n > 0
        safe = np.where(has, n, 1)

        def act(values: np.ndarray) -> pa.Array:
            return pa.array(values.astype(np.float32), mask=~has)

        rows = len(first["layer"])
        main = pa.Table.from_arrays(
            [
                pa.array([run_id] * rows, pa.string()),
                pa.array(first["direction"], pa.string()),
                pa.array(np.asarray(first["layer"], dtype=np.int16)),
                pa.array(np.asarray(first["head"], dtype=np.int16)),
                *[pa.array(np.asarray(first[c], dtype=np.float32)) for c in WEIGHT_COLUMNS],
                act(moments.mean),
                act(sum_abs / safe),
                act(np.where(has, moments.std, 0.0)),
                act(hi),
                act(lo),
                pa.array(n.astype(np.int64)),
            ],
            schema=self.result_schema("read_write_heads"),
        )
        return {"read_write_heads": main, "read_write_heads_top": self._top(partials, run_id)}

    def _top(self, partials: dict[str, list[pa.Table]], run_id: str) -> pa.Table:
        import pyarrow as pa

        schema = self.result_schema("read_write_heads_top")
        both = pa.concat_tables(
            partials.get("read_write_heads_top", []) or [pa.table(_empty_top())]
        )
        if both.num_rows == 0:
            return schema.empty_table()
        cols = {c: both.column(c).to_numpy() for c in both.column_names}
        # best first within each (layer, head); ties broken by (seq_id, pos) for determinism
        rows, rank = rank_within_groups(
            [cols["layer"], cols["head"]],
            [-cols["write_act"], cols["seq_id"], cols["pos"]],
            k=self.params.top_k,
        )
        cols = {c: v[rows] for c, v in cols.items()}
        return pa.Table.from_arrays(
            [
                pa.array([run_id] * len(rows), pa.string()),
                pa.array(cols["layer"].astype(np.int16)),
                pa.array(cols["head"].astype(np.int16)),
                pa.array(rank.astype(np.int16)),
                pa.array(cols["seq_id"].astype(np.int64)),
                pa.array(cols["pos"].astype(np.int32)),
                pa.array(cols["write_act"].astype(np.float32)),
            ],
            schema=schema,
        )


def _empty_top() -> dict[str, np.ndarray]:
    return {
        "layer": np.zeros(0, np.int64),
        "head": np.zeros(0, np.int64),
        "seq_id": np.zeros(0, np.int64),
        "pos": np.zeros(0, np.int64),
        "write_act": np.zeros(0, np.float64),
    }


def _top_rows(key: np.ndarray, proj: np.ndarray, z: pa.Table, n_heads: int, k: int) -> dict:
    """This shard's ``k`` largest projections per (layer, head)."""
    pick, _ = rank_within_groups([key], [-proj], k=k)
    return {
        "layer": key[pick] // n_heads,
        "head": key[pick] % n_heads,
        "seq_id": z.column("seq_id").to_numpy()[pick],
        "pos": z.column("pos").to_numpy()[pick].astype(np.int64),
        "write_act": proj[pick],
    }
