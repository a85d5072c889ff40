"""One harvest at a time per run: a lease held by the harvest driver for its call.

Two harvests of one pipeline name the same run (its id is a content hash). Without a
lease both compute every shard: the data stays right (each file is written atomically,
each shard marked once complete), but the work is doubled. The lease is an exclusive
``flock`` on ``runs/.<id>.harvest.lock``, beside the run's directory so that a harvest
refused before its first write leaves no run behind. The kernel drops the lock when its
process dies, so a killed driver never leaves the run locked. The file is empty and
never rewritten (a no-op rerun changes nothing in the store); the second caller's
message says since when the run is running, from its manifest.

An object store has no locks: there two concurrent harvests still both run (and stay
correct). A store on NFS gets whatever ``flock`` guarantees there.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

from arrakis_ray.errors import StoreError
from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.location import is_remote


@contextmanager
def harvest_lease(layout: RunLayout) -> Iterator[None]:
    """Hold the run's harvest lease for the block; StoreError if another process holds it."""
    if is_remote(layout.root):
        yield
        return
    layout.root.parent.mkdir(parents=True, exist_ok=True)
    path = layout.root.parent / f".{layout.run_id}.harvest.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"run {layout.run_id} is being harvested by another process{_since(layout)}; "
                "wait for it to finish (a rerun then finishes anything left)"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _since(layout: RunLayout) -> str:
    try:
        manifest = json.loads(layout.manifest_path.read_text())
        since = manifest.get("updated_at") or manifest["created_at"]
        return f" (status {manifest['status']} since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""
