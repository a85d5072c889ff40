"""What an experiment version is made of, as canonical bytes: source, arguments, model.

A version is ``sha256(name, source, arguments, model fingerprint)[:16]``: no timestamp,
so the same code run with the same arguments on the same model is the same version in
any process (the original Arrakis hashed a timestamp in, so every call was a new
"version" and nothing could be found again).

- **source**: the function's source as written (``inspect.getsource``). Where Python
  cannot find it (a function typed at ``python -c``), the version hashes its compiled
  code (``marshal``, stable for one Python version) and the record says so. A decorated
  bound method is versioned by its code and arguments: the state of the object it is
  bound to is not part of its version (pass what matters as arguments).
- **arguments**: bound to the signature with defaults applied, as canonical JSON (sorted
  keys). Arrays, tensors, Series and tables are hashed by content (dtype, shape, bytes;
  a table without its schema metadata, which holds library versions), and written out
  when they are small; a function by its code and the values it closes over; the model
  by its fingerprint; non-finite floats are tagged (``{"float": "nan"}``), so they
  differ from the string ``"nan"``. A value with no stable content (an open file, an
  array of Python objects, an object whose repr is its address) is refused by name: a
  version built from ``repr`` would change from one process to the next.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import marshal
import math
import textwrap
import weakref
from collections.abc import Callable, Mapping
from pathlib import PurePath
from typing import Any

from arrakis_ray.errors import DataError

SMALL = 64  # arrays of at most this many values are written out in full


def source_of(func: Callable) -> tuple[str, bytes]:
    """(source text for the record, bytes that identify the code for the version)."""
    func = inspect.unwrap(func)
    try:
        text = textwrap.dedent(inspect.getsource(func))
        return text, text.encode()
    except (OSError, TypeError):
        code = getattr(func, "__code__", None)
        where = getattr(code, "co_filename", "?")
        note = f"# source not available (defined in {where}): the version hashes its bytecode"
        return note, marshal.dumps(code) if code is not None else note.encode()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def version_of(name: str, code: bytes, arguments: str, model: str | None) -> str:
    h = hashlib.sha256()
    for part in (name.encode(), code, arguments.encode(), (model or "").encode()):
        h.update(len(part).to_bytes(8, "little"))  # unambiguous concatenation
        h.update(part)
    return h.hexdigest()[:16]


def bound_arguments(
    func: Callable, args: tuple, kwargs: dict, skip: set[str], supplied: set[str] = frozenset()
) -> dict[str, Any]:
    """The call's arguments by parameter name, defaults applied, ``skip`` left out.
    ``supplied``: parameters the decorator passes (a tool, ``fig``, a plot's keyword
    arguments), bound here to a placeholder whether or not they have defaults."""
    signature = inspect.signature(func)
    given = set(kwargs) | set(list(signature.parameters)[: len(args)])
    filler = {n: None for n in supplied if n in signature.parameters and n not in given}
    try:
        bound = signature.bind(*args, **kwargs, **filler)
    except TypeError as e:
        raise TypeError(f"{getattr(func, '__name__', func)}(): {e}") from None
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k not in skip}


def canonical(arguments: Mapping[str, Any], where: str) -> str:
    """Canonical JSON of the arguments (the version's input and the record's text)."""
    return json.dumps(
        {k: _plain(v, f"{where} argument {k!r}") for k, v in arguments.items()},
        sort_keys=True,
        separators=(",", ":"),
    )


def _plain(value: Any, where: str, seen: frozenset[int] = frozenset()) -> Any:
    """A JSON value with the same content as ``value``, or DataError. ``seen``: the
    functions being described, so that a recursive closure ends."""
    import numpy as np

    def plain(v: Any) -> Any:
        return _plain(v, where, seen)

    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):  # tagged: the string "nan" is another value
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, np.generic):
        return plain(value.item())
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((plain(v) for v in value), key=json.dumps)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {"__dataclass__": type(value).__qualname__, **plain(fields)}
    if _library_type(value)[1] == "Series":  # by its values, whatever their type
        value = value.to_frame()
    array = _as_numpy(value)
    if array is not None:
        if array.dtype.kind not in "biufcSUM":  # objects: no bytes that are their content
            raise DataError(f"{where}: an array of {array.dtype} has no stable content to version")
        if array.size <= SMALL and array.dtype.kind in "biuf":
            values = plain(array.tolist())  # a NaN tagged, as anywhere else
            return {"dtype": str(array.dtype), "shape": list(array.shape), "values": values}
        raw = np.ascontiguousarray(array).tobytes()
        return {"dtype": str(array.dtype), "shape": list(array.shape), "sha256": digest(raw)}
    table = as_arrow_table(value)
    if table is not None:  # pandas and Arrow put versions in the metadata: not content
        table = table.replace_schema_metadata(None)
        schema = table.schema.to_string(show_schema_metadata=False)
        return {"table": schema, "rows": table.num_rows, "sha256": _table_digest(table)}
    if _is_hooked_model(value):
        return {"model": fingerprint(value)}
    if inspect.ismethod(value):  # its function and the object it is bound to
        return {"method": plain(value.__func__), "self": plain(value.__self__)}
    if inspect.isfunction(value):  # its code, and the values it closes over
        _text, code = source_of(value)
        described = {"function": value.__qualname__, "sha256": digest(code)}
        if id(value) in seen:  # a function that calls itself closes over itself
            return described
        try:
            cells = [c.cell_contents for c in value.__closure__ or ()]
        except ValueError:  # a cell not yet bound (a name assigned after the def)
            raise DataError(
                f"{where}: {value.__qualname__} closes over a name not yet set"
            ) from None
        return {**described, "closure": _plain(cells, where, seen | {id(value)})}
    raise DataError(
        f"{where}: a {type(value).__name__} has no stable content to version; pass plain "
        "values, arrays, tensors or tables (or a tool through use_tools)"
    )


def _as_numpy(value: Any):
    """A numpy array of an array, a tensor or a polars / pandas Series, else None."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return value
    kind = _library_type(value)
    if kind == ("torch", "Tensor") or (kind[0] == "torch" and hasattr(value, "detach")):
        t = value.detach().cpu()
        return t.float().numpy() if str(t.dtype) == "torch.bfloat16" else t.numpy()
    if kind in (("polars", "Series"), ("pandas", "Series")):
        return value.to_numpy()
    return None


