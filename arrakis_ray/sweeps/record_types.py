"""The sweep and schedule records (``records.py`` writes and reads them) and their checks.

Each record is a frozen dataclass whose fields match its schema file
(``schemas/sweep.v1.json``, ``sweep_run.v1.json``, ``schedule.v1.json``,
``schedule_firing.v1.json``); ``checked()`` returns it with its times in the records'
UTC form, or raises StoreError naming the field that is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from arrakis_ray.errors import StoreError

METHODS = ("grid", "random")
RUN_STATUSES = ("pending", "running", "complete", "skipped", "duplicate", "failed")
FIRING_STATUSES = ("submitted", "already submitted", "skipped", "failed")
CATCH_UP = ("latest", "all", "none")
CRON_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def utc_now() -> str:
    """Now, UTC, as the records write it: ``2025-01-02T03:04:05.123456Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def utc_time(value: str | datetime, what: str = "time") -> str:
    """A time (ISO text or datetime; without a zone: UTC) in the records' UTC form."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise StoreError(f"{what} {value!r} is not an ISO 8601 time") from None
    if not isinstance(value, datetime):
        raise StoreError(f"{what} {value!r} is not a time")
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def compact_time(value: str | datetime) -> str:
    """A time as a directory name: ``20250102T030405Z`` (whole seconds: a fire time)."""
    return datetime.fromisoformat(utc_time(value)).strftime("%Y%m%dT%H%M%SZ")


def check_name(name: str, what: str) -> str:
    """``name`` if it is safe as one path segment (letters, digits, ``._-``), else StoreError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise StoreError(
            f"{what} {name!r}: use letters, digits, '_', '.' or '-' (at most 128), "
            "not starting with '.' or '-'"
        )
    return name


@dataclass(frozen=True)
class SweepRecord:
    """One sweep as it was run (``sweeps/<sweep_id>/sweep.json``), written once."""

    what: ClassVar[str] = "sweep record"
    sweep_id: str
    name: str
    source: str
    method: str
    spec: str
    """The parsed spec, as JSON text."""
    n_points: int
    created_at: str = field(default_factory=utc_now)

    def checked(self) -> SweepRecord:
        """This record with its times in UTC form; StoreError naming a field that is wrong."""
        check_name(self.sweep_id, "sweep id")
        _text(self, "name", "source", "spec")
        _one_of(self.method, METHODS, "sweep method")
        try:
            json.loads(self.spec)
        except ValueError as exc:
            raise StoreError(f"sweep spec is not JSON text ({exc})") from None
        _count(self.n_points, "n_points")
        return dataclasses.replace(self, created_at=utc_time(self.created_at, "created_at"))


@dataclass(frozen=True)
class RunEvent:
    """What happened to one point of a sweep (append-only, the latest wins)."""

    what: ClassVar[str] = "sweep run event"
    sweep_id: str
    sweep_name: str
    point: int
    point_key: str
    run_id: str
    """The harvest run the point reads (``plan_run``): joins ``runs`` and ``results_*``."""
    params: dict[str, Any]
    """Dotted config path -> value, as the sweep set it."""
    variants: dict[str, str]
    """Tool name -> the variant its record is stored under (``tools.runner.tool_variant``)."""
    status: str
    attempt: int = 0
    """The try this event is about (1: the first); 0 before any try."""
    error: str | None = None
    seconds: float | None = None
    at: str = field(default_factory=utc_now)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    def checked(self) -> RunEvent:
        """This record with its times in UTC form; StoreError naming a field that is wrong."""
        check_name(self.sweep_id, "sweep id")
        check_name(self.point_key, "point key")
        check_name(self.run_id, "run id")
        _text(self, "sweep_name", "host")
        _count(self.point, "point")
        _count(self.attempt, "attempt")
        _count(self.pid, "pid")
        _one_of(self.status, RUN_STATUSES, "sweep run status")
        _optional_text(self, "error")
        if not isinstance(self.params, dict) or not all(isinstance(k, str) for k in self.params):
            raise StoreError(f"params {self.params!r}: an object keyed by dotted paths expected")
        _dumps(self.params, "params")
        if not isinstance(self.variants, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.variants.items()
        ):
            raise StoreError(f"variants {self.variants!r}: an object tool -> variant expected")
        seconds = self.seconds
        if seconds is not None:
            if isinstance(seconds, bool) or not isinstance(seconds, int | float):
                raise StoreError(f"seconds {seconds!r} is not a number")
            seconds = float(seconds)
        return dataclasses.replace(self, seconds=seconds, at=utc_time(self.at, "at"))


