"""What planning needs to know of a model and its tokenizer, kept on disk between runs.

``plan_run`` reads a model's shape, its hook points and what each stores, its position
limit, its tokenizer's size and special ids and its checkpoint's fingerprint. Learning
them the first time imports torch and transformers and builds the model on the meta
device: seconds, most of a 1,000-point sweep's ``--dry-run``. Each fact is kept in one
small JSON file under ``$ARRAKIS_RAY_CACHE_DIR``, ``$XDG_CACHE_HOME/arrakis-ray`` or
``~/.cache/arrakis-ray`` (in ``facts/``), so the next process plans the same models
without importing either.

An entry's key holds everything its fact depends on: the ModelConfig (or the
tokenizer's directory), the stamps of every file the model and tokenizer are read
from, the versions of arrakis-ray, torch, transformers and tokenizers, and the stamps
of arrakis-ray's own modules that compute the facts (an edited checkout learns them
again). A missing, corrupt or unreadable entry is computed again; a cache directory
that cannot be written is skipped. Failures are never stored: a config that fails
raises the same error with or without the cache.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from arrakis_ray.config import ModelConfig, to_dict
from arrakis_ray.harvest.model_source import (
    check_config_overrides,
    checkpoint_dir,
    describe_model,
    load_model,
    load_tokenizer,
    model_source_fingerprint,
    tokenizer_dir,
)
from arrakis_ray.store.manifest import ModelShape

log = logging.getLogger(__name__)
T = TypeVar("T")

FORMAT = 1  # of an entry; a new layout of the values changes it
PACKAGES = ("torch", "transformers", "tokenizers")  # their versions may describe a model anew

# arrakis-ray's modules that compute the facts (with every module of models/): editing
# one (a checkout of another commit) learns the facts again
CODE = (
    "hooks.py", "config.py", "zoo/__init__.py", "harvest/facts_cache.py",
    "harvest/model_source.py", "harvest/checks.py", "harvest/plan.py", "harvest/tokenize.py",
    "harvest/inputs.py", "harvest/batch.py",
)  # fmt: skip

HookShape = tuple[str, str, int, int]
"""(hook, kind, width, heads): what a hook stores per token."""


def cache_dir() -> Path:
    """Where the entries live: ``$ARRAKIS_RAY_CACHE_DIR``, ``$XDG_CACHE_HOME/arrakis-ray``
    or ``~/.cache/arrakis-ray``, then ``facts/``."""
    root = os.environ.get("ARRAKIS_RAY_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = Path(xdg) / "arrakis-ray" if xdg else Path.home() / ".cache" / "arrakis-ray"
    return Path(root).expanduser() / "facts"


@dataclass(frozen=True)
class ModelFacts:
    """A model's shape, every hook point it has (forward order) and its position limit."""

    shape: ModelShape
    hooks: tuple[HookShape, ...]
    """Every hook point of the model with what it stores, in forward order."""
    position_limit: int | None
    """Positions the model allows (``checks.position_limit``); None when unlimited."""
    config: ModelConfig = field(repr=False, compare=False)
    """The model these are the facts of (its meta model raises an unknown hook's error)."""

    def resolve(self, patterns: Sequence[str]) -> tuple[tuple[str, ...], tuple[HookShape, ...]]:
        """Hooks and their shapes for names / globs, as ``HookedModel.resolve_hooks``
        expands them (deduped, forward order). A pattern that matches nothing raises the
        model's own UnknownHookError (which builds the meta model: an error path)."""
        names = [h[0] for h in self.hooks]
        order = {name: i for i, name in enumerate(names)}
        found: set[str] = set()
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            matches = [pattern] if pattern in order else fnmatch.filter(names, pattern)
            if not matches:
                return self._unknown(patterns)
            found.update(matches)
        picked = sorted(found, key=order.__getitem__)
        return tuple(picked), tuple(self.hooks[order[h]] for h in picked)

    def _unknown(self, patterns):
        _described(shape_key(self.config)).resolve_hooks(patterns)  # raises, with hints
        raise AssertionError(f"{patterns} resolved on the model but not from its facts")


@dataclass(frozen=True)
class TokenizerFacts:
    """What planning reads of a tokenizer; stands in for one in ``check_tokenizer_fits``."""

    size: int
    bos_token_id: int | None
    eos_token_id: int | None

    def __len__(self) -> int:
        return self.size


