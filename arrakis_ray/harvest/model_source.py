"""From a ``ModelConfig`` to a HookedModel, a tokenizer, and a fingerprint.

The driver needs the model's *shape* (hook names, widths, vocabulary) to validate
hooks and plan the store before any actor starts, but must not load the weights of a
model that may not fit in its memory: it builds the model on torch's ``meta`` device,
which allocates nothing. Actors load the real weights onto their own device.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from arrakis_ray.config import ModelConfig, to_dict
from arrakis_ray.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    from arrakis_ray.models import HookedModel


def checkpoint_dir(cfg: ModelConfig) -> Path | None:
    """The local checkpoint directory of a zoo or path model (None for random init)."""
    if cfg.zoo:
        from arrakis_ray.zoo import zoo_path

        return zoo_path(cfg.zoo)
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model.path: {path} is not a model directory (no config.json)")
        return path
    return None


def load_model(cfg: ModelConfig, device: str = "cpu") -> HookedModel:
    """The real model, weights and all, on ``device``."""
    from arrakis_ray.models import build_model, load_pretrained

    path = checkpoint_dir(cfg)
    if path is not None:
        model = load_pretrained(path, dtype=cfg.dtype, device=device)
    else:
        model = build_model(cfg.arch, seed=cfg.seed, dtype=cfg.dtype, device=device, **cfg.config)
    model.tokenizer = load_tokenizer(cfg)
    return model


def describe_model(cfg: ModelConfig) -> HookedModel:
    """The model's structure without its weights (on the meta device)."""
    import torch

    from arrakis_ray.models import HookedModel, tiny_config

    path = checkpoint_dir(cfg)
    from transformers import AutoConfig, AutoModelForCausalLM

    if path is not None:
        try:
            hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model.path: cannot read {path}/config.json: {exc}") from None
    else:
        hf_config = tiny_config(cfg.arch, **cfg.config)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(hf_config)
    return HookedModel(hf_model, tokenizer=None)


@lru_cache(maxsize=4)
def _tokenizer_from(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"model.tokenizer: cannot load a tokenizer from {path}: {exc}"
        ) from None


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer for the pipeline's texts (cached per process)."""
    if cfg.tokenizer:
        if cfg.tokenizer.startswith("zoo:"):
            from arrakis_ray.zoo import zoo_path

            return _tokenizer_from(str(zoo_path(cfg.tokenizer.removeprefix("zoo:"))))
        path = Path(cfg.tokenizer).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"model.tokenizer: {path} is not a directory")
        return _tokenizer_from(str(path))
    path = checkpoint_dir(cfg)
    if path is None:
        raise ConfigError(
            "model.tokenizer: a random-init 'arch' model needs a tokenizer for its texts "
            "(a local tokenizer directory or zoo:NAME)"
        )
    return _tokenizer_from(str(path))


def vocab_texts(tokenizer, vocab_size: int) -> list[str]:
    """Readable text of every token id, decoded one token at a time."""
    known = len(tokenizer)
    return [tokenizer.decode([i]) if i < known else f"<id {i}>" for i in range(vocab_size)]


def model_source_fingerprint(cfg: ModelConfig) -> str:
    """sha256 of what determines the weights: checkpoint bytes, or config + seed."""
    digest = hashlib.sha256()
    path = checkpoint_dir(cfg)
    if path is None:
        digest.update(json.dumps(to_dict(cfg), sort_keys=True).encode())
    else:
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(path)).encode())
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        digest.update(json.dumps({"dtype": cfg.dtype, "tokenizer": cfg.tokenizer}).encode())
    return digest.hexdigest()
