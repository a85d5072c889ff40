"""Bounds on the SQL queries of a ``Store``: memory, time, result size, and their messages.

A query over a store can ask for far more than a machine has: a cross join of two large
views runs for hours, ``SELECT * FROM act_resid_post`` asks for the whole store in one
frame. Each query therefore runs under three bounds:

- memory: DuckDB's ``memory_limit``, and twice that for what it spills to its temp
  directory (``max_temp_directory_size``), both set before the connection is locked;
- time: a timer thread interrupts the connection once the query has run ``timeout_s``;
- result size: the result is read as Arrow record batches and the read stops once
  their bytes pass ``max_result_bytes``, before anything is built in Polars.

Past a bound, or on any other DuckDB error, ``Store.sql`` raises a ``QueryError`` of one
line that names the bound and how to raise it. DuckDB's own hints that name commands
the read-only surface refuses (``SET ...``, ``PRAGMA ...``, ``INSTALL``/``LOAD``,
``union_by_name=true``) are dropped from its messages.

The temp directory is named after the process that owns it
(``arrakis-duckdb-<pid>-<random>``): a Store removes its own on close, and one opening
removes those that killed processes of the same user left behind.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from arrakis_ray.errors import ConfigError, QueryError
from arrakis_ray.store.query_messages import one_line, strip_kind

if TYPE_CHECKING:
    import duckdb
    import polars as pl

# duckdb, polars and pyarrow are imported where used: the CLI imports this module for
# its defaults, and every command would pay ~1 s for them

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0  # long enough for a scan of a large store, short of "forgotten"
DEFAULT_MAX_RESULT_BYTES = 1 << 30  # past 1 GiB a frame is a copy of the store, not an answer
# a quarter of the machine: the query shares it with Ray workers, the result itself (up
# to max_result_bytes, held twice while it becomes a frame) and the caller's own data
MEMORY_FRACTION = 0.25
SPILL_FACTOR = 2  # what DuckDB may spill to disk, as a multiple of its memory limit
TEMP_PREFIX = "arrakis-duckdb-"

# GB = 1000^3 and GiB = 1024^3, as in DuckDB's own settings
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str, what: str) -> int:
    """Bytes in ``value``: a number of bytes, or text such as ``4GB``, ``512MiB``, ``1.5GiB``
    (GB = 1000^3 as in DuckDB, GiB = 1024^3). ``what`` names the setting in the error."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size, got {value!r}")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    else:
        match = _SIZE.match(str(value))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ConfigError(
                f"{what}: {value!r} is not a size (examples: 4GB, 512MiB, 1073741824)"
            )
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{what}: {value!r} must be more than 0 bytes")
    return size


