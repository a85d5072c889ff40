"""The logit lens equals a direct computation: lm_head(ln_f(hidden state)) per layer."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from support import DEMO_DATA

from arrakis_ray.errors import ToolError
from arrakis_ray.tools.runner import analyze, make_tool


@pytest.mark.parametrize("seq_id", [0, 25])
def test_logit_lens_matches_direct_computation(harvested, hf_model, seq_id):
    config, _, result = harvested
    model, tokenizer = hf_model
    text = [json.loads(line)["text"] for line in open(DEMO_DATA)][seq_id]
    ids = tokenizer(text)["input_ids"][: config.data.context_length]
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
        n_layers = model.config.n_layer
        # hidden_states[L + 1] is resid_post of block L, except the last, which HF
        # returns after ln_f: the last layer of the lens is the model's own logits
        per_layer = [
            model.lm_head(model.transformer.ln_f(out.hidden_states[layer + 1][0]))
            for layer in range(n_layers - 1)
        ] + [out.logits[0]]

    lens = pq.read_table(result.run_dir / "results" / "logit_lens")
    lens = lens.filter(pc.equal(lens["seq_id"], seq_id))
    assert lens.num_rows == n_layers * len(ids)
    for layer, logits in enumerate(per_layer):
        rows = lens.filter(pc.equal(lens["layer"], layer)).sort_by("pos").to_pydict()
        probs = torch.softmax(logits, dim=-1).numpy()
        np.testing.assert_array_equal(rows["top1_token_id"], probs.argmax(-1))
        np.testing.assert_allclose(rows["top1_prob"], probs.max(-1), rtol=1e-4)
        targets = np.array(ids[1:])
        np.testing.assert_array_equal(rows["target_token_id"][:-1], targets)
        np.testing.assert_allclose(
            rows["target_prob"][:-1], probs[np.arange(len(targets)), targets], rtol=1e-4, atol=1e-7
        )
        expected_rank = (probs[:-1] > probs[np.arange(len(targets)), targets][:, None]).sum(-1) + 1
        np.testing.assert_array_equal(rows["target_rank"][:-1], expected_rank)
        # the last position has no next token
        assert rows["target_token_id"][-1] is None and rows["target_rank"][-1] is None
        assert rows["top1_token"][0] == tokenizer.decode([int(probs[0].argmax())])


def test_the_demo_model_knows_more_at_the_last_layer(harvested):
    """A trained model: the actual next token is likelier at the last layer than the first."""
    _, _, result = harvested
    lens = pq.read_table(result.run_dir / "results" / "logit_lens").to_pandas()
    by_layer = lens.dropna().groupby("layer")["target_prob"].mean()
    assert by_layer.iloc[-1] > by_layer.iloc[0] + 0.1


def test_unknown_tool_and_bad_params_are_refused():
    with pytest.raises(ToolError, match="did you mean logit_lens"):
        make_tool("logit_lense")
    with pytest.raises(ToolError, match="include_embedd"):
        make_tool("logit_lens", {"include_embedd": True})


def test_tool_refuses_a_run_without_its_hooks(ray_session, tmp_path):
    from support import pipeline_dict

    from arrakis_ray.config import pipeline_from_dict
    from arrakis_ray.harvest.driver import harvest

    raw = pipeline_dict(hooks=["blocks.0.hook_attn_out"], shard_size=8)
    raw["data"]["max_documents"] = 8
    result = harvest(pipeline_from_dict(raw), tmp_path / "store")
    with pytest.raises(ToolError, match=r"blocks\.\*\.hook_resid_post"):
        analyze(result.run_dir, "logit_lens")
    assert not (result.run_dir / "results").exists()
