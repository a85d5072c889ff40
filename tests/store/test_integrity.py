"""A store detects its own damage: every answer is right or refused, and `verify
--repair` re-harvests exactly the damaged shards (the cases of the store-integrity issue).

One small harvest per module (3 shards), copied for each test that damages it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support import pipeline_dict, store_snapshot

from arrakis_ray.config import pipeline_from_dict
from arrakis_ray.errors import StoreError
from arrakis_ray.harvest.driver import harvest
from arrakis_ray.harvest.repair import verify_store
from arrakis_ray.store import compact
from arrakis_ray.store.catalog import Store
from arrakis_ray.store.layout import STORE_MARKER, RunLayout
from arrakis_ray.store.lease import harvest_lease
from arrakis_ray.store.manifest import read_manifest, write_manifest
from arrakis_ray.store.migrate import migrate_store
from arrakis_ray.store.reader import RunReader

HOOKS = ["blocks.*.hook_resid_post", "blocks.*.attn.hook_z"]


def _config(compacted: bool = False):
    raw = pipeline_dict(hooks=HOOKS, compact=compacted)
    return pipeline_from_dict(raw)


@pytest.fixture(scope="module")
def pristine(ray_session, tmp_path_factory):
    """(store, run id) of a finished 3-shard harvest, never changed."""
    store = tmp_path_factory.mktemp("integrity") / "store"
    result = harvest(_config(), store)
    return store, result.run_id


@pytest.fixture(scope="module")
def pristine_compacted(ray_session, tmp_path_factory):
    store = tmp_path_factory.mktemp("integrity-parts") / "store"
    saved = compact.MIN_SHARDS
    compact.MIN_SHARDS = 2  # 3 shards count as many: one part per directory
    try:
        result = harvest(_config(compacted=True), store)
    finally:
        compact.MIN_SHARDS = saved
    assert read_manifest(RunLayout(store, result.run_id)).shards_per_part
    return store, result.run_id


def _copy(pristine, tmp_path: Path) -> tuple[Path, RunLayout]:
    source, run_id = pristine
    store = tmp_path / "store"
    shutil.copytree(source, store)
    return store, RunLayout(store, run_id)


def _answers(store: Path) -> dict:
    """What the store answers: counts and sums that any damage would change."""
    with Store(store) as s:
        return {
            "tokens": s.sql("SELECT count(*) AS n, sum(token_id) AS s FROM tokens").rows(),
            "resid": s.sql(
                "SELECT layer, count(*) AS n, round(sum(d0 + d7), 3) AS s "
                "FROM act_resid_post GROUP BY layer ORDER BY layer"
            ).rows(),
            "z": s.sql("SELECT count(*) AS n FROM act_attn_z").rows(),
        }


def test_a_deleted_file_is_refused_named_and_repaired(pristine, tmp_path: Path) -> None:
    expected = _answers(pristine[0])
    store, run = _copy(pristine, tmp_path)
    lost = run.shard_file(run.tokens_dir, 1)
    lost.unlink()
    before = store_snapshot(store)
    with pytest.raises(
        StoreError,
        match=r"damaged: .*tokens/shard-00001\.parquet: file is missing.*verify .* --repair",
    ):
        Store(store)
    # a rerun says so (it used to say "already complete" and never restore the file)
    with pytest.raises(StoreError, match=r"tokens/shard-00001\.parquet: file is missing"):
        harvest(_config(), store)
    (check,) = verify_store(store)
    assert not check.ok and [d.shards for d in check.damage] == [(1,)]
    assert store_snapshot(store) == before  # refusing and verifying change nothing
    (repaired,) = verify_store(store, repair=True)
    assert repaired.ok and repaired.repaired_shards == 1 and repaired.repair_error is None
    assert _answers(store) == expected


def test_strays_copies_and_orphans_are_ignored_and_reported(pristine, tmp_path: Path) -> None:
    expected = _answers(pristine[0])
    store, run = _copy(pristine, tmp_path)
    tokens = run.shard_file(run.tokens_dir, 0)
    shutil.copy(tokens, run.tokens_dir / "shard-00000 (copy).parquet")
    # another table's file, and a foreign 3-row file, under shard names
    block = run.block_dir("resid_post", 0, 0)
    shutil.copy(tokens, run.shard_file(block, 7))
    pq.write_table(pq.read_table(tokens).slice(0, 3), run.shard_file(run.tokens_dir, 9))
    orphan = run.tokens_dir / ".shard-00004.parquet.tmp-123-abcd"  # a killed writer's
    orphan.write_bytes(b"x" * 5000)
    assert _answers(store) == expected
    with Store(store) as s:
        (bytes_,) = s.sql("SELECT bytes FROM runs").row(0)
    pristine_run = RunLayout(pristine[0], pristine[1]).root
    assert bytes_ == sum(p.stat().st_size for p in pristine_run.rglob("*.parquet"))
    (check,) = verify_store(store)
    assert check.ok
    assert sorted(Path(p).name for p in check.strays) == [
        "shard-00000 (copy).parquet",
        "shard-00007.parquet",
        "shard-00009.parquet",
    ]
    assert check.orphans == [str(orphan)]
    verify_store(store, repair=True)
    assert not orphan.exists() and _answers(store) == expected


def test_bit_flips_swaps_and_other_metadata_are_caught(pristine, tmp_path: Path) -> None:
    store, run = _copy(pristine, tmp_path)
    path = run.shard_file(run.block_dir("resid_post", 1, 0), 0)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0x5A for b in data[middle : middle + 8])
    stat = path.stat()
    path.write_bytes(bytes(data))
    # edited in place: the size is the same, the mtime is newer than its inventory
    with pytest.raises(StoreError, match=r"shard-00000\.parquet: changed since it was written"):
        Store(store)
    # with its old mtime put back, opening (a stat) cannot tell; verify and pyarrow can
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (check,) = verify_store(store)
    assert [(Path(d.path).name, d.shards) for d in check.damage] == [("shard-00000.parquet", (0,))]
    assert "checksum differs" in check.damage[0].problem
    with pytest.raises(StoreError, match="CRC|could not read"):
        RunReader(run).activations("resid_post", 0, layer=1)
    # another valid file of the same schema swapped in
    other = run.shard_file(run.block_dir("resid_post", 0, 0), 2)
    shutil.copy(run.shard_file(run.block_dir("resid_post", 0, 0), 1), other)
    with pytest.raises(StoreError, match=r"layer=0/block=0/shard-00002\.parquet"):
        Store(store)


def test_another_schema_version_on_one_file_is_refused(pristine, tmp_path: Path) -> None:
    store, run = _copy(pristine, tmp_path)
    path = run.shard_file(run.block_dir("resid_post", 1, 0), 2)
    table = pq.read_table(path)
    meta = dict(table.schema.metadata) | {b"arrakis.schema_version": b"7"}
    pq.write_table(table.replace_schema_metadata(meta), path)
    with pytest.raises(StoreError, match=r"layer=1/block=0/shard-00002\.parquet"):
        Store(store)
    (check,) = verify_store(store)
    assert check.damage and check.damage[0].shards == (2,)


def test_totals_count_every_call_of_a_killed_and_resumed_harvest(pristine, tmp_path: Path) -> None:
    store, run = _copy(pristine, tmp_path)
    # as a driver killed after two shards leaves it: their inventories, no call record
    manifest = read_manifest(run)
    killed = replace(manifest.harvest, calls=())
    write_manifest(run, manifest.with_changes(status="running", harvest=killed))
    run.completion_marker(2).unlink()
    result = harvest(_config(), store)
    assert result.shards_done == 1
    calls = read_manifest(run).harvest.calls
    assert [c.shards for c in calls] == [2, 1] and all(c.seconds > 0 for c in calls)
    with Store(store) as s:
        (n_tokens, bytes_, per_s) = s.sql("SELECT n_tokens, bytes, tokens_per_s FROM runs").row(0)
        (count,) = s.sql("SELECT count(*) FROM tokens").row(0)
    assert n_tokens == count == sum(c.tokens for c in calls)
    assert bytes_ == sum(p.stat().st_size for p in run.root.rglob("*.parquet"))
    assert per_s == pytest.approx(count / sum(c.seconds for c in calls), abs=0.051)


def test_a_second_harvest_of_a_running_run_says_so(pristine, tmp_path: Path) -> None:
    store, run = _copy(pristine, tmp_path)
    run.completion_marker(2).unlink()
    before = store_snapshot(store)
    with harvest_lease(run), pytest.raises(StoreError, match="being harvested by another process"):
        harvest(_config(), store)
    assert store_snapshot(store) == before


def test_a_damaged_part_is_rebuilt_from_its_shards(pristine_compacted, tmp_path: Path) -> None:
    expected = _answers(pristine_compacted[0])
    store, run = _copy(pristine_compacted, tmp_path)
    part = run.part_file(run.block_dir("resid_post", 0, 0), 0)
    part.unlink()
    with pytest.raises(StoreError, match=r"layer=0/block=0/part-00000\.parquet: file is missing"):
        Store(store)
    (repaired,) = verify_store(store, repair=True)
    assert repaired.ok and repaired.repaired_shards == 3, repaired
    assert part.exists() and _answers(store) == expected
    assert not list(run.activations_root.rglob("shard-*.parquet"))  # parts only, again


def test_a_layout_2_store_is_refused_then_migrated(pristine_compacted, tmp_path: Path) -> None:
    expected = _answers(pristine_compacted[0])
    store, run = _copy(pristine_compacted, tmp_path)
    # back to layout 2: empty completion markers, no other inventories
    for marker in run.completions_dir.glob("shard-*.json"):
        marker.unlink()
        marker.with_suffix(".done").touch()
    for name in ("parts.json", "vocab.json"):
        (run.completions_dir / name).unlink()
    (store / STORE_MARKER).write_text(json.dumps({"format": "arrakis-ray-store", "version": 2}))
    with pytest.raises(StoreError, match=r"version 2 \(no file inventories\).*arrakis-ray migrate"):
        Store(store)
    done = migrate_store(store)
    assert done.shards_inventoried == 3
    assert _answers(store) == expected
    (check,) = verify_store(store)
    assert check.ok and not check.strays
    # a migrated run repaired: its calls mix the migration's (no id) and the repair's
    run.shard_file(run.tokens_dir, 1).unlink()
    (repaired,) = verify_store(store, repair=True)
    assert repaired.ok and repaired.repaired_shards == 1, repaired
    assert _answers(store) == expected


def test_a_lost_parts_inventory_rebuilds_every_part(pristine_compacted, tmp_path: Path) -> None:
    expected = _answers(pristine_compacted[0])
    store, run = _copy(pristine_compacted, tmp_path)
    (run.completions_dir / "parts.json").unlink()
    with pytest.raises(StoreError, match="damaged"):
        Store(store)
    (check,) = verify_store(store)
    assert [d.shards for d in check.damage][:1] == [(0, 1, 2)]  # no part can be trusted
    (repaired,) = verify_store(store, repair=True)
    assert repaired.ok and repaired.repaired_shards == 3, repaired
    assert _answers(store) == expected


def test_store_paths_with_glob_characters_read_only_their_own_files(pristine, tmp_path):
    expected = _answers(pristine[0])
    # siblings the paths would match as glob patterns, with other contents
    for sibling in ("br1store", "starXstore"):
        shutil.copytree(pristine[0], tmp_path / sibling)
        shutil.rmtree(tmp_path / sibling / "runs" / pristine[1] / "tokens")
    for name in ("br[1]store", "star*store"):
        shutil.copytree(pristine[0], tmp_path / name)
        assert _answers(tmp_path / name) == expected


def test_a_link_inside_the_store_is_refused(pristine, tmp_path: Path) -> None:
    store, run = _copy(pristine, tmp_path)
    (run.root / "results").mkdir(exist_ok=True)
    (run.root / "results" / "outside").symlink_to(tmp_path)
    with pytest.raises(StoreError, match=r"results/outside: a symbolic link inside the store"):
        Store(store)


def test_verify_on_the_command_line(pristine, tmp_path: Path, capsys) -> None:
    from arrakis_ray.cli import main

    store, run = _copy(pristine, tmp_path)
    assert main(["verify", str(store)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"run {run.run_id}: ok"]
    run.shard_file(run.tokens_dir, 2).write_bytes(b"not parquet")
    assert main(["verify", str(store), run.run_id[:6]]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"run {run.run_id}: DAMAGED"
    assert "tokens/shard-00002.parquet" in out[1] and out[1].endswith("(shards 2)")
    assert out[-1] == f"repair with: arrakis-ray verify {store} --repair"


def test_actors_the_cluster_cannot_place_are_refused_before_the_run(ray_session, tmp_path):
    from arrakis_ray.errors import ConfigError
    from arrakis_ray.store.layout import list_run_ids

    raw = pipeline_dict(hooks=HOOKS, num_cpus_per_actor=64)
    refused = r"num_cpus_per_actor: 64 CPUs per actor, but the largest node .* has 2 CPUs"
    with pytest.raises(ConfigError, match=refused):
        harvest(pipeline_from_dict(raw), tmp_path / "store")
    assert list_run_ids(tmp_path / "store") == []  # no run left "running"


def test_a_staged_run_inventories_every_stage_s_files(ray_session, tmp_path: Path) -> None:
    # stage 0 writes layers 0-1, stage 1 layers 2-3 and the tokens: one inventory lists all
    raw = pipeline_dict(hooks=["blocks.*.hook_resid_post"], stages=2)
    result = harvest(pipeline_from_dict(raw), tmp_path / "store")
    run = RunLayout(tmp_path / "store", result.run_id)
    for shard in run.completed_shards():
        inventory = json.loads(run.completion_marker(shard).read_text())
        on_disk = sorted(
            p.relative_to(run.root).as_posix()
            for p in run.root.glob(f"*/**/shard-{shard:05d}.parquet")
        )
        assert sorted(f["path"] for f in inventory["files"]) == on_disk
        assert {p.split("/")[2] for p in on_disk if p.startswith("activations")} == {
            f"layer={i}" for i in range(4)
        }
    with Store(tmp_path / "store") as s:
        per_layer = s.sql("SELECT layer, count(*) AS n FROM act_resid_post GROUP BY layer")
        (tokens,) = s.sql("SELECT count(*) FROM tokens").row(0)
    assert sorted(per_layer.rows()) == [(i, tokens) for i in range(4)]
    (check,) = verify_store(tmp_path / "store")
    assert check.ok and not check.strays
