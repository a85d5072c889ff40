"""Packed and per-document tokenization, several replicas, and failures that name the shard."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from support import DEMO_DATA, family_table, pipeline_dict

from arrakis_ray.config import pipeline_from_dict
from arrakis_ray.errors import DataError
from arrakis_ray.harvest.driver import harvest
from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.manifest import read_manifest


def _texts(n):
    with open(DEMO_DATA) as f:
        return [json.loads(line)["text"] for line in f][:n]


def test_packed_mode_keeps_every_document_token_once_with_its_source(
    ray_session, tmp_path, hf_model
):
    model, tokenizer = hf_model
    raw = pipeline_dict(hooks=["blocks.*.hook_resid_post"], shard_size=10)
    raw["data"].update({"mode": "packed", "context_length": 16, "max_documents": 20})
    result = harvest(pipeline_from_dict(raw), tmp_path / "store")
    tokens = pq.read_table(result.run_dir / "tokens").to_pandas()
    # every document's tokens, <bos> text <eos>, exactly once, in order
    for doc_id, text in enumerate(_texts(20)):
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        rows = tokens[tokens.doc_id == doc_id].sort_values("doc_pos")
        assert rows.token_id.tolist() == ids
        assert rows.doc_pos.tolist() == list(range(len(ids)))
    # sequences are full-length except the last one of each shard
    lengths = tokens.groupby("seq_id").size()
    assert (lengths.iloc[:-1][lengths.index[:-1] // 2**20 == 0] <= 16).all()
    assert sorted(set(lengths))[-1] == 16
    manifest = read_manifest(RunLayout(tmp_path / "store", result.run_id))
    assert manifest.data.n_sequences == len(lengths)
    # a packed sequence spans documents and its activations are the model's on that chunk
    seq = int(lengths.index[1])
    chunk = tokens[tokens.seq_id == seq].sort_values("pos")
    assert chunk.doc_id.nunique() > 1
    with torch.no_grad():
        out = model(torch.tensor([chunk.token_id.tolist()]), output_hidden_states=True)
    resid = family_table(result.run_dir, "resid_post")
    rows = resid.filter(pc.and_(pc.equal(resid["seq_id"], seq), pc.equal(resid["layer"], 1)))
    rows = rows.sort_by("pos")
    dims = [c for c in rows.column_names if c[0] == "d" and c[1:].isdigit()]
    np.testing.assert_allclose(
        np.column_stack([rows[c].to_numpy() for c in dims]),
        out.hidden_states[2][0].numpy(),
        rtol=1e-4,
        atol=1e-4,
    )


def test_two_replicas_store_every_row_exactly_once(harvested, tmp_path):
    _, _, single = harvested
    raw = pipeline_dict(hooks=["blocks.*.hook_resid_post"], actors=2, shard_size=5)
    result = harvest(pipeline_from_dict(raw), tmp_path / "store")
    assert result.shards_total == 8
    tokens = pq.read_table(result.run_dir / "tokens")
    expected = pq.read_table(single.run_dir / "tokens")
    keys = set(zip(tokens["seq_id"].to_pylist(), tokens["pos"].to_pylist(), strict=True))
    assert len(keys) == tokens.num_rows == expected.num_rows
    resid = family_table(result.run_dir, "resid_post")
    assert resid.num_rows == 4 * tokens.num_rows


def test_bad_data_fails_loudly_naming_the_shard_and_keeps_completed_shards(ray_session, tmp_path):
    data = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": t}) for t in _texts(12)]
    lines[9] = "{not json"
    data.write_text("\n".join(lines) + "\n")
    raw = pipeline_dict(hooks=["blocks.*.hook_resid_post"], shard_size=4)
    raw["data"] = {"path": str(data), "context_length": 24}
    with pytest.raises(DataError, match=r"shard 2 .*documents 8-11.*docs.jsonl:10: not valid JSON"):
        harvest(pipeline_from_dict(raw), tmp_path / "store")
    run_dir = next((tmp_path / "store" / "runs").iterdir())
    layout = RunLayout(tmp_path / "store", run_dir.name)
    manifest = read_manifest(layout)
    assert manifest.status == "failed" and "not valid JSON" in manifest.error
    # shards finished before the failure keep their files and markers
    for shard in layout.completed_shards():
        for layer in range(4):
            assert layout.shard_file(layout.block_dir("resid_post", layer, 0), shard).exists()
