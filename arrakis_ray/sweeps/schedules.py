"""Cron schedules of sweeps, and the scheduler that submits their firings as Ray Jobs.

Ray has no cron. A schedule (``schedule add``) is a record in the store: a sweep file,
a cron expression in UTC (``croniter``), the store, the Ray Jobs address and a catch-up
policy, with a snapshot of the files its jobs read (``schedules/<name>/files-<hash>/``: the
sweep, its base pipeline, the data and prompts they name by relative paths, at most
``MAX_SNAPSHOT_BYTES``), taken where the schedule is added (a laptop) and submitted
from where the scheduler runs (the head node). A file changed after ``schedule add``
does not matter: the snapshot is what was scheduled (``schedule add --replace`` takes a
new one). Files named by absolute paths (``/shared/data.jsonl``) are not in it: the
job reads them as they are.

The scheduler (``arrakis-ray scheduler --store S``) reads the schedules of its store,
works out which firings are due since the last one recorded, submits each as a Ray Job
from a temporary copy of the snapshot, and records what happened to it in its store
(``schedule_firings``): once (``--once``, for system cron or a Kubernetes CronJob) or
in a loop that sleeps until the next firing. A schedule whose store is not the
scheduler's, or that cannot be submitted, gets a failed firing; the others go on.

A firing's submission id is a hash of (schedule, its sweep's text, the store, the fire
time): two schedulers on one store, on one cluster, submit the same id for the same
firing, and the Jobs API accepts it once (``jobs.submit_sweep``); the other records
"already submitted". Nothing is locked.

After downtime, the missed firings (those after the last recorded one, or after the
schedule was added) follow the schedule's catch-up policy:

- ``latest`` (default): submit the most recent missed firing, record the older ones as
  "skipped" (a sweep finishes only what is missing, so one run catches up on all);
- ``all``: submit every missed firing, the latest ``MAX_CATCH_UP`` at most;
- ``none``: skip them all; only a firing at most ``ON_TIME_S`` old is submitted.

A firing that failed (the cluster was unreachable) is tried again by the next passes,
``MAX_TRIES`` times in all, as a missed firing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from arrakis_ray.errors import ArrakisError, ConfigError
from arrakis_ray.sweeps.job_inputs import MAX_SNAPSHOT_BYTES, snapshot_files  # noqa: F401

log = logging.getLogger(__name__)

CATCH_UP_POLICIES = ("latest", "all", "none")
MAX_CATCH_UP = 100  # firings policy "all" submits after downtime; older ones are skipped
MAX_MISSED = 1000  # missed firings looked at; older ones are neither submitted nor recorded
ON_TIME_S = 60  # policy "none": a firing at most this many seconds old is still on time
MAX_TRIES = 3  # submissions of one firing that failed, before it counts as done
RELOAD_S = 60  # the looping scheduler reads the schedules again at least this often
_DONE = ("submitted", "already submitted", "skipped")
_SUBMITTED = ("submitted", "already submitted")


def check_cron(cron: str) -> str:
    """``cron`` (spaces normalised) if croniter reads it as a 5-field expression in UTC
    (or ``@daily`` ...), else ConfigError naming it (``record_types.cron_problem``)."""
    from arrakis_ray.sweeps.record_types import cron_problem

    why = cron_problem(cron)
    if why is not None:
        raise ConfigError(
            f"--cron {cron!r}: not a cron expression: {why} (5 fields: minute hour "
            "day-of-month month day-of-week, in UTC; e.g. '0 3 * * *')"
        )
    return " ".join(str(cron).split())


def add_schedule(
    sweep_path: str | os.PathLike,
    cron: str,
    store: str | os.PathLike,
    name: str | None = None,
    address: str | None = None,
    catch_up: str = "latest",
    replace: bool = False,
    now: datetime | None = None,
):
    """Check and record a schedule, with the snapshot of the files its jobs read;
    returns its ``ScheduleRecord``.

    The cron expression, the catch-up policy and the store are checked, and the sweep
    is loaded and planned once (without Ray) so that a sweep that cannot run is refused
    now, not at 3 a.m. A schedule of the same name is replaced only with ``replace``.
    """
    from arrakis_ray.sweeps.jobs import canonical_store
    from arrakis_ray.sweeps.plan import plan_sweep
    from arrakis_ray.sweeps.records import (
        ScheduleRecord,
        prune_schedule_files,
        read_schedule,
        snapshot_folder,
        write_schedule,
        write_schedule_files,
    )
    from arrakis_ray.sweeps.spec import load_sweep

    cron = check_cron(cron)
    if catch_up not in CATCH_UP_POLICIES:
        raise ConfigError(
            f"--catch-up {catch_up!r}: expected one of {', '.join(CATCH_UP_POLICIES)}"
        )
    store_text = canonical_store(store)
    path = Path(sweep_path).expanduser().resolve()
    sweep = load_sweep(path)
    plan_sweep(sweep, store_text)  # every point plans: the sweep can run
    name = name or path.stem
    if not replace and read_schedule(store_text, name) is not None:
        raise ConfigError(
            f"{store_text}: a schedule named {name!r} exists; remove it first, give "
            "another --name, or --replace it"
        )
    files, sweep_rel = snapshot_files(sweep)
    folder = snapshot_folder(files)
    record = ScheduleRecord(
        name=name,
        sweep=str(path),
        sweep_text=sweep.text,
        cron=cron,
        store=store_text,
        address=address or None,
        catch_up=catch_up,
        created_at=_utc(now or datetime.now(UTC)).isoformat(),
        sweep_id=sweep.sweep_id,
        snapshot=f"{folder}/{sweep_rel}",
    ).checked()  # a bad record is refused before its files are written
    write_schedule_files(store_text, name, files)
    write_schedule(store_text, record)  # from here on firings read the new folder
    prune_schedule_files(store_text, name, keep=folder)
    log.info(
        "schedule %s: %s UTC, sweep %s (%d files, %d bytes), store %s",
        name, cron, path, len(files), sum(map(len, files.values())), store_text,
    )  # fmt: skip
    return record


# -- when to fire ----------------------------------------------------------------------


def next_firing(schedule, after: datetime) -> datetime:
    """The schedule's first fire time after ``after`` (cron in UTC)."""
    from croniter import croniter

    return _utc(croniter(schedule.cron, _utc(after)).get_next(datetime))


