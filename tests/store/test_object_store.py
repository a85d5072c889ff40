"""A store at s3://bucket/prefix, against a real S3-compatible server on loopback (moto).

The harvest writes through Ray actors straight to the bucket, a tool reads it back
through Ray tasks, and SQL reads it through pyarrow datasets; the values must equal the
local store's (the shared ``harvested`` fixture: same data, same shards).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from support import pipeline_dict

from arrakis_ray.errors import QueryError, StoreError

BUCKET = "lab"
HOOKS = ["blocks.*.hook_resid_post", "blocks.*.attn.hook_z", "blocks.*.attn.hook_pattern"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on a loopback port, with an empty bucket ``lab``."""
    pytest.importorskip("moto")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.2)
        import s3fs

        s3fs.S3FileSystem(
            endpoint_url=endpoint, key="testing", secret="testing", use_listings_cache=False
        ).mkdir(BUCKET)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


def _aws_env(endpoint: str) -> dict[str, str]:
    """The AWS environment a user would set for an S3-compatible server."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """That environment set for one test; returns it."""
    env = _aws_env(s3_endpoint)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def _s3fs(endpoint):
    import s3fs

    return s3fs.S3FileSystem(
        endpoint_url=endpoint, key="testing", secret="testing", use_listings_cache=False
    )


@pytest.fixture(scope="module")
def s3_run(s3_endpoint, ray_session):
    """A float16 harvest + logit lens into s3://lab/store (run once for the module)."""
    from arrakis_ray.config import pipeline_from_dict
    from arrakis_ray.harvest.driver import harvest
    from arrakis_ray.store import compact
    from arrakis_ray.tools.runner import analyze

    mp = pytest.MonkeyPatch()
    for key, value in _aws_env(s3_endpoint).items():
        mp.setenv(key, value)
    mp.setattr(compact, "MIN_SHARDS", 2)  # compact the 3 shards: in the bucket too
    uploads_before = set(Path(tempfile.gettempdir()).glob(".arrakis-upload-*"))
    try:
        config = pipeline_from_dict(pipeline_dict(hooks=HOOKS, storage_dtype="float16"))
        result = harvest(config, f"s3://{BUCKET}/store")
        analyze(result.run_dir, "logit_lens")
        # no write went to a local path by mistake (a URI turned into a relative Path
        # would make ./s3:/...), and every staged upload was cleaned up
        assert not Path("s3:").exists()
        assert set(Path(tempfile.gettempdir()).glob(".arrakis-upload-*")) == uploads_before
        yield config, result
    finally:
        mp.undo()


def _copy_store(fs, name: str, run_id: str) -> str:
    """A copy of the shared S3 store under ``name`` (to damage); the copied run's prefix."""
    copy = f"{BUCKET}/{name}/runs/{run_id}"
    fs.copy(f"{BUCKET}/store/arrakis-store.json", f"{BUCKET}/{name}/arrakis-store.json")
    fs.copy(f"{BUCKET}/store/runs/{run_id}", copy, recursive=True)
    return copy


def _ordered(store, view: str, columns: str, run_id: str):
    return store.sql(
        f"SELECT {columns} FROM {view} WHERE run_id = '{run_id}' ORDER BY ALL"
    ).to_numpy()


def test_harvest_writes_only_to_the_bucket(s3_run, s3_endpoint):
    _config, result = s3_run
    assert str(result.run_dir).startswith(f"s3://{BUCKET}/store/runs/")
    assert result.status == "complete" and result.shards_done == 3
    files = _s3fs(s3_endpoint).find(f"{BUCKET}/store")
    names = {f.rsplit("/", 1)[-1] for f in files}
    assert "arrakis-store.json" in names and "manifest.json" in names
    for family in ("resid_post", "attn_z", "attn_pattern"):  # compacted: a part per layer
        assert sum(f"/activations/{family}/layer=" in f for f in files) == 4, family
        assert not any(f"/activations/{family}/" in f and "/shard-" in f for f in files)
    assert sum("/completions/shard-" in f for f in files) == 3
    assert any("/results/logit_lens/" in f and "/shard-" in f for f in files)
    assert not any(".tmp" in f or "upload" in f for f in files)


