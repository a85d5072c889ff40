"""Building, loading and fingerprinting HookedModels.

Nothing here downloads: random init goes through ``tiny_config``; checkpoints are
read from local directories only (``local_files_only=True``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arrakis_ray.errors import ModelLoadError
from arrakis_ray.models.tiny import canonical_arch, tiny_config

if TYPE_CHECKING:
    import torch

    from arrakis_ray.models.hooked import HookedModel

log = logging.getLogger(__name__)

_DTYPES = ("float32", "float16", "bfloat16")
# Files whose presence means the directory carries a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Config fields that describe how a model was saved or is being run, not what it
# computes: left out of the fingerprint so a save/load round trip keeps it.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "_commit_hash",
    "architectures",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "_attn_implementation",
    "_attn_implementation_internal",
    "attn_implementation",
    "_experts_implementation",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "use_cache",
}


def torch_dtype(dtype: str) -> torch.dtype:
    import torch

    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return getattr(torch, dtype)


def build_model(
    arch: str,
    *,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
    **config_overrides: Any,
) -> HookedModel:
    """A randomly initialised HookedModel from ``tiny_config(arch, **config_overrides)``.

    The same ``seed`` gives the same weights in any process; the global torch RNG is
    left as it was. Weights are drawn in float32, then cast to ``dtype``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from arrakis_ray.models.hooked import HookedModel

    arch = canonical_arch(arch)
    dtype_ = torch_dtype(dtype)
    config = tiny_config(arch, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model = model.to(device=device, dtype=dtype_)
    return HookedModel(model)


def load_pretrained(
    path: str | Path, *, dtype: str = "float32", device: str = "cpu"
) -> HookedModel:
    """Load a causal LM (and its tokenizer, if the directory has one) from a local dir."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from arrakis_ray.models.adapters import adapter_for
    from arrakis_ray.models.hooked import HookedModel

    path = Path(path).expanduser()
    dtype_ = torch_dtype(dtype)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {path} has no config.json")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"cannot read the model config in {path}: {err}") from err
    adapter = adapter_for(config, where=str(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, local_files_only=True, dtype=dtype_
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelLoadError(
            f"cannot load the model weights {_weights_file(path)}: {type(err).__name__}: {first}"
        ) from err
    model = model.to(device)
    tokenizer = None
    if any((path / name).is_file() for name in _TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot load the tokenizer in {path}: {err}") from err
    log.info("loaded %s model from %s (%s, %s)", adapter.arch, path, dtype, device)
    return HookedModel(model, adapter=adapter, tokenizer=tokenizer)


def _config_fingerprint_dict(described: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in sorted(described.items()) if k not in _VOLATILE_CONFIG_KEYS}


def model_fingerprint(model: HookedModel) -> str:
    """sha256 hex of the model's config and parameters (name, dtype, shape, bytes); for a
    custom model the config is its factory and the factory's arguments.

    Stable across processes and across ``save_pretrained``/``load_pretrained``; reads
    every parameter once (about a second per GB).
    """
    return state_fingerprint(model.describe(), model.model.state_dict())


def state_fingerprint(described: dict[str, Any], state: Mapping[str, torch.Tensor]) -> str:
    """sha256 hex of a config dict (less how it was saved or run) and a state dict."""
    import torch

    digest = hashlib.sha256()
    config = _config_fingerprint_dict(described)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(state.items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _weights_file(path: Path) -> Path:
    """The weights file a model directory loads from (the directory if none is there)."""
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    return path
