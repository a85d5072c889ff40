"""Where a store lives: a local directory, or an object-store / fsspec URI.

A local store is a plain ``pathlib.Path``. A URI (``s3://bucket/prefix``, ``gs://...``,
``memory://...``, any fsspec protocol) becomes a ``upath.UPath``: it has the same path
API (``/``, ``name``, ``parent``, ``glob``, ``iterdir``, ``exists``, ``open``,
``stat``), so the layout code is written once for both. Paths are passed to Ray actors
and tasks as objects, never as strings: a UPath carries its filesystem options (the S3
endpoint and credentials) with it when pickled, so workers need no environment of
their own.

What differs for an object store is confined to three places:

- writes (``store/atomic.py``) are staged in a local temp file and uploaded in one
  call: an object appears only when its upload completes, so readers never see half
  a file (there is no rename to make it atomic);
- Parquet reads go through a pyarrow filesystem (``arrow_source`` below);
- SQL (``store/catalog.py``) scans pyarrow datasets, since DuckDB's own S3 reader is an
  extension that cannot be downloaded on a closed cluster.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Union

from arrakis_ray.errors import StoreError

try:  # object stores are optional: a local store needs none of this
    from upath import UPath
except ImportError:  # pragma: no cover - universal_pathlib is a declared dependency
    UPath = None

StorePath = Union[Path, "UPath"]

# S3 settings read from the environment when a store URI is opened, then carried by the
# path itself (to every Ray worker): fsspec option -> environment variables, first set wins.
_S3_ENV = {
    "endpoint_url": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    "key": ("AWS_ACCESS_KEY_ID",),
    "secret": ("AWS_SECRET_ACCESS_KEY",),
    "token": ("AWS_SESSION_TOKEN",),
}


def is_uri(location: object) -> bool:
    """True for ``scheme://...`` other than ``file://`` (a Windows drive is no scheme)."""
    text = str(location)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and len(scheme) > 1 and scheme != "file"


def is_remote(path: object) -> bool:
    """True for a UPath on a non-local fsspec filesystem (strings are never remote)."""
    return UPath is not None and isinstance(path, UPath) and not isinstance(path, Path)


def _s3_options() -> dict:
    options: dict = {
        # another process (a harvest actor) adds files: never answer a listing from cache
        "use_listings_cache": False,
    }
    for option, names in _S3_ENV.items():
        value = next((os.environ[n] for n in names if os.environ.get(n)), None)
        if value:
            options[option] = value
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


def store_path(location: str | os.PathLike) -> StorePath:
    """The path object for a store location: a local Path (absolute) or a UPath for a URI.

    A path object passes through unchanged; ``file://`` URIs are local paths.
    """
    if UPath is not None and isinstance(location, UPath) and is_remote(location):
        return location
    if not is_uri(location):
        text = str(location)
        if text.startswith("file://"):
            text = text.removeprefix("file://")
        return Path(text).expanduser().absolute()
    if UPath is None:  # pragma: no cover
        raise StoreError(f"{location}: object-store URIs need the universal_pathlib package")
    uri = str(location).rstrip("/")
    protocol = uri.partition("://")[0]
    options = _s3_options() if protocol in ("s3", "s3a") else {}
    try:
        return UPath(uri, **options)
    except (ImportError, ValueError) as e:
        raise StoreError(f"{uri}: cannot open this filesystem ({e})") from None


def arrow_source(path: StorePath) -> tuple[str, object]:
    """(path string, pyarrow filesystem or None) for reading ``path`` with pyarrow."""
    path = store_path(path)  # a string names a local file or a URI
    if not is_remote(path):
        return str(path), None
    options = dict(path.storage_options)
    native = _NATIVE_S3_OPTIONS.issuperset(options) and set(
        options.get("client_kwargs") or {}
    ).issubset({"region_name"})
    if path.protocol in ("s3", "s3a") and native:
        # pyarrow's own S3 client reads in C++ without the GIL; fsspec's goes through
        # Python for every read. Options it would not honour keep the fsspec path.
        return path.path, _native_s3(json.dumps(options, sort_keys=True, default=dict))
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return path.path, PyFileSystem(FSSpecHandler(path.fs))


# fsspec S3 options that _native_s3 translates (client_kwargs: region_name only)
_NATIVE_S3_OPTIONS = {
    "endpoint_url",
    "key",
    "secret",
    "token",
    "client_kwargs",
    "use_listings_cache",
}


@lru_cache(maxsize=8)
def _native_s3(options_json: str):
    """A pyarrow S3FileSystem with the same endpoint and credentials as the fsspec path."""
    from pyarrow.fs import S3FileSystem

    options = json.loads(options_json)
    kwargs: dict = {}
    endpoint = options.get("endpoint_url")
    if endpoint:
        scheme, sep, host = endpoint.partition("://")
        kwargs["endpoint_override"] = host.rstrip("/") if sep else endpoint
        kwargs["scheme"] = scheme if sep else "https"
    for ours, theirs in (
        ("key", "access_key"),
        ("secret", "secret_key"),
        ("token", "session_token"),
    ):
        if options.get(ours):
            kwargs[theirs] = options[ours]
    region = (options.get("client_kwargs") or {}).get("region_name")
    if region:
        kwargs["region"] = region
    return S3FileSystem(**kwargs)


# Object stores have no directories: a "directory" exists once a file is under it.
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"}


def first_symlink(root: Path) -> Path | None:
    """The first symbolic link under a local directory (None if there is none): a link
    inside a store would let a query reach files outside it. One ``scandir`` per
    directory; links are not followed."""
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            if entry.is_symlink():
                return Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
    return None


def make_dirs(path: StorePath) -> None:
    """Create a directory and its parents (nothing to do on an object store); a
    StoreError naming the path and the reason if the system refuses."""
    try:
        if not is_remote(path):
            path.mkdir(parents=True, exist_ok=True)
        elif path.protocol not in _OBJECT_STORES:
            path.fs.makedirs(path.path, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create the directory {path}: {os_reason(path, e)}") from None


def os_reason(path: StorePath, error: OSError) -> str:
    """Why the system refused an operation on ``path``, in words: for a path below a
    regular file (``/etc/hostname/store``), that file; else the system's own reason."""
    if isinstance(error, NotADirectoryError | FileExistsError) and not is_remote(path):
        for parent in Path(path).parents:
            if parent.exists():
                if not parent.is_dir():
                    return f"{parent} is a file, not a directory"
                break
        if Path(path).exists() and not Path(path).is_dir():
            return f"{path} is a file, not a directory"
    return error.strerror or str(error)


def check_bucket(path: StorePath) -> None:
    """StoreError unless the bucket of an object-store path exists and can be reached.

    Creating a store never creates a bucket: that is an account-level decision, and a
    typo in a bucket name should fail, not make a new one.
    """
    if not is_remote(path) or path.protocol not in _OBJECT_STORES:
        return
    bucket = path.path.split("/", 1)[0]
    try:
        if path.protocol in ("s3", "s3a"):
            path.fs.call_s3("head_bucket", Bucket=bucket)
            found = True
        else:
            found = path.fs.exists(bucket)
    except FileNotFoundError:
        found = False
    except PermissionError:
        return  # credentials scoped to a prefix may not see the bucket itself
    except Exception as e:  # botocore/aiohttp connection errors are not OSErrors
        raise StoreError(
            f"{path}: cannot reach the object store ({type(e).__name__}: {e})"
        ) from None
    if not found:
        raise StoreError(f"{path}: bucket {bucket!r} does not exist (create it first)")