def as_arrow_table(value: Any, *, rows: bool = False):
    """An Arrow table of a pyarrow Table or a polars / pandas DataFrame (the index of a
    pandas frame dropped), and with ``rows`` of a list of dicts; None for anything else,
    or for a pandas frame Arrow cannot type (mixed objects in a column)."""
    import pyarrow as pa

    if isinstance(value, pa.Table):
        return value
    kind = _library_type(value)
    if kind == ("polars", "DataFrame"):
        return value.to_arrow()
    if kind == ("pandas", "DataFrame"):
        try:
            return pa.Table.from_pandas(value, preserve_index=False)
        except (pa.ArrowException, ValueError, TypeError):
            return None
    if (
        rows
        and isinstance(value, list | tuple)
        and value
        and all(isinstance(r, dict) for r in value)
    ):
        return pa.Table.from_pylist(list(value))
    return None


def _library_type(value: Any) -> tuple[str, str]:
    """(top-level package, class name): tensors and frames are recognised without
    importing their libraries."""
    cls = type(value)
    return cls.__module__.partition(".")[0], cls.__name__


def _table_digest(table) -> str:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return digest(sink.getvalue().to_pybytes())


def as_table(value: Any):
    """An Arrow table for a table or array result (arrays: one flat ``value`` column,
    their shape and dtype in the schema metadata), else None."""
    import pyarrow as pa

    table = as_arrow_table(value)
    if table is not None:
        return table, "table"
    array = _as_numpy(value)
    if array is not None and array.ndim >= 1 and array.dtype.kind in "biuf":
        meta = {"shape": json.dumps(list(array.shape)), "dtype": str(array.dtype)}
        flat = pa.table({"value": array.reshape(-1)}).replace_schema_metadata(meta)
        return flat, "array"
    return None


def array_from(table) -> Any:
    """The numpy array an ``array`` result file holds."""
    meta = table.schema.metadata or {}
    shape = json.loads(meta.get(b"shape", b"[-1]"))
    return table["value"].to_numpy().reshape(shape)


def result_json(value: Any) -> tuple[str, str]:
    """(result_kind, JSON text) of a JSON-able result: ``json``, or ``repr`` when some
    part has no JSON form (then the text is its repr, as a JSON string)."""
    try:
        return "json", json.dumps(_jsonable(value), allow_nan=False)
    except (TypeError, ValueError):
        return "repr", json.dumps(repr(value))


def _jsonable(value: Any) -> Any:
    import numpy as np

    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, list | tuple):  # named tuples (HeadScore) too: as lists
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    array = _as_numpy(value)
    if array is not None:
        return _jsonable(array.tolist())
    raise TypeError(type(value).__name__)


def _is_hooked_model(value: Any) -> bool:
    from arrakis_ray.models.hooked import HookedModel

    return isinstance(value, HookedModel)


class Fingerprints:
    """The model's fingerprint (``models/load.py``: sha256 of its config and weights),
    computed again only when its weights changed.

    sha256 reads about a GB a second, too slow for every logged call of a large model;
    xxh3 of the same bytes is several times faster and says whether they changed. Every
    call reads the weights once this way: a change made any way (``p.data.mul_``, a
    loaded state dict) is seen, which tensor version counters would miss."""

    def __init__(self):
        self._last: tuple[int, str] | None = None

    def __call__(self, model) -> str:
        import xxhash

        from arrakis_ray.models.load import model_fingerprint

        quick = xxhash.xxh3_64()
        for name, tensor in sorted(model.model.state_dict().items()):
            raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(-1)
            quick.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            quick.update(raw.view(torch_uint8()).numpy())  # the buffer itself: no copy
        key = quick.intdigest()
        if self._last is None or self._last[0] != key:
            self._last = (key, model_fingerprint(model))
        return self._last[1]


_BY_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fingerprint(model) -> str:
    """A model's fingerprint, through one ``Fingerprints`` per model (a model passed as an
    argument of many calls is hashed in full once)."""
    if model not in _BY_MODEL:
        _BY_MODEL[model] = Fingerprints()
    return _BY_MODEL[model](model)


def torch_uint8():
    import torch

    return torch.uint8
