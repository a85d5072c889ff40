"""Harvests on a multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``).

Run by ``test_multinode.py`` as a child process: the test process holds the suite's
local Ray, and a process connects to one cluster only. A head with no CPU (the driver,
this process, runs there) and two worker nodes of 1 CPU and 1 declared GPU each (no
CUDA here: the actors run on CPU, Ray only accounts the GPUs). Then, in order:

- ``replicas``: 2 actors of 1 GPU each, into the S3 store (moto on loopback) when one
  is given, else into ``BASE/shared``;
- ``stages``: 2 stages with ``spread_stages`` (0 GPUs: both stages would fit one node),
  into ``BASE/shared-staged``;
- ``blind``: a third worker node, started by ``ray start`` in a user and mount
  namespace where an empty tmpfs hides ``BASE/private``: a node that cannot see a
  store there (skipped where ``unshare`` is not allowed);
- ``unseen``: a harvest into ``BASE/private/store``, which that node cannot see.

Each harvest costs a model load per actor, the cluster a few seconds per node: hence
one harvest for both the replicas and the S3 store.

usage: python multinode.py SPEC.json; SPEC: {"pipeline": pipeline dict, "base": dir,
"s3": {"store": "s3://...", "env": {AWS_...}} or null}. Prints one JSON line: what each
step observed (run dirs, the node ids per shard and per actor, errors, seconds).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    base = Path(spec["base"])
    report: dict = {"seconds": {}}
    blind = None
    cluster = None
    try:
        started = time.perf_counter()
        cluster, nodes = _start_cluster()
        report["nodes"] = nodes
        report["seconds"]["cluster"] = round(time.perf_counter() - started, 1)
        replicas = spec["s3"]["store"] if spec.get("s3") else base / "shared"
        if spec.get("s3"):
            os.environ.update(spec["s3"]["env"])  # read when the store URI is opened
        steps = [
            ("replicas", {"actors": 2, "num_gpus_per_actor": 1}, replicas),
            ("stages", {"stages": 2, "spread_stages": True}, base / "shared-staged"),
        ]
        for name, overrides, store in steps:
            report[name] = _timed(report, name, _harvest, spec["pipeline"], overrides, store)
        outcome = _timed(report, "blind", _start_blind_node, cluster, base / "private")
        if isinstance(outcome, dict):  # failed: the unseen step is not run
            report["blind_skipped"] = outcome["failed"]
        else:
            blind, report["blind_skipped"] = outcome
        report["nodes"]["blind"] = _new_node(nodes) if blind is not None else None
        if blind is not None:
            report["unseen"] = _timed(report, "unseen", _refused, spec["pipeline"], base)
    finally:
        _stop(blind)
        import ray

        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    print(json.dumps(report))


def _timed(report: dict, name: str, fn, *args):
    started = time.perf_counter()
    try:
        return fn(*args)
    except Exception as exc:  # recorded for the test to show, the other steps still run
        traceback.print_exc()
        return {"failed": f"{type(exc).__name__}: {exc}"}
    finally:
        report["seconds"][name] = round(time.perf_counter() - started, 1)


def _start_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    head = ray.get_runtime_context().get_node_id()
    alive = [n for n in ray.nodes() if n["Alive"]]
    workers = sorted(n["NodeID"] for n in alive if n["NodeID"] != head)
    ip = next(n["NodeManagerAddress"] for n in alive if n["NodeID"] == head)
    return cluster, {"head": head, "workers": workers, "ip": ip}


def _harvest(raw: dict, overrides: dict, store) -> dict:
    from arrakis_ray.config import pipeline_from_dict
    from arrakis_ray.harvest.driver import harvest
    from arrakis_ray.store.inventory import read_shard_inventories
    from arrakis_ray.store.layout import RunLayout

    raw = json.loads(json.dumps(raw))
    raw["harvest"].update(overrides)
    before = _map_actors()
    result = harvest(pipeline_from_dict(raw), str(store))
    layout = RunLayout(result.run_dir.parent.parent, result.run_id)
    inventories = read_shard_inventories(layout)
    return {
        "run_dir": str(result.run_dir),
        "status": result.status,
        "shards_done": result.shards_done,
        "shard_nodes": {str(s): list(inv.nodes) for s, inv in inventories.items()},
        "actor_nodes": [n for a, n in _map_actors().items() if a not in before],
    }


def _map_actors() -> dict[str, str]:
    """Actor id -> node id of every Ray Data map actor this cluster has had (GCS)."""
    from ray._private import state

    return {
        actor_id: info["Address"]["NodeID"]
        for actor_id, info in state.actors().items()
        if "MapWorker" in info["ActorClassName"]
    }


def _refused(raw: dict, base: Path) -> dict:
    """A harvest into a store the blind node cannot see: its error and what it left."""
    from arrakis_ray.config import pipeline_from_dict
    from arrakis_ray.harvest.driver import harvest

    store = base / "private" / "store"
    before = _map_actors()
    try:
        harvest(pipeline_from_dict(raw), store)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    else:
        error = None
    files = sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())
    return {"error": error, "files": files, "actors": len(_map_actors()) - len(before)}


def _start_blind_node(cluster, hidden: Path):
    """(process, None), or (None, why not): a worker node that sees an empty ``hidden``."""
    import ray

    unshare = shutil.which("unshare")
    if unshare is None:
        return None, "no unshare command"
    probe = subprocess.run(
        [unshare, "--user", "--map-root-user", "--mount", "true"], capture_output=True
    )
    if probe.returncode != 0:  # user namespaces off (a hardened CI kernel, a container)
        return None, f"unshare --user --mount is not allowed: {probe.stderr.decode().strip()}"
    hidden.mkdir(parents=True, exist_ok=True)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    ip = next(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
    ports = [_free_port() for _ in range(4)]
    start = [
        ray_bin, "start", "--address", cluster.address, "--node-ip-address", ip,
        "--num-cpus", "1", "--num-gpus", "0", "--block", "--disable-usage-stats",
        "--dashboard-agent-listen-port", str(ports[0]),
        "--dashboard-agent-grpc-port", str(ports[1]),
        "--metrics-export-port", str(ports[2]),
        "--runtime-env-agent-port", str(ports[3]),
    ]  # fmt: skip
    script = 'mount -t tmpfs tmpfs "$1" && shift && exec "$@"'
    process = subprocess.Popen(
        [unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh",
         str(hidden), *start],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: stopped as one
    )  # fmt: skip
    expected = len([n for n in ray.nodes() if n["Alive"]]) + 1
    deadline = time.monotonic() + 60
    while len([n for n in ray.nodes() if n["Alive"]]) < expected:
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(process)
            raise RuntimeError("the blind node did not join the cluster")
        time.sleep(0.5)
    return process, None


def _new_node(nodes: dict) -> str:
    import ray

    known = {nodes["head"], *nodes["workers"]}
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] not in known)


def _stop(process) -> None:
    """Stop the blind node: SIGTERM to its process group (``ray start`` and its node's
    processes), SIGKILL if they linger."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main(sys.argv[1])
