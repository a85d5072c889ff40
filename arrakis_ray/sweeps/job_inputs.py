"""What a sweep's Ray Job reads besides the store, and the working dir uploaded with it.

The job loads the sweep again on the cluster, in its copy of the working dir: a path
written relative (``data: {path: data.jsonl}``) resolves against that copy, so the file
must be inside the working dir and is uploaded; a path written absolute
(``/shared/data.jsonl``) is read there as it is, so it is not uploaded and every node
must see it (a shared file system). A local ``model.path`` checkpoint follows the same
rule, relative ones up to ``MAX_CHECKPOINT_BYTES``. A schedule keeps a snapshot of the
files that travel (``snapshot_files``), and its firings submit from it.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from arrakis_ray.config import FILE_PARAMS
from arrakis_ray.errors import ClusterError, ConfigError
from arrakis_ray.sweeps.paths import set_value

log = logging.getLogger(__name__)

# never uploaded with a working dir: environments, caches, stores and built sites
EXCLUDES = (
    ".venv",
    "venv",
    ".git",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "node_modules",
    "demo_store",
    "site",
    "*.parquet",
)
# a local checkpoint uploaded with a job (Ray refuses a working dir over its gRPC limit,
# 512 MiB); larger ones belong on a shared file system, named by an absolute path
MAX_CHECKPOINT_BYTES = 256 * 2**20
MAX_SNAPSHOT_BYTES = 64 * 2**20  # files a schedule copies into the store (snapshot_files)


@dataclass(frozen=True)
class JobInput:
    """A file or directory a job of a sweep reads besides the store."""

    path: Path
    """Where it is here (absolute)."""
    what: str
    """What names it: the sweep, its base pipeline, ``data.path``, ``model.path``..."""
    travels: bool
    """Written as a relative path: it is uploaded with the working dir, and the job reads
    its copy. An absolute path is read as it is on the cluster (not uploaded)."""
    written: str | None = None
    """The path as the pipeline or the sweep writes it (None: the sweep and its base)."""


def job_inputs(sweep) -> list[JobInput]:
    """Every file a job of ``sweep`` reads besides the store: the sweep file, its base
    pipeline, and the data, prompts and local model checkpoints of its points, each once.

    Whether a path travels is read from the files as written: the job loads the sweep
    again on the cluster, where relative paths resolve against its copy of the working
    dir and absolute ones (``/shared/data.jsonl``) are read as they are."""
    from arrakis_ray.sweeps.spec import expand

    found = [
        JobInput(Path(sweep.source).resolve(), "the sweep file", True),
        JobInput(Path(sweep.base).resolve(), "its base pipeline", True),
    ]
    written = _written_base(sweep)
    keys = {p: k for a in sweep.axes for p, k in zip(a.paths, a.keys, strict=True)}
    for point in expand(sweep):
        raw = copy.deepcopy(written)
        for path, value in point.params.items():
            set_value(raw, keys[path], copy.deepcopy(value))
        data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
        found.append(_input(point.config.data.path, data.get("path"), "data.path"))
        steps = raw.get("analyze") if isinstance(raw.get("analyze"), list) else []
        for i, step in enumerate(point.config.analyze):
            for name in FILE_PARAMS:
                value = step.params.get(name) if isinstance(step.params, dict) else None
                if isinstance(value, str):
                    as_written = _get(steps, i, "params", name)
                    found.append(_input(value, as_written, f"analyze.{i}.params.{name}"))
        model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
        for name in ("checkpoint", "tokenizer"):
            value = getattr(point.config.model, name)
            if value and not value.startswith("zoo:"):
                found.append(_input(value, model.get(name), f"model.{name}"))
        if point.config.model.path:
            # read against the current directory here, against the working dir there
            found.append(_input(point.config.model.path, point.config.model.path, "model.path"))
    unique: dict[Path, JobInput] = {}
    for item in found:
        unique.setdefault(item.path, item)
    return list(unique.values())


def _written_base(sweep) -> dict:
    from arrakis_ray.strict_yaml import read_strict_yaml

    return read_strict_yaml(Path(sweep.base))


def _get(node: Any, *keys) -> Any:
    for key in keys:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _input(resolved: str, as_written: Any, what: str) -> JobInput:
    written = as_written if isinstance(as_written, str) else None
    travels = not (written and Path(written).expanduser().is_absolute())
    return JobInput(Path(resolved).expanduser().resolve(), what, travels, written)


def job_files(sweep) -> list[Path]:
    """The files and directories uploaded with a job of ``sweep`` (absolute): the
    ``job_inputs`` that travel."""
    return [item.path for item in job_inputs(sweep) if item.travels]


def default_working_dir(sweep) -> Path:
    """The smallest directory holding every file of ``job_files``: the least to upload."""
    return Path(os.path.commonpath([f.parent for f in job_files(sweep)]))


def check_working_dir(sweep, working_dir: str | os.PathLike) -> Path:
    """``working_dir`` resolved; ClusterError naming the first file the job needs that
    it does not hold (or that the upload would leave out, or a checkpoint too large to
    upload). Each absolute path the job reads as it is gets a log line: every node must
    see it."""
    root = Path(working_dir).expanduser().resolve()
    if not root.is_dir():
        raise ClusterError(f"--working-dir {working_dir}: not a directory")
    for item in job_inputs(sweep):
        path = item.path
        if not item.travels:
            log.info(
                "%s %s is read as it is on the cluster, not uploaded: every node must see "
                "it (a shared file system)", item.what, path,
            )  # fmt: skip
            continue
        if item.what == "model.path":
            _check_checkpoint(item, root)
        if item.what == "model.checkpoint" and item.path.is_file():
            _check_size(item)
        if not path.is_relative_to(root):
            raise ClusterError(
                f"--working-dir {root} does not hold {path} ({item.what} of the sweep "
                f"{sweep.source}): give a directory that holds the sweep, its base pipeline "
                "and the files they name by relative paths (default: the smallest such "
                "directory), or name a file on a shared file system by its absolute path"
            )
        rel = PurePosixPath(path.relative_to(root).as_posix())
        pattern = _excluded(rel)
        if pattern:
            raise ClusterError(
                f"{path}: the sweep reads it, but files matching {pattern!r} are not "
                f"uploaded with a working dir; move it out of {rel.parts[0]}"
            )
    return root


def _check_checkpoint(item: JobInput, root: Path) -> None:
    """A relative model checkpoint travels: the job reads it relative to its current
    directory, the working dir, so it must be at the same place relative to the working
    dir as to the current directory here; and small enough to upload."""
    there = (root / (item.written or "")).resolve()
    if there != item.path:
        raise ClusterError(
            f"model.path {item.written}: read here as {item.path} (relative to the current "
            f"directory), but the job would read {there} (relative to the working dir): "
            f"submit from {root}, or give model.path as an absolute path every node sees"
        )
    _check_size(item)


def _check_size(item: JobInput) -> None:
    """A checkpoint uploaded with a job must fit in Ray's working-dir upload."""
    size = tree_bytes(item.path)
    if size > MAX_CHECKPOINT_BYTES:
        raise ClusterError(
            f"{item.what} {item.path}: {size / 2**20:.0f} MiB, over the "
            f"{MAX_CHECKPOINT_BYTES >> 20} MiB uploaded with a job: put it on a shared file "
            "system and give its absolute path"
        )


