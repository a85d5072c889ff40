"""Cron schedules of sweeps, and the scheduler that submits their firings as Ray Jobs.

Ray has no cron. A schedule (``schedule add``) is a record in the store: a sweep file,
a cron expression (``croniter``), the store, the Ray Jobs address and a catch-up policy.
The scheduler (``arrakis-ray scheduler``) reads the schedules, works out which firings
are due since the last one recorded, submits each as a Ray Job, and records what
happened to it in the store (``schedule_firings``): once (``--once``, for system cron or
a Kubernetes CronJob) or in a loop that sleeps until the next firing.

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

import hashlib
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from arrakis_ray.errors import ArrakisError, ConfigError

log = logging.getLogger(__name__)

CATCH_UP_POLICIES = ("latest", "all", "none")
MAX_CATCH_UP = 100  # firings policy "all" submits after downtime; older ones are skipped
MAX_MISSED = 1000  # missed firings looked at; older ones are neither submitted nor recorded
ON_TIME_S = 60  # policy "none": a firing at most this many seconds old is still on time
MAX_TRIES = 3  # submissions of one firing that failed, before it counts as done
RELOAD_S = 60  # the looping scheduler reads the schedules again at least this often
_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_DONE = ("submitted", "already submitted", "skipped")


def check_cron(cron: str) -> str:
    """``cron`` if croniter reads it as a 5-field expression (or ``@daily`` ...), else
    ConfigError naming it."""
    from croniter import croniter

    text = " ".join(str(cron).split())
    if text in _ALIASES:
        return text
    fields = text.split(" ")
    if len(fields) != 5:
        why = f"{len(fields)} fields, expected 5"
    else:
        try:
            croniter(text)
            return text
        except (ValueError, KeyError) as exc:
            # croniter's "[expr] is not acceptable, out of range": keep the reason
            why = str(exc).removeprefix(f"[{text}] ").removeprefix("is not acceptable")
            why = why.lstrip(", ") or "a field is not a number, name, range or step"
    raise ConfigError(
        f"--cron {cron!r}: not a cron expression: {why} (5 fields: minute hour "
        "day-of-month month day-of-week, in UTC; e.g. '0 3 * * *')"
    )
    return text


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
    """Check and record a schedule; returns its ``ScheduleRecord``.

    The cron expression, the catch-up policy and the store are checked, and the sweep
    is loaded and planned once (without Ray) so that a sweep that cannot run is refused
    now, not at 3 a.m. A schedule of the same name is replaced only with ``replace``.
    """
    from arrakis_ray.sweeps.jobs import canonical_store
    from arrakis_ray.sweeps.plan import plan_sweep
    from arrakis_ray.sweeps.records import ScheduleRecord, read_schedule, write_schedule
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
    record = ScheduleRecord(
        name=name,
        sweep=str(path),
        sweep_text=sweep.text,
        cron=cron,
        store=store_text,
        address=address or None,
        catch_up=catch_up,
        created_at=_utc(now or datetime.now(UTC)).isoformat(),
    )
    write_schedule(store_text, record)
    log.info("schedule %s: %s, sweep %s, store %s", name, cron, path, store_text)
    return record


# -- when to fire ----------------------------------------------------------------------


def next_firing(schedule, after: datetime) -> datetime:
    """The schedule's first fire time after ``after`` (UTC)."""
    from croniter import croniter

    zone = ZoneInfo(schedule.timezone)
    return _utc(croniter(schedule.cron, _utc(after).astimezone(zone)).get_next(datetime))


def due_firings(schedule, last_fire: datetime | None, now: datetime) -> list[datetime]:
    """The fire times after ``last_fire`` (or after the schedule was created, whichever
    is later) up to ``now`` included, oldest first, in UTC: the latest ``MAX_MISSED``
    at most (a warning says when older ones were left out)."""
    from croniter import croniter

    now = _utc(now)
    start = _utc(datetime.fromisoformat(schedule.created_at))
    if last_fire is not None and _utc(last_fire) > start:
        start = _utc(last_fire)
    zone = ZoneInfo(schedule.timezone)
    # walk back from just after now: croniter's get_prev excludes its start time
    cron = croniter(
        schedule.cron, (now.replace(microsecond=0) + timedelta(seconds=1)).astimezone(zone)
    )
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


