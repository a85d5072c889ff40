"""Sweep and schedule records: append-only files that processes write at once, read back
as SQL views (latest event wins, parameters as a STRUCT, tool variants joining results)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from store.test_object_store import BUCKET, _s3fs, s3_endpoint, s3_env  # noqa: F401
from support import pipeline_dict

from arrakis_ray.errors import StoreError
from arrakis_ray.store.catalog import Store
from arrakis_ray.store.layout import init_store
from arrakis_ray.store.schemas import load_schema
from arrakis_ray.sweeps import records
from arrakis_ray.sweeps.records import (
    FiringEvent,
    RunEvent,
    ScheduleRecord,
    SweepRecord,
    append_firing,
    append_run_event,
    read_firings,
    read_run_events,
    read_schedules,
    read_sweeps,
    remove_schedule,
    write_schedule,
    write_sweep,
)

SWEEP = "0123456789abcdef"
OTHER = "fedcba9876543210"
SWEEP_VIEWS = [
    "schedule_firing_events",
    "schedule_firings",
    "schedules",
    "sweep_run_events",
    "sweep_runs",
    "sweeps",
]


def _event(point: int, status: str, sweep_id: str = SWEEP, **changes) -> RunEvent:
    fields = {
        "sweep_id": sweep_id,
        "sweep_name": "demo",
        "point": point,
        "point_key": f"key{point}",
        "run_id": "run-a",
        "params": {},
        "variants": {},
        "status": status,
    }
    return RunEvent(**(fields | changes))


def test_a_fresh_store_has_the_views_empty_with_their_columns(tmp_path: Path) -> None:
    with Store(init_store(tmp_path / "store")) as db:
        assert set(SWEEP_VIEWS) <= set(db.views())
        for view in SWEEP_VIEWS:
            assert db.sql(f"SELECT count(*) AS n FROM {view}")["n"][0] == 0
        assert db.sql("SELECT * FROM sweeps").columns == [
            "sweep_id", "name", "source", "method", "n_points", "created_at", "n_complete",
            "n_skipped", "n_duplicate", "n_running", "n_failed", "n_pending",
            "last_event_at", "spec",
        ]  # fmt: skip
        assert db.sql("SELECT * FROM sweep_runs").columns == [
            "sweep", "sweep_id", "point", "point_key", "run_id", "status", "attempt",
            "error", "seconds", "started_at", "finished_at", "updated_at", "host", "pid",
            "n_events", "params", "variants",
        ]  # fmt: skip
        assert db.sql("SELECT * FROM schedule_firings").columns == [
            "schedule", "fire_time", "status", "submission_id", "sweep_id", "error",
            "updated_at", "host", "pid", "n_attempts",
        ]  # fmt: skip


def test_record_types_match_their_schema_files() -> None:
    for cls, name in [
        (SweepRecord, "sweep"),
        (RunEvent, "sweep_run"),
        (ScheduleRecord, "schedule"),
        (FiringEvent, "schedule_firing"),
    ]:
        schema = load_schema(name)
        assert [f.name for f in dataclasses.fields(cls)] == [f.name for f in schema.fields]
        nullable = {f.name for f in schema.fields if f.nullable}
        assert nullable == {f.name for f in dataclasses.fields(cls) if "None" in str(f.type)}, name


# two processes append 20 events each; once both have imported, a file's appearance
# starts them together, so that their writes interleave
_WRITER = """
import sys, time
from pathlib import Path
from arrakis_ray.sweeps.records import RunEvent, append_run_event
store, worker, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
(go.parent / f"ready-{worker}").touch()
while not go.exists():
    time.sleep(0.005)
for i in range(20):
    append_run_event(store, RunEvent(
        sweep_id="0123456789abcdef", sweep_name="demo", point=i % 5, point_key=f"key{i % 5}",
        run_id="run-a", params={"worker": worker, "i": i}, variants={}, status="running",
        attempt=i + 1))
