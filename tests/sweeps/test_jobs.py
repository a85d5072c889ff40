"""Sweeps submitted as Ray Jobs to a real ``ray start --head`` on loopback: the job runs
the sweep into the store, a second submit is a no-op, and ``jobs status|logs|stop``
report on it; what cannot work on a cluster is refused before anything is sent."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys

import pytest
import yaml
from support import REPO

from arrakis_ray.cli import main
from arrakis_ray.errors import ClusterError

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens there


def _load(path):
    from arrakis_ray.sweeps.spec import load_sweep

    return load_sweep(path)


def test_submission_id_is_the_sweeps_content_store_and_planned_runs(tmp_path, tiny_sweep):
    from arrakis_ray.sweeps.jobs import submission_id_for_sweep
    from arrakis_ray.sweeps.plan import plan_sweep

    here, there = _load(tiny_sweep(tmp_path / "a")), _load(tiny_sweep(tmp_path / "b"))
    sid = submission_id_for_sweep(here, "/data/store")
    points = plan_sweep(here, "/data/store").points
    lines = [here.sweep_id, "/data/store", *(f"{p.run_id} {p.point_key}" for p in points)]
    assert sid == "arrakis-sweep-" + hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    assert submission_id_for_sweep(there, "/data/store/") == sid  # same files elsewhere
    assert submission_id_for_sweep(here, "/data/other") != sid
    # new data at the same path: a new harvest run id, so a new job
    data = tmp_path / "a" / "data.jsonl"
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:7]))
    changed = _load(tmp_path / "a" / "sweep.yaml")
    assert changed.sweep_id == here.sweep_id
    assert submission_id_for_sweep(changed, "/data/store") != sid


def test_absolute_paths_outside_the_working_dir_are_read_where_they_are(
    tmp_path, tiny_sweep, caplog
):
    """The on-premises setup: data on a shared file system, named by an absolute path,
    is not uploaded (a log line says every node must see it); relative paths travel."""
    import logging

    from arrakis_ray.sweeps.jobs import check_working_dir, default_working_dir, job_inputs

    work, shared = tmp_path / "work", tmp_path / "shared"
    path = tiny_sweep(work)
    shared.mkdir()
    (work / "data.jsonl").rename(shared / "data.jsonl")
    base = yaml.safe_load((work / "base.yaml").read_text())
    base["data"]["path"] = str(shared / "data.jsonl")
    (work / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = _load(path)
    inputs = {i.what: (i.path, i.travels) for i in job_inputs(sweep)}
    assert inputs == {
        "the sweep file": (path.resolve(), True),
        "its base pipeline": ((work / "base.yaml").resolve(), True),
        "data.path": ((shared / "data.jsonl").resolve(), False),
    }
    assert default_working_dir(sweep) == work.resolve()  # not their common parent
    with caplog.at_level(logging.INFO, logger="arrakis_ray.sweeps.job_inputs"):
        assert check_working_dir(sweep, work) == work.resolve()
    assert (
        f"data.path {(shared / 'data.jsonl').resolve()} is read as it is on the cluster, "
        "not uploaded: every node must see it"
    ) in caplog.text
    # a local checkpoint named relatively is read from the current directory here and
    # from the working dir there: refused unless they are one
    base["model"] = {"path": "ckpt"}
    (work / "base.yaml").write_text(yaml.safe_dump(base))
    (work / "ckpt").mkdir()
    with pytest.raises(ClusterError, match=r"model.path ckpt: read here as .* submit from "):
        check_working_dir(_load(path), work)
    with contextlib.chdir(work):
        assert check_working_dir(_load(path), work) == work.resolve()
    # one named absolutely is referenced as it is
    base["model"] = {"path": str(shared / "ckpt")}
    (work / "base.yaml").write_text(yaml.safe_dump(base))
    travels = {i.what: i.travels for i in job_inputs(_load(path))}
    assert travels["model.path"] is False


def test_what_a_cluster_cannot_run_is_refused_before_anything_is_sent(tmp_path, tiny_sweep):
    from arrakis_ray.sweeps.jobs import default_working_dir, submit_sweep

    work = tmp_path / "work"
    tiny_sweep(work)
    (work / "sweeps").mkdir()
    text = (work / "sweep.yaml").read_text().replace("base: base.yaml", "base: ../base.yaml")
    (work / "sweeps" / "sweep.yaml").write_text(text)
    sweep = _load(work / "sweeps" / "sweep.yaml")
    assert default_working_dir(sweep) == work.resolve()
    # the address is unreachable: each error below is found before connecting
    with pytest.raises(ClusterError, match=r"--store rel/store: a relative path .* s3://"):
        submit_sweep(sweep, "rel/store", UNREACHABLE)
    with pytest.raises(ClusterError, match=r"does not hold .*/base\.yaml"):
        submit_sweep(sweep, tmp_path / "store", UNREACHABLE, work / "sweeps")
    # data inside an excluded folder would not be uploaded
    (work / "site").mkdir()
    (work / "data.jsonl").rename(work / "site" / "data.jsonl")
    base = yaml.safe_load((work / "base.yaml").read_text())
    base["data"]["path"] = "site/data.jsonl"
    (work / "base.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(ClusterError, match=r"data\.jsonl: .* 'site' are not uploaded"):
        submit_sweep(_load(work / "sweeps" / "sweep.yaml"), tmp_path / "store", UNREACHABLE)
    with pytest.raises(ClusterError, match=r"cannot reach the Ray Jobs API at " + UNREACHABLE):
        submit_sweep(_load(tiny_sweep(tmp_path / "ok")), tmp_path / "store", UNREACHABLE)


def test_dry_run_plans_without_importing_ray(tmp_path, tiny_sweep):
    from arrakis_ray.sweeps.jobs import submission_id_for_sweep

    path, store = tiny_sweep(tmp_path / "work"), tmp_path / "store"
    code = (
        "import sys\n"
        "from arrakis_ray.cli import main\n"
        f"assert main(['sweep', {str(path)!r}, '--store', {str(store)!r}, '--dry-run']) == 0\n"
        f"assert main(['sweep', {str(path)!r}, '--store', {str(store)!r}, '--dry-run',\n"
        f"             '--address', {UNREACHABLE!r}]) == 0\n"
        "print('ray imported:', 'ray' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "ray imported: False" in done.stdout
    assert "2 points: 2 distinct, 0 duplicates, 0 complete, 2 to run" in done.stdout
    sid = submission_id_for_sweep(_load(path), store)
    assert f"would submit {sid} to {UNREACHABLE}: python -m arrakis_ray.cli sweep" in done.stdout
    assert not store.exists()


def test_jobs_commands_name_an_unknown_job_or_cluster_in_one_line(ray_head, capsys):
    assert main(["jobs", "status", "arrakis-sweep-unknown", "--address", ray_head.address]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"arrakis-ray: error: no job arrakis-sweep-unknown on the Ray cluster at "
        f"{ray_head.address} (arrakis-ray jobs list --address {ray_head.address} shows its jobs)"
    )
    assert main(["jobs", "logs", "arrakis-x", "--address", UNREACHABLE]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach the Ray Jobs API at " + UNREACHABLE in err


def _cli(argv: list[str]) -> tuple[int, str]:
    """(exit code, stdout) of one in-process ``arrakis-ray`` command."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def submitted(ray_head, tmp_path_factory, tiny_sweep, wait_job):
    """(sweep path, store, submission id, submit's output, final job status) of the tiny
    sweep, submitted through the CLI and run to its end by the cluster."""
    from arrakis_ray.sweeps.jobs import submission_id_for_sweep

    directory = tmp_path_factory.mktemp("job")
    path, store = tiny_sweep(directory / "work"), directory / "store"
    code, out = _cli(["sweep", str(path), "--store", str(store), "--address", ray_head.address])
    assert code == 0
    sid = submission_id_for_sweep(_load(path), store)
    return path, store, sid, out, wait_job(ray_head.address, sid)


