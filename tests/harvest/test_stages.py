"""A harvest split into pipeline stages (one actor per stage) stores exactly what the
whole model computes in one stage."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from support import family_table, pipeline_dict

from arrakis_ray.config import pipeline_from_dict
from arrakis_ray.errors import ConfigError
from arrakis_ray.harvest.driver import harvest

KEYS = {
    "dense": ["layer", "seq_id", "pos"],
    "head": ["layer", "seq_id", "pos", "head"],
    "pattern": ["layer", "seq_id", "head", "q_pos", "k_pos"],
}


def _sorted(table):
    names = table.column_names
    keys = (
        KEYS["pattern"] if "q_pos" in names else KEYS["head"] if "head" in names else KEYS["dense"]
    )
    return table.sort_by([(k, "ascending") for k in keys])


def _assert_same_run(a, b):
    families = sorted(p.name for p in (a.run_dir / "activations").iterdir())
    assert families == sorted(p.name for p in (b.run_dir / "activations").iterdir())
    for family in families:
        ta = _sorted(family_table(a.run_dir, family))
        tb = _sorted(family_table(b.run_dir, family))
        assert ta.num_rows == tb.num_rows, family
        for name in ta.column_names:
            if name == "run_id":
                continue
            x, y = ta[name].to_numpy(), tb[name].to_numpy()
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=f"{family}.{name}")
    assert (
        pq.read_table(a.run_dir / "tokens")
        .sort_by("seq_id")
        .select(["seq_id", "pos", "token_id"])
        .equals(
            pq.read_table(b.run_dir / "tokens")
            .sort_by("seq_id")
            .select(["seq_id", "pos", "token_id"])
        )
    )


@pytest.mark.parametrize(
    "stages", [{"layer_ranges": [[0, 1], [1, 3], [3, 4]]}, {"stages": 2}], ids=["3", "2"]
)
def test_stages_of_the_gpt2_demo_model_equal_the_whole_model(harvested, tmp_path, stages):
    _, _, whole = harvested
    staged = harvest(pipeline_from_dict(pipeline_dict(**stages)), tmp_path / "store")
    assert staged.run_id != whole.run_id and staged.shards_done == 3
    layers = sorted(p.name for p in (staged.run_dir / "activations" / "resid_post").iterdir())
    assert layers == [f"layer={x}" for x in range(4)]  # each stage wrote its own layers
    _assert_same_run(whole, staged)


@pytest.mark.parametrize("arch", ["llama"])
def test_two_and_three_stages_of_a_llama_model_equal_the_whole_model(ray_session, tmp_path, arch):
    def run(**harvest_overrides):
        raw = pipeline_dict(
            hooks=[
                "blocks.*.hook_resid_post",
                "blocks.*.attn.hook_k",
                "blocks.*.mlp.hook_post",
                "ln_final.hook_normalized",
            ],
            **harvest_overrides,
        )
        raw["model"] = {
            "arch": arch,
            "config": {"vocab_size": 400, "num_hidden_layers": 3},
            "tokenizer": "zoo:facts-gpt2",
            "seed": 1,
        }
        raw["data"]["max_documents"] = 12
        raw["harvest"]["shard_size"] = 6
        return harvest(pipeline_from_dict(raw), tmp_path / "store")

    whole = run()
    for n_stages in (2, 3):
        _assert_same_run(whole, run(stages=n_stages))


def test_bad_layer_ranges_are_refused(ray_session, tmp_path):
    raw = pipeline_dict(layer_ranges=[[0, 2], [3, 4]])
    with pytest.raises(ConfigError, match="layer_ranges"):
        harvest(pipeline_from_dict(raw), tmp_path / "store")
    assert not (tmp_path / "store").exists()