"""


def test_events_of_two_processes_at_once_are_all_kept(tmp_path: Path) -> None:
    store = init_store(tmp_path / "store")
    go = tmp_path / "go"
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(store), str(w), str(go)])
        for w in (0, 1)
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{w}").exists() for w in (0, 1)):
        assert time.monotonic() < deadline and all(w.poll() is None for w in writers)
        time.sleep(0.01)
    go.touch()
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    events = [event for _file, event in read_run_events(store, SWEEP)]
    assert sorted((e.params["worker"], e.params["i"]) for e in events) == [
        (w, i) for w in (0, 1) for i in range(20)
    ]
    assert len({e.pid for e in events}) == 2
    files = list((store / "sweeps" / SWEEP / "runs").rglob("*"))
    assert sum(f.is_file() for f in files) == 40  # no temp file left, none overwritten
    with Store(store) as db:
        per_point = db.sql(
            "SELECT point, count(*) AS n FROM sweep_run_events GROUP BY point ORDER BY point"
        )
        latest = db.sql("SELECT point, n_events FROM sweep_runs ORDER BY point")
    assert per_point.rows() == [(p, 8) for p in range(5)]
    assert latest.rows() == [(p, 8) for p in range(5)]


def test_the_latest_event_of_a_point_is_its_state(tmp_path: Path) -> None:
    store = init_store(tmp_path / "store")
    write_sweep(store, SweepRecord(SWEEP, "demo", "demo.yaml", "grid", "{}", n_points=4))
    # written out of order: the time in the record decides, not the order of writing
    append_run_event(store, _event(0, "complete", attempt=2, seconds=1.5, at="2025-01-01T00:03"))
    append_run_event(store, _event(0, "pending", at="2025-01-01T00:00:00Z"))
    append_run_event(store, _event(0, "failed", attempt=1, error="boom", at="2025-01-01T00:01"))
    append_run_event(store, _event(0, "running", attempt=2, at="2025-01-01T00:02"))
    append_run_event(store, _event(1, "failed", attempt=1, error="out of memory"))
    append_run_event(store, _event(2, "duplicate"))
    assert records.latest_run_events(store, SWEEP)[0].status == "complete"
    with Store(store) as db:
        point = db.sql(
            "SELECT status, attempt, error, seconds, started_at, finished_at, updated_at, "
            "n_events FROM sweep_runs WHERE point = 0"
        ).row(0, named=True)
        sweep = db.sql("SELECT * FROM sweeps").row(0, named=True)
    assert point["status"] == "complete" and point["attempt"] == 2
    assert point["error"] is None and point["seconds"] == 1.5
    assert str(point["started_at"]) == "2025-01-01 00:02:00"
    assert str(point["finished_at"]) == str(point["updated_at"]) == "2025-01-01 00:03:00"
    assert point["n_events"] == 4
    assert (sweep["sweep_id"], sweep["name"], sweep["n_points"]) == (SWEEP, "demo", 4)
    counts = {k: sweep[k] for k in sweep if k.startswith("n_") and k != "n_points"}
    # point 3 has no event yet: pending
    assert counts == {
        "n_complete": 1,
        "n_skipped": 0,
        "n_duplicate": 1,
        "n_running": 0,
        "n_failed": 1,
        "n_pending": 1,
    }


def test_params_of_mixed_sweeps_are_one_struct(tmp_path: Path) -> None:
    store = init_store(tmp_path / "store")
    written = {
        (SWEEP, 0): {"a.b": 1, "harvest.hooks": ["blocks.*.hook_resid_post"], "tag": "x"},
        (SWEEP, 1): {"a.b": 2, "harvest.hooks": ["blocks.0.hook_resid_pre", "logits"]},
        (OTHER, 0): {"a.b": 0.25, "k": 8, "mixed": {"nested": [1]}, "tag": "y"},
        (OTHER, 1): {"a.b": 3, "k": 16, "mixed": "text", "flag": True},
    }
    for (sweep_id, point), params in written.items():
        append_run_event(store, _event(point, "complete", sweep_id, params=params))
    with Store(store) as db:
        types = db.sql("DESCRIBE SELECT params FROM sweep_runs")["column_type"][0]
        got = db.sql(
            "SELECT sweep_id, point, params['a.b'] AS ab, params.\"harvest.hooks\" AS hooks, "
            "params['k'] AS k, params['tag'] AS tag, params['flag'] AS flag, "
            "params['mixed'] AS mixed FROM sweep_runs ORDER BY sweep_id, point"
        )
    # a.b: integers and a float, so DOUBLE; mixed: an object and a string, so JSON text
    assert types == (
        'STRUCT("a.b" DOUBLE, "harvest.hooks" VARCHAR[], tag VARCHAR, k BIGINT, '
        "mixed JSON, flag BOOLEAN)"
    )
    for row in got.iter_rows(named=True):
        params = written[(row["sweep_id"], row["point"])]
        assert row["ab"] == params["a.b"]
        assert row["hooks"] == params.get("harvest.hooks")
        assert (row["k"], row["tag"], row["flag"]) == tuple(
            params.get(name) for name in ("k", "tag", "flag")
        )
        mixed = params.get("mixed")
        assert (None if row["mixed"] is None else json.loads(row["mixed"])) == mixed


def test_an_unreadable_record_is_left_out_with_a_warning(tmp_path: Path, caplog) -> None:
    store = init_store(tmp_path / "store")
    write_sweep(store, SweepRecord(SWEEP, "demo", "demo.yaml", "grid", "{}", n_points=2))
    good = append_run_event(store, _event(0, "complete"))
    broken = good.with_name("20250101T000000.000000Z-00000000.json")
    broken.write_text('{"sweep_id": ')
    bad_status = good.with_name("20250101T000001.000000Z-00000000.json")
    bad_status.write_text(
        json.dumps(dataclasses.asdict(_event(0, "pending")) | {"status": "done?"})
    )
    other = store / "sweeps" / OTHER / "sweep.json"
    other.parent.mkdir(parents=True)
    other.write_text("not json")
    with caplog.at_level(logging.WARNING, logger="arrakis_ray.sweeps.records"):
        with Store(store) as db:
            runs = db.sql("SELECT point, status FROM sweep_runs").rows()
            sweeps = db.sql("SELECT sweep_id FROM sweeps").rows()
    assert runs == [(0, "complete")] and sweeps == [(SWEEP,)]
    warned = "\n".join(caplog.messages)
    for path in (broken, bad_status, other):
        assert f"{path}: not a readable" in warned
    assert "'done?' is not one of pending" in warned
    # a rewrite of the sweep of the same id leaves the record as it is
    before = (store / "sweeps" / SWEEP / "sweep.json").read_bytes()
    write_sweep(store, SweepRecord(SWEEP, "demo", "demo.yaml", "grid", "{}", n_points=2))
    assert (store / "sweeps" / SWEEP / "sweep.json").read_bytes() == before
    assert [r.sweep_id for r in read_sweeps(store)] == [SWEEP]


def test_bad_records_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    store = init_store(tmp_path / "store")
    with pytest.raises(StoreError, match="sweep run status 'done' is not one of"):
        append_run_event(store, _event(0, "done"))
    with pytest.raises(StoreError, match="point key '../x'"):
        append_run_event(store, _event(0, "pending", point_key="../x"))
    with pytest.raises(StoreError, match="params is not JSON"):
        append_run_event(store, _event(0, "pending", params={"x": float("nan")}))
    with pytest.raises(StoreError, match="'61 \\* \\* \\* \\*' is not a cron expression"):
        write_schedule(store, ScheduleRecord("n", "s.yaml", "", "61 * * * *", str(store)))
    with pytest.raises(StoreError, match="catch_up policy 'some'"):
        write_schedule(store, ScheduleRecord("n", "s.yaml", "", "0 3 * * *", "s", None, "some"))
    with pytest.raises(StoreError, match="schedule name 'a/b'"):
        append_firing(store, FiringEvent("a/b", "2025-01-01T03:00Z", None, "submitted"))
    assert sorted(p.name for p in store.iterdir()) == ["arrakis-store.json", "runs"]


def test_schedules_and_their_firings(tmp_path: Path) -> None:
    store = tmp_path / "new-store"  # adding a schedule makes the store
    write_schedule(store, ScheduleRecord("nightly", "s.yaml", "name: s\n", "0 3 * * *", "S"))
    write_schedule(store, ScheduleRecord("hourly", "h.yaml", "name: h\n", "0 * * * *", "S"))
    fire = "2025-01-02T03:00:00+00:00"
    append_firing(store, FiringEvent("nightly", fire, "sub-1", "failed", error="no head"))
    append_firing(store, FiringEvent("nightly", fire, "sub-1", "submitted", sweep_id=SWEEP))
    time.sleep(0.001)  # a later event of the same firing, by another scheduler
    append_firing(store, FiringEvent("nightly", fire, "sub-1", "already submitted"))
    append_firing(store, FiringEvent("hourly", "2025-01-02T04:00:00Z", "sub-2", "skipped"))
    firings = read_firings(store, "nightly")
    assert [f.status for f in firings] == ["failed", "submitted", "already submitted"]
    assert {f.fire_time for f in firings} == {"2025-01-02T03:00:00.000000Z"}
    assert (store / "schedules/nightly/firings/20250102T030000Z").is_dir()
    remove_schedule(store, "hourly")  # its history stays
    with pytest.raises(StoreError, match="no schedule named 'hourly'"):
        remove_schedule(store, "hourly")
    assert [s.name for s in read_schedules(store)] == ["nightly"]
    with Store(store) as db:
        schedules = db.sql("SELECT name, cron, catch_up, timezone FROM schedules").rows()
        rows = db.sql(
            "SELECT schedule, fire_time::VARCHAR AS fire_time, status, submission_id, "
            "n_attempts FROM schedule_firings ORDER BY schedule"
        ).rows()
    assert schedules == [("nightly", "0 3 * * *", "latest", "UTC")]
    assert rows == [
        ("hourly", "2025-01-02 04:00:00", "skipped", "sub-2", 1),
        ("nightly", "2025-01-02 03:00:00", "already submitted", "sub-1", 3),
    ]


def test_a_firing_once_submitted_shows_submitted(tmp_path: Path) -> None:
    """A slower scheduler's late skip (or a late failure) never hides a job."""
    store = init_store(tmp_path / "store")
    times = iter(f"2025-01-02T05:00:0{i}Z" for i in range(9))

    def fire(hour: int, *statuses: str) -> None:
        for status in statuses:  # in this order, one second apart
            event = FiringEvent(
                "nightly",
                f"2025-01-02T0{hour}:00Z",
                "sub",
                status,
                error="why" if status == "failed" else None,
                at=next(times),
            )
            append_firing(store, event)  # fmt: skip

    fire(1, "submitted", "skipped", "failed")
    fire(2, "failed", "skipped")
    fire(3, "skipped", "already submitted", "skipped")
    fire(4, "skipped")
    with Store(store) as db:
        rows = db.sql(
            "SELECT hour(fire_time) AS h, status, n_attempts, updated_at::VARCHAR AS at "
            "FROM schedule_firings ORDER BY h"
        ).rows()
    assert rows == [
        (1, "submitted", 3, "2025-01-02 05:00:00"),
        (2, "failed", 2, "2025-01-02 05:00:03"),
        (3, "already submitted", 3, "2025-01-02 05:00:06"),
        (4, "skipped", 1, "2025-01-02 05:00:08"),
    ]


