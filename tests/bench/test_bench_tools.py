"""The bench's tools: WriteRead's scores against the weights by hand, its rankings, and
every tool's in-process path against the same tool on a stored harvest."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil

import numpy as np
import polars as pl
import pytest
import torch
from polars.testing import assert_frame_equal
from support import DEMO_DATA

from arrakis_ray.bench.tools import ARRAKIS_KEYS, BenchTool, builtin_tools
from arrakis_ray.bench.write_read import HeadScore, WriteRead
from arrakis_ray.errors import DataError, StoreError, ToolError
from arrakis_ray.models.weights import attention_weights
from arrakis_ray.store.reader import RunReader


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls here, Ray workers beside them on 2 cores: one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """A random gpt2 without a tokenizer: 2 layers, 4 heads of width 8."""
    from arrakis_ray.models.load import build_model

    return build_model(
        "gpt2", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=64
    )


@pytest.fixture(scope="module")
def demo():
    """The demo model (facts-gpt2) with its tokenizer, in this process."""
    from arrakis_ray.config import ModelConfig
    from arrakis_ray.harvest.model_source import load_model

    return load_model(ModelConfig(zoo="facts-gpt2"))


@pytest.fixture(scope="module")
def bench_store(harvested, tmp_path_factory):
    """(a copy of the shared harvested store, the run id): tools here write into it."""
    _config, store, result = harvested
    copy = tmp_path_factory.mktemp("bench-tools") / "store"
    shutil.copytree(store, copy)
    return copy, result.run_id


@pytest.fixture
def own_store(harvested, tmp_path):
    """(a copy of the shared harvested store for one test, the run id)."""
    _config, store, result = harvested
    shutil.copytree(store, tmp_path / "store")
    return tmp_path / "store", result.run_id


def tree_digest(root) -> dict[str, str]:
    """Every file under ``root``: its relative path -> the sha256 of its bytes."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def by_hand(model, layer: int, u: np.ndarray, fold_ln: bool) -> dict[str, np.ndarray]:
    """Per head of ``layer``: the circuits built as full d_model x d_model matrices in
    float64, and the scores of the read_write_heads docstring, computed from them."""
    w = attention_weights(model, layer)
    W_Q, W_K, W_V, W_O = (x.double().numpy() for x in (w.W_Q, w.W_K, w.W_V, w.W_O))
    if fold_ln:  # ln1 read in (gain on the reading rows, LayerNorm centering both sides)
        from arrakis_ray.models.norms import ln1_norm

        norm = ln1_norm(model, layer)
        d = model.d_model
        P = np.eye(d) - np.ones((d, d)) / d if norm.centred else np.eye(d)
        gain = norm.gain.double().numpy()
        W_Q, W_K, W_V = (P @ (gain[:, None] * x) for x in (W_Q, W_K, W_V))
        W_O = W_O @ P
    out = {k: [] for k in ("write_weight", "read_q", "read_k", "read_v", "ov_norm", "qk_norm")}
    for h in range(model.n_heads):
        ov, qk = W_V[h] @ W_O[h], W_Q[h] @ W_K[h].T
        fro_ov, fro_qk = np.linalg.norm(ov), np.linalg.norm(qk)
        out["write_weight"].append(np.linalg.norm(ov @ u) / fro_ov)
        out["read_v"].append(np.linalg.norm(u @ ov) / fro_ov)
        out["read_q"].append(np.linalg.norm(u @ qk) / fro_qk)
        out["read_k"].append(np.linalg.norm(qk @ u) / fro_qk)
        out["ov_norm"].append(fro_ov)
        out["qk_norm"].append(fro_qk)
    return {k: np.array(v) for k, v in out.items()}


# ------------------------------------------------------------------- WriteRead math