def format_size(size: int) -> str:
    """``size`` bytes for a message: exact binary units where they fit (``1 GiB``),
    else decimal ones to three digits (``4 GB``, ``1.5 GB``)."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            if size % scale == 0:
                return f"{size // scale} {unit}"
            break
    for unit, scale in (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("kB", 1000)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


def machine_memory() -> int:
    """Bytes of memory this process may use: physical memory, or less under a cgroup
    limit (a container, a Slurm job), where exceeding it gets the process killed."""
    limits = [os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # cgroup v2 writes "max" for no limit
            limits.append(int(text))
    return min(limits)


@dataclass(frozen=True)
class QueryBounds:
    """The limits every query of one Store runs under; ``None`` lifts a bound."""

    memory_limit: int
    """Bytes of memory DuckDB may use for the store's queries (it spills beyond, up to
    ``SPILL_FACTOR`` times as much on disk)."""
    timeout_s: float | None
    """Seconds a query may run before it is interrupted."""
    max_result_bytes: int | None
    """Bytes of Arrow data a result may hold; a larger result is refused unbuilt."""

    @classmethod
    def of(
        cls,
        memory_limit: int | str | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        max_result_bytes: int | str | None = DEFAULT_MAX_RESULT_BYTES,
    ) -> QueryBounds:
        """Bounds from user values: sizes as bytes or text (``4GB``), ``memory_limit=None``
        for ``MEMORY_FRACTION`` of the machine's memory."""
        memory = (
            int(machine_memory() * MEMORY_FRACTION)
            if memory_limit is None
            else parse_size(memory_limit, "memory limit (--memory-limit)")
        )
        if timeout_s is not None and not timeout_s > 0:
            raise ConfigError(f"timeout (--timeout): {timeout_s!r} must be more than 0 seconds")
        result = (
            None
            if max_result_bytes is None
            else parse_size(max_result_bytes, "result bound (--max-result)")
        )
        return cls(memory, timeout_s, result)

    def settings(self, temp_dir: str) -> list[str]:
        """DuckDB SET statements for these bounds and ``temp_dir``; run them before the
        configuration is locked."""
        quoted = temp_dir.replace("'", "''")
        return [
            f"SET temp_directory = '{quoted}'",
            f"SET memory_limit = '{self.memory_limit}B'",
            f"SET max_temp_directory_size = '{self.memory_limit * SPILL_FACTOR}B'",
        ]

    @contextmanager
    def guard(self, con: duckdb.DuckDBPyConnection) -> Iterator[None]:
        """Run the block under the time bound, and turn what fails inside it into one
        ``QueryError`` line (DuckDB errors, the interrupt, running out of memory)."""
        import duckdb

        watch = _Watchdog(con, self.timeout_s)
        try:
            yield
        except duckdb.Error as exc:
            if watch.fired:
                raise QueryError(
                    f"query stopped after {self.timeout_s:g} s, its time limit "
                    "(raise it with --timeout or Store(timeout_s=...))"
                ) from None
            if isinstance(exc, duckdb.OutOfMemoryException):
                raise QueryError(self._out_of_memory(str(exc))) from None
            raise QueryError(one_line(str(exc))) from None
        except QueryError as exc:  # the read-only check passes on DuckDB's parser errors
            raise QueryError(one_line(str(exc))) from None
        finally:
            watch.stop()

    def _out_of_memory(self, message: str) -> str:
        detail = strip_kind(message.strip().splitlines()[0]).rstrip(".")
        how = "raise it with --memory-limit or Store(memory_limit=...)"
        limit = format_size(self.memory_limit)
        if "max_temp_directory_size" in message:
            spill = format_size(self.memory_limit * SPILL_FACTOR)
            return (
                f"query ran out of disk to spill to: {detail}; a query may spill {spill}, "
                f"{SPILL_FACTOR} times the memory limit of {limit}; {how}"
            )
        return f"query ran out of memory: {detail}, under the memory limit of {limit}; {how}"

    def fetch(self, relation: duckdb.DuckDBPyRelation) -> pl.DataFrame:
        """The relation's result as a frame, read in record batches and refused with a
        ``QueryError`` as soon as it passes ``max_result_bytes``.

        DuckDB errors raised while reading the batches reach Python as pyarrow
        ``OSError``s carrying only DuckDB's message; they are raised again as the DuckDB
        exception the message names (an ``IO Error`` as ``duckdb.IOException``...), so
        that callers see one kind of error whatever batch it came in.
        """
        import polars as pl
        import pyarrow as pa

        rows = _batch_rows(relation.types, self.max_result_bytes)
        try:
            with relation.to_arrow_reader(rows) as reader:
                batches, total = [], 0
                for batch in reader:
                    total += batch.nbytes
                    if self.max_result_bytes is not None and total > self.max_result_bytes:
                        raise QueryError(
                            f"the result passed {format_size(self.max_result_bytes)}; add a "
                            "LIMIT or raise --max-result (Store(max_result_bytes=...))"
                        )
                    batches.append(batch)
                schema = reader.schema
        except OSError as exc:
            raise _duckdb_error(str(exc)) from None
        return pl.from_arrow(pa.Table.from_batches(batches, schema=schema))