def test_events_are_written_only_into_an_existing_store(tmp_path: Path) -> None:
    missing = tmp_path / "typo-store"
    with pytest.raises(StoreError, match=f"{missing}: not a store .*nothing recorded"):
        append_firing(missing, FiringEvent("nightly", "2025-01-02T03:00Z", None, "skipped"))
    with pytest.raises(StoreError, match="not a store"):
        append_run_event(missing, _event(0, "pending"))
    assert not missing.exists()
    write_sweep(missing, SweepRecord(SWEEP, "demo", "demo.yaml", "grid", "{}", n_points=1))
    assert append_run_event(missing, _event(0, "pending")).is_file()  # a sweep made it


def test_one_mixed_parameter_is_json_and_the_others_keep_their_types(tmp_path: Path) -> None:
    store = init_store(tmp_path / "store")
    written = [(SWEEP, 0, {"k": 32, "lr": 0.5}), (SWEEP, 1, {"k": 64, "lr": 1}),
               (OTHER, 0, {"k": "auto", "lr": 0.25})]  # fmt: skip
    for sweep_id, point, params in written:
        append_run_event(store, _event(point, "complete", sweep_id, params=params))
    with Store(store) as db:
        types = db.sql("DESCRIBE SELECT params FROM sweep_runs")["column_type"][0]
        rows = db.sql(
            "SELECT sweep_id, point, TRY_CAST(params.k AS DOUBLE) AS k, params.lr AS lr "
            "FROM sweep_runs ORDER BY sweep_id, point"
        ).rows()
    assert types == "STRUCT(k JSON, lr DOUBLE)"
    assert rows == [(SWEEP, 0, 32.0, 0.5), (SWEEP, 1, 64.0, 1.0), (OTHER, 0, None, 0.25)]


