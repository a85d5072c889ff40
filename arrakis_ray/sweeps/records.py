"""Sweep and schedule records in a store: append-only JSON files, read as SQL views.

Layout (under the store root, beside ``runs/`` and ``experiments/``)::

    sweeps/<sweep_id>/sweep.json                                 schemas/sweep.v1.json
    sweeps/<sweep_id>/runs/<point_key>/<time>-<hex>.json         schemas/sweep_run.v1.json
    schedules/<name>/schedule.json                               schemas/schedule.v1.json
    schedules/<name>/files-<hash>/...                            the files a firing submits
    schedules/<name>/firings/<fire time>/<time>-<hex>.json       schemas/schedule_firing.v1.json

A sweep is written once (its id is a hash of its content). What happens to a point of
a sweep, or to a firing of a schedule, is a new event file whose name (its UTC time and
random hex) no other writer uses: two processes recording at once never write the same
file, and nothing is read, changed and written back. Each file appears whole
(``store/atomic.py``: rename on a disk, one upload on an object store). The latest event
of a point is its state (a firing's state ranks its events: ``sweep_views.py``). A file
that cannot be read is left out with a warning naming it; the others are read.

A sweep's record and a schedule create the store if there is none yet; an event (a
point's, a firing's) is only written into an existing store: a mistyped store is an
error, not a new empty store.

The record types and their checks are in ``record_types.py`` (re-exported here).

Views, built by :func:`create_views` (``sweep_views.py`` holds their SQL) on the store's
catalog: ``sweeps``, ``sweep_runs``, ``sweep_run_events``, ``schedules``,
``schedule_firings`` and ``schedule_firing_events``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

from arrakis_ray.errors import StoreError
from arrakis_ray.store.atomic import atomic_open
from arrakis_ray.store.layout import STORE_MARKER, init_store
from arrakis_ray.store.location import StorePath, is_remote, store_path
from arrakis_ray.sweeps.record_types import (  # noqa: F401 - re-exported
    CATCH_UP,
    CRON_ALIASES,
    FIRING_STATUSES,
    METHODS,
    RUN_STATUSES,
    FiringEvent,
    RunEvent,
    ScheduleRecord,
    SweepRecord,
    _dumps,
    check_name,
    compact_time,
    cron_problem,
    utc_now,
    utc_time,
)

log = logging.getLogger(__name__)

SWEEPS_DIR = "sweeps"
SCHEDULES_DIR = "schedules"
FILES_DIR = "files"  # schedules/<name>/files-<hash>/: the snapshot a firing submits

# -- writing ----------------------------------------------------------------------


def write_sweep(store: str | StorePath, record: SweepRecord) -> StorePath:
    """Write the sweep's record, once: a readable record of the same sweep id is left as
    it is (its id is a hash of its content). Its path."""
    record = record.checked()
    path = _writable(store, create=True) / SWEEPS_DIR / record.sweep_id / "sweep.json"
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
    path = _writable(store, create=True) / SCHEDULES_DIR / record.name / "schedule.json"
    return _write(path, record)


def remove_schedule(store: str | StorePath, name: str) -> None:
    """Remove a schedule and its snapshot (its firings stay: the history, and what no
    scheduler may submit again); StoreError if there is none of that name."""
    root = store_path(store) / SCHEDULES_DIR / check_name(name, "schedule name")
    path = root / "schedule.json"
    if not path.exists():
        raise StoreError(f"{store}: no schedule named {name!r}")
    path.unlink()
    prune_schedule_files(store, name, keep=None)


def write_schedule_files(store: str | StorePath, name: str, files: dict[str, bytes]) -> str:
    """Write a schedule's snapshot (relative '/'-separated path -> content) into a folder
    of its own, ``schedules/<name>/files-<content hash>/``; the folder's name. Written
    before its record, which names it: a scheduler reading the previous record keeps
    reading the previous folder, whole (``prune_schedule_files`` removes it after)."""
    folder = snapshot_folder(files)
    root = _writable(store, create=True) / SCHEDULES_DIR / check_name(name, "schedule name")
    for rel, data in sorted(files.items()):
        with atomic_open(root / folder / _safe_relative(rel), "wb") as f:
            f.write(data)
    return folder


def snapshot_folder(files: dict[str, bytes]) -> str:
    """The folder a snapshot of ``files`` is written to: ``files-`` and 12 hex of their
    names and contents."""
    digest = hashlib.sha256()
    for rel, data in sorted(files.items()):
        digest.update(f"{_safe_relative(rel)}\0{len(data)}\0".encode())
        digest.update(data)
    return f"{FILES_DIR}-{digest.hexdigest()[:12]}"


def prune_schedule_files(store: str | StorePath, name: str, keep: str | None) -> None:
    """Remove the schedule's snapshot folders but ``keep``."""
    root = store_path(store) / SCHEDULES_DIR / check_name(name, "schedule name")
    if not root.is_dir():
        return
    for folder in root.iterdir():
        if folder.name != keep and folder.name.startswith(FILES_DIR) and folder.is_dir():
            for rel in _listing(folder):
                (folder / rel).unlink()
            if not is_remote(root):
                shutil.rmtree(folder, ignore_errors=True)  # the emptied directories


def read_schedule_files(store: str | StorePath, name: str, folder: str = FILES_DIR) -> dict:
    """The schedule's snapshot in ``folder``: relative path -> content ({} without one);
    StoreError naming a file that cannot be read."""
    base = store_path(store) / SCHEDULES_DIR / check_name(name, "schedule name")
    base = base / check_name(folder, "snapshot folder")
    names = [_safe_relative(n) for n in _listing(base) if not _temporary(n)]
    found = {}
    for rel, data in zip(names, _contents(base, names), strict=True):
        if isinstance(data, BaseException):
            raise StoreError(f"{base / rel}: cannot read the schedule's file ({data})")
        found[rel] = data
    return found


def _temporary(rel: str) -> bool:
    """An atomic write's temp file (``store/atomic.py``), never a snapshot's."""
    return PurePosixPath(rel).name.startswith(".")


def _safe_relative(rel: str) -> str:
    """``rel`` if it is a relative path that stays below its root, else StoreError."""
    path = PurePosixPath(rel)
    if path.is_absolute() or not path.parts or ".." in path.parts:
        raise StoreError(f"{rel!r}: not a relative path inside a schedule's files")
    return path.as_posix()


def append_firing(store: str | StorePath, event: FiringEvent) -> StorePath:
    """Record one event of a schedule's firing, in a new file. Its path."""
    event = event.checked()
    directory = _writable(store) / SCHEDULES_DIR / event.schedule / "firings"
    return _write(directory / compact_time(event.fire_time) / _event_name(event.at), event)


def _writable(store: str | StorePath, create: bool = False) -> StorePath:
    """The store's root; one not made yet is made with ``create`` (a sweep's first run,
    a schedule added first), else StoreError (an event goes into an existing store)."""
    root = store_path(store)
    if (root / STORE_MARKER).exists():  # one stat per record
        return root
    if create:
        return init_store(root)
    raise StoreError(f"{root}: not a store (no {STORE_MARKER}); nothing recorded there")


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


def create_views(con, root: StorePath) -> list[str]:
    """Create the sweep and schedule views on ``con`` (``sweep_views.py``); their names.
    Without records they exist, empty, with their columns."""
    from arrakis_ray.sweeps.sweep_views import load_views

    return load_views(con, root)
