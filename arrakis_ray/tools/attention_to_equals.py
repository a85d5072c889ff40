"""The attention paid BY ``=`` TO an operand, per head, over the inputs ``a, b, =``.

Despite the tool's name (kept for the stores and pipelines that use it), the rows are
attention *from* ``=``: the query is the ``=`` token (position 2, the only position
whose output is the answer) and the key is ``source_pos`` (0 = a, the default; 1 = b).
Each row's ``weight`` is ``pattern[head, q_pos=2, k_pos=source_pos]`` of the stored
``blocks.L.attn.hook_pattern`` (the softmaxed, causal pattern), with the input's a and
b. The issue's "attention from a to =" and the seed's figure mean this same quantity.

In the modular-addition transformer (Nanda et al. 2023) the query at ``=`` reads a and
b; how much each head gives to a, as a function of (a, b), is periodic in the key
frequencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from arrakis_ray.errors import ToolError
from arrakis_ray.hooks import family_hook
from arrakis_ray.tools.base import ShardInputs, Tool
from arrakis_ray.tools.modular import check_modulus, check_vocab

if TYPE_CHECKING:
    from arrakis_ray.store.manifest import RunManifest


@dataclass(frozen=True)
class AttentionToEqualsParams:
    """Parameters of attention_to_equals."""

    p: int = 113
    """The modulus: token ids 0..p-1 are the numbers."""
    layer: int = 0
    """Block whose attention pattern is read."""
    source_pos: int = 0
    """Key position that ``=`` (the query) attends to: 0 = a, 1 = b."""

    def __post_init__(self) -> None:
        check_modulus(self.p)
        if self.source_pos not in (0, 1):
            raise ValueError("source_pos must be 0 (a) or 1 (b)")


class AttentionToEquals(Tool):
    """Per head and input (a, b): the attention weight with ``=`` as the query and a (or b,
    ``source_pos``) as the key."""

    name = "attention_to_equals"
    summary = "per head and input (a, b): attention weight of query '=' on key a (or b)"
    reference = (
        "Nanda et al., 'Progress measures for grokking via mechanistic interpretability' (2023)"
    )
    Params = AttentionToEqualsParams

    def check(self, manifest: RunManifest) -> None:
        check_vocab(self.name, manifest, self.params.p)
        self.selected_layers(manifest, [self.params.layer])

    def required_hooks(self, manifest: RunManifest) -> list[str]:
        return [family_hook("attn_pattern", self.params.layer)]

    def compute_shard(self, inputs: ShardInputs, model=None):
        import pyarrow as pa
        import pyarrow.compute as pc

        from arrakis_ray.studies.grokking import task

        tokens = inputs.tokens
        seq, a, b = task.sequence_pairs(
            tokens.column("seq_id").to_numpy(),
            tokens.column("pos").to_numpy(),
            tokens.column("token_id").to_numpy(),
        )
        last_pos = 2  # the '=' of 'a b ='
        if (
            tokens.column("pos").to_numpy().max(initial=0) != last_pos
            or (a < 0).any()
            or (b < 0).any()
        ):
            raise ToolError(f"{self.name}: the inputs must be 'a b =' (3 tokens each)")
        table = inputs.activations["attn_pattern"]
        keep = pc.and_(
            pc.equal(table.column("layer"), self.params.layer),
            pc.and_(
                pc.equal(table.column("q_pos"), last_pos),
                pc.equal(table.column("k_pos"), self.params.source_pos),
            ),
        )
        table = table.filter(keep)
        where = np.searchsorted(seq, table.column("seq_id").to_numpy())
        n = table.num_rows
        return pa.Table.from_pydict(
            {
                "run_id": [inputs.run_id] * n,
                "layer": np.full(n, self.params.layer, dtype=np.int16),
                "source_pos": np.full(n, self.params.source_pos, dtype=np.int16),
                "head": table.column("head").to_numpy().astype(np.int16),
                "a": a[where].astype(np.int16),
                "b": b[where].astype(np.int16),
                "weight": table.column("weight").to_numpy().astype(np.float32),
            },
            schema=self.result_schema(),
        )