def test_sql_over_s3_equals_the_local_store(s3_run, s3_env, harvested):
    from arrakis_ray.store.catalog import Store

    _config, result = s3_run
    _lconfig, local_root, local = harvested
    dims = ", ".join(f"d{i}" for i in range(128))
    with Store(f"s3://{BUCKET}/store") as remote, Store(local_root) as here:
        assert remote.run_ids() == [result.run_id]
        runs = remote.sql("SELECT status, n_tokens, bytes FROM runs")
        assert runs["status"].to_list() == ["complete"] and runs["bytes"][0] > 0
        for view, cols, dtype in [
            ("tokens", "seq_id, pos, doc_id, doc_pos, token_id, token_text", None),
            ("act_resid_post", f"layer, seq_id, pos, {dims}", np.float16),
            ("act_attn_z", "layer, head, seq_id, pos, d0, d31", np.float16),
            ("act_attn_pattern", "*", None),
        ]:
            cols_remote = cols if cols != "*" else "* EXCLUDE (run_id)"
            got = _ordered(remote, view, cols_remote, result.run_id)
            want = _ordered(here, view, cols_remote, local.run_id)
            assert got.shape == want.shape and len(got) > 0, view
            if dtype is None:
                np.testing.assert_array_equal(got, want)
            else:  # stored as float16 there, float32 here: equal after the same rounding
                key = 3 if view == "act_resid_post" else 4
                np.testing.assert_array_equal(got[:, :key], want[:, :key])
                _assert_same_float16(got[:, key:], want[:, key:])
        # a tool's results, computed by Ray tasks reading from the bucket
        lens = remote.sql("SELECT count(*) AS n FROM results_logit_lens")["n"][0]
        assert (
            lens
            == here.sql(
                f"SELECT count(*) AS n FROM results_logit_lens WHERE run_id = '{local.run_id}'"
            )["n"][0]
        )
        # the macros run on the object store's views too
        top = remote.sql("SELECT * FROM top_contexts('resid_post', 2, 7, 5)")
        want_top = here.sql(
            f"SELECT * FROM top_contexts('resid_post', 2, 7, 5, run_id := '{local.run_id}')"
        )
        assert top["token_text"].to_list() == want_top["token_text"].to_list()


def test_rerun_on_s3_is_a_no_op(s3_run, s3_env):
    from arrakis_ray.harvest.driver import harvest

    config, result = s3_run
    again = harvest(config, f"s3://{BUCKET}/store")
    assert again.status == "already complete" and again.run_id == result.run_id


def _assert_same_float16(got, want) -> None:
    """``got`` (stored as float16) is ``want`` (float32) rounded to float16, to within one
    float16 step: the two harvests ran in different Ray workers, whose float32 results
    may differ in their last bits (one full suite run saw 0.4% of values a step apart)."""
    rounded = np.asarray(want, dtype=np.float32).astype(np.float16)
    step = np.abs(np.spacing(rounded)).astype(np.float32)
    diff = np.abs(np.asarray(got, dtype=np.float32) - rounded.astype(np.float32))
    assert (diff <= step).all(), f"max difference {diff.max()} exceeds one float16 step"
    assert (diff == 0).mean() > 0.99  # nearly all bit-identical


def test_the_run_contract_reads_an_s3_run(s3_run, s3_env, harvested):
    from arrakis_ray.store.reader import RunReader

    _, result = s3_run
    reader = RunReader.open(result.run_dir)  # a UPath: the run on the bucket
    assert reader.manifest.results["logit_lens"].rows == reader.result("logit_lens").num_rows
    assert reader.documents("relation")[0] == "capital"  # the labels live in the bucket too
    local = RunReader.open(harvested[2].run_dir)
    seq, pos, x = reader.matrix("resid_post", 1, 0)
    lseq, lpos, lx = local.matrix("resid_post", 1, 0)  # float32 locally, float16 on S3
    assert (seq == lseq).all() and (pos == lpos).all()
    _assert_same_float16(x, lx)


def test_cli_sql_on_an_s3_store(s3_run, s3_env):
    _config, result = s3_run
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "arrakis_ray.cli",
            "sql",
            f"s3://{BUCKET}/store",
            "SELECT run_id, count(*) AS n FROM tokens GROUP BY run_id",
            "--format",
            "csv",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **s3_env},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "run_id,n" and lines[1].startswith(result.run_id + ",")


def test_hostile_queries_are_refused_on_s3(s3_run, s3_env):
    from arrakis_ray.store.catalog import Store

    with Store(f"s3://{BUCKET}/store") as db:
        for query in (
            "SELECT * FROM read_csv('/etc/passwd')",
            "COPY (SELECT 1) TO '/tmp/arrakis-s3-escape.csv'",
            "SELECT * FROM read_parquet('s3://lab/store/**/*.parquet')",
        ):
            with pytest.raises(QueryError):
                db.sql(query)
    assert not os.path.exists("/tmp/arrakis-s3-escape.csv")


def test_missing_bucket_is_one_clear_error(s3_env):
    from arrakis_ray.store.catalog import Store
    from arrakis_ray.store.layout import init_store

    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        init_store("s3://no-such-bucket/store")
    with pytest.raises(StoreError, match="no-such-bucket"):
        Store("s3://no-such-bucket/store")


def test_corrupt_shard_on_s3_names_the_file(s3_run, s3_env, s3_endpoint):
    from arrakis_ray.store.catalog import Store

    _config, result = s3_run
    fs = _s3fs(s3_endpoint)
    copy = _copy_store(fs, "broken", result.run_id)
    victim = f"{copy}/tokens/shard-00000.parquet"
    fs.pipe_file(victim, fs.cat_file(victim)[:100])  # truncated
    before = {f: fs.info(f)["size"] for f in fs.find(f"{BUCKET}/broken")}
    with pytest.raises(StoreError, match="tokens/shard-00000.parquet"):
        Store(f"s3://{BUCKET}/broken")
    assert {f: fs.info(f)["size"] for f in fs.find(f"{BUCKET}/broken")} == before


