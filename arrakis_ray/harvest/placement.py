"""Where a harvest runs on a multi-node cluster: nodes that can write the store, and
stage actors spread over nodes.

Every harvest actor writes its shard's files straight into the store (``actor.py``).
On one machine that is a directory every worker sees. On a cluster it is a directory
on each node unless a shared filesystem is mounted there, and then every node's rows
go to its own disk: the run looks complete on whichever node reads it and is missing
the other nodes' shards. ``check_store_reachable`` finds that out before any work
starts, by asking each node to read a file the driver has just written; it is not
inferred from addresses or mount tables.

Nodes can also join after that check: an autoscaling cluster (``min_workers: 0``)
starts a harvest with its head alone and adds GPU nodes once actors ask for them. So
the driver keeps its probe file for the whole harvest or tool call (``store_probe``)
and hands its name and token to the work; every worker checks it (``check_probe``, a
read of a few bytes) before it writes anything, and refuses with the same line.

``stage_placement`` puts a staged harvest's stage actors on nodes of their own
(``harvest.spread_stages``): a STRICT_SPREAD placement group with one bundle per
stage actor; ``check_spread_fits`` refuses, before the run is touched, a cluster with
fewer nodes than stage actors (Ray would wait for the group forever).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from arrakis_ray.config import HarvestConfig
from arrakis_ray.errors import ClusterError, ConfigError
from arrakis_ray.store.location import is_remote

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 60.0  # a zero-CPU task waits only for a worker process to start
PLACEMENT_TIMEOUT_S = 60.0  # for the nodes' resources to free up for the group
PROBE_PREFIX = ".arrakis-probe-"

# (store root, node ids) already seen to share the store in this process: a sweep
# harvesting run after run into one store probes its nodes once; a node that joins
# later makes another set, probed again
_verified: set[tuple[str, frozenset[str]]] = set()


@dataclass(frozen=True)
class StoreProbe:
    """The driver's probe file in a local store: ``<store>/<name>`` holds ``token``."""

    name: str
    token: str


@contextmanager
def store_probe(store_root) -> Iterator[StoreProbe | None]:
    """Write a probe file into a local-path store for the block's duration (removed
    when it ends, however it ends); None for an object store, where every node reaches
    the same objects (``check_store_reachable``)."""
    if is_remote(store_root):
        yield None
        return
    token = secrets.token_hex(16)
    probe = StoreProbe(f"{PROBE_PREFIX}{token[:16]}", token)
    path = Path(store_root) / probe.name
    path.write_text(token, encoding="utf-8")
    try:
        yield probe
    finally:
        path.unlink(missing_ok=True)


def check_probe(store_root, probe: StoreProbe | None) -> None:
    """On a worker, before it writes into the store: refuse (ClusterError) a node that
    does not see the driver's probe file, so it never writes rows to a disk of its own
    (a node that joined after ``check_store_reachable``). ``probe`` None: nothing to
    check (an object store, or a caller outside a harvest or tool call)."""
    if probe is None:
        return
    problem, text = _read_probe(str(Path(store_root) / probe.name))
    if problem or text != probe.token:
        import ray
        from ray.util import get_node_ip_address

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        reason = text if problem else "another directory is at that path"
        raise ClusterError(_blind(store_root, get_node_ip_address(), node or "?", reason))


def _blind(store_root, address: str, node_id: str, reason: str, more: str = "") -> str:
    """The one line naming a node that cannot see the store."""
    return (
        f"store {store_root} is a local path that node {address} (node id {node_id[:12]}…)"
        f"{more} cannot see ({reason}): rows would be written to that node's own disk; use "
        "a shared filesystem mounted at the same path on every node, or an s3:// store"
    )


def check_store_reachable(store_root, probe: StoreProbe | None = None) -> None:
    """Refuse a local-path store that a node of the cluster cannot see (ClusterError).

    A zero-CPU task pinned to each alive node that can run harvest work (any CPU or
    GPU) reads back a probe file the driver has written (``probe``, from
    ``store_probe``; else one written and removed here); a node where the file is
    missing, unreadable or holds another token would write its rows to a disk of its
    own. Costs nothing on a single-node cluster whose node is the driver's own (the
    local default): no task runs. Nodes that join later are caught by ``check_probe``.
    """
    if is_remote(store_root):
        # an object store (s3://...) is reached over the network by its URL, with the
        # endpoint and credentials the path object carries to every worker
        # (store/location.py): every node addresses the same objects, so there is no
        # node-private copy to detect
        return
    import ray

    nodes = _nodes_that_work()
    here = ray.get_runtime_context().get_node_id()
    if not nodes or [n["NodeID"] for n in nodes] == [here]:
        return  # one node, the driver's: the store is the driver's own directory
    key = (str(store_root), frozenset(n["NodeID"] for n in nodes))
    if key in _verified:
        return
    if probe is None:
        with store_probe(store_root) as own:
            blind = _probe(nodes, str(Path(store_root) / own.name), own.token)
    else:
        blind = _probe(nodes, str(Path(store_root) / probe.name), probe.token)
    if blind:
        node, reason = blind[0]
        others = len(blind) - 1
        more = f" (and {others} other node{'s' if others > 1 else ''})" if others else ""
        raise ClusterError(
            _blind(store_root, node["NodeManagerAddress"], node["NodeID"], reason, more)
        )
    _verified.add(key)
    log.info("store %s: seen by all %d nodes of the cluster", store_root, len(nodes))


