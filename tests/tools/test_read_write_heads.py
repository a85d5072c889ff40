"""Read/write head scores equal dense numpy computations from the HF weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from runs import shard_plan, synthetic_manifest, synthetic_shape
from support import family_table

from arrakis_ray.errors import ToolError
from arrakis_ray.harvest.model_source import vocab_texts
from arrakis_ray.models import build_model, load_pretrained
from arrakis_ray.store.catalog import Store
from arrakis_ray.tools.read_write_heads import (
    ReadWriteParams,
    resolve_direction,
    weight_scores,
)
from arrakis_ray.tools.runner import analyze, make_tool
from arrakis_ray.zoo import zoo_path

TOKEN = "paris"


def _manifest(**shape):
    """A typed manifest of run "r" with the given model shape fields."""
    return synthetic_manifest("r", ["hook_embed"], synthetic_shape(**shape), shard_plan(1, 1))


@pytest.fixture(scope="module")
def demo():
    """The demo model as a HookedModel, and its vocab texts (as a harvest writes them)."""
    model = load_pretrained(zoo_path("facts-gpt2"))
    return model, np.asarray(vocab_texts(model.tokenizer, model.vocab_size), dtype=object)


def _numpy_direction(hf, token_id: int) -> np.ndarray:
    """Unit residual direction of a token: centered unembedding, ln_f scale and centering."""
    W_U = hf.lm_head.weight.detach().double().numpy().T  # [d_model, vocab]
    d = W_U[:, token_id] - W_U.mean(axis=1)
    d = hf.transformer.ln_f.weight.detach().double().numpy() * d
    d = d - d.mean()
    return d / np.linalg.norm(d)


def _numpy_scores(hf, u: np.ndarray) -> dict[str, np.ndarray]:
    """Dense d_model x d_model circuits per head, sliced by hand from gpt2's Conv1D weights."""
    cfg = hf.config
    d, nh = cfg.n_embd, cfg.n_head
    dh = d // nh
    proj = np.eye(d) - np.ones((d, d)) / d
    out = {k: np.zeros((cfg.n_layer, nh)) for k in ("write_weight", "read_q", "read_k", "read_v")}
    for layer, block in enumerate(hf.transformer.h):
        W = block.attn.c_attn.weight.detach().double().numpy()  # [in, out = q | k | v]
        W_o = block.attn.c_proj.weight.detach().double().numpy()  # [heads * dh, d]
        read = proj @ np.diag(block.ln_1.weight.detach().double().numpy())
        for h in range(nh):
            q, k, v = (read @ W[:, i * d + h * dh : i * d + (h + 1) * dh] for i in range(3))
            o = W_o[h * dh : (h + 1) * dh] @ proj
            ov, qk = v @ o, q @ k.T
            fro = np.linalg.norm
            out["write_weight"][layer, h] = fro(ov @ u) / fro(ov)
            out["read_v"][layer, h] = fro(u @ ov) / fro(ov)
            out["read_q"][layer, h] = fro(u @ qk) / fro(qk)
            out["read_k"][layer, h] = fro(qk @ u) / fro(qk)
    return out


def test_weight_scores_match_dense_numpy(demo, hf_model):
    model, vocab = demo
    hf, _ = hf_model
    token_id = int(np.flatnonzero(vocab == TOKEN)[0])
    u, label = resolve_direction(ReadWriteParams(token=TOKEN), model, vocab)
    assert label == f"token:{TOKEN} (id {token_id})"
    np.testing.assert_allclose(u.numpy(), _numpy_direction(hf, token_id), atol=1e-6)
    # token and token_id name the same direction
    u2, _ = resolve_direction(ReadWriteParams(token_id=token_id), model, vocab)
    torch.testing.assert_close(u, u2)
    got = weight_scores(model, u, fold_ln=True)
    ref = _numpy_scores(hf, _numpy_direction(hf, token_id))
    for name, values in ref.items():
        np.testing.assert_allclose(got[name], values, rtol=1e-4, atol=1e-6, err_msg=name)
        assert np.all((got[name] >= 0) & (got[name] <= 1 + 1e-6))