@pytest.mark.parametrize("fold_ln", [False, True])
def test_scores_equal_the_circuits_built_by_hand(tiny, fold_ln):
    v = np.random.default_rng(0).normal(size=tiny.d_model)
    scores = WriteRead(tiny).scores(direction=v.tolist(), fold_ln=fold_ln)
    assert scores.height == tiny.n_layers * tiny.n_heads
    for layer in range(tiny.n_layers):
        want = by_hand(tiny, layer, v / np.linalg.norm(v), fold_ln)
        got = scores.filter(pl.col("layer") == layer).sort("head")
        assert got["head"].to_list() == list(range(tiny.n_heads))
        for column, values in want.items():
            np.testing.assert_allclose(got[column].to_numpy(), values, rtol=2e-4, err_msg=column)


def test_dim_idx_is_the_basis_direction(tiny):
    wr = WriteRead(tiny)
    got = wr.scores(1, dim_idx=5, fold_ln=False)
    assert got["direction"].unique().to_list() == ["dim:5"]
    assert got["layer"].unique().to_list() == [1]
    # e_5: the share of W_OV's Frobenius norm in its column 5 (writes) / row 5 (reads)
    w = attention_weights(tiny, 1)
    for h in range(tiny.n_heads):
        ov = (w.W_V[h] @ w.W_O[h]).double().numpy()
        row = got.filter(pl.col("head") == h)
        assert row["write_weight"][0] == pytest.approx(
            np.linalg.norm(ov[:, 5]) / np.linalg.norm(ov), rel=1e-4
        )
        assert row["read_v"][0] == pytest.approx(
            np.linalg.norm(ov[5]) / np.linalg.norm(ov), rel=1e-4
        )
    same = wr.scores(1, direction=np.eye(tiny.d_model)[5] * 3.0, fold_ln=False)
    assert_frame_equal(got.drop("direction"), same.drop("direction"))


def test_identify_heads_order_and_filters(tiny):
    wr = WriteRead(tiny)
    hand = by_hand(tiny, 1, np.eye(tiny.d_model)[2], fold_ln=True)["read_k"]
    order = sorted(range(tiny.n_heads), key=lambda h: -hand[h])
    heads = wr.identify_read_heads(1, dim_idx=2, read="k")
    assert [h.head for h in heads] == order
    assert all(h.layer == 1 for h in heads)
    np.testing.assert_allclose([h.score for h in heads], hand[order], rtol=2e-4)
    assert wr.identify_read_heads(1, dim_idx=2, read="k", top_k=2) == heads[:2]
    cut = heads[1].score
    assert wr.identify_read_heads(1, dim_idx=2, read="k", threshold=cut) == heads[:2]
    assert wr.identify_read_heads(1, dim_idx=2, read="k", threshold=cut, top_k=1) == heads[:1]
    assert wr.identify_read_heads(1, dim_idx=2, read="k", threshold=2.0) == []
    # the write ranking along a direction is write_weight's
    writes = wr.identify_write_heads(0, token_id=7)
    table = wr.scores(0, token_id=7).sort("write_weight", descending=True)
    assert [h.head for h in writes] == table["head"].to_list()
    assert json.loads(json.dumps(heads[0])) == [1, heads[0].head, heads[0].score]


def test_write_heads_without_a_direction_rank_by_ov_norm(tiny):
    heads = WriteRead(tiny).identify_write_heads(0, fold_ln=False)
    w = attention_weights(tiny, 0)
    norms = [np.linalg.norm((w.W_V[h] @ w.W_O[h]).double().numpy()) for h in range(tiny.n_heads)]
    order = sorted(range(tiny.n_heads), key=lambda h: -norms[h])
    assert heads == [HeadScore(0, h, pytest.approx(norms[h], rel=1e-4)) for h in order]


def test_write_read_refusals_are_one_line(tiny, demo):
    wr = WriteRead(tiny)
    cases = [
        (lambda: wr.identify_write_heads(2), "layer_idx 2 is out of range"),
        (lambda: wr.identify_read_heads(0, dim_idx=32), "dim_idx 32 is not a residual"),
        (lambda: wr.identify_read_heads(0), "reads a direction"),
        (lambda: wr.identify_read_heads(0, dim_idx=1, read="o"), "read='o'"),
        (lambda: wr.identify_write_heads(0, dim_idx=1, token_id=3), "give one direction"),
        (lambda: wr.identify_write_heads(0, token="a"), "has no tokenizer"),
        (lambda: wr.identify_write_heads(0, dim_idx=1, top_k=0), "top_k"),
        (lambda: wr.scores(direction=[1.0, 2.0]), "d_model = 32"),
        (lambda: WriteRead(demo).scores(token="pariss"), "did you mean 'paris'"),
    ]
    for call, words in cases:
        with pytest.raises(ToolError) as caught:
            call()
        assert words in str(caught.value) and "\n" not in str(caught.value)


