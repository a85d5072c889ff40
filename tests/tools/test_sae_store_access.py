"""superposition_disentangler reads and writes a run only through RunReader/RunWriter.

A layer-staged run (one file part per stage and shard) gives the SAE the same result as
the whole-model run; a missing activation file is reported as missing, by its name; the
trained weights are a run artifact that ``RunReader.read_artifact`` returns.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from runs import write_run
from safetensors.numpy import load

from arrakis_ray.errors import StoreError
from arrakis_ray.store.reader import RunReader
from arrakis_ray.tools.runner import make_tool

N_SEQ, N_POS, D = 12, 5, 6
PARAMS = {"hook": "blocks.1.hook_resid_post", "k": 2, "n_features": 12, "epochs": 2}


def _run(tmp_path, run_id: str, stages=None) -> RunReader:
    """Three shards of two layers of resid_post; ``stages``: [start, stop) block ranges."""
    rng = np.random.default_rng(0)
    acts = {
        f"blocks.{layer}.hook_resid_post": rng.standard_normal((N_SEQ, N_POS, D))
        for layer in (0, 1)
    }
    tokens = rng.integers(0, 4, (N_SEQ, N_POS))
    layout = write_run(
        tmp_path / "store", run_id, tokens, ["a", "b", "c", "d"], acts, shard_size=4, stages=stages
    )
    return RunReader(layout)


def _sae(reader: RunReader) -> dict[str, pa.Table]:
    return make_tool("superposition_disentangler", PARAMS).compute_run(reader, None)


def test_a_staged_run_gives_the_same_sae(tmp_path):
    whole = _run(tmp_path, "whole")
    staged = _run(tmp_path, "staged", stages=[(0, 1), (1, 2)])
    assert staged.manifest.n_stages == 2
    a, b = _sae(whole), _sae(staged)
    for output in ("sae_features", "sae_directions"):
        assert a[output].drop_columns(["run_id"]).equals(b[output].drop_columns(["run_id"]))
    (ma,), (mb,) = a["sae_metrics"].to_pylist(), b["sae_metrics"].to_pylist()
    paths = [m.pop("weights_path") for m in (ma, mb)]
    for m in (ma, mb):
        del m["run_id"], m["seconds"]
    assert ma == mb
    # the weights: a run artifact, the same bytes' tensors in both runs (a reader
    # outside a tool call writes no call directory)
    wa, wb = (load(r.read_artifact(p)) for r, p in zip((whole, staged), paths, strict=True))
    want = "results/superposition_disentangler/blocks.1.hook_resid_post.safetensors"
    assert paths == [want, want]
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_array_equal(wa[name], wb[name])


@pytest.mark.parametrize("stages", [None, [(0, 1), (1, 2)]])
def test_a_missing_activation_file_is_called_missing(tmp_path, stages):
    reader = _run(tmp_path, "run", stages=stages)
    path = reader.layout.shard_file(reader.layout.block_dir("resid_post", 1, 0), 1)
    path.unlink()
    with pytest.raises(StoreError, match="file is missing") as caught:
        _sae(reader)
    assert str(path) in str(caught.value) and "corrupt" not in str(caught.value)


def test_artifacts_are_named_inside_the_run(tmp_path):
    reader = _run(tmp_path, "run")
    writer = reader.writer()
    where = writer.write_artifact("superposition_disentangler", "w.bin", b"\x00\x01")
    assert where == "results/superposition_disentangler/w.bin"
    assert reader.read_artifact(where) == b"\x00\x01"
    for bad in ("../w.bin", "shard-00000.parquet", ".hidden", "a/b"):
        with pytest.raises(StoreError, match="invalid artifact name"):
            writer.write_artifact("superposition_disentangler", bad, b"")
    with pytest.raises(StoreError, match="not inside run"):
        reader.read_artifact("../../other/results/x")
    with pytest.raises(StoreError, match=r"w2\.bin: file is missing"):
        reader.read_artifact("results/superposition_disentangler/w2.bin")