def test_a_submitted_sweep_runs_on_the_cluster_into_the_store(submitted, ray_head):
    from arrakis_ray.store.catalog import Store
    from arrakis_ray.sweeps.plan import plan_sweep

    path, store, sid, out, status = submitted
    assert out.splitlines()[0] == f"submitted {sid} to {ray_head.address}"
    assert f"--store {store}" in out
    assert status == "SUCCEEDED"
    # the store, read here, holds every point complete: planned again, nothing is left
    plan = plan_sweep(_load(path), store)
    assert [p.status for p in plan.points] == ["complete", "complete"]
    with Store(store) as db:
        rows = db.sql("SELECT point, run_id, status FROM sweep_runs ORDER BY point").rows()
    assert rows == [(p.index, p.run_id, "complete") for p in plan.points]


def test_a_second_submit_is_a_no_op(submitted, ray_head):
    from arrakis_ray.sweeps.jobs import list_jobs, submit_sweep

    path, store, sid, _out, _status = submitted
    code, out = _cli(["sweep", str(path), "--store", str(store), "--address", ray_head.address])
    assert code == 0
    assert out.splitlines()[:2] == [
        f"already submitted: {sid} is SUCCEEDED on {ray_head.address}",
        "  to run it again (only what is missing): add --resubmit",
    ]
    again = submit_sweep(_load(path), store, ray_head.address)
    assert (again.submission_id, again.status, again.job_status) == (
        sid, "already submitted", "SUCCEEDED",
    )  # fmt: skip
    assert [j.submission_id for j in list_jobs(ray_head.address, prefix=sid)] == [sid]


