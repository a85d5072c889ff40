"""Paths the command line cannot use end in one stderr line, exit code 2, store unchanged.

Each case names the path in its line: ``sql --out`` into the store (directly, through a
symbolic link, or a directory linked into it), to a missing directory; ``report --out``
onto a file or into a directory it cannot write; ``--store`` below a regular file; a
store the user cannot write; query bounds given on the command line. The read-only
cases run the console script as an unprivileged user (``nobody`` when the tests run as
root, whom no permission bit stops).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from runs import write_run
from support import pipeline_dict

from arrakis_ray.cli import main
from arrakis_ray.store.layout import RunLayout

RUN = "run-a"
PR_CAPBSET_DROP = 24  # prctl option (linux/prctl.h)
LOG_RECORD = re.compile(r"^\d\d:\d\d:\d\d arrakis_ray\.")  # the CLI's log format


def _digest(root: Path) -> str:
    """Hash of every file's relative path and bytes under ``root``: equal = untouched."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _one_line(err: str, *needles: str) -> str:
    """The error line of ``err``, asserted to be its only line besides log records
    (a harvest logs its plan before it touches the store)."""
    lines = [line for line in err.splitlines() if not LOG_RECORD.match(line)]
    assert len(lines) == 1, err
    assert lines[0].startswith("arrakis-ray: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _fails(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    return _one_line(capsys.readouterr().err, *needles)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A store of one small synthetic run (two shards, resid_post of two layers)."""
    rng = np.random.default_rng(0)
    activations = {
        f"blocks.{layer}.hook_resid_post": rng.standard_normal((4, 5, 8)).astype(np.float32)
        for layer in range(2)
    }
    tokens = rng.integers(0, 6, size=(4, 5))
    root = tmp_path / "store"
    write_run(root, RUN, tokens, ["a", "b", "c", "d", "e", "f"], activations, shard_size=2)
    return root


def _shard(store: Path) -> Path:
    return RunLayout(store, RUN).shard_file(RunLayout(store, RUN).tokens_dir, 0)


# -- sql --out ------------------------------------------------------------------------------


def test_sql_out_may_not_point_into_the_store(store: Path, tmp_path: Path, capsys):
    before = _digest(store)
    shard = _shard(store)
    (tmp_path / "shard-link.parquet").symlink_to(shard)
    (tmp_path / "dir-link").symlink_to(shard.parent)
    (tmp_path / "dangling-link.csv").symlink_to(store / "runs" / RUN / "new.csv")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for out in [
        str(shard),
        str(outside / ".." / "store" / "runs" / RUN / "result.csv"),  # a new file inside
        str(tmp_path / "shard-link.parquet"),
        str(tmp_path / "dir-link" / shard.name),
        str(tmp_path / "dangling-link.csv"),
    ]:
        line = _fails(
            capsys, ["sql", str(store), "SELECT 1 AS x", "--format", "parquet", "--out", out], out
        )
        assert f"inside the store {store.resolve()}" in line
    assert _digest(store) == before
    assert not (store / "runs" / RUN / "new.csv").exists()
    assert main(["sql", str(store), "SELECT count(*) AS n FROM tokens"]) == 0  # still whole


def test_sql_out_through_a_hard_link_replaces_the_link(store: Path, tmp_path: Path, capsys):
    before = _digest(store)
    hard = tmp_path / "hard.parquet"
    os.link(_shard(store), hard)
    query = "SELECT 42 AS answer"
    assert main(["sql", str(store), query, "--format", "parquet", "--out", str(hard)]) == 0
    assert pq.read_table(hard).column("answer").to_pylist() == [42]
    assert _digest(store) == before  # the shard's inode was not written through


def test_sql_out_to_a_missing_or_odd_place(store: Path, tmp_path: Path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    sql = ["sql", str(store), "SELECT 1 AS x", "--out"]
    missing = str(tmp_path / "missing" / "r.csv")
    _fails(capsys, [*sql, missing], missing, f"the directory {tmp_path / 'missing'} does not exist")
    below = str(a_file / "r.csv")
    _fails(capsys, [*sql, below], below, f"the directory {a_file} is a file")
    _fails(capsys, [*sql, str(tmp_path)], str(tmp_path), "is a directory")


def test_query_bounds_on_the_command_line(store: Path, capsys):
    cross = "SELECT count(*) FROM range(1000000) a, range(1000000) b"
    _fails(capsys, ["sql", str(store), cross, "--timeout", "1"], "query stopped after 1 s")
    huge = "SELECT * FROM range(3000000000)"
    _fails(capsys, ["sql", str(store), huge, "--max-result", "8MiB"], "passed 8 MiB", "LIMIT")
    _fails(capsys, ["sql", str(store), "SELECT 1", "--memory-limit", "5XB"], "--memory-limit")
    assert main(["sql", str(store), "SELECT 1 AS x", "--max-result", "0", "--timeout", "0"]) == 0


# -- --store below a regular file ------------------------------------------------------------


def test_a_store_below_a_regular_file(tmp_path: Path, capsys):
    a_file = tmp_path / "somefile"
    a_file.write_text("not a directory")
    below = a_file / "store"
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(pipeline_dict()))
    _fails(
        capsys,
        ["harvest", str(pipeline), "--store", str(below)],
        str(below),
        f"{a_file} is a file, not a directory",
    )
    _fails(capsys, ["report", RUN, "--store", str(below)], str(below))
    _fails(capsys, ["sql", str(below), "SELECT 1"], str(below))
    assert a_file.read_text() == "not a directory"


# -- report --out ---------------------------------------------------------------------------


def test_report_out_onto_a_file(store: Path, tmp_path: Path, capsys):
    before = _digest(store)
    a_file = tmp_path / "report.html"
    a_file.write_text("keep me")
    run = str(store / "runs" / RUN)
    _fails(capsys, ["report", run, "--out", str(a_file)], str(a_file), "is a file")
    below = a_file / "report"
    _fails(capsys, ["report", run, "--out", str(below)], str(below), f"{a_file} is a file")
    assert a_file.read_text() == "keep me" and _digest(store) == before


# -- a store the user cannot write -------------------------------------------------------------


@pytest.fixture
def read_only_store(store: Path) -> Iterator[Path]:
    """``store`` with its permission bits read-only (restored after the test)."""
    paths = [store, *store.rglob("*")]
    for path in paths:
        path.chmod(0o555 if path.is_dir() else 0o444)
    yield store
    for path in paths:
        path.chmod(0o755 if path.is_dir() else 0o644)


def _without_override() -> None:
    """In the child, before exec: drop root's power to ignore permission bits
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) from the capability bounding set, so that
    the command meets the read-only store as any user would. Linux only."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _unprivileged(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """``arrakis-ray ARGS`` in a process whom permission bits stop."""
    env = {**os.environ, "ARRAKIS_RAY_LOG_DIR": str(tmp_path / "logs")}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [str(Path(sys.executable).with_name("arrakis-ray")), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_without_override if os.getuid() == 0 else None,
    )


@pytest.mark.skipif(
    os.getuid() == 0 and not sys.platform.startswith("linux"),
    reason="as root, permission bits bind only once Linux capabilities are dropped",
)
def test_a_read_only_store_is_one_line(read_only_store: Path, tmp_path: Path):
    before = _digest(read_only_store)
    run_dir = read_only_store / "runs" / RUN
    report = _unprivileged(["report", str(run_dir)], tmp_path)
    assert report.returncode == 2
    _one_line(report.stderr, f"{run_dir / 'report'}", f"{run_dir} is not writable")

    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(pipeline_dict()))
    harvest = _unprivileged(["harvest", str(pipeline), "--store", str(read_only_store)], tmp_path)
    assert harvest.returncode == 2
    _one_line(harvest.stderr, str(read_only_store), "Permission denied")
    assert _digest(read_only_store) == before


# -- Ray failures -----------------------------------------------------------------------------


def test_a_ray_failure_is_one_line_wherever_it_is_caught(ray_session):
    import ray

    from arrakis_ray.cli import _error_line
    from arrakis_ray.errors import StoreError, ToolError
    from arrakis_ray.ray_session import one_line_error

    def multi_line_store_error():  # defined here: Ray ships it by value, not by module
        raise StoreError(
            "shard-00003.parquet: could not read (Couldn't deserialize thrift\n"
            "Deserializing page header failed.)"
        )

    try:
        ray.get(ray.remote(multi_line_store_error).remote())
    except StoreError as exc:  # Ray's RayTaskError(StoreError): its text, the whole traceback
        escaped = exc
    assert len(str(escaped).splitlines()) > 3
    expected = (
        "analyze failed: shard-00003.parquet: could not read (Couldn't deserialize thrift "
        "Deserializing page header failed.)"
    )
    assert _error_line(escaped, "analyze") == expected  # outside any ray_errors block
    try:
        raise ToolError("tool x: its shards failed") from escaped
    except ToolError as wrapped:  # Ray's error behind the one raised
        assert str(one_line_error(wrapped, "analyze")) == expected
    refused = PermissionError(13, "Permission denied", "/data/store/runs/x")
    assert _error_line(refused, "harvest") == "/data/store/runs/x: Permission denied"
    assert _error_line(KeyError("a bug"), "harvest") is None  # a bug keeps its traceback


def test_an_actor_whose_constructor_raises_is_its_error(ray_session):
    import ray

    from arrakis_ray.errors import ModelLoadError
    from arrakis_ray.ray_session import one_line_error

    class LoadsAModel:  # defined here: Ray ships it by value, not by module
        def __init__(self):
            raise ModelLoadError("cannot load the model weights /m/model.safetensors: bad")

        def ping(self):
            return 1

    actor = ray.remote(max_restarts=0)(LoadsAModel).remote()
    try:
        ray.get(actor.ping.remote())
    except Exception as exc:  # ActorDiedError: the cause only in its text
        error = one_line_error(exc, "harvest of run r")
    assert type(error) is ModelLoadError
    assert str(error) == (
        "harvest of run r failed: cannot load the model weights /m/model.safetensors: bad"
    )