def due_firings(schedule, last_fire: datetime | None, now: datetime) -> list[datetime]:
    """The fire times after ``last_fire`` (or after the schedule was created, whichever
    is later) up to ``now`` included, oldest first, in UTC: the latest ``MAX_MISSED``
    at most (a warning says when older ones were left out)."""
    from croniter import croniter

    now = _utc(now)
    start = _utc(datetime.fromisoformat(schedule.created_at))
    if last_fire is not None and _utc(last_fire) > start:
        start = _utc(last_fire)
    # walk back from just after now: croniter's get_prev excludes its start time
    cron = croniter(schedule.cron, now.replace(microsecond=0) + timedelta(seconds=1))
    found: list[datetime] = []
    while True:
        fire = _utc(cron.get_prev(datetime))
        if fire <= start:
            break
        if fire <= now:
            found.append(fire)
        if len(found) == MAX_MISSED:
            if _utc(cron.get_prev(datetime)) > start:
                log.warning(
                    "schedule %s: more than %d firings missed since %s; only the latest "
                    "%d are considered", schedule.name, MAX_MISSED, start.isoformat(),
                    MAX_MISSED,
                )  # fmt: skip
            break
    return found[::-1]


def catch_up(policy: str, firings: list[datetime], now: datetime) -> tuple[list, list]:
    """(to submit, to record as skipped) of the due ``firings`` (oldest first) under a
    catch-up policy."""
    if policy == "latest":
        return firings[-1:], firings[:-1]
    if policy == "all":
        if len(firings) > MAX_CATCH_UP:
            log.warning(
                "%d firings missed: policy 'all' submits the latest %d, skips %d",
                len(firings), MAX_CATCH_UP, len(firings) - MAX_CATCH_UP,
            )  # fmt: skip
        return firings[-MAX_CATCH_UP:], firings[:-MAX_CATCH_UP]
    if policy == "none":
        on_time = _utc(now) - timedelta(seconds=ON_TIME_S)
        return [f for f in firings if f >= on_time], [f for f in firings if f < on_time]
    raise ConfigError(f"catch-up policy {policy!r}: expected one of {CATCH_UP_POLICIES}")