def test_hand_set_heads_score_one_and_top():
    """A head whose W_O writes only along u, and one whose W_Q reads only along u, score 1."""
    model = build_model("gpt2", seed=0)
    d, dh = model.d_model, model.d_head
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(d, generator=gen)
    u = u - u.mean()  # zero-mean: LayerNorm's centering leaves it alone
    u = u / u.norm()
    blocks = model.model.transformer.h
    with torch.no_grad():
        for block in blocks:
            block.ln_1.weight.fill_(1.0)
        # layer 1, head 2: W_O[h] = c u^T (Conv1D c_proj weight is [heads * dh, d])
        c = torch.randn(dh, generator=gen)
        blocks[1].attn.c_proj.weight[2 * dh : 3 * dh] = torch.outer(c, u)
        # layer 0, head 1: W_Q[h] = u c^T (c_attn columns 0..d are q)
        blocks[0].attn.c_attn.weight[:, dh : 2 * dh] = torch.outer(u, c)
    got = weight_scores(model, u, fold_ln=True)
    assert got["write_weight"][1, 2] == pytest.approx(1.0, abs=1e-5)
    assert np.unravel_index(got["write_weight"].argmax(), got["write_weight"].shape) == (1, 2)
    assert got["read_q"][0, 1] == pytest.approx(1.0, abs=1e-5)
    assert np.unravel_index(got["read_q"].argmax(), got["read_q"].shape) == (0, 1)
    # the rest look like random heads: about 1/sqrt(d_model)
    assert np.median(got["write_weight"]) < 4 / np.sqrt(d)


def test_bad_directions_are_refused(demo):
    model, vocab = demo
    with pytest.raises(ToolError, match="exactly one of"):
        make_tool("read_write_heads", {"token": TOKEN, "token_id": 3})
    with pytest.raises(ToolError, match="exactly one of"):
        make_tool("read_write_heads", {})
    manifest = _manifest(d_model=128, n_layers=4)
    tool = make_tool("read_write_heads", {"direction": [1.0, 2.0]})
    with pytest.raises(ToolError, match=r"width d_model = 128"):
        tool.required_hooks(manifest)
    with pytest.raises(ToolError, match="does not exist"):
        make_tool("read_write_heads", {"direction_file": "/nonexistent/d.npy"}).required_hooks(
            manifest
        )
    with pytest.raises(ToolError, match="did you mean 'paris'"):
        resolve_direction(ReadWriteParams(token="pariss"), model, vocab)
    with pytest.raises(ToolError, match="outside the vocab"):
        resolve_direction(ReadWriteParams(token_id=10_000), model, vocab)
    assert (
        make_tool("read_write_heads", {"token": TOKEN, "activations": False}).required_hooks(
            manifest
        )
        == []
    )


def test_direction_file_equals_direction_list(demo, tmp_path):
    model, vocab = demo
    vec = np.random.default_rng(0).normal(size=model.d_model)
    np.save(tmp_path / "d.npy", vec[None, :])  # [1, d_model] is accepted too
    a, label = resolve_direction(
        ReadWriteParams(direction_file=str(tmp_path / "d.npy")), model, vocab
    )
    b, _ = resolve_direction(ReadWriteParams(direction=tuple(vec)), model, vocab)
    torch.testing.assert_close(a, b)
    assert label.startswith("file:") and float(a.norm()) == pytest.approx(1.0)


def _stored_z(run_dir) -> dict[str, np.ndarray]:
    table = family_table(run_dir, "attn_z")
    dims = sorted(
        (c for c in table.column_names if c[0] == "d" and c[1:].isdigit()), key=lambda c: int(c[1:])
    )
    return {
        "layer": table["layer"].to_numpy(),
        "head": table["head"].to_numpy(),
        "seq_id": table["seq_id"].to_numpy(),
        "pos": table["pos"].to_numpy(),
        "z": np.column_stack([table[c].to_numpy() for c in dims]).astype(np.float64),
    }