def fire_schedule(schedule, address: str | None, now: datetime) -> list:
    """One schedule's due firings, submitted or skipped by its policy and recorded in
    its store; the ``FiringEvent`` of each, oldest first."""
    from arrakis_ray.sweeps.records import FiringEvent, append_firing, read_firings

    last = last_firing(read_firings(schedule.store, schedule.name))
    submit, skip = catch_up(schedule.catch_up, due_firings(schedule, last, now), now)
    events = []
    for fire in skip:
        why = f"missed while no scheduler ran (catch-up policy {schedule.catch_up})"
        events.append(FiringEvent(schedule.name, fire.isoformat(), None, "skipped", why))
    for fire in submit:
        events.append(_fire(schedule, fire, schedule.address or address))
    for event in events:
        append_firing(schedule.store, event)
        log.info(
            "schedule %s, firing %s: %s %s%s", event.schedule, event.fire_time, event.status,
            event.submission_id or "", f": {event.error}" if event.error else "",
        )  # fmt: skip
    return events


def _fire(schedule, fire_time: datetime, address: str | None):
    """Submit one firing; its event (failures are recorded, not raised)."""
    from arrakis_ray.sweeps.jobs import submit_sweep
    from arrakis_ray.sweeps.records import FiringEvent
    from arrakis_ray.sweeps.spec import load_sweep

    submission_id = fire_submission_id(schedule, fire_time)
    sweep_id = None
    try:
        if not address:
            raise ConfigError(
                f"schedule {schedule.name}: no Ray Jobs address: give the scheduler "
                "--address, or the schedule one (schedule add --address)"
            )
        path = Path(schedule.sweep)
        if not path.is_file():
            raise ConfigError(f"schedule {schedule.name}: sweep file {path} not found here")
        if path.read_text(encoding="utf-8") != schedule.sweep_text:
            raise ConfigError(
                f"schedule {schedule.name}: {path} changed since the schedule was added; "
                "to submit the new version, add the schedule again (schedule add --replace)"
            )
        sweep = load_sweep(path)
        sweep_id = sweep.sweep_id
        meta = {"arrakis_schedule": schedule.name, "arrakis_fire_time": fire_time.isoformat()}
        done = submit_sweep(
            sweep, schedule.store, address, submission_id=submission_id, metadata=meta
        )
        return FiringEvent(
            schedule.name, fire_time.isoformat(), submission_id, done.status, sweep_id=sweep_id
        )
    except ArrakisError as exc:
        return FiringEvent(
            schedule.name, fire_time.isoformat(), submission_id, "failed", str(exc),
            sweep_id=sweep_id,
        )  # fmt: skip


def run_scheduler(
    store: str | os.PathLike,
    address: str | None = None,
    once: bool = False,
    now: datetime | None = None,
    echo: Callable[[object], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list:
    """Submit every schedule's due firings (``fire_schedule``); with ``once`` a single
    pass at ``now`` (default: the clock), returning its events; else forever, sleeping
    until the next firing and reading the schedules again at least every ``RELOAD_S``
    seconds. ``echo`` gets each event as it is recorded."""
    from arrakis_ray.store.location import store_path
    from arrakis_ray.sweeps.records import read_schedules

    store_text = str(store_path(store))  # where the schedules are read; each names its store
    if now is not None and not once:
        raise ConfigError("--now sets the clock of a single pass: use it with --once")
    while True:
        moment = _utc(now or datetime.now(UTC))
        events = []
        schedules = []
        try:
            schedules = read_schedules(store_text)
            for schedule in schedules:
                for event in fire_schedule(schedule, address, moment):
                    events.append(event)
                    if echo:
                        echo(event)
        except Exception:  # a looping scheduler outlives a store or cluster outage
            if once:
                raise
            log.exception("scheduler pass over %s failed; trying again", store_text)
        if once:
            return events
        wake = min([next_firing(s, moment) for s in schedules], default=None)
        pause = RELOAD_S if wake is None else (wake - datetime.now(UTC)).total_seconds()
        sleep(min(max(pause, 0.5), RELOAD_S))


def _utc(value: datetime) -> datetime:
    """An aware UTC datetime (a naive one is taken as UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
