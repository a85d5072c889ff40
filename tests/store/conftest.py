"""Fixtures: a custom schema directory and a two-run store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arrakis_ray.store import schemas
from arrakis_ray.store.layout import init_store
from arrakis_ray.store.schemas import add_schema_dir

from .storedata import TOY_RESULT_SCHEMA, RunData, build_run


@pytest.fixture
def schema_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A custom schema directory holding result.toy.v1.json, removed after the test."""
    directory = tmp_path / "tool_schemas"
    directory.mkdir()
    (directory / "result.toy.v1.json").write_text(json.dumps(TOY_RESULT_SCHEMA))
    monkeypatch.setattr(schemas, "_schema_dirs", list(schemas._schema_dirs))
    add_schema_dir(directory)
    yield directory
    schemas._versions.cache_clear()


@pytest.fixture
def two_runs(tmp_path: Path, schema_dir: Path) -> tuple[Path, dict[str, RunData]]:
    """Store with run "run-a" (float16, every family, a toy result) and "run-b" (float32)."""
    store = init_store(tmp_path / "store")
    runs = {
        "run-a": build_run(store, "run-a", "float16", seed=1, full=True),
        "run-b": build_run(store, "run-b", "float32", seed=2, full=False),
    }
    return store, runs