# ----------------------------------------------------------------- the tool table


def test_builtin_tools_by_name_and_arrakis_key(tiny):
    from arrakis_ray.tools import TOOLS

    tools = builtin_tools(tiny, None)
    # tools registered from other packages (the suite registers one) are left out
    built_in = {name for name, cls in TOOLS.items() if cls.__module__.startswith("arrakis_ray.")}
    assert built_in | set(ARRAKIS_KEYS) == set(tools)
    for key, name in ARRAKIS_KEYS.items():
        assert tools[key] is tools[name] and tools[name].name == name
    assert isinstance(tools["write_read"], WriteRead)
    assert tools["knowledge"] is tools["k_prober"]


# ------------------------------------------------- in-process path == stored path


def test_logit_lens_on_inputs_equals_the_stored_harvest(harvested, demo):
    """The shared harvest (40 demo documents, float32) and its logit lens; the same texts
    given to the bench, and the same sequences as token ids, give the same rows."""
    _config, _store, result = harvested
    reader = RunReader.open(result.run_dir)
    stored = pl.from_arrow(reader.result("logit_lens"))
    with open(DEMO_DATA) as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(40), f, strict=False)]
    tool = builtin_tools(demo, None)["logit_lens"]
    keys = ["layer", "seq_id", "pos"]
    from_texts = tool.run(texts)
    assert from_texts["run_id"].unique().to_list() == ["live"]
    assert tool.runs_used == []  # no stored run was read
    _assert_rows_equal(from_texts, stored, keys)
    tokens = pl.from_arrow(reader.tokens(0)).sort("seq_id", "pos")
    ids = [g["token_id"].to_list() for _, g in tokens.group_by("seq_id", maintain_order=True)]
    from_ids = tool.run(ids)
    _assert_rows_equal(from_ids, stored.filter(pl.col("seq_id") < len(ids)), keys)


def test_live_tool_on_inputs_equals_the_stored_run(bench_store, demo, tmp_path):
    store, run_id = bench_store
    with open(DEMO_DATA) as f:
        rows = [json.loads(line) for _, line in zip(range(5), f, strict=False)]
    columns = ("prompt", "subject", "relation", "answer")
    rows = [{c: r[c] for c in columns} for r in rows]
    prompts = tmp_path / "facts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tool = builtin_tools(demo, store)["kg_extractor"]
    stored = tool.run(run=run_id, prompts=str(prompts), top_k=2)
    assert stored["run_id"].unique().to_list() == [run_id]
    assert tool.runs_used == [run_id]
    here = tool.run(pl.DataFrame(rows), top_k=2)
    assert here.height == stored.height == 2 * len(rows)
    _assert_rows_equal(here, stored, ["item", "rank"])
    as_dicts = tool.run(rows, top_k=2)
    assert_frame_equal(as_dicts, here)
    # pandas (its index dropped, not a column) and Arrow give the same table
    import pandas as pd
    import pyarrow as pa

    frame = pd.DataFrame(rows, index=[7, 3, 9, 1, 5])
    for table in (frame, pa.Table.from_pylist(rows)):
        assert_frame_equal(tool.run(table, top_k=2), here)
    assert tool.runs_used == [run_id]  # in-process calls read no stored run


