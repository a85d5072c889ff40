"""The ``runs`` view's rows, from the run manifests; a manifest's file stamp.

The catalog (``store/catalog.py``) builds the ``runs`` table from these rows when a
Store opens, and watches the manifests of uncompacted runs by their stamps.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from arrakis_ray.config import to_dict
from arrakis_ray.errors import StoreError
from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.location import tree_bytes
from arrakis_ray.store.manifest import RunManifest, read_manifest

log = logging.getLogger(__name__)

RUNS_COLUMNS = (
    ("run_id", "VARCHAR"),
    ("name", "VARCHAR"),
    ("status", "VARCHAR"),
    ("model", "VARCHAR"),
    ("arch", "VARCHAR"),
    ("n_sequences", "BIGINT"),
    ("n_tokens", "BIGINT"),
    ("hooks", "VARCHAR[]"),
    ("created_at", "VARCHAR"),
    ("tokens_per_s", "DOUBLE"),
    ("bytes", "BIGINT"),
    ("manifest", "VARCHAR"),
)


def manifest_stamp(path: Path) -> tuple:
    """What changes when a manifest is rewritten (atomically, under a new inode)."""
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def run_row(layout: RunLayout) -> tuple[dict, RunManifest | None]:
    """One row of the ``runs`` view, and the run's manifest; a run without a readable
    manifest still gets a row (and no activation views: they need its shape)."""
    row: dict = {"run_id": layout.run_id, "bytes": tree_bytes(layout.root)}
    try:
        manifest = read_manifest(layout)
    except StoreError as e:
        log.warning("%s", e)
        row["status"] = "no-manifest" if not layout.manifest_path.exists() else "corrupt-manifest"
        return row, None
    row.update(
        name=manifest.name,
        status=manifest.status,
        model=manifest.model_source,
        arch=manifest.shape.arch,
        n_sequences=manifest.data.n_sequences,
        n_tokens=manifest.harvest.n_tokens,
        hooks=list(manifest.hooks),
        created_at=manifest.created_at,
        tokens_per_s=manifest.harvest.tokens_per_s,
    )
    data = manifest.to_json()
    data["results"] = {name: to_dict(r) for name, r in manifest.results.items()}
    row["manifest"] = json.dumps(data, sort_keys=True)
    return row, manifest
