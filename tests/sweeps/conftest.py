"""A real Ray cluster for the Ray Jobs tests: ``ray start --head`` on loopback, once per
session, with its dashboard (the Jobs API) on a free port.

It is a cluster of its own, beside the suite's ``ray_session`` (a local ``ray.init`` in
this process): its own temp dir and ports, stopped by signalling its ``ray start
--block`` process, never with ``ray stop`` (which stops every Ray on the machine). The
tests talk to it over HTTP only (``JobSubmissionClient``).
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from support import DEMO_DATA, pipeline_dict

START_DEADLINE_S = 300  # ray start and its dashboard, on a loaded 2-core machine
JOB_DEADLINE_S = 600  # a tiny sweep's job: the driver's imports dominate


@dataclass(frozen=True)
class RayHead:
    """The test cluster: its Jobs API address and what identifies its processes."""

    address: str
    """http://127.0.0.1:PORT (the dashboard)."""
    gcs: str
    temp_dir: str


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _jobs_api_up(address: str) -> bool:
    from ray.job_submission import JobSubmissionClient

    try:
        JobSubmissionClient(address).list_jobs()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def ray_head():
    """A ``ray start --head --block`` on 127.0.0.1 with the dashboard; its ``RayHead``."""
    gcs_port, dash_port, agent_port, metrics_port = _free_ports(4)
    temp_dir = tempfile.mkdtemp(prefix="arh", dir="/tmp")  # short: Unix socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # the jobs' python
        RAY_AUTH_MODE="disabled",  # no token to hand the jobs API client
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
    )
    ray = str(Path(sys.executable).parent / "ray")
    args = [
        ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
        "--port", str(gcs_port), "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dash_port), "--dashboard-agent-listen-port", str(agent_port),
        "--metrics-export-port", str(metrics_port), "--num-cpus", "2",
        "--include-dashboard", "true", "--temp-dir", temp_dir, "--disable-usage-stats",
    ]  # fmt: skip
    log = open(Path(temp_dir) / "ray-start.log", "wb")  # noqa: SIM115 - closed at teardown
    process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
    head = RayHead(f"http://127.0.0.1:{dash_port}", f"127.0.0.1:{gcs_port}", temp_dir)
    try:
        deadline = time.monotonic() + START_DEADLINE_S
        while not _jobs_api_up(head.address):
            if process.poll() is not None or time.monotonic() > deadline:
                text = (Path(temp_dir) / "ray-start.log").read_text(errors="replace")
                pytest.fail(f"ray start --head did not come up:\n{text[-3000:]}")
            time.sleep(1)
        yield head
    finally:
        _stop(process, head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop(process: subprocess.Popen, head: RayHead) -> None:
    """SIGTERM to ``ray start --block`` drains the node and ends its processes; then any
    process of this cluster still alive (a job's driver) is killed: those whose command
    line names its temp dir or whose RAY_ADDRESS is its GCS."""
    import psutil

    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            ours = head.temp_dir in " ".join(proc.info["cmdline"] or [])
            ours = ours or proc.environ().get("RAY_ADDRESS") == head.gcs
            if ours and proc.pid != os.getpid():
                proc.kill()
        except (psutil.Error, OSError):
            continue


@pytest.fixture(scope="session")
def tiny_sweep():
    """``write_tiny_sweep``, for the tests."""
    return write_tiny_sweep


@pytest.fixture(scope="session")
def wait_job():
    """``wait_for_job``, for the tests."""
    return wait_for_job


def write_tiny_sweep(directory: Path, name: str = "tiny") -> Path:
    """A sweep over 2 settings of one tool (one harvest of 8 documents), its base pipeline
    and its data, all in ``directory`` (the job's working dir); the sweep file's path."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = DEMO_DATA.read_text(encoding="utf-8").splitlines()[:8]
    (directory / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    base = pipeline_dict()
    base["data"].update(path="data.jsonl", max_documents=8)
    base["harvest"].update(hooks=["blocks.*.mlp.hook_post"], shard_size=8)
    base["analyze"] = [{"tool": "sparsity_analyzer", "params": {"kurtosis_family": None}}]
    (directory / "base.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
    sweep = {
        "name": name,
        "base": "base.yaml",
        "method": "grid",
        "parameters": {"analyze.sparsity_analyzer.params.threshold": {"values": [0.0, 0.5]}},
    }
    path = directory / "sweep.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(sweep), sort_keys=False), encoding="utf-8")
    return path


def wait_for_job(address: str, submission_id: str) -> str:
    """The job's final status (polled; JOB_DEADLINE_S is a guard, not an assertion)."""
    from arrakis_ray.sweeps.jobs import job_state

    deadline = time.monotonic() + JOB_DEADLINE_S
    while True:
        state = job_state(submission_id, address)
        if state.terminal or time.monotonic() > deadline:
            return state.status
        time.sleep(2)