def test_a_text_table_gives_the_rows_of_its_texts(demo):
    """An observational tool given a table: its ``text`` column is the inputs (the rows
    equal those of the plain texts, its other columns labels), whatever library holds it."""
    import pandas as pd

    texts = ["the capital of france is paris", "the capital of spain is"]
    lens = builtin_tools(demo, None)["logit_lens"]
    plain = lens.run(texts)
    labelled = {"text": texts, "label": ["a", "b"]}
    for table in (pl.DataFrame(labelled), pd.DataFrame(labelled, index=[4, 2])):
        assert_frame_equal(lens.run(table), plain)


def test_run_path_returns_the_stored_tables_and_records_the_run(bench_store, demo):
    store, run_id = bench_store
    wr = builtin_tools(demo, store)["write_read"]
    out = wr.run(run=run_id[:8], token="paris", top_k=3)  # a unique prefix of the id
    assert set(out) == {"read_write_heads", "read_write_heads_top"}
    reader = RunReader.open(run_id, store)
    for output, frame in out.items():
        assert_frame_equal(frame, pl.from_arrow(reader.result(output)))
    assert wr.runs_used == [run_id]  # the full id, though a prefix was given
    # the stored weight scores are WriteRead's, computed here on the same model
    weights = ["layer", "head", "direction", "write_weight", "read_q", "read_k", "read_v"]
    here = wr.scores(token="paris").select(weights)
    _assert_rows_equal(here, out["read_write_heads"].select(weights), ["layer", "head"])


def test_in_process_token_ids_in_any_container_agree(tiny):
    tool = BenchTool("residual_tools", tiny)
    ids = np.random.default_rng(1).integers(0, 64, size=(3, 6))
    from_list = tool.run(ids.tolist())
    assert from_list["residual_tokens"]["seq_id"].unique().sort().to_list() == [0, 1, 2]
    for given in (ids, torch.from_numpy(ids)):
        for output, frame in tool.run(given).items():
            assert_frame_equal(frame, from_list[output])


# --------------------------------------------------- run=: stored records, reused


def test_run_with_the_stored_params_reads_them_and_writes_nothing(own_store, demo, monkeypatch):
    """The harvest fixture ran logit_lens with its defaults: asking for those (left out,
    or given explicitly) reads the stored tables, every file of the store unchanged."""
    from arrakis_ray.tools import runner

    store, run_id = own_store
    want = pl.from_arrow(RunReader.open(run_id, store).result("logit_lens"))
    before = tree_digest(store)

    def no_analyze(*args, **kwargs):
        raise AssertionError("the stored record has these params: nothing to compute")

    monkeypatch.setattr(runner, "analyze", no_analyze)
    lens = builtin_tools(demo, store)["logit_lens"]
    assert_frame_equal(lens.run(run=run_id), want)
    assert_frame_equal(lens.run(run=run_id, include_embed=False), want)
    assert tree_digest(store) == before
    assert lens.runs_used == [run_id]
    # a file its record lists, gone (not replaced by a call): said, not recomputed
    (store / next(p for p in before if "results/logit_lens/" in p)).unlink()
    with pytest.raises(StoreError, match="a result file of logit_lens is gone"):
        lens.run(run=run_id)


def test_run_with_other_params_returns_that_calls_tables(own_store, demo, monkeypatch):
    """Other params run the tool (replacing the record, as documented) and return its
    tables; a concurrent call that replaces the record before this call reads it (and
    deletes this call's files) makes it compute again, never return the other's rows."""
    from arrakis_ray.store.manifest import read_tool_records
    from arrakis_ray.store.writer import RunWriter
    from arrakis_ray.tools import runner

    store, run_id = own_store
    reader = RunReader.open(run_id, store)
    want = pl.from_arrow(reader.result("logit_lens"))
    lens = builtin_tools(demo, store)["logit_lens"]
    with_embed = lens.run(run=run_id, include_embed=True)
    # layer -1 (the embeddings) is new; every other row is the default call's
    assert with_embed.filter(pl.col("layer") == -1).height == want.height // demo.n_layers
    assert_frame_equal(with_embed.filter(pl.col("layer") >= 0), want, check_row_order=False)
    embed_record = read_tool_records(reader.layout)["logit_lens"]
    assert embed_record.params == {"include_embed": True}  # replaced, as analyze does

    real, calls = runner.analyze, []

    def raced(run, tool, params, store):
        """The real analyze, then (once) a concurrent call's record put back over it,
        this call's files deleted, as a concurrent analyze finishing later does."""
        result = real(run, tool, params, store=store)
        calls.append(params)
        if len(calls) == 1:
            ours = read_tool_records(reader.layout)["logit_lens"]
            writer = RunWriter.for_layout(reader.layout)
            writer.record_tool("logit_lens", embed_record)
            writer.remove_results(ours.files)
        return result

    monkeypatch.setattr(runner, "analyze", raced)
    again = lens.run(run=run_id, include_embed=False)
    assert calls == [{"include_embed": False}] * 2  # raced once, then computed again
    assert_frame_equal(again, want, check_row_order=False)
    assert read_tool_records(reader.layout)["logit_lens"].params == {"include_embed": False}