class _Watchdog:
    """Interrupts a connection once ``timeout_s`` has passed, and again every 50 ms
    until stopped: an interrupt that arrives between two steps of a query (binding,
    then reading) is dropped by DuckDB, the next one lands."""

    def __init__(self, con: duckdb.DuckDBPyConnection, timeout_s: float | None) -> None:
        self.fired = False
        self._con = con
        self._stop = threading.Event()
        self._thread = None
        if timeout_s is not None:
            self._thread = threading.Thread(
                target=self._run, args=(timeout_s,), name="arrakis-query-timeout", daemon=True
            )
            self._thread.start()

    def _run(self, timeout_s: float) -> None:
        if self._stop.wait(timeout_s):
            return
        self.fired = True
        while not self._stop.is_set():
            self._con.interrupt()
            self._stop.wait(0.05)

    def stop(self) -> None:
        """Stop interrupting; joined, so no interrupt can reach the next query."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# bytes per value of DuckDB's fixed-width types (others: _OTHER_BYTES)
_WIDTHS = {"boolean": 1, "tinyint": 1, "utinyint": 1, "smallint": 2, "usmallint": 2}
_WIDTHS |= {"integer": 4, "uinteger": 4, "float": 4, "date": 4, "bigint": 8, "ubigint": 8}
_WIDTHS |= {"double": 8, "hugeint": 16, "uhugeint": 16, "uuid": 16, "interval": 16}
_OTHER_BYTES = 16  # a short string, a timestamp, a decimal
_LIST_LENGTH = 8  # a guess: a variable-length list's length is known only once read
_BATCH_BYTES = 16 << 20  # Arrow bytes per batch: small against the bound, few Python steps


def _value_bytes(dtype: duckdb.sqltypes.DuckDBPyType) -> int:
    """A guess of the Arrow bytes of one value of ``dtype``."""
    children = dict(dtype.children) if dtype.id in ("array", "list", "struct", "map") else {}
    if dtype.id == "array":
        return _value_bytes(children["child"]) * int(children["size"])
    if dtype.id == "list":
        return _value_bytes(children["child"]) * _LIST_LENGTH
    if dtype.id in ("struct", "map"):
        return sum(_value_bytes(child) for child in children.values())
    return _WIDTHS.get(dtype.id, _OTHER_BYTES)


def _batch_rows(types: list, max_result_bytes: int | None) -> int:
    """Rows per record batch, so that a batch holds about ``_BATCH_BYTES`` (a row of
    14,336 float32 activations is 57 KB: a fixed row count would overshoot the bound)."""
    target = min(_BATCH_BYTES, max_result_bytes or _BATCH_BYTES)
    row = sum(_value_bytes(t) for t in types) or 1
    return max(1, min(1 << 20, target // row))


def _duckdb_error(message: str) -> duckdb.Error:
    """The DuckDB exception that the ``<Kind> Error: ...`` prefix of ``message`` names."""
    import duckdb

    kinds = {
        "IO Error": duckdb.IOException,
        "Out of Memory Error": duckdb.OutOfMemoryException,
        "INTERRUPT Error": duckdb.InterruptException,
    }
    return kinds.get(message.partition(":")[0].strip(), duckdb.Error)(message)


def make_temp_dir() -> str:
    """A new temp directory for DuckDB, named after this process; stale ones of killed
    processes are removed first."""
    sweep_stale_temp_dirs()
    return tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-")


def sweep_stale_temp_dirs(parent: str | None = None) -> list[Path]:
    """Remove the ``arrakis-duckdb-<pid>-*`` directories under ``parent`` (the system
    temp directory) that belong to this user and whose process is gone; returns them.

    A directory of a live process, of another user, or without a pid in its name (an
    older arrakis-ray's) is kept: only its owner can tell whether it is in use.
    """
    if os.name != "posix":  # os.kill(pid, 0) is no liveness test on Windows
        return []
    parent_dir = Path(parent or tempfile.gettempdir())
    owned = re.compile(rf"^{re.escape(TEMP_PREFIX)}(\d+)-")
    removed = []
    try:
        entries = list(os.scandir(parent_dir))
    except OSError:
        return []
    for entry in entries:
        match = owned.match(entry.name)
        if match is None:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        if _alive(int(match.group(1))):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)  # another Store may be sweeping too
        log.info("removed %s, the DuckDB temp directory of a process that is gone", entry.path)
        removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0, ...) would address our own process group
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
