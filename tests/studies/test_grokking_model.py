"""The grokking transformer as a custom model: its fast path, its hooks, the task's data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from arrakis_ray.studies.grokking import task
from arrakis_ray.studies.grokking.model import GrokkingTransformer, P, build


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GrokkingTransformer().eval()


def test_the_answer_path_equals_the_full_forward_at_equals(model):
    ids = torch.from_numpy(task.all_pairs()[::97])
    with torch.no_grad():
        full = model(ids)[:, -1, :P]
        fast = model.answer_logits(ids)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)


def test_the_shape_is_the_papers(model):
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "embed.weight": (114, 128),
        "pos_embed.weight": (3, 128),
        "blocks.0.attn.q.weight": (128, 128),
        "blocks.0.attn.k.weight": (128, 128),
        "blocks.0.attn.v.weight": (128, 128),
        "blocks.0.attn.o.weight": (128, 128),
        "blocks.0.mlp.w_in.weight": (512, 128),
        "blocks.0.mlp.w_out.weight": (128, 512),
        "unembed.weight": (114, 128),
    }


def test_the_hooks_equal_a_manual_forward():
    from arrakis_ray.models.hooked import HookedModel

    torch.manual_seed(1)
    built = build()
    hooked = HookedModel.from_torch(built)
    ids = torch.tensor([[3, 5, P], [112, 0, P]])
    logits, cache = hooked.run_with_cache(ids, hooks=["*"])
    m = built.module
    with torch.no_grad():
        x = m.embed.weight[ids] + m.pos_embed.weight[:3]
        attn = m.blocks[0].attn
        q = (x @ attn.q.weight.T).view(2, 3, 4, 32)
        k = (x @ attn.k.weight.T).view(2, 3, 4, 32)
        v = (x @ attn.v.weight.T).view(2, 3, 4, 32)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(32)
        scores = scores.masked_fill(~torch.ones(3, 3, dtype=torch.bool).tril(), -torch.inf)
        pattern = scores.softmax(-1)
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        mid = x + z.reshape(2, 3, 128) @ attn.o.weight.T
        pre = mid @ m.blocks[0].mlp.w_in.weight.T
        post = pre.relu()
        resid = mid + post @ m.blocks[0].mlp.w_out.weight.T
        manual_logits = resid @ m.unembed.weight.T
    expected = {
        "blocks.0.attn.hook_pattern": pattern,
        "blocks.0.attn.hook_z": z,
        "blocks.0.hook_resid_mid": mid,
        "blocks.0.mlp.hook_pre": pre,
        "blocks.0.mlp.hook_post": post,
        "blocks.0.hook_resid_post": resid,
    }
    for name, value in expected.items():
        torch.testing.assert_close(cache[name], value, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(logits, manual_logits, rtol=1e-5, atol=1e-5)


def test_the_split_is_seeded_and_30_percent():
    mask = task.train_mask()
    assert mask.sum() == int(0.3 * P * P) == 3830
    assert np.array_equal(mask, task.train_mask())
    assert not np.array_equal(mask, task.train_mask(seed=1))


def test_the_inputs_are_every_pair_once_and_the_labels_their_sum():
    pairs = task.all_pairs()
    assert pairs.shape == (P * P, 3) and (pairs[:, 2] == P).all()
    assert np.array_equal(task.labels(), (pairs[:, 0] + pairs[:, 1]) % P)
    assert np.array_equal(task.pair_rows(pairs[:, 0], pairs[:, 1]), np.arange(P * P))
    with pytest.raises(ValueError, match="not all"):
        task.pair_rows(pairs[1:, 0], pairs[1:, 1])


def test_the_shipped_pairs_file_is_the_task():
    from arrakis_ray.resources import data_dir

    stored = np.load(data_dir("pipelines") / "data" / "grokking_pairs.npy")
    assert np.array_equal(stored, task.all_pairs())