def test_schedule_records_keep_their_sweep_id_and_snapshot(tmp_path: Path) -> None:
    store = tmp_path / "store"
    record = ScheduleRecord("nightly", "/laptop/s.yaml", "name: s\n", "0 3 * * *", str(store),
                            sweep_id=SWEEP, snapshot="sweeps/s.yaml")  # fmt: skip
    first = records.write_schedule_files(
        store, "nightly", {"sweeps/s.yaml": b"a", "data.jsonl": b"b"}
    )
    assert first == records.snapshot_folder({"data.jsonl": b"b", "sweeps/s.yaml": b"a"})
    write_schedule(store, record)
    assert records.read_schedule(store, "nightly").sweep_id == SWEEP
    assert records.read_schedule_files(store, "nightly", first) == {
        "data.jsonl": b"b", "sweeps/s.yaml": b"a",
    }  # fmt: skip
    # a new snapshot goes to a folder of its own; pruning then leaves only it
    second = records.write_schedule_files(store, "nightly", {"s.yaml": b"c"})
    assert second != first
    assert records.read_schedule_files(store, "nightly", first)["sweeps/s.yaml"] == b"a"
    records.prune_schedule_files(store, "nightly", keep=second)
    assert records.read_schedule_files(store, "nightly", first) == {}
    assert records.read_schedule_files(store, "nightly", second) == {"s.yaml": b"c"}
    with pytest.raises(StoreError, match="not a relative path inside"):
        records.write_schedule_files(store, "nightly", {"../x": b""})
    # a record written before sweep_id and snapshot were kept still reads
    path = store / "schedules" / "old" / "schedule.json"
    path.parent.mkdir(parents=True)
    old = dataclasses.asdict(record) | {"name": "old"}
    path.write_text(json.dumps({k: v for k, v in old.items() if k not in ("sweep_id", "snapshot")}))
    assert (
        records.read_schedule(store, "old").sweep_id,
        records.read_schedule(store, "old").snapshot,
    ) == (None, None)
    with Store(store) as db:
        rows = db.sql("SELECT name, sweep_id, snapshot FROM schedules ORDER BY name").rows()
    assert rows == [("nightly", SWEEP, "sweeps/s.yaml"), ("old", None, None)]
    # one check of cron text: six fields are refused in a record as at schedule add
    with pytest.raises(StoreError, match="6 fields, expected 5"):
        write_schedule(store, dataclasses.replace(record, cron="0 0 3 * * *"))


