"""The typed run contract: plan_run, RunManifest (and its schema), tool records.

Values are checked against what the harvest wrote and against the model itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import replace

import jsonschema
import pytest
from support import DEMO_DATA, REPO, pipeline_dict

from arrakis_ray.config import pipeline_from_dict
from arrakis_ray.errors import StoreError
from arrakis_ray.harvest.plan import plan_run
from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.manifest import RunManifest, json_schema, read_manifest, write_manifest
from arrakis_ray.store.reader import RunReader


def test_plan_run_names_the_run_the_harvest_made(harvested, hf_model):
    config, store, result = harvested
    plan = plan_run(config)
    manifest = read_manifest(RunLayout(store, result.run_id))
    assert plan.run_id == result.run_id
    assert plan.hooks == manifest.hooks
    assert plan.shards == manifest.shard_plan
    assert plan.shape == manifest.shape
    assert manifest.harvest.bytes <= plan.predicted_bytes
    hf = hf_model[0].config  # the shape, read another way: HF's own config
    shape = plan.shape
    assert (shape.n_layers, shape.d_model, shape.n_heads) == (
        hf.n_layer,
        hf.n_embd,
        hf.n_head,
    )
    assert shape.d_mlp == (hf.n_inner or 4 * hf.n_embd)
    assert shape.d_head * shape.n_heads == hf.n_embd
    assert shape.d_vocab == hf.vocab_size
    assert (shape.norm, shape.positional, shape.parallel_blocks) == ("layernorm", "learned", False)


def test_plan_run_starts_no_ray_and_is_deterministic():
    code = (
        "import sys; from arrakis_ray.config import load_pipeline; "
        "from arrakis_ray.harvest.plan import plan_run; "
        f"c = load_pipeline({str(REPO / 'pipelines' / 'demo.yaml')!r}); "
        "print(plan_run(c).run_id, plan_run(c).run_id, 'ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, second, ray_loaded = out.stdout.split()
    assert first == second and ray_loaded == "False"


def test_plan_run_tells_configs_apart():
    base = pipeline_from_dict(pipeline_dict(hooks=["blocks.*.hook_resid_post"]))
    other_hooks = pipeline_from_dict(pipeline_dict(hooks=["blocks.0.hook_resid_post"]))
    staged = pipeline_from_dict(pipeline_dict(hooks=["blocks.*.hook_resid_post"], stages=2))
    ids = {plan_run(c).run_id for c in (base, other_hooks, staged)}
    assert len(ids) == 3
    assert plan_run(staged).stages == ((0, 2), (2, 4))
    # one layer of one family: a quarter of the values of all four layers
    assert plan_run(other_hooks).predicted_bytes < plan_run(base).predicted_bytes


def test_plan_run_sees_a_file_changed_in_place(tmp_path):
    data = tmp_path / "facts.jsonl"
    shutil.copy(DEMO_DATA, data)
    raw = pipeline_dict(hooks=["blocks.*.hook_resid_post"])
    raw["data"]["path"] = str(data)
    first = plan_run(pipeline_from_dict(raw)).run_id
    st = data.stat()  # same size, mtime put back: as cp -p or rsync -t leave a file
    data.write_bytes(data.read_bytes().replace(b"paris", b"parix", 1))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert plan_run(pipeline_from_dict(raw)).run_id != first


def test_plan_run_takes_a_config_built_in_python_with_lists():
    config = pipeline_from_dict(pipeline_dict(hooks=["blocks.*.hook_resid_post"]))
    listy = replace(
        config,
        harvest=replace(config.harvest, hooks=list(config.harvest.hooks)),
        data=replace(config.data, keep_columns=list(config.data.keep_columns)),
    )
    assert plan_run(listy).run_id == plan_run(config).run_id


def test_manifest_round_trips_and_follows_its_schema(harvested):
    _, store, result = harvested
    layout = RunLayout(store, result.run_id)
    on_disk = json.loads(layout.manifest_path.read_text())
    jsonschema.validate(on_disk, json_schema())
    manifest = RunManifest.from_json(on_disk, "test")
    assert RunManifest.from_json(manifest.to_json(), "again") == manifest
    assert on_disk["harvest"]["n_tokens"] == manifest.harvest.n_tokens > 0
    written = json.loads((REPO / "schemas" / "manifest.v2.schema.json").read_text())
    assert written == json_schema(), "regenerate schemas/manifest.v2.schema.json"


def test_a_version_1_manifest_is_upgraded_on_read(harvested, tmp_path):
    _, store, result = harvested
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    layout = RunLayout(copy, result.run_id)
    new = read_manifest(layout)
    shape = new.shape
    old = {  # what the harvest wrote before the manifest had a type
        "run_id": new.run_id,
        "name": new.name,
        "status": "complete",
        "created_at": new.created_at,
        "config": new.config,
        "hooks": list(new.hooks),
        "model": {
            "source": "zoo:facts-gpt2",
            "arch": shape.arch,
            "n_layers": shape.n_layers,
            "d_model": shape.d_model,
            "n_heads": shape.n_heads,
            "d_head": shape.d_head,
            "d_mlp": shape.d_mlp,
            "vocab_size": shape.d_vocab,
            "fingerprint": new.model_fingerprint,
        },
        "data": {
            "path": "x.jsonl",
            "fingerprint": "f",
            "n_documents": 40,
            "n_sequences": 40,
            "n_shards": 3,
        },  # fmt: skip
        "shard_plan": [s.to_dict() for s in new.shard_plan],
        "stages": [[0, 4]],
        "schemas": {"tokens": 1},
        "harvest": {
            "resumed": False,
            "predicted_max_bytes": 1,
            "n_tokens": 7,
            "calls": [
                {
                    "finished_at": "t",
                    "shards": 3,
                    "tokens": 7,
                    "bytes": 9,
                    "sequences": 40,
                    "seconds": 1.5,
                }
            ],
        },  # fmt: skip
        "results": {
            "logit_lens": {
                "params": {},
                "outputs": ["logit_lens"],
                "schema_version": 1,
                "shards": 3,
                "rows": 11,
                "seconds": 0.5,
                "finished_at": "t",
            }
        },  # fmt: skip
        "versions": {},
    }
    layout.manifest_path.write_text(json.dumps(old))
    upgraded = read_manifest(layout)
    assert upgraded.shape == shape  # the parts v1 lacked come from the architecture
    assert upgraded.hooks == new.hooks and upgraded.shard_plan == new.shard_plan
    assert upgraded.harvest.n_tokens == 7 and upgraded.harvest.tokens_per_s == round(7 / 1.5, 1)
    assert upgraded.results["logit_lens"].rows > 0
    # the files are where the manifest's compaction says (migrate records it for a
    # layout-1 store, whose manifests are version 1)
    compacted = upgraded.with_changes(shards_per_part=new.shards_per_part)
    assert RunReader(layout, compacted).activations("resid_post", 0, layer=2).num_rows > 0
    # a resume rewrites the manifest as v2: the inline tool records move to tools/
    write_manifest(layout, upgraded)
    assert json.loads(layout.manifest_path.read_text())["version"] == 2
    assert read_manifest(layout).results == upgraded.results


def test_a_manifest_from_the_future_or_broken_is_one_clear_error(harvested, tmp_path):
    _, store, result = harvested
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    layout = RunLayout(copy, result.run_id)
    data = json.loads(layout.manifest_path.read_text())
    layout.manifest_path.write_text(json.dumps({**data, "version": 9}))
    with pytest.raises(StoreError, match="version 9 is newer"):
        read_manifest(layout)
    broken = {**data, "shape": {**data["shape"], "n_layers": "four"}}
    layout.manifest_path.write_text(json.dumps(broken))
    with pytest.raises(StoreError, match=r"shape\.n_layers: expected an integer"):
        read_manifest(layout)


def test_two_analyze_calls_at_once_both_keep_their_record(harvested, tmp_path):
    from arrakis_ray.tools.runner import analyze

    _, store, result = harvested
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    layout = RunLayout(copy, result.run_id)
    before = layout.manifest_path.read_bytes()
    errors = []

    def run(tool):
        try:
            analyze(layout.root, tool)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in ("residual_tools", "logit_lens")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    results = read_manifest(layout).results
    assert {"residual_tools", "logit_lens"} <= set(results)
    assert results["logit_lens"].rows == RunReader(layout).result("logit_lens").num_rows
    # a tool call never rewrites the harvest's manifest: no read-modify-write to race
    assert layout.manifest_path.read_bytes() == before


def test_the_reader_gives_a_layer_as_a_sorted_matrix(harvested):
    _, _, result = harvested
    reader = RunReader.open(result.run_dir)
    seq, pos, x = reader.matrix("resid_post", 2, 0)
    table = reader.activations("resid_post", 0)  # every layer, read the plain way
    rows = [r for r in table.to_pylist() if r["layer"] == 2]
    rows.sort(key=lambda r: (r["seq_id"], r["pos"]))
    assert seq.tolist() == [r["seq_id"] for r in rows] and pos.tolist() == [r["pos"] for r in rows]
    width = reader.shape.d_model
    assert x.shape == (len(rows), width) and x.dtype.name == "float32"
    assert x[:, width - 1].tolist() == [r[f"d{width - 1}"] for r in rows]