def fire_submission_id(schedule, fire_time: datetime) -> str:
    """``arrakis-sched-`` and 16 hex of (schedule name, its sweep's text, its store, the
    fire time in UTC): the same firing is the same job, whoever submits it."""
    text = "\n".join(
        [schedule.name, schedule.sweep_text, schedule.store, _utc(fire_time).isoformat()]
    )
    return "arrakis-sched-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def last_firing(events: list) -> datetime | None:
    """The latest fire time that is done: submitted, already submitted, skipped, or
    failed ``MAX_TRIES`` times; None if there is none."""
    failures: dict[str, int] = {}
    done = []
    for event in events:
        if event.status == "failed":
            failures[event.fire_time] = failures.get(event.fire_time, 0) + 1
        if event.status in _DONE or failures.get(event.fire_time, 0) >= MAX_TRIES:
            done.append(_utc(datetime.fromisoformat(event.fire_time)))
    return max(done, default=None)


# -- firing ----------------------------------------------------------------------------


def fire_schedule(schedule, store: str | os.PathLike, address: str | None, now: datetime):
    """One schedule's due firings, submitted or skipped by its policy and recorded in
    ``store`` (the scheduler's: it must be the schedule's); the ``FiringEvent`` of each,
    oldest first. A firing that cannot be submitted is a failed event, not an error."""
    from arrakis_ray.sweeps.records import FiringEvent, append_firing, read_firings

    last = last_firing(read_firings(store, schedule.name))
    submit, skip = catch_up(schedule.catch_up, due_firings(schedule, last, now), now)
    events = []
    for fire in submit:
        events.append(_fire(schedule, fire, schedule.address or address, store))
        _record(store, events[-1], append_firing)
    if skip:
        # read again: another scheduler may have submitted one of these meanwhile, and a
        # skip recorded after it would be noise (the view ranks a submission first anyway)
        taken = {e.fire_time for e in read_firings(store, schedule.name) if e.status in _SUBMITTED}
        why = f"missed while no scheduler ran (catch-up policy {schedule.catch_up})"
        for fire in skip:
            event = FiringEvent(schedule.name, fire.isoformat(), None, "skipped", why)
            if event.checked().fire_time not in taken:
                events.append(event)
                _record(store, event, append_firing)
    return sorted(events, key=lambda e: _utc(datetime.fromisoformat(e.fire_time)))


def _record(store, event, append_firing) -> None:
    append_firing(store, event)
    log.info(
        "schedule %s, firing %s: %s %s%s", event.schedule, event.fire_time, event.status,
        event.submission_id or "", f": {event.error}" if event.error else "",
    )  # fmt: skip


