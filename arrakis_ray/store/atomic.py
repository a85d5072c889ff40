"""Atomic file writes: readers see the old file or the new one, never half of one.

On a local disk: write to a hidden temp name beside the target, fsync, rename. The temp
name starts with a dot and does not end in ``.parquet``; no inventory lists it, so no
reader sees it, and one left by a killed writer is an orphan ``verify`` removes.

On an object store (``store/location.py``) there is no rename; instead the file is
staged in a local temp file and uploaded in one call once complete. An object becomes
visible only when its upload finishes, so the guarantee is the same; a failed write
uploads nothing.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from arrakis_ray.errors import StoreError
from arrakis_ray.store.location import StorePath, is_remote, store_path


@contextmanager
def atomic_path(path: StorePath) -> Iterator[Path]:
    """A local temp path to write; on a clean exit the file replaces ``path`` atomically.

    Native writers (pyarrow) write to it by path, which keeps them off Python file
    objects, whose every write takes the GIL from the threads running the model.
    """
    path = store_path(path)  # a string is a local path or a URI
    if is_remote(path):
        fd, name = tempfile.mkstemp(prefix=".arrakis-upload-")
        os.close(fd)
        tmp = Path(name)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if is_remote(path):
            path.fs.put_file(str(tmp), path.path)
        else:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)  # the data reaches the disk before the name does
            finally:
                os.close(fd)
            os.replace(tmp, path)
    except OSError as e:
        raise StoreError(f"{path}: could not write ({e})") from e
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: StorePath, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """Open a temp file to write; on a clean exit it replaces ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
