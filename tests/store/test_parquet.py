"""Atomic, schema-checked Parquet writing; version-checked reading; manifests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from runs import shard_plan, synthetic_manifest, synthetic_shape

from arrakis_ray.errors import SchemaError, StoreError
from arrakis_ray.store.checksum import checksum_file
from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.manifest import read_manifest, write_manifest
from arrakis_ray.store.parquet import file_schema, read_table, write_table
from arrakis_ray.store.schemas import activation_schema, tokens_schema


def _dense(n: int = 10, width: int = 4, dtype: str = "float16") -> pa.Table:
    x = np.random.default_rng(0).standard_normal((n, width)).astype(dtype)
    return pa.table(
        {
            "run_id": pa.array(["r"] * n),
            "layer": pa.array(np.zeros(n, np.int16)),
            "seq_id": pa.array(np.arange(n, dtype=np.int64)),
            "pos": pa.array(np.zeros(n, np.int32)),
            **{f"d{i}": pa.array(x[:, i]) for i in range(width)},
        }
    )


def _write(table: pa.Table, path: Path, version: int = 1, dtype: str = "float16"):
    return write_table(
        table,
        path,
        schema_name="activation.dense",
        schema_version=version,
        expected=activation_schema("dense", 4, dtype),
    )


def test_round_trip_metadata_and_encoding(tmp_path: Path) -> None:
    path = tmp_path / "acts" / "shard-00000.parquet"
    table = _dense()
    written = _write(table, path)
    assert written.bytes == path.stat().st_size and written.rows == table.num_rows
    assert written.checksum == checksum_file(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["shard-00000.parquet"]  # no temp
    back = read_table(path, schema_name="activation.dense", max_version=1)
    assert back.equals(table.cast(back.schema))
    np.testing.assert_array_equal(back["d3"].to_numpy(), table["d3"].to_numpy())
    meta = pq.read_metadata(path)
    assert meta.metadata[b"arrakis.schema"] == b"activation.dense"
    assert meta.metadata[b"arrakis.schema_version"] == b"1"
    assert file_schema(path) == ("activation.dense", 1)
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    chunks = {names[i]: meta.row_group(0).column(i) for i in range(meta.num_columns)}
    assert not chunks["d0"].has_dictionary_page  # floats: plain
    assert not chunks["d0"].is_stats_set
    assert chunks["run_id"].has_dictionary_page  # strings: dictionary
    assert chunks["seq_id"].statistics.max == 9
    one = read_table(path, schema_name="activation.dense", max_version=1, columns=["d1"])
    assert one.column_names == ["d1"]


def test_schema_mismatch_is_refused_and_nothing_written(tmp_path: Path) -> None:
    path = tmp_path / "shard-00000.parquet"
    table = _dense()
    wrong_type = table.set_column(3, "pos", table["pos"].cast(pa.int64()))
    with pytest.raises(SchemaError, match=r"'activation.dense'.*column 'pos' has type int64"):
        _write(wrong_type, path)
    with pytest.raises(SchemaError, match="column 1 is 'seq_id', expected 'layer'"):
        _write(table.select(["run_id", "seq_id", "layer", "pos", "d0", "d1", "d2", "d3"]), path)
    with pytest.raises(SchemaError, match="missing column 'd3'"):
        _write(table.drop_columns(["d3"]), path)
    with pytest.raises(SchemaError, match="has type halffloat, expected float"):
        _write(table, path, dtype="float32")
    nulls = table.set_column(2, "seq_id", pa.array([None] * 10, pa.int64()))
    with pytest.raises(SchemaError, match="'seq_id' holds 10 nulls"):
        _write(nulls, path)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "shard-00000.parquet"
    _write(_dense(n=5), path)
    before = path.read_bytes()
    with pytest.raises(SchemaError):
        _write(_dense(n=7).drop_columns(["d0"]), path)
    assert path.read_bytes() == before


def test_newer_or_foreign_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "shard-00000.parquet"
    _write(_dense(), path, version=3)
    with pytest.raises(SchemaError) as e:
        read_table(path, schema_name="activation.dense", max_version=1)
    assert "written by a newer arrakis-ray (schema v3, this reader knows v1)" in str(e.value)
    assert str(path) in str(e.value)
    with pytest.raises(SchemaError, match="holds table 'activation.dense', expected 'tokens'"):
        read_table(path, schema_name="tokens", max_version=1)
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1]}), plain)
    with pytest.raises(SchemaError, match="no arrakis.schema metadata"):
        read_table(plain, schema_name="tokens", max_version=1)


def test_truncated_or_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "shard-00000.parquet"
    _write(_dense(n=200), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match=r"shard-00000\.parquet: corrupt or truncated"):
        read_table(path, schema_name="activation.dense", max_version=1)
    # Footer intact but a column chunk overwritten: caught when the data is read.
    broken = bytearray(data)
    broken[4:200] = b"\xff" * 196
    path.write_bytes(bytes(broken))
    with pytest.raises(StoreError, match=r"shard-00000\.parquet"):
        read_table(path, schema_name="activation.dense", max_version=1)
    with pytest.raises(StoreError, match=r"missing\.parquet: file is missing"):
        read_table(tmp_path / "missing.parquet", schema_name="tokens", max_version=1)


def test_tokens_schema_write(tmp_path: Path) -> None:
    table = pa.table(
        {
            "run_id": ["r", "r"],
            "seq_id": pa.array([0, 0], pa.int64()),
            "pos": pa.array([0, 1], pa.int32()),
            "doc_id": pa.array([5, 5], pa.int64()),
            "doc_pos": pa.array([3, 4], pa.int32()),
            "token_id": pa.array([17, 4], pa.int32()),
            "token_text": [" hi", "\n"],
        }
    )
    path = tmp_path / "t.parquet"
    write_table(table, path, schema_name="tokens", schema_version=1, expected=tokens_schema())
    back = read_table(path, schema_name="tokens", max_version=1)
    assert back.to_pylist() == table.to_pylist()


def test_manifest_round_trip_and_errors(tmp_path: Path) -> None:
    run = RunLayout(tmp_path, "r1")
    manifest = synthetic_manifest("r1", ["blocks.0.hook_resid_post"], synthetic_shape("gpt2"),
                                  shard_plan(3, 2))  # fmt: skip
    write_manifest(run, manifest)
    assert read_manifest(run) == manifest
    text = json.dumps(manifest.to_json(), sort_keys=True, indent=2) + "\n"
    assert run.manifest_path.read_text() == text
    assert sorted(p.name for p in run.root.iterdir()) == ["manifest.json"]

    before = run.manifest_path.read_text()
    with pytest.raises(StoreError, match="not JSON-serialisable"):
        write_manifest(run, manifest.with_changes(config={"x": object()}))
    assert run.manifest_path.read_text() == before

    run.manifest_path.write_text("{not json")
    with pytest.raises(StoreError, match=r"r1/manifest\.json: corrupt manifest"):
        read_manifest(run)
    with pytest.raises(StoreError, match=r"r2/manifest\.json: manifest is missing"):
        read_manifest(RunLayout(tmp_path, "r2"))