def same_store(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two store locations are one store: the same URI, or the same directory
    once links are resolved."""
    from arrakis_ray.store.location import is_uri, store_path

    def key(location) -> str:
        text = str(store_path(location))
        return text if is_uri(text) else os.path.realpath(text)

    return key(a) == key(b)


def _fire(schedule, fire_time: datetime, address: str | None, store):
    """Submit one firing from its snapshot; its event (any failure is recorded as a
    failed event, not raised: one firing must not stop the others)."""
    from arrakis_ray.sweeps.records import FiringEvent

    submission_id = fire_submission_id(schedule, fire_time)
    try:
        if not same_store(schedule.store, store):
            raise ConfigError(
                f"schedule {schedule.name}: its sweep writes to {schedule.store}, not to "
                f"this scheduler's store {store}: run a scheduler with --store "
                f"{schedule.store}, or add the schedule again into this store"
            )
        if not address:
            raise ConfigError(
                f"schedule {schedule.name}: no Ray Jobs address: give the scheduler "
                "--address, or the schedule one (schedule add --address)"
            )
        meta = {"arrakis_schedule": schedule.name, "arrakis_fire_time": fire_time.isoformat()}
        done, sweep_id = _submit_snapshot(schedule, store, address, submission_id, meta)
        return FiringEvent(
            schedule.name, fire_time.isoformat(), submission_id, done.status, sweep_id=sweep_id
        )
    except Exception as exc:  # noqa: BLE001 - recorded with the firing, as one line
        error = str(exc) if isinstance(exc, ArrakisError) else f"{type(exc).__name__}: {exc}"
        log.debug("schedule %s: firing %s failed", schedule.name, fire_time, exc_info=True)
        return FiringEvent(
            schedule.name, fire_time.isoformat(), submission_id, "failed", error,
            sweep_id=schedule.sweep_id,
        )  # fmt: skip


def _submit_snapshot(schedule, store, address: str, submission_id: str, meta: dict):
    """Write the schedule's snapshot into a temporary working dir and submit the sweep
    from it (Ray uploads the dir during the call); (the ``Submission``, the sweep id)."""
    from arrakis_ray.sweeps.jobs import submit_sweep
    from arrakis_ray.sweeps.records import FILES_DIR, read_schedule_files
    from arrakis_ray.sweeps.spec import load_sweep

    if schedule.snapshot is None:  # a record from before snapshots: the file on disk
        path = Path(schedule.sweep)
        if not path.is_file() or path.read_text(encoding="utf-8") != schedule.sweep_text:
            raise ConfigError(
                f"schedule {schedule.name}: it has no snapshot of its files and {path} is "
                "missing or changed here: add the schedule again (schedule add --replace)"
            )
        sweep = load_sweep(path)
        return submit_sweep(sweep, store, address, submission_id=submission_id,
                            metadata=meta), sweep.sweep_id  # fmt: skip
    folder, sep, sweep_rel = schedule.snapshot.partition("/")
    if not (sep and folder.startswith(f"{FILES_DIR}-")):  # a record from before folders
        folder, sweep_rel = FILES_DIR, schedule.snapshot
    files = read_schedule_files(store, schedule.name, folder)
    if sweep_rel not in files:
        raise ConfigError(
            f"schedule {schedule.name}: its snapshot in {store} lacks the sweep file "
            f"{schedule.snapshot}: add the schedule again (schedule add --replace)"
        )
    with tempfile.TemporaryDirectory(prefix=f"arrakis-{schedule.name}-") as tmp:
        root = Path(tmp).resolve()
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        # the job runs in its working dir: relative model paths are checked from there
        with contextlib.chdir(root):
            sweep = load_sweep(root / sweep_rel)
            done = submit_sweep(sweep, store, address, root, submission_id=submission_id,
                                metadata=meta)  # fmt: skip
    return done, sweep.sweep_id


def run_scheduler(
    store: str | os.PathLike,
    address: str | None = None,
    once: bool = False,
    now: datetime | None = None,
    echo: Callable[[object], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list:
    """Submit every schedule's due firings (``fire_schedule``), each schedule on its own
    (one that fails does not stop the others); with ``once`` a single pass at ``now``
    (default: the clock), returning its events; else forever, sleeping until the next
    firing and reading the schedules again at least every ``RELOAD_S`` seconds. ``echo``
    gets each event as it is recorded."""
    from arrakis_ray.store.location import store_path
    from arrakis_ray.sweeps.records import read_schedules

    store_text = str(store_path(store))  # the schedules and their firings are here
    if now is not None and not once:
        raise ConfigError("--now sets the clock of a single pass: use it with --once")
    while True:
        moment = _utc(now or datetime.now(UTC))
        events = []
        schedules = []
        try:
            schedules = read_schedules(store_text)
        except Exception:  # a looping scheduler outlives a store outage
            if once:
                raise
            log.exception("scheduler: cannot read the schedules of %s; trying again", store_text)
        for schedule in schedules:
            for event in _pass(schedule, store_text, address, moment):
                events.append(event)
                if echo:
                    echo(event)
        if once:
            return events
        wake = min([next_firing(s, moment) for s in schedules], default=None)
        pause = RELOAD_S if wake is None else (wake - datetime.now(UTC)).total_seconds()
        sleep(min(max(pause, 0.5), RELOAD_S))


def _pass(schedule, store: str, address: str | None, moment: datetime) -> list:
    """``fire_schedule``, or, if it fails as a whole (its firings cannot be read or
    recorded), a failed event for its latest due firing (recorded if possible)."""
    from arrakis_ray.sweeps.records import FiringEvent, append_firing

    try:
        return fire_schedule(schedule, store, address, moment)
    except Exception as exc:  # noqa: BLE001 - one schedule must not block the others
        log.exception("scheduler: schedule %s failed", schedule.name)
        due = due_firings(schedule, None, moment)[-1:]
        if not due:
            return []
        error = str(exc) if isinstance(exc, ArrakisError) else f"{type(exc).__name__}: {exc}"
        event = FiringEvent(schedule.name, due[0].isoformat(),
                            fire_submission_id(schedule, due[0]), "failed", error)  # fmt: skip
        with contextlib.suppress(Exception):  # the store itself may be what failed
            append_firing(store, event)
        return [event]


def _utc(value: datetime) -> datetime:
    """An aware UTC datetime (a naive one is taken as UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
