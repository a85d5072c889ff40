"""The harvest writes exactly what the model computes, once per (sequence, position, hook)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from support import DEMO_DATA, family_table, pipeline_dict, store_snapshot

from arrakis_ray.config import pipeline_from_dict
from arrakis_ray.harvest.driver import harvest
from arrakis_ray.store import compact
from arrakis_ray.store.catalog import Store
from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.manifest import read_manifest
from arrakis_ray.store.reader import RunReader


def _family(result, family: str):
    return family_table(result.run_dir, family)


def _vectors(table, layer: int, seq_id: int) -> np.ndarray:
    """[pos, d] of one sequence at one layer, ordered by position."""
    rows = table.filter(pc.and_(pc.equal(table["layer"], layer), pc.equal(table["seq_id"], seq_id)))
    rows = rows.sort_by("pos")
    dims = [c for c in rows.column_names if c.startswith("d") and c[1:].isdigit()]
    return np.column_stack([rows[c].to_numpy() for c in dims])


def _texts(n: int) -> list[str]:
    with open(DEMO_DATA) as f:
        return [json.loads(line)["text"] for line in f if line.strip()][:n]


def _reference_ids(tokenizer, text: str, context: int) -> list[int]:
    ids = tokenizer(text)["input_ids"]
    if ids[0] != tokenizer.bos_token_id:
        ids = [tokenizer.bos_token_id, *ids]
    return ids[:context]


@pytest.mark.parametrize("seq_id", [0, 17, 39])
def test_stored_activations_equal_hf_outputs(harvested, hf_model, seq_id):
    config, _, result = harvested
    model, tokenizer = hf_model
    ids = _reference_ids(tokenizer, _texts(40)[seq_id], config.data.context_length)
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
    n_layers = model.config.n_layer
    tol = dict(rtol=1e-4, atol=1e-4)

    tokens = pq.read_table(result.run_dir / "tokens").filter(pc.equal(pc.field("seq_id"), seq_id))
    assert tokens.sort_by("pos")["token_id"].to_pylist() == ids

    resid_pre, resid_post = _family(result, "resid_pre"), _family(result, "resid_post")
    for layer in range(n_layers):
        np.testing.assert_allclose(
            _vectors(resid_pre, layer, seq_id), out.hidden_states[layer][0].numpy(), **tol
        )
    for layer in range(n_layers - 1):
        np.testing.assert_allclose(
            _vectors(resid_post, layer, seq_id), out.hidden_states[layer + 1][0].numpy(), **tol
        )
    # HF's last hidden state is taken after the final norm
    np.testing.assert_allclose(
        _vectors(_family(result, "ln_final"), n_layers, seq_id),
        out.hidden_states[-1][0].numpy(),
        **tol,
    )
    np.testing.assert_allclose(
        _vectors(_family(result, "logits"), n_layers, seq_id), out.logits[0].numpy(), **tol
    )
    embed = _vectors(_family(result, "embed"), -1, seq_id)
    pos_embed = _vectors(_family(result, "pos_embed"), -1, seq_id)
    np.testing.assert_allclose(embed + pos_embed, out.hidden_states[0][0].numpy(), **tol)

    patterns = _family(result, "attn_pattern")
    for layer in range(n_layers):
        rows = patterns.filter(
            pc.and_(pc.equal(patterns["layer"], layer), pc.equal(patterns["seq_id"], seq_id))
        )
        dense = np.zeros_like(out.attentions[layer][0].numpy())
        dense[rows["head"].to_numpy(), rows["q_pos"].to_numpy(), rows["k_pos"].to_numpy()] = rows[
            "weight"
        ].to_numpy()
        np.testing.assert_allclose(dense, out.attentions[layer][0].numpy(), **tol)


def test_every_token_and_hook_row_exactly_once(harvested):
    config, _, result = harvested
    texts = _texts(40)
    tokens = pq.read_table(result.run_dir / "tokens")
    keys = set(zip(tokens["seq_id"].to_pylist(), tokens["pos"].to_pylist(), strict=True))
    assert len(keys) == tokens.num_rows  # no duplicates
    assert sorted({s for s, _ in keys}) == list(range(len(texts)))
    n_layers = read_manifest(RunLayout(result.run_dir.parents[1], result.run_id)).shape.n_layers
    for family in ("resid_post", "mlp_post", "resid_mid"):
        table = _family(result, family)
        assert table.num_rows == n_layers * tokens.num_rows
        for layer in range(n_layers):
            rows = table.filter(pc.equal(table["layer"], layer))
            assert (
                set(zip(rows["seq_id"].to_pylist(), rows["pos"].to_pylist(), strict=True)) == keys
            )
    heads = _family(result, "attn_z")
    assert heads.num_rows == n_layers * tokens.num_rows * 4  # 4 heads in the demo model


def test_manifest_records_the_run(harvested):
    config, store, result = harvested
    manifest = read_manifest(RunLayout(store, result.run_id))
    assert manifest.status == "complete"
    assert manifest.run_id == result.run_id
    assert len(manifest.shard_plan) == 3  # 40 documents, 16 per shard
    tokens = pq.read_table(result.run_dir / "tokens").num_rows
    assert manifest.harvest.n_tokens == tokens
    assert manifest.harvest.tokens_per_s > 0
    assert "blocks.1.hook_resid_post" in manifest.hooks
    assert manifest.results["logit_lens"].rows > 0
    # the size printed before the run is an upper bound of what it wrote
    assert manifest.harvest.bytes <= manifest.harvest.predicted_max_bytes


def test_rerun_is_a_noop_a_partial_run_resumes_and_compaction_keeps_every_row(
    ray_session, tmp_path, monkeypatch
):
    store = tmp_path / "store"
    raw = pipeline_dict(hooks=["blocks.*.hook_resid_post"], shard_size=8, compact=False)
    raw["data"]["max_documents"] = 20
    config = pipeline_from_dict(raw)
    first = harvest(config, store)
    assert (first.shards_done, first.shards_total) == (3, 3)
    complete = family_table(first.run_dir, "resid_post").sort_by(
        [("layer", "ascending"), ("seq_id", "ascending"), ("pos", "ascending")]
    )

    before = store_snapshot(store)
    again = harvest(config, store)
    assert again.status == "already complete" and again.shards_done == 0
    assert store_snapshot(store) == before

    # lose shard 1 as a killed run would: no completion marker, files gone or partial
    layout = RunLayout(store, first.run_id)
    layout.completion_marker(1).unlink()
    layout.shard_file(layout.block_dir("resid_post", 2, 0), 1).unlink()
    shutil.copy(layout.shard_file(layout.tokens_dir, 0), layout.shard_file(layout.tokens_dir, 1))
    resumed = harvest(config, store)
    assert (resumed.run_id, resumed.shards_done) == (first.run_id, 1)
    assert read_manifest(layout).harvest.resumed is True
    table = family_table(first.run_dir, "resid_post").sort_by(
        [("layer", "ascending"), ("seq_id", "ascending"), ("pos", "ascending")]
    )
    assert table.equals(complete)
    tokens = pq.read_table(first.run_dir / "tokens")
    assert sorted(set(tokens["seq_id"].to_pylist())) == list(range(20))

    # the same config with compaction (the default) finds the run complete and compacts
    # it (the driver decides: 3 shards are made to count as many): one part per
    # directory, the same rows, shard by shard and in SQL
    monkeypatch.setattr(compact, "MIN_SHARDS", 2)
    compacted = harvest(
        pipeline_from_dict(raw | {"harvest": raw["harvest"] | {"compact": True}}), store
    )
    assert (compacted.run_id, compacted.status) == (first.run_id, "already complete")
    assert read_manifest(layout).shards_per_part == 3
    files = sorted(p.name for p in layout.block_dir("resid_post", 0, 0).iterdir())
    assert files == ["part-00000.parquet"]
    assert (
        family_table(first.run_dir, "resid_post")
        .sort_by([("layer", "ascending"), ("seq_id", "ascending"), ("pos", "ascending")])
        .equals(complete)
    )
    shard_1 = RunReader(layout).activations("resid_post", 1, layer=3)
    assert sorted(set(shard_1["seq_id"].to_pylist())) == list(range(8, 16))
    with Store(store) as s:
        assert s.sql("SELECT count(*) AS n FROM act_resid_post")["n"][0] == complete.num_rows


def test_automatic_shard_size_targets_bytes_per_shard():
    from arrakis_ray.harvest import plan

    raw = pipeline_dict(hooks=["blocks.*.hook_resid_post"], storage_dtype="float16")
    del raw["harvest"]["shard_size"]
    raw["data"]["max_documents"] = None  # all 400 documents
    config = pipeline_from_dict(raw)
    assert config.harvest.shard_size is None
    shapes = plan.hook_shapes(config)
    # per sequence: 24 tokens x (40 B of tokens table + 4 layers x (128 x 2 B + 14 B of keys))
    per_sequence = 24 * (40 + 4 * (128 * 2 + 14))
    assert plan.predict_bytes(shapes, 24, 24, "float16") == per_sequence
    # 128 MiB would be ~20,700 such documents: clamped to 4,096, then to 400 / 4 = 100 so
    # that the corpus makes 4 shards
    assert plan.shard_size_for(per_sequence) == 4096
    assert plan.auto_shard_size(config, shapes) == 100
    # the actor count does not change the shards (nor the run id): a rerun with other
    # resources resumes
    two_actors = pipeline_from_dict({**raw, "harvest": {**raw["harvest"], "actors": 2}})
    assert plan.auto_shard_size(two_actors, shapes) == 100


def test_automatic_shard_size_of_a_large_corpus(tmp_path):
    from arrakis_ray.harvest import plan

    corpus = tmp_path / "big.jsonl"
    corpus.write_text("".join('{"text": "the capital of france is paris ."}\n' * 20_000))
    raw = pipeline_dict(hooks=["blocks.*.mlp.hook_post"], storage_dtype="float16")
    del raw["harvest"]["shard_size"]
    raw["data"] = {"path": str(corpus), "context_length": 128}
    config = pipeline_from_dict(raw)
    shapes = plan.hook_shapes(config)
    per_doc = plan.predict_bytes(shapes, 128, 128, "float16")
    assert per_doc == 128 * (40 + 4 * (512 * 2 + 14))
    assert plan.auto_shard_size(config, shapes) == plan.SHARD_BYTES // per_doc == 250
    # packed: a document's tokens are estimated from its bytes at the tokens per byte
    # of a tokenized sample: 7 words plus BOS and EOS for each 45-byte line
    packed = pipeline_from_dict({**raw, "data": {**raw["data"], "mode": "packed"}})
    per_packed_doc = plan.predict_bytes(shapes, 7 + 2, 128, "float16")
    assert plan.auto_shard_size(packed, shapes) == plan.SHARD_BYTES // per_packed_doc == 3557


def test_automatic_shard_size_is_clamped(monkeypatch):
    from arrakis_ray.harvest import plan

    raw = pipeline_dict(hooks=["blocks.*.hook_resid_post"])
    del raw["harvest"]["shard_size"]
    raw["data"]["max_documents"] = None
    config = pipeline_from_dict(raw)
    shapes = plan.hook_shapes(config)
    monkeypatch.setattr(plan, "SHARD_BYTES", 1000)  # less than one sequence
    assert plan.auto_shard_size(config, shapes) == plan.SHARD_SIZE_RANGE[0]


def test_harvest_resolves_the_shard_size_before_the_run_id(ray_session, tmp_path):
    raw = pipeline_dict(hooks=["blocks.*.hook_resid_post"])
    del raw["harvest"]["shard_size"]
    config = pipeline_from_dict(raw)
    first = harvest(config, tmp_path / "store")
    # 40 documents, one actor: 4 shards of 10
    assert (first.shards_total, first.status) == (4, "complete")
    manifest = read_manifest(RunLayout(tmp_path / "store", first.run_id))
    assert manifest.config["harvest"]["shard_size"] == 10
    again = harvest(config, tmp_path / "store")
    assert (again.run_id, again.status) == (first.run_id, "already complete")