def test_tool_variants_split_a_results_view_and_join_sweep_runs(ray_session, tmp_path):
    """One harvest, the logit lens computed as the run's own call and with two settings
    as variants: the results view's ``variant`` column holds each record's rows, and a
    sweep's points join their own rows through ``variants``."""
    from arrakis_ray.config import pipeline_from_dict
    from arrakis_ray.harvest.driver import harvest
    from arrakis_ray.store.layout import RunLayout
    from arrakis_ray.store.manifest import read_tool_records
    from arrakis_ray.tools.runner import analyze, make_tool, tool_variant

    pipeline = pipeline_dict(
        hooks=["blocks.*.hook_resid_post", "blocks.0.hook_resid_pre"], shard_size=4
    )
    pipeline["data"]["max_documents"] = 8
    store = tmp_path / "store"
    run_dir = harvest(pipeline_from_dict(pipeline), store).run_dir
    analyze(run_dir, "logit_lens")
    with Store(store) as db:  # no variant record yet: the columns of before
        columns = db.sql("SELECT * FROM results_logit_lens LIMIT 0").columns
    assert "variant" not in columns
    settings = [{"include_embed": False}, {"include_embed": True}]
    variants = [tool_variant(make_tool("logit_lens", p)) for p in settings]
    for params, variant in zip(settings, variants, strict=True):
        analyze(run_dir, "logit_lens", params, variant=variant)
    layout = RunLayout(store, run_dir.name)
    stored = read_tool_records(layout)
    assert set(stored) == {"logit_lens", *(f"logit_lens.{v}" for v in variants)}
    key = ["layer", "seq_id", "pos", "top1_token_id"]
    with Store(store) as db:
        assert db.sql("SELECT * FROM results_logit_lens LIMIT 0").columns == [*columns, "variant"]
        for variant in [None, *variants]:
            record = stored["logit_lens" if variant is None else f"logit_lens.{variant}"]
            files = [pq.read_table(layout.root / e.path, columns=key) for e in record.files]
            want = sorted(tuple(row.values()) for t in files for row in t.to_pylist())
            got = db.sql(
                f"SELECT {', '.join(key)} FROM results_logit_lens "
                f"WHERE variant IS NOT DISTINCT FROM {'NULL' if variant is None else repr(variant)}"
                f" ORDER BY ALL"
            ).rows()
            assert got == want and len(got) == record.rows
        # include_embed adds layer -1 to the same 4 layers
        layers = db.sql(
            "SELECT variant, min(layer) AS lo, count(DISTINCT layer) AS n "
            "FROM results_logit_lens GROUP BY variant ORDER BY variant NULLS FIRST"
        ).rows()
    assert layers == [(None, 0, 4), *sorted([(variants[0], 0, 4), (variants[1], -1, 5)])]

    for point, (params, variant) in enumerate(zip(settings, variants, strict=True)):
        dotted = {"analyze.logit_lens.params.include_embed": params["include_embed"]}
        tools = {"logit_lens": variant}
        event = _event(point, "complete", params=dotted, variants=tools, run_id=run_dir.name)
        append_run_event(store, event)
    with Store(store) as db:
        joined = db.sql(
            "SELECT s.params['analyze.logit_lens.params.include_embed'] AS embed, "
            "count(*) AS n, min(r.layer) AS lo FROM sweep_runs s JOIN results_logit_lens r "
            "ON r.run_id = s.run_id AND r.variant = s.variants['logit_lens'] "
            "GROUP BY ALL ORDER BY embed"
        ).rows()
    rows = [stored[f"logit_lens.{v}"].rows for v in variants]
    assert joined == [(False, rows[0], 0), (True, rows[1], -1)]


