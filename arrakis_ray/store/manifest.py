"""A run's ``manifest.json``: the resolved config and everything that explains the run.

The content is free-form JSON filled by the harvest (config, fingerprints, schema
versions, shard plan, status, timings, package versions); the keys the catalog's ``runs``
view reads are listed in ``schemas/README.md``.
"""

from __future__ import annotations

import json

from arrakis_ray.errors import StoreError
from arrakis_ray.store.atomic import atomic_open
from arrakis_ray.store.layout import RunLayout


def write_manifest(layout: RunLayout, manifest: dict) -> None:
    """Write the run's manifest atomically (sorted keys, indent 2)."""
    path = layout.manifest_path
    if not isinstance(manifest, dict):
        raise StoreError(f"{path}: a manifest is a JSON object, got {type(manifest).__name__}")
    try:
        text = json.dumps(manifest, sort_keys=True, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise StoreError(f"{path}: manifest is not JSON-serialisable ({e})") from None
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def read_manifest(layout: RunLayout) -> dict:
    """The run's manifest; StoreError naming the file if it is missing or corrupt."""
    path = layout.manifest_path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{path}: manifest is missing (run {layout.run_id!r})") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: corrupt manifest ({e})") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path}: corrupt manifest (a JSON object expected)")
    return data
