"""Versioned Arrow schemas of the stored tables, loaded from ``schemas/*.json``.

Schemas are data: ``schemas/<name>.v<N>.json`` holds a table's fields (name, type,
nullable, doc) and, for activation tables, a ``dims`` template that expands to one column
per dimension (``d0..d{width-1}``) in the run's storage dtype. Nothing here infers a
schema from data.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pyarrow as pa

from arrakis_ray.errors import SchemaError
from arrakis_ray.resources import schemas_dir

SCHEMAS_DIR = schemas_dir()
# Searched in order; custom tools outside this repo add their own with add_schema_dir.
_schema_dirs: list[Path] = [SCHEMAS_DIR]
STORAGE_DTYPES = ("float16", "float32")  # bfloat16 has no Parquet type: stored as float32
ACTIVATION_KINDS = ("dense", "head", "pattern")

_FILE = re.compile(r"^(?P<name>.+)\.v(?P<version>\d+)\.json$")
_PRIMITIVES: dict[str, pa.DataType] = {
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint8": pa.uint8(),
    "uint16": pa.uint16(),
    "uint32": pa.uint32(),
    "uint64": pa.uint64(),
    "float16": pa.float16(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "string": pa.string(),
    "large_string": pa.large_string(),
    "binary": pa.binary(),
    "date32": pa.date32(),
    "timestamp[s]": pa.timestamp("s"),
    "timestamp[ms]": pa.timestamp("ms"),
    "timestamp[us]": pa.timestamp("us"),
    "timestamp[ns]": pa.timestamp("ns"),
}
_NAMES = {t: name for name, t in _PRIMITIVES.items()}
_LIST = re.compile(r"^list<(.+)>$")
_FIXED_LIST = re.compile(r"^fixed_size_list<(.+)>\[(\d+)\]$")


def parse_type(text: str) -> pa.DataType:
    """Arrow type of a schema-file type string (``int32``, ``list<string>``, ...)."""
    if text in _PRIMITIVES:
        return _PRIMITIVES[text]
    m = _FIXED_LIST.match(text)
    if m:
        return pa.list_(parse_type(m.group(1)), int(m.group(2)))
    m = _LIST.match(text)
    if m:
        return pa.list_(parse_type(m.group(1)))
    raise SchemaError(f"unknown type {text!r} (known: {', '.join(_PRIMITIVES)}, list<T>)")


def type_name(t: pa.DataType) -> str:
    """Schema-file type string of an Arrow type; inverse of ``parse_type``."""
    if t in _NAMES:
        return _NAMES[t]
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{type_name(t.value_type)}>[{t.list_size}]"
    if pa.types.is_list(t):
        return f"list<{type_name(t.value_type)}>"
    raise SchemaError(f"type {t} cannot be stored in an arrakis-ray table")


@dataclass(frozen=True)
class FieldSpec:
    """One column of a table schema."""

    name: str
    type: str
    nullable: bool
    doc: str

    def arrow(self) -> pa.Field:
        """This column as an Arrow field."""
        return pa.field(self.name, parse_type(self.type), nullable=self.nullable)


@dataclass(frozen=True)
class DimsSpec:
    """Template of the per-dimension columns of an activation table."""

    prefix: str
    doc: str
    nullable: bool = False
    """Null only as padding (the last column block of a wide dense family)."""


@dataclass(frozen=True)
class TableSchema:
    """One version of one table's schema, as read from ``schemas/<name>.v<N>.json``."""

    name: str
    version: int
    doc: str
    fields: tuple[FieldSpec, ...]
    dims: DimsSpec | None = None

    def arrow(self, width: int | None = None, dtype: str = "float16") -> pa.Schema:
        """Arrow schema; for a table with ``dims``, ``width`` columns of ``dtype`` follow."""
        fields = [f.arrow() for f in self.fields]
        if self.dims is not None:
            if not isinstance(width, int) or width < 1:
                raise SchemaError(f"schema {self.name!r} needs a positive width, got {width!r}")
            if dtype not in STORAGE_DTYPES:
                raise SchemaError(
                    f"storage dtype {dtype!r} for {self.name!r} is not one of "
                    f"{', '.join(STORAGE_DTYPES)} (convert bfloat16 to float32 before writing)"
                )
            t = _PRIMITIVES[dtype]
            nullable = self.dims.nullable
            fields += [pa.field(f"{self.dims.prefix}{i}", t, nullable) for i in range(width)]
        return pa.schema(fields)


