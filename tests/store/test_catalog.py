"""The DuckDB catalog: views over every run, checked against numpy; read-only surface."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from arrakis_ray.errors import QueryError, SchemaError, StoreError
from arrakis_ray.store.catalog import Store
from arrakis_ray.store.layout import RunLayout, init_store

from .storedata import N_HEADS, N_LAYERS, N_POS, N_SEQ, SHARD_SIZE, VOCAB, WIDTH, RunData


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_views_and_runs(two_runs: tuple[Path, dict[str, RunData]]) -> None:
    store, runs = two_runs
    with Store(store) as s:
        assert s.run_ids() == ["run-a", "run-b"]
        assert s.views() == [
            "act_attn_pattern",
            "act_attn_q",
            "act_resid_post",
            "experiment_calls",  # the bench's records: present, empty, in every store
            "experiments",
            "hypotheses",
            "results_toy",
            "runs",
            "schedule_firing_events",  # the sweeps' and schedules' records: likewise
            "schedule_firings",
            "schedules",
            "sweep_run_events",
            "sweep_runs",
            "sweeps",
            "tokens",
            "vocab",
        ]
        df = s.sql("SELECT * FROM runs ORDER BY run_id")
    assert df["run_id"].to_list() == ["run-a", "run-b"]
    assert df["name"].to_list() == ["test-run-a", "test-run-b"]
    assert df["status"].to_list() == ["complete", "complete"]
    assert df["model"].to_list() == ["tiny-1", "tiny-2"]
    assert df["arch"].to_list() == ["gpt2", "gpt2"]
    assert df["n_tokens"].to_list() == [N_SEQ * N_POS] * 2
    assert df["tokens_per_s"].to_list() == [10.0, 20.0]
    assert df["hooks"].to_list() == [runs[r].manifest["hooks"] for r in ("run-a", "run-b")]
    sizes = [
        sum(p.stat().st_size for p in (store / "runs" / r).rglob("*.parquet"))
        for r in ("run-a", "run-b")
    ]
    assert df["bytes"].to_list() == sizes


def test_top_contexts_match_numpy(two_runs: tuple[Path, dict[str, RunData]]) -> None:
    store, runs = two_runs
    query = """
        SELECT a.run_id, a.seq_id, a.pos, a.d4, t.token_text
        FROM act_resid_post a JOIN tokens t USING (run_id, seq_id, pos)
        WHERE a.layer = 1
        ORDER BY a.d4 DESC LIMIT 5
    """
    with Store(store) as s:
        top = s.sql(query)
    candidates = []
    for run_id, data in runs.items():
        for seq in range(N_SEQ):
            for pos in range(N_POS):
                value = float(data.resid[1, seq, pos, 4])
                text = VOCAB[data.token_ids[seq, pos]]
                candidates.append((value, run_id, seq, pos, text))
    expected = sorted(candidates, key=lambda c: -c[0])[:5]
    assert top["run_id"].to_list() == [c[1] for c in expected]
    assert list(zip(top["seq_id"], top["pos"], strict=True)) == [(c[2], c[3]) for c in expected]
    assert top["token_text"].to_list() == [c[4] for c in expected]
    np.testing.assert_allclose(top["d4"].to_numpy(), [c[0] for c in expected], rtol=1e-6)


def test_aggregates_match_numpy(two_runs: tuple[Path, dict[str, RunData]]) -> None:
    store, runs = two_runs
    norm = " + ".join(f"d{i} * d{i}" for i in range(WIDTH))
    with Store(store) as s:
        means = s.sql(
            f"SELECT run_id, layer, avg(sqrt({norm})) AS norm, count(*) AS n "
            "FROM act_resid_post GROUP BY ALL ORDER BY run_id, layer"
        )
        q_sum = s.sql("SELECT layer, head, sum(d3) AS s FROM act_attn_q GROUP BY ALL ORDER BY ALL")
        rows = s.sql(
            "SELECT seq_id, q_pos, k_pos, weight FROM act_attn_pattern "
            "WHERE layer = 1 AND head = 0 ORDER BY seq_id, q_pos, k_pos"
        )
        mass = s.sql(
            "SELECT max(abs(total - 1)) AS err, count(*) AS n FROM ("
            "  SELECT sum(weight) AS total FROM act_attn_pattern"
            "  GROUP BY run_id, layer, seq_id, head, q_pos)"
        )
        vocab = s.sql("SELECT run_id, token_id, token_text FROM vocab ORDER BY run_id, token_id")
        toy = s.sql("SELECT run_id, layer, score FROM results_toy ORDER BY layer")
        dtypes = s.sql("SELECT column_type FROM (DESCRIBE act_resid_post) WHERE column_name='d0'")

    for i, (run_id, layer) in enumerate(zip(means["run_id"], means["layer"], strict=True)):
        x = runs[run_id].resid[layer].astype(np.float64)
        np.testing.assert_allclose(means["norm"][i], np.linalg.norm(x, axis=-1).mean(), rtol=1e-5)
        assert means["n"][i] == N_SEQ * N_POS
    assert means.height == 2 * N_LAYERS

    q = runs["run-a"].q.astype(np.float64)
    np.testing.assert_allclose(q_sum["s"].to_numpy(), q[..., 3].sum(axis=(1, 2)).ravel(), rtol=1e-5)

    pattern = runs["run-a"].pattern[1, :, 0]  # [seq, q, k]
    seq, qp, kp = np.nonzero(np.tril(np.ones((N_POS, N_POS)))[None].repeat(N_SEQ, 0))
    assert rows["k_pos"].to_list() == kp.tolist() and rows["q_pos"].to_list() == qp.tolist()
    np.testing.assert_array_equal(rows["weight"].to_numpy(), pattern[seq, qp, kp])
    assert mass["err"][0] < 1e-5 and mass["n"][0] == N_LAYERS * N_SEQ * N_HEADS * N_POS

    assert vocab["run_id"].to_list() == ["run-a"] * len(VOCAB) + ["run-b"] * len(VOCAB)
    assert vocab["token_text"].to_list() == VOCAB * 2
    assert toy["run_id"].to_list() == ["run-a"] * N_LAYERS
    np.testing.assert_allclose(
        toy["score"].to_numpy(), runs["run-a"].resid.astype(np.float64).mean(axis=(1, 2, 3))
    )
    assert dtypes["column_type"].to_list() == ["FLOAT"]  # float16 and float32 runs unite


def test_temp_and_stray_files_are_invisible_and_new_shards_seen(
    two_runs: tuple[Path, dict[str, RunData]],
) -> None:
    store, _runs = two_runs
    run = RunLayout(store, "run-b")
    family = run.block_dir("resid_post", 0, 0)
    # A half-written file under a temp name, as a killed writer would leave it; a copy
    # of a shard; a foreign file under a shard's name: no inventory lists them.
    first = run.shard_file(family, 0)
    (family / ".shard-00008.parquet.tmp-9-ffff").write_bytes(first.read_bytes()[:100])
    shutil.copy(first, family / "shard-00000 (copy).parquet")
    shutil.copy(first, run.shard_file(family, 9))
    # shard 1 not yet finished: its inventory lands while the Store is open
    marker = run.completion_marker(1)
    inventory = marker.read_bytes()
    marker.unlink()
    with Store(store) as s:
        count = "SELECT count(*) AS n FROM act_resid_post WHERE run_id = 'run-b' AND layer = 0"
        assert s.sql(count)["n"][0] == SHARD_SIZE * N_POS
        marker.write_bytes(inventory)
        assert s.sql(count)["n"][0] == N_SEQ * N_POS
        tokens = s.sql("SELECT count(*) AS n FROM tokens WHERE run_id = 'run-b'")
        assert tokens["n"][0] == N_SEQ * N_POS


HOSTILE = [
    "COPY (SELECT * FROM tokens) TO '{outside}/leak.csv'",
    "COPY (SELECT * FROM tokens) TO '{store}/inside.csv'",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('{store}/../secret.txt')",
    "ATTACH '{store}/x.duckdb' AS x",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "RESET allowed_directories",
    "DROP VIEW tokens",
    "CREATE TABLE t AS SELECT 1",
    "CREATE OR REPLACE VIEW tokens AS SELECT 1",
    "SELECT 1; DROP VIEW runs",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{store}/x.csv'",
    "PRAGMA enable_profiling",
    "CALL pragma_version()",
    "EXPORT DATABASE '{store}/dump'",
]


def test_hostile_queries_are_refused(two_runs: tuple[Path, dict[str, RunData]]) -> None:
    store, _runs = two_runs
    outside = store.parent / "outside"
    outside.mkdir()
    (store.parent / "secret.txt").write_text("secret")
    before = _tree_hashes(store.parent)
    with Store(store) as s:
        n_tokens = s.sql("SELECT count(*) AS n FROM tokens")["n"][0]
        for template in HOSTILE:
            query = template.format(store=store, outside=outside)
            with pytest.raises(QueryError):
                s.sql(query)
        assert s.sql("SELECT count(*) AS n FROM tokens")["n"][0] == n_tokens
        assert "runs" in s.sql("SHOW TABLES")["name"].to_list()
        plan = s.sql("EXPLAIN SELECT count(*) FROM tokens")
        assert plan.height >= 1
    assert _tree_hashes(store.parent) == before


def test_read_outside_store_names_the_permission(
    two_runs: tuple[Path, dict[str, RunData]],
) -> None:
    store, _runs = two_runs
    with Store(store) as s, pytest.raises(QueryError, match="Permission Error.*/etc/passwd"):
        s.sql("SELECT * FROM read_csv('/etc/passwd')")


def test_query_errors(two_runs: tuple[Path, dict[str, RunData]]) -> None:
    store, _runs = two_runs
    s = Store(store)
    with pytest.raises(QueryError) as e:
        s.sql("SELECT * FORM tokens")
    assert 'syntax error at or near "tokens"' in str(e.value) and "LINE 1" in str(e.value)
    with pytest.raises(QueryError, match="nope does not exist"):
        s.sql("SELECT * FROM nope")
    with pytest.raises(QueryError, match="empty query"):
        s.sql("  ")
    s.close()
    with pytest.raises(QueryError, match="closed"):
        s.sql("SELECT 1")


def test_not_a_store_and_empty_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is not an arrakis-ray store"):
        Store(tmp_path)
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "missing")
    with Store(init_store(tmp_path / "empty")) as s:
        assert s.views() == [
            "experiment_calls",
            "experiments",
            "hypotheses",
            "runs",
            "schedule_firing_events",
            "schedule_firings",
            "schedules",
            "sweep_run_events",
            "sweep_runs",
            "sweeps",
        ]
        assert s.run_ids() == []
        assert s.sql("SELECT count(*) AS n FROM runs")["n"][0] == 0
        assert s.sql("SELECT count(*) AS n FROM experiments")["n"][0] == 0


def test_run_without_manifest_and_newer_schema(
    two_runs: tuple[Path, dict[str, RunData]],
) -> None:
    store, _runs = two_runs
    RunLayout(store, "run-b").manifest_path.unlink()
    with Store(store) as s:
        df = s.sql("SELECT run_id, status, name FROM runs ORDER BY run_id")
    assert df.rows() == [("run-a", "complete", "test-run-a"), ("run-b", "no-manifest", None)]

    # every file's recorded schema is checked, not only the first one's
    run = RunLayout(store, "run-a")
    inventory = json.loads(run.completion_marker(1).read_text())
    for entry in inventory["files"]:
        if entry["path"].startswith("tokens/"):
            entry["schema_version"] = 7
    run.completion_marker(1).write_text(json.dumps(inventory))
    with pytest.raises(SchemaError, match=r"run-a/tokens/shard-00001\.parquet.*schema v7"):
        Store(store)


def test_corrupt_shard_is_named(two_runs: tuple[Path, dict[str, RunData]]) -> None:
    store, _runs = two_runs
    run = RunLayout(store, "run-a")
    path = run.shard_file(run.block_dir("resid_post", 0, 0), 1)
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(
        StoreError, match=r"run run-a is damaged: .*shard-00001\.parquet: \d+ bytes"
    ):
        Store(store)


def test_connection_itself_is_locked_down(two_runs: tuple[Path, dict[str, RunData]]) -> None:
    """Second line of defence, below the statement filter: DuckDB's own settings."""
    import duckdb

    store, _runs = two_runs
    outside = store.parent / "outside.csv"
    with Store(store) as s:
        con = s._con  # white-box: bypass Store.sql's statement check on purpose
        for statement in (
            f"COPY (SELECT 1) TO '{outside}'",
            "SELECT * FROM read_csv('/etc/passwd')",
            f"ATTACH '{store.parent}/x.duckdb' AS x",
            "INSTALL httpfs",
            "LOAD httpfs",
            "SET enable_external_access = true",
            "SET allowed_directories = ['/']",
            "SET lock_configuration = false",
        ):
            with pytest.raises(duckdb.Error):
                con.execute(statement)
        # The views still read the store's Parquet files after the lock-down.
        assert con.sql("SELECT count(*) FROM tokens").fetchall()[0][0] == 2 * N_SEQ * N_POS
    assert not outside.exists()