def model_facts(cfg: ModelConfig, source: str) -> ModelFacts:
    """The model's facts: from the cache, or from the model built on the meta device
    (after ``check_config_overrides``, whose ConfigError names ``source``)."""

    def compute() -> dict:
        check_config_overrides(cfg, source)  # before a model is built of them
        return _describe_facts(shape_key(cfg))

    def parse(value: dict) -> ModelFacts:
        limit = value["position_limit"]
        if limit is not None and type(limit) is not int:
            raise TypeError(f"position_limit {limit!r}")
        return ModelFacts(
            shape=ModelShape(**value["shape"]),
            hooks=tuple((str(h), str(k), int(w), int(n)) for h, k, w, n in value["hooks"]),
            position_limit=limit,
            config=cfg,
        )

    key = {"model": to_dict(cfg), "files": dir_stamps(checkpoint_dir(cfg))}
    if cfg.factory:  # the shape is what the factory's code builds
        key["code"] = factory_code_stamp(cfg.factory)
    return cached("model", key, compute, parse)


def tokenizer_facts(cfg: ModelConfig) -> TokenizerFacts:
    """The tokenizer's size and BOS / EOS ids: from the cache, or from the tokenizer."""
    folder = tokenizer_dir(cfg)  # the error of a missing tokenizer, cached or not

    def compute() -> dict:
        tokenizer = load_tokenizer(cfg)
        return {
            "size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }

    def parse(value: dict) -> TokenizerFacts:
        facts = TokenizerFacts(**value)
        ids = (facts.bos_token_id, facts.eos_token_id)
        if type(facts.size) is not int or any(i is not None and type(i) is not int for i in ids):
            raise TypeError(f"tokenizer facts {value!r}")
        return facts

    key = {"dir": str(folder.resolve()), "files": dir_stamps(folder)}
    return cached("tokenizer", key, compute, parse)


def model_fingerprint(cfg: ModelConfig) -> str:
    """``model_source_fingerprint``: a checkpoint's is kept by its files' stamps (it
    reads every byte of the weights); a random-init model's is a hash of its config."""
    path = checkpoint_dir(cfg)
    if cfg.factory:  # config, checkpoint bytes and the factory's code (kept by stamps)
        key = {"model": to_dict(cfg), "code": factory_code_stamp(cfg.factory)}
        if cfg.checkpoint:
            key["files"] = file_stamp(Path(cfg.checkpoint).expanduser())
        return cached("fingerprint", key, lambda: _factory_fingerprint(cfg, key), _hex64)
    if path is None:
        return model_source_fingerprint(cfg)
    # it depends on the checkpoint's files, dtype and tokenizer, not the seed
    key = {"zoo": cfg.zoo, "path": cfg.path, "dtype": cfg.dtype, "tokenizer": cfg.tokenizer}
    files = dir_stamps(path)

    def compute() -> str:
        return _fingerprint(json.dumps(key), json.dumps(files))

    return cached("fingerprint", {**key, "files": files}, compute, _hex64)


def _hex64(value: str) -> str:
    if not (isinstance(value, str) and len(value) == 64 and int(value, 16) >= 0):
        raise ValueError(f"fingerprint {value!r}")
    return value


def _factory_fingerprint(cfg: ModelConfig, _key: dict) -> str:
    """A factory model's fingerprint, as ``models.load.model_fingerprint`` computes it on
    the loaded model: its factory, config and state dict. With a checkpoint the state
    dict is read from the file (cast to the model's dtype, as loading does), without
    building the model; a random-init model is built under its seed, since then the
    factory's code decides the weights."""
    from arrakis_ray.models import load
    from arrakis_ray.models.custom import read_checkpoint

    if not cfg.checkpoint:
        return load.model_fingerprint(load_model(cfg, device="cpu"))
    dtype = load.torch_dtype(cfg.dtype)
    state = {
        name: tensor.to(dtype) if tensor.is_floating_point() else tensor
        for name, tensor in read_checkpoint(cfg.checkpoint).items()
    }
    described = {"factory": cfg.factory, "config": dict(cfg.config)}
    return load.state_fingerprint(described, state)


def factory_code_stamp(factory: str) -> str | None:
    """sha256 of the Python files beside a factory's module (its module and the modules
    it most likely builds from, such as a sibling ``attention.py``), located by
    ``importlib.util.find_spec`` (which imports the parent packages, not the module)."""
    import importlib.util

    module_name = factory.partition(":")[0]
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None  # loading the model says what is wrong, with the field's name
    origin = getattr(spec, "origin", None)
    if not origin or not Path(origin).is_file():
        return None
    digest = hashlib.sha256()
    for file in sorted(Path(origin).parent.glob("*.py")):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


@lru_cache(maxsize=64)
def _fingerprint(key: str, _files: str) -> str:
    return model_source_fingerprint(ModelConfig(**json.loads(key)))


def cached(kind: str, key: dict, compute: Callable[[], Any], parse: Callable[[Any], T]) -> T:
    """``parse(compute())`` for ``key``: from this process's memory, from the entry on
    disk, or computed and stored. ``compute`` raising stores nothing; ``parse`` turns a
    JSON value into the fact and raises (TypeError, ValueError, KeyError, ...) on a corrupt
    one. ``key`` is completed with the versions and code every fact depends on."""
    full = {"kind": kind, "format": FORMAT, **key, "env": _environment()}
    try:
        text = json.dumps(full, sort_keys=True)
    except (TypeError, ValueError):  # a config value JSON cannot hold: no entry for it
        return parse(compute())
    if text in _MEMORY:
        return _MEMORY[text]
    path = cache_dir() / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"
    fact = _read(path, json.loads(text), parse)
    if fact is None:
        value = compute()
        fact = parse(value)
        _write(path, {"key": full, "value": value})
    _MEMORY[text] = fact
    return fact


_MEMORY: dict[str, Any] = {}


def _read(path: Path, key: dict, parse: Callable[[Any], T]) -> T | None:
    """The entry's fact, or None when it is missing, unreadable, corrupt or another
    key's (a hash prefix shared by two keys)."""
    try:
        entry = json.loads(path.read_text())
        if entry["key"] == key:
            return parse(entry["value"])
        log.debug("facts cache: %s holds another key; computing it again", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.debug("facts cache: cannot read %s (%s); computing it again", path, exc)
    return None


def _write(path: Path, entry: dict) -> None:
    """Write ``entry`` atomically (a reader sees the old file or the whole new one);
    a directory that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entry, f, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.debug("facts cache: cannot write %s (%s); not cached", path, exc)


def file_stamp(path: Path) -> list:
    """What tells a changed file: its inode, size, mtime and ctime (a copy that restores
    the mtime, ``cp -p`` or ``rsync -t``, still gets a new ctime)."""
    st = os.stat(path)
    return [str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def dir_stamps(path: Path | None) -> list:
    """The stamps of every file under ``path`` (none for no directory)."""
    if path is None:
        return []
    return [file_stamp(p) for p in sorted(path.rglob("*")) if p.is_file()]


@lru_cache(maxsize=1)
def _environment() -> dict:
    """The package versions and arrakis-ray's modules a fact depends on (read once per
    process)."""
    import arrakis_ray

    versions = {"arrakis-ray": arrakis_ray.__version__}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    package = Path(arrakis_ray.__file__).parent
    code = [package / name for name in CODE] + sorted((package / "models").glob("*.py"))
    stamps = [[str(p.relative_to(package)), *file_stamp(p)[2:]] for p in code if p.is_file()]
    return {"versions": versions, "code": stamps}


def shape_key(cfg: ModelConfig) -> str:
    """What determines the model's shape (not its seed or dtype), plus the checkpoint's
    config.json stamp: the key of this process's meta models (one per shape)."""
    key = {"zoo": cfg.zoo, "path": cfg.path, "arch": cfg.arch, "config": cfg.config}
    path = checkpoint_dir(cfg)
    if path is not None:
        key["stamp"] = file_stamp(path / "config.json")
    if cfg.factory:
        key["factory"] = cfg.factory
        key["stamp"] = factory_code_stamp(cfg.factory)
    return json.dumps(key, sort_keys=True)


@lru_cache(maxsize=16)
def _described(key: str):
    """The meta model of a ``shape_key`` (one per shape in this process)."""
    fields = {k: v for k, v in json.loads(key).items() if k != "stamp"}
    return describe_model(ModelConfig(**fields))


@lru_cache(maxsize=16)
def _describe_facts(key: str) -> dict:
    """The facts of the meta model of a ``shape_key``, as the JSON value of an entry."""
    from arrakis_ray.harvest.plan import model_shape  # plan imports this module

    model = _described(key)
    hooks = []
    for hook in model.hook_names():
        kind, width = model.hook_shape(hook)
        heads = model.n_heads_of(hook) if kind != "dense" else 1
        hooks.append([hook, kind, width or 0, heads])
    return {
        "shape": asdict(model_shape(model)),
        "hooks": hooks,
        "position_limit": model.max_positions,
    }
