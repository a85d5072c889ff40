"""A stored run of one synthetic dense hook family, for the run-scope tools.

It is a ``runs.write_run`` run (the shared fixture: tokens, vocab, shards, completion
markers, the typed manifest, the documents' kept columns), so a tool reads it through
``RunReader`` exactly as it reads a harvested run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from runs import write_run

from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.reader import RunReader

VOCAB = ["<bos>", "a", "b", "c", "d"]


def write_synthetic_run(
    root: Path,
    hook_template: str,
    acts: dict[int, np.ndarray],
    *,
    documents: list[dict] | None = None,
    shard_size: int = 50,
    dtype: str = "float32",
    run_id: str = "synthetic",
) -> RunLayout:
    """Store ``acts`` (layer -> [n_seq, n_pos, width]) as hook family ``hook_template``.

    Sequence i is document i of ``documents`` (every key kept as a label; default one
    ``{"text": ...}`` per sequence); shards hold ``shard_size`` sequences each.
    """
    layers = sorted(acts)
    n_seq, n_pos, _ = acts[layers[0]].shape
    rng = np.random.default_rng(0)
    token_ids = rng.integers(1, len(VOCAB), size=(n_seq, n_pos)).astype(np.int32)
    token_ids[:, 0] = 0
    return write_run(
        root / "store",
        run_id,
        token_ids,
        VOCAB,
        {hook_template.format(layer=layer): acts[layer] for layer in layers},
        shard_size=shard_size,
        documents=documents or [{"text": f"doc {i}"} for i in range(n_seq)],
        dtype=dtype,
    )


def run_inputs(layout: RunLayout) -> RunReader:
    """The RunReader the runner would hand a run-scope tool for this run."""
    return RunReader(layout)
