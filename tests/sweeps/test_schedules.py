"""Cron schedules of sweeps: which firings are due, what the catch-up policies do after
downtime, and two schedulers on one store and one cluster submitting each firing once."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

import pytest
from support import REPO

from arrakis_ray.cli import main
from arrakis_ray.sweeps.records import ScheduleRecord
from arrakis_ray.sweeps.schedules import (
    MAX_CATCH_UP,
    MAX_MISSED,
    catch_up,
    due_firings,
    fire_submission_id,
    last_firing,
)

T0 = datetime(2025, 1, 1, 0, 30, tzinfo=UTC)  # when the test schedules were added


def _schedule(cron: str = "0 * * * *", policy: str = "latest", **kw) -> ScheduleRecord:
    fields = dict(name="nightly", sweep="/s/sweep.yaml", sweep_text="name: s\n", cron=cron,
                  store="/data/store", catch_up=policy, created_at=T0.isoformat())  # fmt: skip
    return ScheduleRecord(**{**fields, **kw})


def _hours(*hours: int) -> list[datetime]:
    return [datetime(2025, 1, 1, h, tzinfo=UTC) for h in hours]


def _cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


# -- due firings and catch-up, on fixed clocks ------------------------------------------


def test_due_firings_are_those_after_creation_or_the_last_firing_up_to_now():
    now = datetime(2025, 1, 1, 5, 10, tzinfo=UTC)
    assert due_firings(_schedule(), None, now) == _hours(1, 2, 3, 4, 5)
    assert due_firings(_schedule(), _hours(3)[0], now) == _hours(4, 5)
    # a firing exactly at now is due; the last one recorded is not due again
    assert due_firings(_schedule(), None, _hours(5)[0]) == _hours(1, 2, 3, 4, 5)
    assert due_firings(_schedule(), _hours(5)[0], _hours(5)[0]) == []
    # a last firing before the schedule was (re)created does not bring older firings back
    assert due_firings(_schedule(), datetime(2024, 12, 31, tzinfo=UTC), now) == _hours(
        1, 2, 3, 4, 5
    )
    daily = _schedule("0 3 * * *")
    assert due_firings(daily, None, datetime(2025, 1, 3, 2, 59, tzinfo=UTC)) == [
        datetime(2025, 1, 1, 3, tzinfo=UTC),
        datetime(2025, 1, 2, 3, tzinfo=UTC),
    ]


def test_only_the_latest_missed_firings_are_looked_at():
    now = T0 + timedelta(days=2)  # 2,880 missed minutes
    found = due_firings(_schedule("* * * * *"), None, now)
    assert len(found) == MAX_MISSED
    assert found[-1] == now.replace(second=0)
    assert found[0] == found[-1] - timedelta(minutes=MAX_MISSED - 1)


def test_catch_up_policies():
    firings = _hours(1, 2, 3, 4, 5)
    now = datetime(2025, 1, 1, 5, 10, tzinfo=UTC)
    assert catch_up("latest", firings, now) == (_hours(5), _hours(1, 2, 3, 4))
    assert catch_up("all", firings, now) == (firings, [])
    # none: a firing ten minutes old is missed; one 30 s old is on time
    assert catch_up("none", firings, now) == ([], firings)
    on_time = datetime(2025, 1, 1, 5, 0, 30, tzinfo=UTC)
    assert catch_up("none", firings, on_time) == (_hours(5), _hours(1, 2, 3, 4))
    assert catch_up("latest", [], now) == ([], [])


def test_catch_up_all_is_capped():
    minutes = [T0 + timedelta(minutes=i) for i in range(MAX_CATCH_UP + 20)]
    submit, skip = catch_up("all", minutes, minutes[-1])
    assert submit == minutes[20:] and skip == minutes[:20]


def test_firing_ids_are_the_schedule_its_sweep_its_store_and_the_fire_time():
    schedule, fire = _schedule(), _hours(3)[0]
    sid = fire_submission_id(schedule, fire)
    assert sid.startswith("arrakis-sched-") and len(sid) == len("arrakis-sched-") + 16
    # the same firing seen in another time zone is the same job
    assert fire_submission_id(schedule, fire.astimezone(timezone(timedelta(hours=-5)))) == sid
    others = [
        fire_submission_id(schedule, _hours(4)[0]),
        fire_submission_id(dataclasses.replace(schedule, name="other"), fire),
        fire_submission_id(dataclasses.replace(schedule, sweep_text="name: t\n"), fire),
        fire_submission_id(dataclasses.replace(schedule, store="/data/other"), fire),
    ]
    assert len({sid, *others}) == 5


def test_a_failed_firing_is_tried_again_until_it_has_failed_three_times():
    from arrakis_ray.sweeps.records import FiringEvent

    def event(hour, status):
        return FiringEvent("nightly", _hours(hour)[0].isoformat(), None, status)

    assert last_firing([]) is None
    assert last_firing([event(2, "submitted"), event(3, "failed")]) == _hours(2)[0]
    assert last_firing([event(2, "skipped"), *[event(3, "failed")] * 3]) == _hours(3)[0]
    assert last_firing([event(2, "already submitted")]) == _hours(2)[0]


# -- schedule add / list / remove ---------------------------------------------------------


def test_a_bad_cron_expression_is_named(tmp_path, tiny_sweep, capsys):
    path, store = tiny_sweep(tmp_path / "work"), tmp_path / "store"
    argv = ["schedule", "add", str(path), "--store", str(store), "--cron"]
    assert main([*argv, "61 3 * * *"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "arrakis-ray: error: --cron '61 3 * * *': not a cron expression: out of range "
        "(5 fields: minute hour day-of-month month day-of-week, in UTC; e.g. '0 3 * * *')\n"
    )
    assert main([*argv, "0 3 * *"]) == 2
    assert "'0 3 * *': not a cron expression: 4 fields, expected 5 (" in capsys.readouterr().err
    assert not store.exists()  # nothing recorded


def _load(path):
    from arrakis_ray.sweeps.spec import load_sweep

    return load_sweep(path)


def test_schedule_add_list_remove(tmp_path, tiny_sweep, capsys):
    from arrakis_ray.sweeps.records import read_schedule_files, read_schedules

    path, store = tiny_sweep(tmp_path / "work"), tmp_path / "store"
    code, out = _cli(["schedule", "add", str(path), "--cron", "0 3 * * *", "--store",
                      str(store), "--name", "nightly"])  # fmt: skip
    assert code == 0 and out.startswith("schedule nightly: '0 3 * * *' (UTC) -> ")
    [record] = read_schedules(store)
    assert (record.name, record.cron, record.sweep, record.catch_up, record.address) == (
        "nightly", "0 3 * * *", str(path.resolve()), "latest", None,
    )  # fmt: skip
    assert record.sweep_text == path.read_text()
    # the files its jobs read are copied into the store, as laid out in the working dir
    folder, _, sweep_rel = record.snapshot.partition("/")
    assert (record.sweep_id, sweep_rel) == (_load(path).sweep_id, "sweep.yaml")
    assert folder.startswith("files-")
    assert read_schedule_files(store, "nightly", folder) == {
        name: (path.parent / name).read_bytes()
        for name in ("base.yaml", "data.jsonl", "sweep.yaml")
    }
    code = main(["schedule", "add", str(path), "--cron", "0 4 * * *", "--store", str(store),
                 "--name", "nightly"])  # fmt: skip
    assert code == 2
    assert capsys.readouterr().err == (
        f"arrakis-ray: error: {store}: a schedule named 'nightly' exists; remove it first, "
        "give another --name, or --replace it\n"
    )
    code, out = _cli(["schedule", "list", "--store", str(store)])
    assert code == 0 and out.startswith("nightly: '0 3 * * *' (UTC), catch-up latest, next ")
    assert out.splitlines()[0].endswith("last never")
    assert _cli(["schedule", "remove", "nightly", "--store", str(store)])[0] == 0
    assert read_schedules(store) == []
    assert not (store / "schedules" / "nightly" / folder).exists()  # its snapshot too


def test_a_replaced_schedule_reads_its_new_snapshot_and_drops_the_old(tmp_path, tiny_sweep):
    """The new files go to a folder of their own before the record names it: a scheduler
    reading the old record meanwhile reads the old folder whole."""
    from arrakis_ray.sweeps.records import read_schedule_files
    from arrakis_ray.sweeps.schedules import add_schedule

    path, store = tiny_sweep(tmp_path / "work"), tmp_path / "store"
    old = add_schedule(path, "0 3 * * *", store, name="nightly", now=T0)
    data = path.parent / "data.jsonl"
    data.write_text(data.read_text().splitlines()[0] + "\n")  # one document now
    new = add_schedule(path, "0 3 * * *", store, name="nightly", now=T0, replace=True)
    old_folder, new_folder = old.snapshot.split("/")[0], new.snapshot.split("/")[0]
    assert old_folder != new_folder
    folders = sorted(p.name for p in (store / "schedules" / "nightly").iterdir() if p.is_dir())
    assert folders == [new_folder]
    assert read_schedule_files(store, "nightly", new_folder)["data.jsonl"] == data.read_bytes()


def test_a_file_a_snapshot_cannot_carry_is_refused_at_add(tmp_path, tiny_sweep):
    """A hidden data file would be stored but never read back; an excluded one never
    uploaded: both refused when the schedule is added, naming the file."""
    import yaml

    from arrakis_ray.errors import ConfigError
    from arrakis_ray.sweeps.schedules import add_schedule

    path, store = tiny_sweep(tmp_path / "work"), tmp_path / "store"
    hidden = path.parent / ".data" / "data.jsonl"
    hidden.parent.mkdir()
    (path.parent / "data.jsonl").rename(hidden)
    base = yaml.safe_load((path.parent / "base.yaml").read_text())
    base["data"]["path"] = ".data/data.jsonl"
    (path.parent / "base.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError, match=r"\.data/data\.jsonl, a hidden path"):
        add_schedule(path, "0 3 * * *", store, now=T0)
    assert not (store / "schedules").exists()


def test_the_snapshot_is_submitted_not_the_files_on_disk(tmp_path, tiny_sweep):
    """The scheduler runs elsewhere (the head node): the sweep's files there do not exist;
    it submits from the snapshot taken at schedule add."""
    import shutil

    from arrakis_ray.sweeps.records import read_firings
    from arrakis_ray.sweeps.schedules import add_schedule, run_scheduler

    path, store = tiny_sweep(tmp_path / "work"), tmp_path / "store"
    added = add_schedule(path, "0 3 * * *", store, now=T0)
    shutil.rmtree(tmp_path / "work")
    # the address is unreachable: the snapshot was loaded and checked, then the connection
    # failed (a missing file would have failed first)
    [event] = run_scheduler(store, "http://127.0.0.1:9", once=True, now=_hours(3)[0])
    assert event.status == "failed"
    assert event.submission_id == fire_submission_id(added, _hours(3)[0])
    assert event.error.startswith("cannot reach the Ray Jobs API at http://127.0.0.1:9")
    assert event.sweep_id == added.sweep_id
    assert [(e.status, e.error) for e in read_firings(store)] == [("failed", event.error)]


def test_a_snapshot_over_the_limit_is_refused(tmp_path, tiny_sweep):
    from arrakis_ray.errors import ConfigError
    from arrakis_ray.sweeps.schedules import MAX_SNAPSHOT_BYTES, snapshot_files

    sweep = _load(tiny_sweep(tmp_path / "work"))
    files, rel = snapshot_files(sweep)
    assert rel == "sweep.yaml" and sorted(files) == ["base.yaml", "data.jsonl", "sweep.yaml"]
    with open(tmp_path / "work" / "data.jsonl", "ab") as f:
        f.write(b"\n" * MAX_SNAPSHOT_BYTES)
    with pytest.raises(ConfigError, match=r"MiB of files .* over the 64 MiB a schedule copies"):
        snapshot_files(sweep)


def test_each_schedule_fires_on_its_own_into_the_schedulers_store(tmp_path, tiny_sweep):
    """A schedule whose store is not the scheduler's gets a failed firing, recorded in the
    scheduler's store (no store is made at the schedule's); the others still fire."""
    from arrakis_ray.sweeps.records import read_firings, write_schedule
    from arrakis_ray.sweeps.schedules import add_schedule, run_scheduler

    path, store = tiny_sweep(tmp_path / "work"), tmp_path / "store"
    good = add_schedule(path, "0 3 * * *", store, name="good", now=T0)
    elsewhere = tmp_path / "elsewhere"
    write_schedule(store, dataclasses.replace(good, name="astray", store=str(elsewhere)))
    events = run_scheduler(store, "http://127.0.0.1:9", once=True, now=_hours(3)[0])
    errors = {e.schedule: e.error for e in events}
    assert errors["astray"] == (
        f"schedule astray: its sweep writes to {elsewhere}, not to this scheduler's store "
        f"{store}: run a scheduler with --store {elsewhere}, or add the schedule again "
        "into this store"
    )
    assert errors["good"].startswith("cannot reach the Ray Jobs API")
    assert sorted((e.schedule, e.status) for e in read_firings(store)) == [
        ("astray", "failed"), ("good", "failed"),
    ]  # fmt: skip
    assert not elsewhere.exists()


def test_the_looping_scheduler_wakes_for_the_next_firing_or_within_a_minute(
    tmp_path, tiny_sweep, capsys
):
    from arrakis_ray.sweeps.schedules import RELOAD_S, add_schedule, run_scheduler

    path, store = tiny_sweep(tmp_path / "work"), tmp_path / "store"
    add_schedule(path, "0 0 1 1 *", store, name="yearly")
    pauses: list[float] = []

    class Stop(Exception):
        pass

    def sleep(seconds: float) -> None:  # the loop's only way out, for the test
        pauses.append(seconds)
        if len(pauses) == 2:
            raise Stop

    with pytest.raises(Stop):
        run_scheduler(store, "http://127.0.0.1:9", sleep=sleep)
    assert pauses == [RELOAD_S, RELOAD_S]  # a year away: the schedules are read each minute
    add_schedule(path, "* * * * *", store, name="minutely")
    pauses.clear()
    with pytest.raises(Stop):
        run_scheduler(store, "http://127.0.0.1:9", sleep=sleep)
    assert all(0 < p <= RELOAD_S for p in pauses)
    # --now is the clock of one pass only
    assert main(["scheduler", "--store", str(store), "--now", "2025-01-01T03:00:00Z"]) == 2
    assert capsys.readouterr().err == (
        "arrakis-ray: error: --now sets the clock of a single pass: use it with --once\n"
    )


# -- two schedulers, one store, one cluster -----------------------------------------------


def _scheduler(store, address: str, now: datetime) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    argv = ["scheduler", "--store", str(store), "--address", address, "--once",
            "--now", now.isoformat()]  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "arrakis_ray.cli", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
    )  # fmt: skip


def test_two_schedulers_submit_each_firing_once(ray_head, tmp_path, tiny_sweep, wait_job):
    from arrakis_ray.store.catalog import Store
    from arrakis_ray.sweeps.jobs import list_jobs
    from arrakis_ray.sweeps.records import read_firings
    from arrakis_ray.sweeps.schedules import add_schedule, run_scheduler

    path, store = tiny_sweep(tmp_path / "work"), tmp_path / "store"
    schedule = add_schedule(path, "0 * * * *", store, name="hourly", now=T0)
    now = datetime(2025, 1, 1, 3, 0, 20, tzinfo=UTC)  # 3 firings since T0: 1:00, 2:00, 3:00
    # both started before either runs: each decides on its own, from the same store
    schedulers = [_scheduler(store, ray_head.address, now) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in schedulers]
    for p, (_out, err) in zip(schedulers, outputs, strict=True):
        assert p.returncode == 0, err
    sid = fire_submission_id(schedule, _hours(3)[0])
    events = read_firings(store, "hourly")
    by_time: dict[str, list[str]] = {}
    for e in events:
        by_time.setdefault(e.fire_time, []).append(e.status)
    # catch-up "latest": the two older firings skipped (by each), the latest submitted once
    assert {t[11:16]: sorted(s) for t, s in by_time.items()} == {
        "01:00": ["skipped", "skipped"],
        "02:00": ["skipped", "skipped"],
        "03:00": ["already submitted", "submitted"],
    }
    assert {e.submission_id for e in events if e.status != "skipped"} == {sid}
    jobs = [j for j in list_jobs(ray_head.address, prefix="arrakis-sched-")]
    assert [j.submission_id for j in jobs if j.metadata.get("arrakis_schedule") == "hourly"] == [
        sid
    ]
    # a pass at the same clock finds nothing due
    assert run_scheduler(store, ray_head.address, once=True, now=now) == []
    # the firing's job ran the sweep into the schedule's store
    assert wait_job(ray_head.address, sid) == "SUCCEEDED"
    with Store(store) as db:
        statuses = db.sql("SELECT status FROM sweep_runs ORDER BY point").rows()
        firings = db.sql(
            "SELECT strftime(fire_time, '%H:%M'), status, n_attempts FROM schedule_firings "
            "ORDER BY fire_time"
        ).rows()
    assert statuses == [("complete",), ("complete",)]
    assert [(t, n) for t, _s, n in firings] == [("01:00", 2), ("02:00", 2), ("03:00", 2)]
