"""Every query of a Store runs within bounds: time, memory, result size; each bound
fails as one line that names it, the Store stays usable, and temp directories of killed
processes are swept."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from arrakis_ray.errors import ConfigError, QueryError
from arrakis_ray.store import bounds
from arrakis_ray.store.bounds import QueryBounds, format_size, parse_size
from arrakis_ray.store.catalog import Store
from arrakis_ray.store.query_messages import NO_EXTENSIONS, one_line

from .storedata import RunData

CROSS_JOIN = "SELECT count(*) FROM range(1000000) a, range(1000000) b"  # 10^12 rows
HUGE = "SELECT * FROM range(3000000000)"  # 24 GB of int64


def _one_line_error(store: Store, query: str) -> str:
    with pytest.raises(QueryError) as caught:
        store.sql(query)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def _tokens(store: Store) -> int:
    return store.sql("SELECT count(*) AS n FROM tokens")["n"][0]


def test_a_long_query_is_stopped_by_the_timeout(two_runs: tuple[Path, dict[str, RunData]]):
    root, _runs = two_runs
    with Store(root, timeout_s=1) as store:
        expected = _tokens(store)
        started = time.monotonic()
        message = _one_line_error(store, CROSS_JOIN)
        assert time.monotonic() - started < 5
        assert message.startswith("query stopped after 1 s") and "--timeout" in message
        assert _tokens(store) == expected  # the connection still answers


def test_a_large_result_is_refused_before_it_is_built(two_runs: tuple[Path, dict[str, RunData]]):
    root, _runs = two_runs
    process = psutil.Process()
    peak = [process.memory_info().rss]
    done = threading.Event()

    def watch() -> None:  # the peak resident size while the query runs, every 10 ms
        while not done.wait(0.01):
            peak.append(process.memory_info().rss)

    with Store(root, max_result_bytes="64MiB") as store:
        before = process.memory_info().rss
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            message = _one_line_error(store, HUGE)
        finally:
            done.set()
            watcher.join()
        assert message == (
            "the result passed 64 MiB; add a LIMIT or raise --max-result "
            "(Store(max_result_bytes=...))"
        )
        assert max(peak) - before < 300e6, f"grew {(max(peak) - before) / 1e6:.0f} MB"
        assert _tokens(store) > 0
        # under the bound a result is whole, in one frame of the query's types
        frame = store.sql("SELECT i, i * 0.5 AS half, 'x' || i AS s FROM range(100000) t(i)")
        assert frame.height == 100000 and frame["i"].sum() == 99999 * 100000 // 2
        assert [str(t) for t in frame.dtypes] == [
            "Int64",
            "Decimal(precision=21, scale=1)",
            "String",
        ]


def test_the_memory_limit_is_one_clear_error(two_runs: tuple[Path, dict[str, RunData]]):
    root, _runs = two_runs
    with Store(root, memory_limit="50MB") as store:
        setting = store.sql("SELECT current_setting('memory_limit') AS m")["m"][0]
        assert setting == "47.6 MiB"  # DuckDB's own units
        # a single list cannot be spilled: it must fit in memory
        message = _one_line_error(store, "SELECT list(range) FROM range(100000000)")
        assert message.startswith("query ran out of memory: failed to allocate")
        assert "memory limit of 50 MB; raise it with --memory-limit" in message
        assert "SET " not in message and "Possible solutions" not in message
        # an aggregate larger than memory spills, within twice the limit on disk
        spill = "SELECT max(k) FROM (SELECT i AS k, count(*) FROM range(20000000) t(i) GROUP BY i)"
        message = _one_line_error(store, spill)
        assert message.startswith("query ran out of disk to spill to:")
        assert "a query may spill 100 MB, 2 times the memory limit of 50 MB" in message
        assert "PRAGMA" not in message
        assert _tokens(store) > 0


def test_stale_temp_dirs_are_swept_and_live_ones_kept(
    two_runs: tuple[Path, dict[str, RunData]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    root, _runs = two_runs
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(gone.stdout)
    stale = temp / f"arrakis-duckdb-{dead_pid}-abc"
    (stale / "nested").mkdir(parents=True)
    (stale / "nested" / "duckdb_temp_storage.tmp").write_bytes(b"x" * 100)
    live = temp / f"arrakis-duckdb-{os.getpid()}-def"  # this process: alive
    live.mkdir()
    unnamed = temp / "arrakis-duckdb-old1234"  # an older arrakis-ray's: no pid, no owner
    unnamed.mkdir()
    other = temp / f"arrakis-duckdb-{dead_pid}-another-user"
    other.mkdir()
    if os.getuid() == 0:
        os.chown(other, 65534, 65534)
    store = Store(root)
    own = [p for p in temp.iterdir() if p not in (live, unnamed, other)]
    assert not stale.exists()
    assert live.is_dir() and unnamed.is_dir()
    assert other.is_dir() == (os.getuid() == 0)  # only as root can the test make another's
    assert len(own) == 1 and own[0].name.startswith(f"arrakis-duckdb-{os.getpid()}-")
    store.close()
    assert not own[0].exists()


def test_duckdb_hints_the_surface_refuses_are_dropped(two_runs: tuple[Path, dict[str, RunData]]):
    root, _runs = two_runs
    with Store(root) as store:
        depth = "SELECT " + "(" * 1200 + "1" + ")" * 1200
        assert (
            _one_line_error(store, depth)
            == "Parser Error: Max expression depth limit of 1000 exceeded."
        )
        division = _one_line_error(store, "SELECT 1 // 0")
        assert division.endswith("Use TRY(...) to return NULL for this expression.")
        extension = _one_line_error(store, "SELECT * FROM read_xlsx('x')")
        assert extension.endswith(NO_EXTENSIONS) and "INSTALL" not in extension
        syntax = _one_line_error(store, "SELECT *\nFORM tokens")
        assert (
            syntax
            == 'Parser Error: syntax error at or near "tokens" (LINE 2, column 6: "FORM tokens")'
        )
        missing = _one_line_error(store, "SELECT nosuch FROM tokens")
        assert "Candidate bindings:" in missing
        refused = _one_line_error(store, "LOAD httpfs")
        assert refused == "the query surface is read-only: LOAD statements are not allowed"


def test_one_line_rewrites_duckdb_messages():
    schemas = (
        "Invalid Input Error: Mismatch between the schema of different files\n"
        "If you are trying to read files with different schemas, try setting union_by_name=True"
    )
    assert (
        one_line(schemas) == "Invalid Input Error: Mismatch between the schema of different files"
    )
    offset = (
        "Invalid Input Error: The parquet file 'a.parquet' seems to have incorrectly set page "
        "offsets. DuckDB may still be able to scan this file by manually disabling the "
        "prefetching mechanism using: 'SET disable_parquet_prefetching=true'."
    )
    assert one_line(offset) == (
        "Invalid Input Error: The parquet file 'a.parquet' seems to have incorrectly set page "
        "offsets."
    )
    long_line = "SELECT " + ", ".join(f"column_{i}" for i in range(40)) + ", nope FROM t"
    caret = " " * (len("LINE 1: ") + long_line.index("nope")) + "^"
    located = one_line(f'Binder Error: "nope" not found\n\nLINE 1: {long_line}\n{caret}')
    column = long_line.index("nope") + 1
    assert located.startswith(f'Binder Error: "nope" not found (LINE 1, column {column}: "…')
    assert "nope FROM t" in located and len(located) < 140


def test_sizes_and_bad_bounds():
    assert parse_size("4GB", "x") == 4_000_000_000
    assert parse_size("512MiB", "x") == 512 << 20
    assert parse_size("1.5 GiB", "x") == 3 << 29
    assert parse_size(1024, "x") == 1024
    assert format_size(1 << 30) == "1 GiB" and format_size(4_000_000_000) == "4 GB"
    with pytest.raises(ConfigError, match=r"--memory-limit.*'4 elephants' is not a size"):
        QueryBounds.of(memory_limit="4 elephants")
    with pytest.raises(ConfigError, match=r"--timeout.*more than 0"):
        QueryBounds.of(timeout_s=0)
    with pytest.raises(ConfigError, match=r"--max-result.*more than 0"):
        QueryBounds.of(max_result_bytes="0B")
    default = QueryBounds.of()
    assert default.memory_limit == int(bounds.machine_memory() * bounds.MEMORY_FRACTION)
    assert default.timeout_s == 300 and default.max_result_bytes == 1 << 30