@pytest.mark.usefixtures("s3_env")  # a moto server on loopback (tests/store)
def test_records_on_an_object_store() -> None:
    """On s3:// the records are objects, listed in one call and read concurrently."""
    store = f"s3://{BUCKET}/sweep-records"
    write_sweep(store, SweepRecord(SWEEP, "demo", "demo.yaml", "grid", "{}", n_points=3))
    for point in range(3):
        append_run_event(store, _event(point, "pending", params={"k": point}))
    append_run_event(store, _event(1, "complete", params={"k": 1}, seconds=2.0))
    write_schedule(store, ScheduleRecord("nightly", "s.yaml", "name: s\n", "0 3 * * *", store))
    append_firing(store, FiringEvent("nightly", "2025-01-02T03:00Z", "sub-1", "submitted"))
    fs = _s3fs(os.environ["AWS_ENDPOINT_URL"])
    fs.pipe(f"{BUCKET}/sweep-records/sweeps/{SWEEP}/runs/key2/broken.json", b"{")
    assert len(fs.find(f"{BUCKET}/sweep-records/sweeps/{SWEEP}/runs")) == 5
    with Store(store) as db:
        runs = db.sql("SELECT point, status, params['k'] AS k FROM sweep_runs ORDER BY point")
        sweep = db.sql("SELECT n_complete, n_pending FROM sweeps").row(0)
        firing = db.sql("SELECT schedule, status FROM schedule_firings").row(0)
    assert runs.rows() == [(0, "pending", 0), (1, "complete", 1), (2, "pending", 2)]
    assert sweep == (1, 2) and firing == ("nightly", "submitted")
    assert [s.name for s in read_schedules(store)] == ["nightly"]