def test_report_of_an_s3_run_is_written_locally(s3_run, s3_env, tmp_path, monkeypatch):
    from arrakis_ray.reports.run_report import build_report

    _config, result = s3_run
    monkeypatch.chdir(tmp_path)
    report = build_report(result.run_dir, png=False)
    html = tmp_path / f"report-{result.run_id}" / "report.html"
    assert report.html.resolve() == html and html.is_file()
    text = html.read_text()
    assert result.run_id in text and "<script" in text


def test_verify_and_repair_on_s3(s3_run, s3_env, s3_endpoint):
    from arrakis_ray.harvest.repair import verify_store
    from arrakis_ray.store.catalog import Store

    _config, result = s3_run
    fs = _s3fs(s3_endpoint)
    copy = _copy_store(fs, "mended", result.run_id)
    store = f"s3://{BUCKET}/mended"
    with Store(store) as s:
        expected = s.sql("SELECT count(*) AS n, sum(token_id) AS t FROM tokens").rows()
    (check,) = verify_store(store)
    assert check.ok
    fs.rm_file(f"{copy}/tokens/shard-00001.parquet")
    (check,) = verify_store(store)
    assert [d.shards for d in check.damage] == [(1,)]
    (repaired,) = verify_store(store, repair=True)
    assert repaired.ok and repaired.repaired_shards == 1, repaired
    with Store(store) as s:
        assert s.sql("SELECT count(*) AS n, sum(token_id) AS t FROM tokens").rows() == expected


def test_a_live_tool_writes_to_the_bucket_and_a_rerun_replaces_its_files(
    s3_run, s3_endpoint, tmp_path
):
    """Activation patching in actors on a run in the bucket: its rows equal the tool run
    here, its files are in the bucket under the call's directory, and a second call
    replaces the first's files there."""
    import polars as pl
    import pyarrow.parquet as pq
    from support import REPO, with_run_id

    from arrakis_ray.config import ModelConfig
    from arrakis_ray.live.model import local_model
    from arrakis_ray.live.prompts import read_prompts
    from arrakis_ray.store.reader import RunReader
    from arrakis_ray.tools import patching
    from arrakis_ray.tools.runner import analyze, make_tool

    _config, result = s3_run
    pairs = read_prompts(REPO / "pipelines" / "data" / "facts_pairs.jsonl", patching.PAIR_COLUMNS)
    pq.write_table(pairs.slice(0, 4).drop(["item"]), tmp_path / "pairs.parquet")
    params = {"prompts": str(tmp_path / "pairs.parquet"), "families": ["attn_z"]}
    fs = _s3fs(s3_endpoint)
    prefix = f"{BUCKET}/store/runs/{result.run_id}/results/activation_patching/"
    listed = []
    for _ in range(2):
        analyze(result.run_dir, "activation_patching", params)
        listed.append(sorted(f for f in fs.find(prefix) if f.endswith(".parquet")))
    first, second = listed
    assert len(first) == len(second) == 1 and first != second  # one slice, one file per call
    stored = pl.from_arrow(RunReader.open(result.run_dir).result("activation_patching"))
    want = make_tool("activation_patching", params).compute_live(
        with_run_id(pairs.slice(0, 4), result.run_id), local_model(ModelConfig(zoo="facts-gpt2"))
    )
    keys = ["item", "layer", "head"]
    want = pl.from_arrow(want).sort(keys)
    assert stored.sort(keys).select(keys).equals(want.select(keys))
    np.testing.assert_allclose(stored.sort(keys)["logit_diff"], want["logit_diff"], atol=1e-4)


def test_bench_records_on_s3_are_read_back_and_queried(s3_run, s3_env, s3_endpoint):
    """The bench's store may be a bucket: calls are objects there, read by a new bench
    and by the catalog's views; a store's runs and experiments join."""
    import polars as pl

    from arrakis_ray.bench import BaseInterpretabilityBench, HookedAutoConfig, HookedAutoModel
    from arrakis_ray.store.catalog import Store

    _config, result = s3_run
    model = HookedAutoModel(
        HookedAutoConfig(
            "gpt2", vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4
        )
    )
    exp = BaseInterpretabilityBench(model, save_dir=f"s3://{BUCKET}/store")

    @exp.log_experiment
    def table(n):
        return pl.DataFrame({"i": list(range(n))})

    table(3)
    table(3)
    again = BaseInterpretabilityBench(model, save_dir=f"s3://{BUCKET}/store")
    (version,) = again.list_versions("table")
    record = again.get_version("table", version)
    assert record["result"]["i"].to_list() == [0, 1, 2] and len(record["calls"]) == 2
    keys = _s3fs(s3_endpoint).find(f"{BUCKET}/store/experiments/calls/table/")
    assert len(keys) == 2
    with Store(f"s3://{BUCKET}/store") as db:
        both = db.sql(
            "SELECT (SELECT count(*) FROM runs) AS runs, "
            "(SELECT n_calls FROM experiments WHERE name = 'table') AS calls"
        )
    assert both.row(0) == (1, 2)