def _nodes_that_work() -> list[dict]:
    """The alive nodes a harvest task or actor can run on (``ray.nodes()`` entries):
    those with a CPU or a GPU. A node with neither (a head started with 0 CPUs) runs
    none of the harvest's work, so what it sees does not matter."""
    import ray

    return [
        node
        for node in ray.nodes()
        if node.get("Alive")
        and any(float((node.get("Resources") or {}).get(r, 0)) > 0 for r in ("CPU", "GPU"))
    ]


def _probe(nodes: list[dict], path: str, token: str) -> list[tuple[dict, str]]:
    """(node, reason) for each node that did not read ``token`` from ``path``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    read = ray.remote(num_cpus=0, max_retries=0)(_read_probe)
    refs = {
        read.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(path): node
        for node in nodes
    }
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    blind = []
    for ref in ready:
        try:
            seen = ray.get(ref)
        except Exception as exc:  # the task died with its node or worker
            blind.append((refs[ref], f"the probe task failed: {type(exc).__name__}"))
            continue
        problem, text = seen
        if problem or text != token:
            blind.append((refs[ref], text if problem else "another directory is at that path"))
    for ref in late:
        ray.cancel(ref, force=True)
        blind.append((refs[ref], f"no answer to a probe task within {PROBE_TIMEOUT_S:g} s"))
    return blind


def _read_probe(path: str) -> tuple[bool, str]:
    """On a node: (False, the probe file's text), or (True, why it cannot be read)."""
    try:
        with open(path, encoding="utf-8") as f:
            return False, f.read()
    except FileNotFoundError:
        return True, f"the probe file {Path(path).name} is not there"
    except OSError as exc:
        return True, f"the probe file cannot be read: {exc.strerror or exc}"


def check_spread_fits(config: HarvestConfig, n_stages: int, source: str) -> None:
    """Refuse ``harvest.spread_stages`` on a cluster that cannot give each stage actor a
    node of its own (ConfigError). Nothing to check unless spreading a staged model."""
    if not config.spread_stages or n_stages < 2:
        return
    bundle = _bundle(config, source)
    needed = n_stages * config.actors
    fit = [
        node
        for node in _nodes_that_work()
        if all(float(node["Resources"].get(r, 0)) >= amount for r, amount in bundle.items())
    ]
    if len(fit) < needed:
        each = ", ".join(f"{amount:g} {r}" for r, amount in bundle.items())
        actors = f"{config.actors} actor{'s' if config.actors > 1 else ''}"
        raise ConfigError(
            f"{source}: harvest.spread_stages: {n_stages} stages x {actors} need {needed} "
            f"nodes with {each} each, one actor per node, but the cluster has {len(fit)}"
        )


@contextmanager
def stage_placement(config: HarvestConfig, n_stages: int, source: str) -> Iterator[dict]:
    """Ray remote args for every stage's actor pool: with ``spread_stages`` (and more
    than one stage) a STRICT_SPREAD placement group's scheduling strategy, else none.

    One bundle per stage actor (stages x actors), each exactly one actor's CPUs and
    GPUs, so an actor fills its bundle and no two actors share one: any bundle will do
    for any stage (bundle index -1), and since the bundles are on distinct nodes, so
    are all the stage actors. The group is removed when the block ends.
    """
    if not config.spread_stages or n_stages < 2:
        yield {}
        return
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = _bundle(config, source)
    needed = n_stages * config.actors
    group = placement_group([dict(bundle) for _ in range(needed)], strategy="STRICT_SPREAD")
    try:
        if not group.wait(PLACEMENT_TIMEOUT_S):
            raise ClusterError(
                f"harvest.spread_stages: {needed} stage actors could not be placed on "
                f"{needed} different nodes within {PLACEMENT_TIMEOUT_S:g} s: other work "
                "holds those nodes' resources"
            )
        yield {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, -1)}
    finally:
        remove_placement_group(group)


def _bundle(config: HarvestConfig, source: str) -> dict[str, float]:
    """One stage actor's resources as a placement group bundle."""
    bundle = {
        r: float(amount)
        for r, amount in (("CPU", config.num_cpus_per_actor), ("GPU", config.num_gpus_per_actor))
        if amount > 0
    }
    if not bundle:  # Ray refuses an empty bundle, and zero-resource actors would share one
        raise ConfigError(
            f"{source}: harvest.spread_stages: needs num_cpus_per_actor or "
            "num_gpus_per_actor above 0 (a placement group reserves an actor's resources)"
        )
    return bundle
