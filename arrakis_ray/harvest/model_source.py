"""From a ``ModelConfig`` to a HookedModel, a tokenizer, and a fingerprint.

The driver needs the model's *shape* (hook names, widths, vocabulary) to validate
hooks and plan the store before any actor starts, but must not load the weights of a
model that may not fit in its memory: it builds the model on torch's ``meta`` device,
which allocates nothing. Actors load the real weights onto their own device.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from arrakis_ray.config import ModelConfig, to_dict
from arrakis_ray.errors import ArrakisError, ConfigError, ModelLoadError

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


def check_config_overrides(cfg: ModelConfig, source: str) -> None:
    """Refuse a ``model.config`` key the architecture's HF config class does not know.

    An HF config keeps any keyword it does not know as a plain attribute, so a typo
    (``n_layers``) or another family's name (gpt2's ``n_layer`` on llama) would
    silently build the default-sized model. Known: the fields of a default instance,
    the class's ``attribute_map`` aliases, and ``intermediate_size`` (``tiny_config``
    takes it for every family). A key outside those that HF consumes anyway (a legacy
    name such as gpt-neox's ``rotary_pct``, folded into ``rope_parameters``) is kept.
    """
    if not cfg.config or cfg.factory:  # a factory refuses unknown keywords itself
        return
    from transformers import AutoConfig

    model_type = _model_type(cfg.arch)
    known = _known_config_keys(model_type)
    strangers = [k for k in cfg.config if not isinstance(k, str) or k not in known]
    if not strangers:
        return
    unknown = next((k for k in strangers if not isinstance(k, str)), None)
    if unknown is None:
        try:
            probe = AutoConfig.for_model(model_type, **{k: cfg.config[k] for k in strangers})
        except Exception:  # HF reacted to the key, so it knows it: tiny_config reports the value
            return
        kept = probe.to_dict()
        unknown = next((k for k in strangers if k in kept), None)
    if unknown is None:
        return
    hint = _suggest_config_key(str(unknown), known)
    class_name = type(AutoConfig.for_model(model_type)).__name__
    raise ConfigError(
        f"{source}: model.config.{unknown}: not a field of {class_name}, the config of "
        f"model.arch {cfg.arch}{hint}"
    )


def _model_type(arch: str) -> str:
    from arrakis_ray.models.adapters import ADAPTERS

    return ADAPTERS[_canonical_arch(arch)].model_types[0]


@lru_cache(maxsize=16)
def _known_config_keys(model_type: str) -> frozenset[str]:
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    aliases = getattr(type(default), "attribute_map", {})
    return frozenset({*default.to_dict(), *aliases, "intermediate_size"})


@lru_cache(maxsize=1)
def _family_names() -> dict[str, tuple[str, str]]:
    """A family's own name of a generic config field -> (the generic name, the family),
    over every supported family: ``n_layer`` -> (``num_hidden_layers``, gpt2)."""
    from transformers import AutoConfig

    from arrakis_ray.models.adapters import ADAPTERS

    names = {}
    for arch, adapter in ADAPTERS.items():
        config_class = type(AutoConfig.for_model(adapter.model_types[0]))
        aliases = getattr(config_class, "attribute_map", {})
        names.update({native: (generic, arch) for generic, native in aliases.items()})
    return names


def _suggest_config_key(key: str, known: frozenset[str]) -> str:
    generic, family = _family_names().get(key, (None, None))
    if generic in known:
        return f"; did you mean {generic}? ({key} is {family}'s name for it)"
    close = difflib.get_close_matches(key, sorted(known), n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def load_model(cfg: ModelConfig, device: str = "cpu") -> HookedModel:
    """The real model, weights and all, on ``device``."""
    from arrakis_ray.models import build_model, load_pretrained

    if cfg.factory:
        from arrakis_ray.models.custom import build_custom
        from arrakis_ray.models.load import torch_dtype

        model = build_custom(
            cfg.factory,
            cfg.config,
            checkpoint=cfg.checkpoint,
            seed=cfg.seed,
            dtype=torch_dtype(cfg.dtype),
            device=device,
        )
        model.tokenizer = load_tokenizer(cfg)
        return model
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
    from transformers import AutoConfig, AutoModelForCausalLM

    from arrakis_ray.models import HookedModel, tiny_config

    if cfg.factory:
        from arrakis_ray.models.custom import describe_custom

        try:
            return describe_custom(cfg.factory, cfg.config)
        except ArrakisError:
            raise
        except Exception as exc:  # sizes the factory cannot build
            raise ModelLoadError(
                f"model.factory {cfg.factory}: cannot build a model of this config: "
                f"{type(exc).__name__}: {_one_line(exc)}"
            ) from None
    path = checkpoint_dir(cfg)
    if path is not None:
        field = "model.path"
        try:
            hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"{field}: cannot read {path}/config.json: {_one_line(exc)}"
            ) from None
    else:
        field, arch = "model.config", _canonical_arch(cfg.arch)
        try:
            hf_config = tiny_config(arch, **cfg.config)
        except Exception as exc:  # HF validates values as it builds a config
            raise ModelLoadError(f"{field}: {_one_line(exc)}") from None
    try:
        with torch.device("meta"):
            hf_model = AutoModelForCausalLM.from_config(hf_config)
        return HookedModel(hf_model, tokenizer=None)
    except ArrakisError:  # an architecture without a hook adapter: already said well
        raise
    except Exception as exc:  # sizes HF or the adapter cannot build (heads, 0 layers, ...)
        raise ModelLoadError(
            f"{field}: cannot build a model of this config: {type(exc).__name__}: {_one_line(exc)}"
        ) from None


def _canonical_arch(arch: str) -> str:
    from arrakis_ray.models.tiny import canonical_arch

    try:
        return canonical_arch(arch)
    except ModelLoadError as exc:
        raise ModelLoadError(f"model.arch: {exc}") from None


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's text as one line of at most ``limit`` characters (HF's validation
    errors span several lines)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    return _tokenizer_from(str(tokenizer_dir(cfg)))


def tokenizer_dir(cfg: ModelConfig) -> Path:
    """The directory the pipeline's tokenizer is read from (no transformers import):
    ``model.tokenizer``, else the zoo/path model's own checkpoint."""
    if cfg.tokenizer:
        if cfg.tokenizer.startswith("zoo:"):
            from arrakis_ray.zoo import zoo_path

            return zoo_path(cfg.tokenizer.removeprefix("zoo:"))
        path = Path(cfg.tokenizer).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"model.tokenizer: {path} is not a directory")
        return path
    path = checkpoint_dir(cfg)
    if path is None:
        kind = "a 'factory'" if cfg.factory else "a random-init 'arch'"
        raise ConfigError(
            f"model.tokenizer: {kind} model needs a tokenizer for its texts "
            "(a local tokenizer directory or zoo:NAME)"
        )
    return path


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