@dataclass(frozen=True)
class ScheduleRecord:
    """A sweep to submit on a cron schedule (``schedules/<name>/schedule.json``)."""

    what: ClassVar[str] = "schedule"
    name: str
    sweep: str
    """The sweep file's path as given to ``schedule add``."""
    sweep_text: str
    """The sweep file's content when the schedule was added (what is submitted)."""
    cron: str
    """Five fields (or ``@daily`` ...), in UTC (``cron_problem`` checks it)."""
    store: str
    address: str | None = None
    """The Ray Jobs address (``http://HEAD:8265``); None: the scheduler's own."""
    catch_up: str = "latest"
    """After downtime: submit the latest missed firing, all of them, or none."""
    timezone: str = "UTC"
    """Always UTC: cron expressions are read in UTC (kept for the records' schema)."""
    created_at: str = field(default_factory=utc_now)
    sweep_id: str | None = None
    """The sweep's id when the schedule was added (joins ``sweeps.sweep_id``); None in
    records written before it was kept."""
    snapshot: str | None = None
    """The sweep file's path below ``schedules/<name>/``, its snapshot folder first
    (``files-<hash>/...``: the files a firing submits, taken at ``schedule add``); None:
    a record without a snapshot, whose firings read the sweep file at ``sweep``."""

    def checked(self) -> ScheduleRecord:
        """This record with its times in UTC form; StoreError naming a field that is wrong."""
        check_name(self.name, "schedule name")
        _text(self, "sweep", "sweep_text", "cron", "store")
        _optional_text(self, "address", "sweep_id", "snapshot")
        _one_of(self.catch_up, CATCH_UP, "catch_up policy")
        _one_of(self.timezone, ("UTC",), "schedule timezone")
        why = cron_problem(self.cron)
        if why is not None:
            raise StoreError(f"schedule {self.name}: {self.cron!r} is not a cron expression: {why}")
        return dataclasses.replace(self, created_at=utc_time(self.created_at, "created_at"))


def cron_problem(cron: str) -> str | None:
    """Why ``cron`` is not a 5-field cron expression (or ``@daily`` ...) that croniter
    reads; None when it is one. The one check of cron text (``schedule add`` and the
    records both use it)."""
    from croniter import croniter

    text = " ".join(str(cron).split())
    if text in CRON_ALIASES:
        return None
    fields = text.split(" ")
    if len(fields) != 5:
        return f"{len(fields)} fields, expected 5"
    try:
        croniter(text)
    except (ValueError, KeyError) as exc:
        # croniter's "[expr] is not acceptable, out of range": keep the reason
        why = str(exc).removeprefix(f"[{text}] ").removeprefix("is not acceptable")
        return why.lstrip(", ") or "a field is not a number, name, range or step"
    return None


@dataclass(frozen=True)
class FiringEvent:
    """What happened to one firing of a schedule (append-only, the latest wins)."""

    what: ClassVar[str] = "schedule firing event"
    schedule: str
    fire_time: str
    """The cron time this firing is for, UTC (the submission id derives from it)."""
    submission_id: str | None
    status: str
    error: str | None = None
    at: str = field(default_factory=utc_now)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    sweep_id: str | None = None

    def checked(self) -> FiringEvent:
        """This record with its times in UTC form; StoreError naming a field that is wrong."""
        check_name(self.schedule, "schedule name")
        _one_of(self.status, FIRING_STATUSES, "firing status")
        _optional_text(self, "submission_id", "error", "sweep_id")
        _text(self, "host")
        _count(self.pid, "pid")
        return dataclasses.replace(
            self,
            fire_time=utc_time(self.fire_time, "fire_time"),
            at=utc_time(self.at, "at"),
        )


# -- checks -----------------------------------------------------------------------


def _text(record: Any, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(record, name), str):
            raise StoreError(f"{name} {getattr(record, name)!r} is not text")


def _optional_text(record: Any, *names: str) -> None:
    for name in names:
        value = getattr(record, name)
        if value is not None and not isinstance(value, str):
            raise StoreError(f"{name} {value!r} is not text")


def _count(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StoreError(f"{what} {value!r} is not a count (an integer >= 0)")


def _one_of(value: Any, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise StoreError(f"{what} {value!r} is not one of {', '.join(allowed)}")


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} is not JSON ({exc})") from None
