"""Sweep and schedule records in a store: append-only JSON files, read as SQL views.

Layout (under the store root, beside ``runs/`` and ``experiments/``)::

    sweeps/<sweep_id>/sweep.json                                 schemas/sweep.v1.json
    sweeps/<sweep_id>/runs/<point_key>/<time>-<hex>.json         schemas/sweep_run.v1.json
    schedules/<name>/schedule.json                               schemas/schedule.v1.json
    schedules/<name>/firings/<fire time>/<time>-<hex>.json       schemas/schedule_firing.v1.json

A sweep is written once (its id is a hash of its content). What happens to a point of
a sweep, or to a firing of a schedule, is a new event file whose name (its UTC time and
random hex) no other writer uses: two processes recording at once never write the same
file, and nothing is read, changed and written back. Each file appears whole
(``store/atomic.py``: rename on a disk, one upload on an object store). The latest event
of a point (or a firing) is its state. A file that cannot be read is left out with a
warning naming it; the others are read.

Views, built by :func:`create_views` (``sweep_views.py`` holds their SQL) on the store's
catalog: ``sweeps``, ``sweep_runs``, ``sweep_run_events``, ``schedules``,
``schedule_firings`` and ``schedule_firing_events``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from arrakis_ray.errors import StoreError
from arrakis_ray.store.atomic import atomic_open
from arrakis_ray.store.layout import STORE_MARKER, init_store
from arrakis_ray.store.location import StorePath, is_remote, store_path

log = logging.getLogger(__name__)

SWEEPS_DIR = "sweeps"
SCHEDULES_DIR = "schedules"
METHODS = ("grid", "random")
RUN_STATUSES = ("pending", "running", "complete", "skipped", "duplicate", "failed")
FIRING_STATUSES = ("submitted", "already submitted", "skipped", "failed")
CATCH_UP = ("latest", "all", "none")
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
    store: str
    address: str | None = None
    """The Ray Jobs address (``http://HEAD:8265``); None: the scheduler's own."""
    catch_up: str = "latest"
    """After downtime: submit the latest missed firing, all of them, or none."""
    timezone: str = "UTC"
    created_at: str = field(default_factory=utc_now)

    def checked(self) -> ScheduleRecord:
        """This record with its times in UTC form; StoreError naming a field that is wrong."""
        from croniter import croniter

        check_name(self.name, "schedule name")
        _text(self, "sweep", "sweep_text", "cron", "store")
        _optional_text(self, "address")
        _one_of(self.catch_up, CATCH_UP, "catch_up policy")
        _one_of(self.timezone, ("UTC",), "schedule timezone")
        if not croniter.is_valid(self.cron):
            raise StoreError(f"schedule {self.name}: {self.cron!r} is not a cron expression")
        return dataclasses.replace(self, created_at=utc_time(self.created_at, "created_at"))


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


# -- writing ----------------------------------------------------------------------


def write_sweep(store: str | StorePath, record: SweepRecord) -> StorePath:
    """Write the sweep's record, once: a readable record of the same sweep id is left as
    it is (its id is a hash of its content). Its path."""
    record = record.checked()
    path = _writable(store) / SWEEPS_DIR / record.sweep_id / "sweep.json"
    if path.exists():
        try:
            if _parse(SweepRecord, path.read_bytes()).sweep_id == record.sweep_id:
                return path
        except (OSError, StoreError) as exc:
            log.warning("%s: %s; written again", path, exc)
    _write(path, record)
    return path


def append_run_event(store: str | StorePath, event: RunEvent) -> StorePath:
    """Record one event of a sweep's point, in a new file. Its path."""
    event = event.checked()
    directory = _writable(store) / SWEEPS_DIR / event.sweep_id / "runs" / event.point_key
    return _write(directory / _event_name(event.at), event)


def write_schedule(store: str | StorePath, record: ScheduleRecord) -> StorePath:
    """Write (or replace) a schedule's record; its firings stay. Its path."""
    record = record.checked()
    path = _writable(store) / SCHEDULES_DIR / record.name / "schedule.json"
    return _write(path, record)


def remove_schedule(store: str | StorePath, name: str) -> None:
    """Remove a schedule (its firings stay: the history, and what no scheduler may
    submit again); StoreError if there is none of that name."""
    path = store_path(store) / SCHEDULES_DIR / check_name(name, "schedule name")
    path = path / "schedule.json"
    if not path.exists():
        raise StoreError(f"{store}: no schedule named {name!r}")
    path.unlink()


def append_firing(store: str | StorePath, event: FiringEvent) -> StorePath:
    """Record one event of a schedule's firing, in a new file. Its path."""
    event = event.checked()
    directory = _writable(store) / SCHEDULES_DIR / event.schedule / "firings"
    return _write(directory / compact_time(event.fire_time) / _event_name(event.at), event)


def _writable(store: str | StorePath) -> StorePath:
    root = store_path(store)
    # one stat per record; a store not made yet (a schedule added first) is made here
    return root if (root / STORE_MARKER).exists() else init_store(root)


def _event_name(at: str) -> str:
    stamp = datetime.fromisoformat(at).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{stamp}-{secrets.token_hex(4)}.json"


def _write(path: StorePath, record: Any) -> StorePath:
    text = _dumps(dataclasses.asdict(record), type(record).__name__)
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return path


# -- reading ----------------------------------------------------------------------


def read_sweeps(store: str | StorePath) -> list[SweepRecord]:
    """Every readable sweep record, by sweep id."""
    found = _read(store_path(store), SWEEPS_DIR, ("*", "sweep.json"), SweepRecord)
    return sorted((record for _f, record in found), key=lambda r: r.sweep_id)


def read_run_events(
    store: str | StorePath, sweep_id: str | None = None
) -> list[tuple[str, RunEvent]]:
    """(file, event) of every readable run event (of one sweep, if given), in the order
    they happened (file: its path relative to the store root)."""
    where = SWEEPS_DIR if sweep_id is None else f"{SWEEPS_DIR}/{check_name(sweep_id, 'sweep id')}"
    pattern = ("*", "runs", "*", "*.json") if sweep_id is None else ("runs", "*", "*.json")
    found = _read(store_path(store), where, pattern, RunEvent)
    return sorted(found, key=lambda item: (item[1].at, item[0]))


def latest_run_events(store: str | StorePath, sweep_id: str) -> dict[int, RunEvent]:
    """Point -> its latest event, for one sweep."""
    return {event.point: event for _file, event in read_run_events(store, sweep_id)}


def read_schedules(store: str | StorePath) -> list[ScheduleRecord]:
    """Every readable schedule, by name."""
    found = _read(store_path(store), SCHEDULES_DIR, ("*", "schedule.json"), ScheduleRecord)
    return sorted((record for _f, record in found), key=lambda r: r.name)


def read_schedule(store: str | StorePath, name: str) -> ScheduleRecord | None:
    """One schedule (None: there is none of that name); StoreError if it is unreadable."""
    path = store_path(store) / SCHEDULES_DIR / check_name(name, "schedule name")
    path = path / "schedule.json"
    if not path.exists():
        return None
    try:
        return _parse(ScheduleRecord, path.read_bytes())
    except StoreError as exc:
        raise StoreError(f"{path}: not a readable schedule ({exc})") from None


def read_firings(store: str | StorePath, schedule: str | None = None) -> list[FiringEvent]:
    """Every readable firing event (of one schedule, if given), by schedule, fire time
    and the time it was recorded."""
    return [event for _file, event in read_firing_events(store, schedule)]


def read_firing_events(
    store: str | StorePath, schedule: str | None = None
) -> list[tuple[str, FiringEvent]]:
    """(file, event) of every readable firing event, as ``read_firings`` orders them."""
    if schedule is None:
        where, pattern = SCHEDULES_DIR, ("*", "firings", "*", "*.json")
    else:
        where = f"{SCHEDULES_DIR}/{check_name(schedule, 'schedule name')}"
        pattern = ("firings", "*", "*.json")
    found = _read(store_path(store), where, pattern, FiringEvent)
    return sorted(
        found, key=lambda item: (item[1].schedule, item[1].fire_time, item[1].at, item[0])
    )


def _read(root: StorePath, where: str, pattern: tuple[str, ...], cls: type) -> list[tuple]:
    """(path relative to the root, record) of the files under ``root/where`` matching
    ``pattern`` (one glob per path segment); unreadable ones are left out, with a warning."""
    from fnmatch import fnmatchcase

    base = root / where
    names = [
        name
        for name in _listing(base)
        if len(parts := name.split("/")) == len(pattern)
        and not any(p.startswith(".") for p in parts)  # temp files of writes under way
        and all(fnmatchcase(p, glob) for p, glob in zip(parts, pattern, strict=True))
    ]
    found = []
    for name, data in zip(names, _contents(base, names), strict=True):
        path = base / name
        try:
            if isinstance(data, BaseException):
                raise StoreError(f"cannot read it ({data})")
            found.append((f"{where}/{name}", _parse(cls, data)))
        except StoreError as exc:  # one damaged file must not hide the others
            log.warning("%s: not a readable %s (%s); left out", path, cls.what, exc)
    return found


def _listing(base: StorePath) -> list[str]:
    """Paths of every file under ``base``, relative to it, sorted ('/'-separated)."""
    if is_remote(base):
        prefix = base.path.rstrip("/") + "/"
        try:  # one recursive listing, not one per directory
            return sorted(p.removeprefix(prefix) for p in base.fs.find(base.path))
        except FileNotFoundError:
            return []
    if not base.is_dir():
        return []
    found = []
    for directory, _dirs, files in os.walk(base):
        relative = os.path.relpath(directory, base)
        found += [f if relative == "." else f"{relative}/{f}" for f in files]
    return sorted(found)


def _contents(base: StorePath, names: list[str]) -> list[bytes | BaseException]:
    """The bytes of each file (or why it could not be read)."""
    if is_remote(base) and names:
        paths = [(base / name).path for name in names]
        # fetched concurrently by async filesystems (s3fs): a sweep has many small files
        data = base.fs.cat(paths, on_error="return")
        return [data.get(p, FileNotFoundError(p)) for p in paths]
    found: list[bytes | BaseException] = []
    for name in names:
        try:
            found.append((base / name).read_bytes())
        except OSError as exc:
            found.append(exc)
    return found


def _parse(cls: type, data: bytes) -> Any:
    """A record of ``cls`` from a file's bytes; StoreError saying what is wrong."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"not JSON ({exc})") from None
    names = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(raw, dict) or not set(raw) <= names:
        extra = sorted(set(raw) - names) if isinstance(raw, dict) else "not an object"
        raise StoreError(f"unknown fields {extra}")
    try:
        return cls(**raw).checked()
    except TypeError as exc:  # a required field missing
        raise StoreError(str(exc)) from None


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


def create_views(con, root: StorePath) -> list[str]:
    """Create the sweep and schedule views on ``con`` (``sweep_views.py``); their names.
    Without records they exist, empty, with their columns."""
    from arrakis_ray.sweeps.sweep_views import load_views

    return load_views(con, root)