def test_runner_on_demo_run(harvested, hf_model, demo):
    _, store, result = harvested
    hf, _ = hf_model
    _, vocab = demo
    analyze(result.run_dir, "read_write_heads", {"token": TOKEN, "top_k": 3})
    with Store(store) as s:
        main = s.sql("SELECT * FROM results_read_write_heads ORDER BY layer, head")
        top = s.sql(
            "SELECT t.layer, t.head, t.rank, t.seq_id, t.pos, t.write_act, k.token_text "
            "FROM results_read_write_heads_top t JOIN tokens k USING (run_id, seq_id, pos) "
            "ORDER BY layer, head, rank"
        )
    token_id = int(np.flatnonzero(vocab == TOKEN)[0])
    u = _numpy_direction(hf, token_id)
    # activation scores, from the stored z of every shard and W_O sliced from HF
    z = _stored_z(result.run_dir)
    dh = hf.config.n_embd // hf.config.n_head
    proj = np.zeros(len(z["layer"]))
    for layer, block in enumerate(hf.transformer.h):
        W_o = block.attn.c_proj.weight.detach().double().numpy()
        for h in range(hf.config.n_head):
            rows = (z["layer"] == layer) & (z["head"] == h)
            proj[rows] = z["z"][rows] @ (W_o[h * dh : (h + 1) * dh] @ u)
    assert (
        len(main) == 16
        and main["n_tokens"].to_list() == [int(((z["layer"] == 0) & (z["head"] == 0)).sum())] * 16
    )
    ref_w = _numpy_scores(hf, u)
    for row in main.iter_rows(named=True):
        L, h = row["layer"], row["head"]
        p = proj[(z["layer"] == L) & (z["head"] == h)]
        assert row["write_act_mean"] == pytest.approx(p.mean(), rel=1e-4, abs=1e-6)
        assert row["write_act_abs_mean"] == pytest.approx(np.abs(p).mean(), rel=1e-4, abs=1e-6)
        assert row["write_act_std"] == pytest.approx(p.std(), rel=1e-3, abs=1e-6)
        assert row["write_act_max"] == pytest.approx(p.max(), rel=1e-4, abs=1e-6)
        assert row["write_act_min"] == pytest.approx(p.min(), rel=1e-4, abs=1e-6)
        assert row["write_weight"] == pytest.approx(ref_w["write_weight"][L, h], rel=1e-4)
        assert row["direction"] == f"token:{TOKEN} (id {token_id})"
        # the top table: the 3 largest projections of this head, best first
        mine = top.filter((top["layer"] == L) & (top["head"] == h))
        np.testing.assert_allclose(
            mine["write_act"].to_numpy(), np.sort(p)[::-1][:3], rtol=1e-4, atol=1e-6
        )
        assert mine["rank"].to_list() == [1, 2, 3]


def test_weights_only_compute_and_reduce(demo):
    """Without activations: weight columns filled, activation columns null, no top rows."""
    from arrakis_ray.tools.base import ShardInputs

    model, vocab = demo
    tool = make_tool("read_write_heads", {"token": TOKEN, "activations": False})
    inputs = ShardInputs("r", 0, _manifest(), activations={}, tokens=None, vocab=vocab)
    part = tool.compute_shard(inputs, model)
    out = tool.reduce({name: [t, t] for name, t in part.items()}, _manifest())
    main, top = out["read_write_heads"].to_pydict(), out["read_write_heads_top"]
    assert top.num_rows == 0 and top.schema == tool.result_schema("read_write_heads_top")
    assert main["n_tokens"] == [0] * 16 and set(main["write_act_mean"]) == {None}
    u, _ = resolve_direction(ReadWriteParams(token=TOKEN), model, vocab)
    np.testing.assert_allclose(
        main["write_weight"], weight_scores(model, u, fold_ln=True)["write_weight"].ravel()
    )