def test_jobs_status_logs_and_list(submitted, ray_head):
    path, _store, sid, _out, _status = submitted
    code, out = _cli(["jobs", "status", sid, "--address", ray_head.address])
    assert code == 0 and out.startswith(f"{sid}: SUCCEEDED")
    code, out = _cli(["jobs", "logs", sid, "--address", ray_head.address])
    sweep_id = _load(path).sweep_id
    assert code == 0 and f"sweep {sweep_id}: 2 points: 2 run now" in out
    code, followed = _cli(["jobs", "logs", sid, "--address", ray_head.address, "--follow"])
    assert code == 0 and followed == out  # the job has ended: all of it, then the end
    code, out = _cli(["jobs", "list", "--address", ray_head.address])
    assert code == 0
    assert any(line.startswith(f"{sid}  SUCCEEDED") for line in out.splitlines())


def test_jobs_stop_and_resubmit(ray_head, wait_job, tmp_path, tiny_sweep, capsys):
    from ray.job_submission import JobSubmissionClient

    from arrakis_ray.sweeps.jobs import submission_id_for_sweep

    path, store = tiny_sweep(tmp_path / "work"), tmp_path / "store"
    sid = submission_id_for_sweep(_load(path), store)
    # a long job holding the sweep's id (as a sweep job that hangs would)
    JobSubmissionClient(ray_head.address).submit_job(entrypoint="sleep 600", submission_id=sid)
    submit = ["sweep", str(path), "--store", str(store), "--address", ray_head.address]
    assert main([*submit, "--resubmit"]) == 2
    assert f"job {sid} of this sweep is still " in capsys.readouterr().err
    code, out = _cli(["jobs", "stop", sid, "--address", ray_head.address])
    assert (code, out) == (0, f"{sid}: stop requested\n")
    assert wait_job(ray_head.address, sid) == "STOPPED"
    code, out = _cli(["jobs", "stop", sid, "--address", ray_head.address])
    assert (code, out) == (0, f"{sid}: not running (STOPPED)\n")
    code, out = _cli(submit)
    assert out.splitlines()[:2] == [
        f"already submitted: {sid} is STOPPED on {ray_head.address}",
        "  to run it again (only what is missing): add --resubmit",
    ]
    code, out = _cli([*submit, "--resubmit"])
    assert out.splitlines()[0] == f"submitted {sid}-2 to {ray_head.address}"
    assert _cli(["jobs", "stop", f"{sid}-2", "--address", ray_head.address])[0] == 0
    assert wait_job(ray_head.address, f"{sid}-2") == "STOPPED"
