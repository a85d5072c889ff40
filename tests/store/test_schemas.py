"""Schemas as data: the JSON files, their Arrow form, tool result registration."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from arrakis_ray.errors import SchemaError
from arrakis_ray.store import schemas
from arrakis_ray.store.schemas import (
    SCHEMAS_DIR,
    activation_schema,
    known_schemas,
    load_schema,
    parse_type,
    tokens_schema,
    type_name,
    vocab_schema,
)


def test_every_schema_file_loads_and_is_documented() -> None:
    # table schemas; manifest.v2.schema.json is a JSON Schema (tests/store/test_run_contract.py)
    files = sorted(p for p in SCHEMAS_DIR.glob("*.json") if not p.name.endswith(".schema.json"))
    readme = (SCHEMAS_DIR / "README.md").read_text()
    assert {"tokens", "vocab", "activation.dense", "activation.head", "activation.pattern"} <= set(
        known_schemas()
    )
    for path in files:
        raw = json.loads(path.read_text())
        schema = load_schema(raw["name"], raw["version"])
        assert path.name == f"{schema.name}.v{schema.version}.json"
        assert schema.doc and all(f.doc for f in schema.fields)
        assert f"`{schema.name}`" in readme


def test_core_schemas_match_the_layout() -> None:
    assert [(f.name, str(f.type)) for f in tokens_schema()] == [
        ("run_id", "string"),
        ("seq_id", "int64"),
        ("pos", "int32"),
        ("doc_id", "int64"),
        ("doc_pos", "int32"),
        ("token_id", "int32"),
        ("token_text", "string"),
    ]
    assert vocab_schema().names == ["token_id", "token_text"]
    dense = activation_schema("dense", 3, "float32")
    assert dense.names == ["run_id", "layer", "seq_id", "pos", "d0", "d1", "d2"]
    assert dense.field("layer").type == pa.int16()
    assert dense.field("d2").type == pa.float32()
    head = activation_schema("head", 2, "float16")
    assert head.names == ["run_id", "layer", "seq_id", "pos", "head", "d0", "d1"]
    assert head.field("d1").type == pa.float16()
    pattern = activation_schema("pattern", 64, "float16")  # width/dtype do not apply
    assert pattern.names == ["run_id", "layer", "seq_id", "head", "q_pos", "k_pos", "weight"]
    assert pattern.field("weight").type == pa.float32()


def test_schema_errors() -> None:
    with pytest.raises(SchemaError, match="unknown schema 'nope'"):
        load_schema("nope")
    with pytest.raises(SchemaError, match="no version 7"):
        load_schema("tokens", 7)
    with pytest.raises(SchemaError, match="'bfloat16'.*convert bfloat16 to float32"):
        activation_schema("dense", 4, "bfloat16")
    with pytest.raises(SchemaError, match="positive width"):
        load_schema("activation.dense").arrow()
    with pytest.raises(SchemaError, match="unknown activation kind"):
        activation_schema("sparse", 4, "float16")


@pytest.mark.parametrize(
    "t",
    [pa.int16(), pa.float16(), pa.string(), pa.list_(pa.string()), pa.list_(pa.float32(), 8)],
)
def test_type_names_round_trip(t: pa.DataType) -> None:
    assert parse_type(type_name(t)) == t


def test_schema_file_name_must_match_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schemas, "_schema_dirs", [tmp_path])
    schemas._versions.cache_clear()
    (tmp_path / "result.x.v2.json").write_text(
        json.dumps({"name": "result.x", "version": 1, "doc": "", "fields": []})
    )
    try:
        with pytest.raises(SchemaError, match="file name does not match its content"):
            load_schema("result.x")
    finally:
        schemas._versions.cache_clear()


def test_readme_result_sections_are_generated_from_the_json_files() -> None:
    from arrakis_ray.store import schema_docs

    readme = (schema_docs.SCHEMAS_DIR / "README.md").read_text()
    assert schema_docs.updated_readme(readme) == readme, (
        "schemas/README.md is stale: run python -m arrakis_ray.store.schema_docs"
    )
