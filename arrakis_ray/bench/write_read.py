"""The original Arrakis' WriteReadAnalyzer as a bench tool: which attention heads write
or read a direction of the residual stream, ranked (``exp.tools["write_read"]``).

The scores are those of the verified ``read_write_heads`` tool
(``arrakis_ray.tools.read_write_heads``), computed here from the bench model's weights;
``WriteRead.run(...)`` runs that tool itself, as any :class:`BenchTool`.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from arrakis_ray.bench.tools import BenchTool, ModelHere
from arrakis_ray.errors import ToolError

if TYPE_CHECKING:
    import polars as pl

    from arrakis_ray.models.hooked import HookedModel


class HeadScore(NamedTuple):
    """One attention head and its score (a tuple: JSON writes it as a list)."""

    layer: int
    head: int
    score: float


class WriteRead(BenchTool):
    """The original Arrakis' WriteReadAnalyzer, on the verified ``read_write_heads`` math.

    A direction in the residual stream is one of ``token`` (its text exactly as in the
    vocabulary) or ``token_id`` (the token's centred unembedding direction, with the
    final norm folded in when ``fold_ln``), ``dim_idx`` (the basis direction
    ``e_dim_idx``) or ``direction`` (d_model floats). Per head, all in [0, 1]
    (``arrakis_ray.tools.read_write_heads``): ``write_weight = ||W_OV u|| / ||W_OV||_F``,
    ``read_q``, ``read_k`` (through W_QK) and ``read_v`` (through W_OV). With ``fold_ln``
    each head reads through its ln1 as in the tool. ``run(...)`` runs the
    ``read_write_heads`` tool itself (its activation scores too), as any BenchTool.
    """

    tool_name = "read_write_heads"

    def __init__(self, model: HookedModel | ModelHere, store: Any = None):
        super().__init__(self.tool_name, model, store)

    def scores(
        self, layer_idx: int | None = None, *, token: str | None = None,
        token_id: int | None = None, dim_idx: int | None = None, direction: Any = None,
        fold_ln: bool = True,
    ) -> pl.DataFrame:  # fmt: skip
        """Every head's (or ``layer_idx``'s heads') ``ov_norm`` (||W_OV||_F) and
        ``qk_norm`` (||W_QK||_F), and with a direction its ``direction`` label,
        ``write_weight``, ``read_q``, ``read_k`` and ``read_v``."""
        import polars as pl
        import torch

        from arrakis_ray.models.circuits import layer_factors
        from arrakis_ray.tools.read_write_heads import WEIGHT_COLUMNS, weight_scores

        model = self.here.model
        layers = range(model.n_layers) if layer_idx is None else [self._layer(layer_idx)]
        resolved = self._direction(token, token_id, dim_idx, direction, fold_ln)
        with torch.inference_mode():
            factors = [layer_factors(model, layer, fold_ln) for layer in layers]
            ov = np.stack([f.ov_norm().float().cpu().numpy() for f in factors])
            qk = np.stack([f.qk_norm().float().cpu().numpy() for f in factors])
        layer, head = (
            a.ravel() for a in np.meshgrid(list(layers), range(model.n_heads), indexing="ij")
        )
        columns: dict[str, Any] = {
            "layer": pl.Series(layer, dtype=pl.Int16),
            "head": pl.Series(head, dtype=pl.Int16),
        }
        if resolved is not None:
            u, label = resolved
            by_column = weight_scores(model, u, fold_ln)  # [n_layers, n_heads] each
            columns["direction"] = [label] * len(layer)
            for name in WEIGHT_COLUMNS:
                columns[name] = pl.Series(by_column[name][list(layers)].ravel(), dtype=pl.Float32)
        columns["ov_norm"] = pl.Series(ov.ravel(), dtype=pl.Float32)
        columns["qk_norm"] = pl.Series(qk.ravel(), dtype=pl.Float32)
        return pl.DataFrame(columns)

    def identify_write_heads(
        self, layer_idx: int, *, token: str | None = None, token_id: int | None = None,
        dim_idx: int | None = None, direction: Any = None, top_k: int | None = None,
        threshold: float | None = None, fold_ln: bool = True,
    ) -> list[HeadScore]:  # fmt: skip
        """The heads of ``layer_idx`` by how much they write, best first: along a
        direction, ``write_weight``; with no direction, how much they write at all,
        ``||W_OV||_F`` (the head's output size for iid unit inputs, in residual units).
        Kept: scores >= ``threshold``, then the first ``top_k``."""
        scores = self.scores(
            layer_idx, token=token, token_id=token_id, dim_idx=dim_idx,
            direction=direction, fold_ln=fold_ln,
        )  # fmt: skip
        column = "write_weight" if "write_weight" in scores.columns else "ov_norm"
        return _ranked(scores, column, top_k, threshold)

    def identify_read_heads(
        self, layer_idx: int, *, dim_idx: int | None = None, token: str | None = None,
        token_id: int | None = None, direction: Any = None, read: str = "q",
        top_k: int | None = None, threshold: float | None = None, fold_ln: bool = True,
    ) -> list[HeadScore]:  # fmt: skip
        """The heads of ``layer_idx`` by how much they read a direction, best first:
        ``read`` = "q" (its queries, ``read_q``), "k" (its keys) or "v" (its values).
        Kept: scores >= ``threshold``, then the first ``top_k``."""
        if read not in ("q", "k", "v"):
            raise ToolError(f"write_read: read={read!r}: give 'q', 'k' or 'v'")
        if all(v is None for v in (dim_idx, token, token_id, direction)):
            raise ToolError(
                "write_read: identify_read_heads reads a direction: give dim_idx, token, "
                "token_id or direction"
            )
        scores = self.scores(
            layer_idx, token=token, token_id=token_id, dim_idx=dim_idx,
            direction=direction, fold_ln=fold_ln,
        )  # fmt: skip
        return _ranked(scores, f"read_{read}", top_k, threshold)

    def _layer(self, layer_idx: Any) -> int:
        n_layers = self.here.model.n_layers
        if not isinstance(layer_idx, Integral) or isinstance(layer_idx, bool):
            raise ToolError(f"write_read: layer_idx must be an integer, got {layer_idx!r}")
        if not 0 <= layer_idx < n_layers:
            raise ToolError(
                f"write_read: layer_idx {layer_idx} is out of range: the model has "
                f"{n_layers} layers (0..{n_layers - 1})"
            )
        return int(layer_idx)

    def _direction(self, token, token_id, dim_idx, direction, fold_ln: bool):
        """``(unit vector, label)`` of the one direction given, or None if none is."""
        from arrakis_ray.tools.read_write_heads import ReadWriteParams, resolve_direction

        given = {
            name: value
            for name, value in (
                ("token", token), ("token_id", token_id),
                ("dim_idx", dim_idx), ("direction", direction),
            )
            if value is not None
        }  # fmt: skip
        if not given:
            return None
        if len(given) > 1:
            raise ToolError(
                f"write_read: give one direction, not {' and '.join(given)} "
                "(token, token_id, dim_idx or direction)"
            )
        model = self.here.model
        if token is not None and model.tokenizer is None:
            raise ToolError(
                f"write_read: token {token!r}: this model has no tokenizer; give token_id"
            )
        if dim_idx is not None:
            if not isinstance(dim_idx, Integral) or not 0 <= dim_idx < model.d_model:
                raise ToolError(
                    f"write_read: dim_idx {dim_idx!r} is not a residual dimension of this "
                    f"model (0..{model.d_model - 1}, d_model = {model.d_model})"
                )
            direction = np.eye(model.d_model)[int(dim_idx)]
        if direction is not None:
            if hasattr(direction, "detach"):  # a torch tensor
                direction = direction.detach().cpu().numpy()
            direction = tuple(float(x) for x in np.asarray(direction, dtype=np.float64).ravel())
        try:
            params = ReadWriteParams(
                token=token, token_id=token_id, direction=direction, fold_ln=fold_ln
            )
        except ValueError as exc:
            raise ToolError(f"write_read: {exc}") from None
        # only a token needs the vocabulary's texts (decoding it takes a while)
        vocab = self.here.vocab if direction is None else np.array([], dtype=object)
        u, label = resolve_direction(params, model, vocab)
        return u, (f"dim:{int(dim_idx)}" if dim_idx is not None else label)


def _ranked(
    scores: pl.DataFrame, column: str, top_k: int | None, threshold: float | None
) -> list[HeadScore]:
    """Heads by ``column``, best first (ties: lower head first), filtered."""
    import polars as pl

    if top_k is not None and (not isinstance(top_k, Integral) or top_k < 1):
        raise ToolError(f"write_read: top_k must be a positive integer, got {top_k!r}")
    if threshold is not None and (not isinstance(threshold, Real) or not math.isfinite(threshold)):
        raise ToolError(f"write_read: threshold must be a finite number, got {threshold!r}")
    ranked = scores.sort([column, "head"], descending=[True, False])
    if threshold is not None:
        ranked = ranked.filter(pl.col(column) >= threshold)
    if top_k is not None:
        ranked = ranked.head(int(top_k))
    return [
        HeadScore(int(layer), int(head), float(score))
        for layer, head, score in ranked.select("layer", "head", column).iter_rows()
    ]