# ---------------------------------------------------------------------- pickling


def test_the_tools_pickle_after_a_live_tool_ran(tiny):
    """A live tool caches the bench's LiveModel (its holder has a lock): the tools still
    pickle (``exp.map`` sends the bench to Ray), one shared model, rebuilt on use."""
    tools = builtin_tools(tiny, None)
    profile = {"seq_len": 4, "batch_size": 1, "repeats": 1, "warmup": 0}
    first = tools["profile_model"].run(**profile)
    here = tools["logit_lens"].here
    assert "live" in vars(here) and len(here.vocab) == 64  # both cached now
    with pytest.raises(TypeError, match="lock"):
        pickle.dumps(here.live)  # why ModelHere drops it
    back = pickle.loads(pickle.dumps(tools))
    again = back["profile_model"]
    assert again.here is back["write_read"].here and "live" not in vars(again.here)
    assert back["knowledge"] is back["k_prober"]
    fixed = ["module", "kind", "layer", "params", "flops_per_token", "activation_bytes_per_token"]
    assert_frame_equal(again.run(**profile).select(fixed), first.select(fixed))
    # the profile's parameters, by construction: every parameter of the model once
    assert first["params"].sum() == sum(p.numel() for p in tiny.model.parameters())
    assert again.here.vocab.tolist() == here.vocab.tolist()


# ------------------------------------------------------------------- refusals


def test_bad_tool_inputs_are_one_clear_line(tiny, demo, bench_store, harvested):
    store, _run_id = bench_store
    tools = builtin_tools(tiny, store)
    kg = builtin_tools(demo, store)["kg_extractor"]
    cases = [
        (lambda: tools["logit_lens"].run(["some text"]), ToolError, "has no tokenizer"),
        (lambda: tools["logit_lens"].run([[1, 2, 64]]), DataError, "token id 64, outside"),
        (lambda: tools["logit_lens"].run(), ToolError, "give inputs="),
        (lambda: tools["logit_lens"].run([[1]], run="x"), ToolError, "not both"),
        (lambda: tools["logit_lens"].run([[1]], bogus=1), ToolError, "bogus"),
        (
            lambda: kg.run([{"prompt": "the capital of france is", "subject": "france"}]),
            DataError,
            "lacks column(s) relation, answer",
        ),
        (lambda: kg.run(["france has its capital in"]), DataError, "columns prompt, subject"),
        (lambda: kg.run(), ToolError, "runs on prompts"),
        (
            lambda: tools["logit_lens"].run(run=str(harvested[2].run_dir)),
            ToolError,
            "not the bench's store",
        ),
    ]
    for call, kind, words in cases:
        with pytest.raises(kind) as caught:
            call()
        assert words in str(caught.value), str(caught.value)
        assert "\n" not in str(caught.value)


def _assert_rows_equal(got: pl.DataFrame, want: pl.DataFrame, keys: list[str]) -> None:
    """The same rows (by ``keys``), every column but run_id, floats to 1e-5."""
    got, want = (f.drop("run_id", strict=False).sort(keys) for f in (got, want))
    assert_frame_equal(got, want.select(got.columns), check_exact=False, rel_tol=1e-5, abs_tol=1e-6)