def _parse_schema_file(path: Path) -> TableSchema:
    try:
        data = json.loads(path.read_text())
        fields = tuple(
            FieldSpec(f["name"], f["type"], bool(f.get("nullable", True)), f.get("doc", ""))
            for f in data["fields"]
        )
        dims = data.get("dims")
        schema = TableSchema(
            name=data["name"],
            version=int(data["version"]),
            doc=data.get("doc", ""),
            fields=fields,
            dims=(
                DimsSpec(dims["prefix"], dims.get("doc", ""), bool(dims.get("nullable", False)))
                if dims
                else None
            ),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SchemaError(f"{path}: invalid schema file ({type(e).__name__}: {e})") from None
    m = _FILE.match(path.name)
    if m is None or m.group("name") != schema.name or int(m.group("version")) != schema.version:
        raise SchemaError(
            f"{path}: file name does not match its content "
            f"({schema.name!r} v{schema.version} should be {schema.name}.v{schema.version}.json)"
        )
    for f in fields:
        parse_type(f.type)  # fail at load, not at first write
    return schema


def add_schema_dir(path: str | Path) -> None:
    """Also look for schema files in ``path`` (a custom tool's own ``schemas/``)."""
    resolved = Path(path).resolve()
    if not resolved.is_dir():
        raise SchemaError(f"schema directory {resolved} does not exist")
    if resolved not in _schema_dirs:
        _schema_dirs.append(resolved)
        _versions.cache_clear()


@cache
def _versions(name: str) -> dict[int, TableSchema]:
    found: dict[int, TableSchema] = {}
    for directory in _schema_dirs:
        for path in directory.glob(f"{name}.v*.json"):
            m = _FILE.match(path.name)
            if m and m.group("name") == name:
                s = _parse_schema_file(path)
                found.setdefault(s.version, s)  # earlier directories win
    return found


def known_schemas() -> list[str]:
    """Names of every schema in the schema directories."""
    names = {
        m.group("name")
        for d in _schema_dirs
        for p in d.glob("*.json")
        if (m := _FILE.match(p.name))
    }
    return sorted(names)


def load_schema(name: str, version: int | None = None) -> TableSchema:
    """The latest version (or the given one) of schema ``name``; SchemaError if unknown."""
    versions = _versions(name)
    if not versions:
        raise SchemaError(
            f"unknown schema {name!r} (known: {', '.join(known_schemas())}; "
            f"searched {', '.join(map(str, _schema_dirs))})"
        )
    if version is None:
        return versions[max(versions)]
    if version not in versions:
        raise SchemaError(f"schema {name!r} has no version {version} (has {sorted(versions)})")
    return versions[version]


def tokens_schema() -> pa.Schema:
    """Arrow schema of the ``tokens`` table."""
    return load_schema("tokens").arrow()


def vocab_schema() -> pa.Schema:
    """Arrow schema of the ``vocab`` table."""
    return load_schema("vocab").arrow()


def activation_schema_name(kind: str) -> str:
    """Schema name of an activation kind (``dense`` -> ``activation.dense``)."""
    if kind not in ACTIVATION_KINDS:
        kinds = ", ".join(ACTIVATION_KINDS)
        raise SchemaError(f"unknown activation kind {kind!r} (kinds: {kinds})")
    return f"activation.{kind}"


@cache  # every shard file of a harvest checks against it; 14k fields take ms to build
def activation_schema(kind: str, width: int, dtype: str) -> pa.Schema:
    """Arrow schema of an activation table; ``pattern`` ignores width and dtype (float32)."""
    schema = load_schema(activation_schema_name(kind))
    if schema.dims is None:
        return schema.arrow()
    return schema.arrow(width, dtype)


def stored_dims(schema: pa.Schema) -> tuple[int, str]:
    """(number of ``d<i>`` columns, their storage dtype) of an activation table's schema;
    float32 when it has none (a pattern table). Another type keeps its own name, which
    ``activation_schema`` then refuses by name."""
    dims = [f for f in schema if f.name[:1] == "d" and f.name[1:].isdigit()]
    if not dims:
        return 0, "float32"
    names = {pa.float16(): "float16", pa.float32(): "float32"}
    return len(dims), names.get(dims[0].type, str(dims[0].type))


def schema_mismatch(actual: pa.Schema, expected: pa.Schema) -> str | None:
    """The first difference in column names, types or order, or None if they agree."""
    for i, (a, e) in enumerate(zip(actual, expected, strict=False)):
        if a.name != e.name:
            return f"column {i} is {a.name!r}, expected {e.name!r}"
        if a.type != e.type:
            return f"column {a.name!r} has type {a.type}, expected {e.type}"
    if len(actual) != len(expected):
        if len(actual) > len(expected):
            extra = actual.names[len(expected)]
            return f"unexpected column {extra!r} after the {len(expected)} expected"
        return f"missing column {expected.names[len(actual)]!r}"
    return None
