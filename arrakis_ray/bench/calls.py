"""Recording one call of a bench function: what ran, what it printed, what it returned.

:func:`record_call` runs the function and writes its record, whatever happens: a call
that raises is recorded with status ``error`` and its traceback, then the exception goes
on to the caller. The record's files are written only after the function returns, each
under a name no other call uses (``bench/records.py``), so a failing or concurrent call
never changes what is already stored.
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import secrets
import socket
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any

from arrakis_ray.bench import records, versions
from arrakis_ray.errors import StoreError

log = logging.getLogger(__name__)

MAX_STDOUT = 1 << 20  # characters of printed output kept in the record


@dataclass
class CallSpec:
    """What identifies a call before it runs: its name, kind, version and texts."""

    name: str
    kind: str
    source: str
    arguments: str
    version: str
    model_fingerprint: str | None
    model_arch: str | None


@dataclass
class Outcome:
    """What the function's result becomes in the record, and what the caller gets."""

    returned: Any
    row: dict[str, Any] = field(default_factory=dict)
    hypothesis: dict[str, Any] | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)
    """file name -> Arrow table (written as Parquet) or bytes: ``result.parquet``,
    ``chart.vl.json`` or ``profile.parquet``, named in the row's ``result_file``,
    ``chart_file`` or ``profile_file``."""


def new_call_id(now: datetime) -> str:
    """Sortable by time and unique across processes: UTC microseconds + random hex."""
    return now.strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(4)


class _Tee(io.TextIOBase):
    """Prints as usual and keeps a copy (the first MAX_STDOUT characters)."""

    def __init__(self, out):
        self.out, self.kept, self.size = out, [], 0

    def write(self, text: str) -> int:
        self.out.write(text)
        if self.size < MAX_STDOUT:
            self.kept.append(text[: MAX_STDOUT - self.size])
            self.size += len(self.kept[-1])
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def text(self) -> str:
        return "".join(self.kept)


@cache
def packages() -> str:
    """Versions of what a result depends on, read from installed metadata (no imports)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("arrakis-ray", "torch", "transformers", "numpy", "pyarrow", "ray"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return json.dumps(found, sort_keys=True)


def record_call(
    root,
    spec: CallSpec,
    run: Callable[[], Any],
    finish: Callable[[Any], Outcome],
    runs_read: Callable[[], list[str]] = list,
) -> Any:
    """Run ``run()``, record the call under ``root`` and return ``finish``'s value.

    ``finish`` turns the function's result into the record's fields (a hypothesis test,
    a chart); it runs inside the recording, so a result it refuses is an ``error`` call.
    ``runs_read()`` lists the stored runs the call's tools read.
    """
    started = datetime.now(UTC)
    call_id = new_call_id(started)
    files = records.ExperimentFiles(root, spec.name, call_id)
    tee = _Tee(sys.stdout)
    clock = time.perf_counter()
    error: BaseException | None = None
    outcome = Outcome(None)
    try:
        with redirect_stdout(tee):
            outcome = finish(run())
    except BaseException as e:  # noqa: BLE001 - recorded, then raised again below
        error = e
    wall = time.perf_counter() - clock
    row = {
        "name": spec.name,
        "version": spec.version,
        "call_id": call_id,
        "kind": spec.kind,
        "started_at": started.replace(tzinfo=None),
        "wall_s": wall,
        "status": "ok",
        "source": spec.source,
        "arguments": spec.arguments,
        "model_fingerprint": spec.model_fingerprint,
        "model_arch": spec.model_arch,
        "result_kind": "none",
        "stdout": tee.text(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "packages": packages(),
    }
    if error is None:
        row.update(outcome.row)
        try:
            _write_artifacts(files, outcome.artifacts, row)
            if outcome.hypothesis is not None:  # before the call row, which says "ok"
                hypothesis = {
                    "name": spec.name,
                    "version": spec.version,
                    "call_id": call_id,
                    "started_at": row["started_at"],
                    **outcome.hypothesis,
                }
                records.write_row(files.hypothesis, hypothesis, records.hypothesis_schema())
        except Exception as e:  # noqa: BLE001 - the call ran: its record still goes in
            error = StoreError(f"the result of {spec.name} could not be stored: {e}")
            error.__cause__ = e
            row.update(result_kind="none", result_json=None, result_file=None, chart_file=None)
            row["profile_file"] = None
    if error is not None:
        first = (str(error).strip().splitlines() or [""])[0]
        row["status"] = "error"
        row["error"] = f"{type(error).__name__}: {first}".rstrip(": ")
        row["traceback"] = "".join(traceback.format_exception(error))
    used = list(dict.fromkeys(runs_read()))
    row["run_id"] = used[0] if used else None
    row["run_ids"] = used or None
    try:
        records.write_row(files.call, row, records.call_schema())
    except Exception:
        if error is None:
            raise
        # the function's own exception matters more than its record's
        log.exception("could not record the failed call %s of %s", call_id, spec.name)
        raise error from None
    if error is not None:
        raise error
    return outcome.returned


def _write_artifacts(files: records.ExperimentFiles, artifacts: dict, row: dict) -> None:
    """Write the call's artifact files; the row names each by its column."""
    for file_name, content in artifacts.items():
        path, relative = files.artifact(file_name)
        if isinstance(content, bytes):
            records.write_bytes(path, content)
        else:
            records.write_table(path, content)
        column = file_name.partition(".")[0].rstrip("0123456789-") + "_file"
        if column not in ("result_file", "chart_file", "profile_file"):
            raise ValueError(f"artifact {file_name!r} has no column")
        row[column] = relative


def plain_outcome(result: Any) -> Outcome:
    """The record of an ordinary result: a table or array as a Parquet file, anything
    else as JSON (or its repr)."""
    if type(result).__module__.startswith("altair"):  # a chart: its Vega-Lite spec
        chart = result.to_json(indent=None).encode()
        return Outcome(result, {"result_kind": "chart"}, artifacts={"chart.vl.json": chart})
    table = versions.as_table(result)
    if table is not None:
        content, kind = table
        return Outcome(result, {"result_kind": kind}, artifacts={"result.parquet": content})
    if result is None:
        return Outcome(None, {"result_kind": "none"})
    kind, text = versions.result_json(result)
    return Outcome(result, {"result_kind": kind, "result_json": text})
