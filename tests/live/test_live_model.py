"""LiveModel: one model, whole or in stages, for forwards, gradients and probes."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from arrakis_ray.errors import ToolError

PROMPTS = ["the capital of france is", "the capital of spain is"]


def _ids(model) -> torch.Tensor:
    return torch.tensor([model.encode(p) for p in PROMPTS])


def test_stages_give_the_whole_models_logits_cache_and_probes(demo_live, demo_staged):
    hooks = ["blocks.*.hook_resid_post", "blocks.1.attn.hook_z"]
    probes = {"blocks.*.hook_resid_post": lambda x, _n: x[:, -1].norm(dim=-1)}
    whole = demo_live.run(_ids(demo_live), hooks=hooks, probes=probes)
    staged = demo_staged.run(_ids(demo_live), hooks=hooks, probes=probes)
    reference, cache = demo_live.meta.run_with_cache(
        _ids(demo_live), hooks=["logits", *demo_live.resolve_hooks(hooks)]
    )
    assert_close(whole.logits, reference)
    assert_close(staged.logits, reference)
    assert list(staged.cache) == demo_live.resolve_hooks(hooks)  # forward order
    for name, value in staged.cache.items():
        assert_close(value, cache[name])
    # probes ran on the stage holding each hook, and sent back only their values
    assert sorted(staged.probes) == [f"blocks.{layer}.hook_resid_post" for layer in range(4)]
    for name, value in staged.probes.items():
        assert_close(value, cache[name][:, -1].norm(dim=-1))
        assert_close(whole.probes[name], value)


def test_an_intervention_reaches_downstream_stages(demo_live, demo_staged):
    """Zeroing block 0's attention (stage 1) changes what stage 2 computes, the same way."""
    zero = {"blocks.0.hook_attn_out": lambda x, _n: torch.zeros_like(x)}
    want, _ = demo_live.meta.run_with_cache(_ids(demo_live), hooks=["logits"], interventions=zero)
    assert_close(demo_staged.run(_ids(demo_live), interventions=zero).logits, want)
    plain = demo_staged.run(_ids(demo_live)).logits
    assert (plain - want).abs().max() > 1e-3


def test_gradients_through_stages_equal_autograd_on_the_whole_model(demo_live, demo_staged):
    answer = demo_live.token_id("paris")

    def metric(logits):
        return logits[:, -1, answer]

    grad_hooks = ["blocks.0.hook_resid_pre", "blocks.3.attn.hook_z", "blocks.2.hook_mlp_out"]
    staged = demo_staged.run_with_grads(_ids(demo_live), None, grad_hooks, metric)
    whole = demo_live.run_with_grads(_ids(demo_live), None, grad_hooks, metric)
    # the reference: autograd on the embeddings' output of an ordinary forward
    hm = demo_live.meta
    captured = {}

    def keep(value, name):
        value = value.detach().requires_grad_()
        captured[name] = value
        return value

    logits, _ = hm.run_with_cache(
        _ids(demo_live),
        hooks=["logits"],
        interventions={"blocks.0.hook_resid_pre": keep},
        grad=True,
    )
    (want,) = torch.autograd.grad(metric(logits).sum(), [captured["blocks.0.hook_resid_pre"]])
    assert_close(whole.grads["blocks.0.hook_resid_pre"], want, atol=1e-5, rtol=1e-4)
    for name in grad_hooks:
        assert_close(staged.grads[name], whole.grads[name], atol=1e-5, rtol=1e-4)
    assert_close(staged.values, metric(hm.run_with_cache(_ids(demo_live), hooks=["logits"])[0]))
    assert all(p.grad is None for w in demo_staged.workers for p in w.model.model.parameters())


@pytest.mark.parametrize("hook", ["blocks.0.hook_mlp_out", "blocks.3.hook_mlp_out"])
def test_a_gradient_wanted_in_one_stage_only(demo_live, demo_staged, hook):
    """The other stage owns no grad hook: the gradient still flows through it (stage 2's
    hook) or back to it (stage 1's)."""
    answer = demo_live.token_id("paris")

    def metric(logits):
        return logits[:, -1, answer]

    whole = demo_live.run_with_grads(_ids(demo_live), None, [hook], metric)
    staged = demo_staged.run_with_grads(_ids(demo_live), None, [hook], metric)
    assert list(staged.grads) == [hook]
    assert staged.grads[hook].abs().max() > 0
    assert_close(staged.grads[hook], whole.grads[hook], atol=1e-5, rtol=1e-4)


def test_final_logits_read_a_residual_through_the_last_stage(demo_live, demo_staged):
    _, cache = demo_live.meta.run_with_cache(_ids(demo_live), hooks=["blocks.3.hook_resid_post"])
    resid = cache["blocks.3.hook_resid_post"]
    logits = demo_live.meta.run_with_cache(_ids(demo_live), hooks=["logits"])[0]
    assert_close(demo_staged.final_logits(resid), logits)


def test_bad_requests_are_refused_in_one_line(demo_live, demo_staged):
    with pytest.raises(ToolError, match="'blocks.0.attn.hook_pattern' is read-only"):
        demo_live.run(_ids(demo_live), interventions={"blocks.0.attn.hook_pattern": None})
    with pytest.raises(ToolError, match="at least one writable hook"):
        demo_live.run_with_grads(_ids(demo_live), None, ["blocks.*.attn.hook_pattern"], sum)
    with pytest.raises(ToolError, match="'pariss' is not a single token"):
        demo_live.token_id("pariss")
    with pytest.raises(RuntimeError, match="backward\\(\\) without a grad forward"):
        demo_staged.workers[0].backward(torch.zeros(1))
