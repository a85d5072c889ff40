"""A run's harvest calls, rebuilt from its shard inventories.

The manifest records each harvest call when it ends; a call killed before then never
records itself, though its finished shards stay (and a resume skips them). Each shard's
inventory names the call that wrote it, so the calls, and the run's totals over them
(tokens, bytes, throughput in the ``runs`` view), are counted from the inventories.
"""

from __future__ import annotations

from arrakis_ray.store.inventory import ShardInventory
from arrakis_ray.store.manifest import HarvestCall


def harvest_calls(
    inventories: dict[int, ShardInventory],
    recorded: tuple[HarvestCall, ...],
    seconds: dict[str, float] | None = None,
) -> tuple[HarvestCall, ...]:
    """The run's harvest calls, each counting the shards its inventories name.

    ``recorded``: the calls the manifest holds; their wall times are kept, and calls
    from before inventories (no ``started_at``) are kept as they are. ``seconds``: wall
    times known now (the call finishing). A call that never recorded itself (killed)
    lasted from its start to its last shard.
    """
    known = {c.started_at: c for c in recorded if c.started_at}
    by_call: dict[str, list[ShardInventory]] = {}
    for inventory in inventories.values():
        by_call.setdefault(inventory.call, []).append(inventory)
    calls = [c for c in recorded if not c.started_at]
    # shards inventoried by a migration (call None) have their calls in ``recorded``
    for call, shards in sorted((c, s) for c, s in by_call.items() if c):
        finished = max(i.finished_at for i in shards)
        if seconds and call in seconds:
            wall = seconds[call]
        elif call in known:
            wall, finished = known[call].seconds, known[call].finished_at
        else:
            wall = _elapsed(call, finished)
        calls.append(
            HarvestCall(
                finished_at=finished,
                shards=len(shards),
                tokens=sum(i.tokens for i in shards),
                bytes=sum(i.bytes for i in shards),
                sequences=sum(i.sequences for i in shards),
                seconds=wall,
                started_at=call,
            )
        )
    return tuple(calls)


def _elapsed(start: str, end: str) -> float:
    from datetime import datetime

    try:
        seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except ValueError:
        return 0.0
    return round(max(seconds, 0.0), 3)
