"""Atomic file writes: write to a hidden temp name beside the target, fsync, rename.

Readers see the old file or the new one, never half of one. The temp name starts with
a dot and does not end in ``.parquet``, so the catalog's ``shard-*.parquet`` globs never
match it, even while it is being written.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from arrakis_ray.errors import StoreError


@contextmanager
def atomic_open(path: Path, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """Open a temp file to write; on a clean exit it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise StoreError(f"{path}: could not write ({e})") from e
    finally:
        tmp.unlink(missing_ok=True)
