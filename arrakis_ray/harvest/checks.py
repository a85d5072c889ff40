"""Checks of a pipeline against its model and its cluster, before the store is touched.

Each check turns a failure that would otherwise surface late (an ``IndexError`` deep
in an actor, a harvest that waits forever for resources) into one ``ConfigError`` line
naming the pipeline file, the dotted field, the value and the limit it breaks.
``plan_run`` calls the model checks; the driver calls ``check_cluster_fits`` once Ray
is up, since only then are the cluster's resources known.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from arrakis_ray.config import HarvestConfig, PipelineConfig
from arrakis_ray.errors import ArrakisError, ConfigError


def check_cluster_fits(
    harvest_config: HarvestConfig,
    resources: dict,
    source: str,
    largest_node: dict | None = None,
) -> None:
    """Refuse actors the cluster can never place: Ray would wait for them forever.

    ``resources`` is ``ray.cluster_resources()`` (``{"CPU": 2.0, "GPU": 1.0, ...}``;
    a missing key means none). Each pipeline stage runs its own actor pool and every
    stage needs one actor at once for a shard to get through, so ``stages`` actors must
    fit together; more actors than fit at once is fine (Ray Data starts them as
    resources free up). An actor lives on one node: ``largest_node``, the most of each
    resource one alive node has, bounds one actor (8 nodes of 16 CPUs place no actor of
    64). HarvestConfig reserves no memory, so only CPUs and GPUs are checked.
    """
    n_stages = len(harvest_config.layer_ranges) or harvest_config.stages
    for field_name, resource, unit in (
        ("num_gpus_per_actor", "GPU", "GPU"),
        ("num_cpus_per_actor", "CPU", "CPU"),
    ):
        per_actor = getattr(harvest_config, field_name)
        on_one_node = float((largest_node or {}).get(resource, 0.0))
        if largest_node is not None and per_actor > on_one_node:
            raise ConfigError(
                f"{source}: harvest.{field_name}: {_count(per_actor, unit)} per actor, but "
                f"the largest node of the cluster has {_count(on_one_node, unit)}"
            )
        available = float(resources.get(resource, 0.0))
        if per_actor * n_stages <= available:
            continue
        stages = f" x {n_stages} stages (one actor each, at once)" if n_stages > 1 else ""
        raise ConfigError(
            f"{source}: harvest.{field_name}: {_count(per_actor, unit)} per actor{stages}, "
            f"but the cluster has {_count(available, unit)}"
        )


def check_position_limit(config: PipelineConfig, hf_config: Any) -> None:
    """Refuse a context longer than the model's positions.

    A learned position table (gpt2's ``wpe``) has one row per position, so a longer
    sequence fails inside an actor with ``IndexError: index out of range in self``; a
    rotary model computes past its limit, but on positions it was never trained on, so
    it is refused too.
    """
    limit = position_limit(hf_config)
    context = config.data.context_length
    if limit is not None and context > limit:
        raise ConfigError(
            f"{config.source}: data.context_length: {context} tokens, but the model has "
            f"{limit} positions (max_position_embeddings); use at most {limit}"
        )


def position_limit(hf_config: Any) -> int | None:
    """The number of positions an HF config allows (None when it declares no limit).

    gpt2 calls it ``n_positions``; its ``attribute_map`` answers
    ``max_position_embeddings`` for it, and the fallback covers a config without one.
    """
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def check_tokenizer_fits(config: PipelineConfig, tokenizer, vocab_size: int) -> None:
    """Refuse a tokenizer that can produce ids the model's embedding has no row for.

    Texts may tokenize to any id of the tokenizer, so its whole vocabulary must fit.
    Given token ids are range-checked document by document (``inputs.read_shard_tokens``);
    only the BOS and EOS ids the tokenize step adds come from the tokenizer then.
    """
    where = config.source
    if reads_texts(config):
        if len(tokenizer) > vocab_size:
            raise ConfigError(
                f"{where}: model.tokenizer: the tokenizer has {len(tokenizer):,} tokens, but "
                f"the model's vocabulary has {vocab_size:,} (vocab_size); token ids "
                f"{vocab_size:,} and above have no embedding"
            )
        return
    for name in ("bos_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None and token_id >= vocab_size:
            raise ConfigError(
                f"{where}: model.tokenizer: its {name} is {token_id}, outside the model's "
                f"vocabulary [0, {vocab_size}) (vocab_size)"
            )


def reads_texts(config: PipelineConfig) -> bool:
    """Whether the tokenize step encodes texts (else every input is token ids)."""
    from arrakis_ray.harvest.inputs import input_files

    if config.data.token_column is not None:
        return False
    return any(f.suffix != ".npy" for f in input_files(config.data.path))


@contextmanager
def named_in(source: str):
    """Put the pipeline file in front of an error that names only its field
    (``model.tokenizer: ...``, ``data.path: ...``: model_source and inputs never see
    the pipeline file)."""
    try:
        yield
    except ArrakisError as exc:
        text = str(exc)
        if text.startswith(("model.", "data.")):
            raise type(exc)(f"{source}: {text}") from None
        raise


def _count(value: float, unit: str) -> str:
    """``1 GPU``, ``0.5 CPU``, ``0 GPUs``, ``64 CPUs``: an amount without a spurious ``.0``."""
    return f"{value:g} {unit}{'s' if value == 0 or value > 1 else ''}"
