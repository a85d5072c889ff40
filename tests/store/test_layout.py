"""Store layout: hook families, store marker, run paths, run resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arrakis_ray.errors import StoreError, UnknownHookError
from arrakis_ray.store.layout import (
    STORE_MARKER,
    RunLayout,
    family_kind,
    hook_family,
    hook_layer,
    init_store,
    open_store,
    resolve_run,
)


@pytest.mark.parametrize(
    ("hook", "family", "kind"),
    [
        ("blocks.3.hook_resid_post", "resid_post", "dense"),
        ("blocks.0.hook_resid_pre", "resid_pre", "dense"),
        ("blocks.11.hook_resid_mid", "resid_mid", "dense"),
        ("blocks.3.hook_attn_out", "attn_out", "dense"),
        ("blocks.3.hook_mlp_out", "mlp_out", "dense"),
        ("blocks.3.attn.hook_q", "attn_q", "head"),
        ("blocks.3.attn.hook_k", "attn_k", "head"),
        ("blocks.3.attn.hook_v", "attn_v", "head"),
        ("blocks.3.attn.hook_z", "attn_z", "head"),
        ("blocks.3.attn.hook_pattern", "attn_pattern", "pattern"),
        ("blocks.3.mlp.hook_pre", "mlp_pre", "dense"),
        ("blocks.3.mlp.hook_post", "mlp_post", "dense"),
        ("hook_embed", "embed", "dense"),
        ("hook_pos_embed", "pos_embed", "dense"),
        ("ln_final.hook_normalized", "ln_final", "dense"),
        ("ln_final.hook_scale", "ln_final_scale", "dense"),
        ("logits", "logits", "dense"),
    ],
)
def test_hook_family(hook: str, family: str, kind: str) -> None:
    assert hook_family(hook) == family
    assert family_kind(family) == kind


@pytest.mark.parametrize(
    "hook", ["hook_resid_post", "blocks.3.attn.hook_out", "blocks.x.hook_resid_post", "blocks.3"]
)
def test_hook_family_unknown(hook: str) -> None:
    with pytest.raises(UnknownHookError, match="maps to no stored family"):
        hook_family(hook)


def test_hook_layer() -> None:
    assert hook_layer("hook_embed", 4) == -1
    assert hook_layer("blocks.2.mlp.hook_post", 4) == 2
    assert hook_layer("ln_final.hook_normalized", 4) == 4
    assert hook_layer("logits", 4) == 4


def test_init_store_marker_and_idempotence(tmp_path: Path) -> None:
    root = init_store(tmp_path / "a" / "store")
    assert json.loads((root / STORE_MARKER).read_text()) == {
        "format": "arrakis-ray-store",
        "version": 3,
    }
    (root / "runs" / "r1").mkdir()
    assert init_store(root) == root  # an existing store is opened, not reset
    assert (root / "runs" / "r1").is_dir()
    assert open_store(root) == root


def test_init_store_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="non-empty directory without arrakis-store.json"):
        init_store(tmp_path)
    assert not (tmp_path / STORE_MARKER).exists()
    with pytest.raises(StoreError, match="not a directory"):
        init_store(tmp_path / "notes.txt")


def test_open_store_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nope")
    with pytest.raises(StoreError) as e:
        open_store(tmp_path)
    assert str(e.value) == f"{tmp_path} is not an arrakis-ray store (no arrakis-store.json)"
    (tmp_path / STORE_MARKER).write_text('{"format": "arrakis-ray-store", "version": 9}')
    with pytest.raises(StoreError, match="version 9 is newer"):
        open_store(tmp_path)


def test_run_layout_paths(tmp_path: Path) -> None:
    run = RunLayout(tmp_path, "abc123")
    assert run.root == tmp_path / "runs" / "abc123"
    assert run.manifest_path == run.root / "manifest.json"
    assert run.vocab_path == run.root / "vocab.parquet"
    assert run.shard_file(run.tokens_dir, 7) == run.root / "tokens" / "shard-00007.parquet"
    assert run.activation_dir("attn_q") == run.root / "activations" / "attn_q"
    assert run.results_dir("logit_lens") == run.root / "results" / "logit_lens"
    assert run.completion_marker(3) == run.root / "completions" / "shard-00003.json"
    with pytest.raises(UnknownHookError):
        run.activation_dir("resid")
    for bad in ("../x", "", "a/b", ".hidden"):
        with pytest.raises(StoreError, match="invalid run id"):
            RunLayout(tmp_path, bad)


def test_completed_shards(tmp_path: Path) -> None:
    run = RunLayout(tmp_path, "r")
    assert run.completed_shards() == set()
    run.completions_dir.mkdir(parents=True)
    for shard in (0, 2, 11):
        run.completion_marker(shard).touch()
    (run.completions_dir / ".shard-00004.json.tmp-1-ab").touch()
    (run.completions_dir / "shard-00005.done").touch()  # a layout-2 marker
    assert run.completed_shards() == {0, 2, 11}


def test_resolve_run(tmp_path: Path) -> None:
    root = init_store(tmp_path / "store")
    for run_id in ("aaa111", "aab222", "bbb333"):
        (root / "runs" / run_id).mkdir()
    by_dir = resolve_run(root / "runs" / "bbb333")
    assert (by_dir.store_root, by_dir.run_id) == (root, "bbb333")
    assert resolve_run("bbb333", root).root == root / "runs" / "bbb333"
    assert resolve_run("bb", root).run_id == "bbb333"  # unique prefix
    with pytest.raises(StoreError, match="ambiguous.*aaa111, aab222"):
        resolve_run("aa", root)
    with pytest.raises(StoreError, match=r"no run 'zzz'.*runs: aaa111, aab222, bbb333"):
        resolve_run("zzz", root)
    with pytest.raises(StoreError, match="give the store"):
        resolve_run("zzz")
    with pytest.raises(StoreError, match="not a run directory"):
        resolve_run(tmp_path)