def tree_bytes(path: Path) -> int:
    """The bytes of a file, or of every file below a directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _excluded(rel: PurePosixPath) -> str | None:
    for pattern in EXCLUDES:
        if any(fnmatch.fnmatchcase(part, pattern) for part in rel.parts):
            return pattern
    return None


def snapshot_files(sweep) -> tuple[dict[str, bytes], str]:
    """(relative path -> content, the sweep file's relative path) of the files a job of
    ``sweep`` uploads (``jobs.job_files``), relative to its default working dir;
    ClusterError as ``check_working_dir``, ConfigError over ``MAX_SNAPSHOT_BYTES``
    (what ``schedule add`` copies into the store)."""
    root = check_working_dir(sweep, default_working_dir(sweep))
    paths: list[Path] = []
    for item in job_files(sweep):
        paths += sorted(p for p in item.rglob("*") if p.is_file()) if item.is_dir() else [item]
    total = sum(p.stat().st_size for p in paths)
    if total > MAX_SNAPSHOT_BYTES:
        raise ConfigError(
            f"{sweep.source}: its jobs read {total / 2**20:.1f} MiB of files (relative to "
            f"{root}), over the {MAX_SNAPSHOT_BYTES >> 20} MiB a schedule copies into the "
            "store: put large data on a shared file system and name it by an absolute path"
        )
    for path in paths:  # what the snapshot could not give back as the job reads it
        rel = PurePosixPath(path.relative_to(root).as_posix())
        hidden = any(part.startswith(".") for part in rel.parts)
        pattern = _excluded(rel)
        if hidden or pattern:
            why = "a hidden path" if hidden else f"excluded from uploads ({pattern})"
            raise ConfigError(
                f"{sweep.source}: its job reads {path}, {why}: a schedule cannot carry "
                "it; name it by an absolute path on a shared file system, or move it"
            )
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in paths}
    return files, Path(sweep.source).resolve().relative_to(root).as_posix()
