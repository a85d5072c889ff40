"""The Tool contract: what an analysis tool declares and the one function it implements.

A tool is a small class. It names itself, declares its parameters as a frozen
dataclass (validated like pipeline config: unknown or mistyped parameters get a clear
error), the hook points it reads, whether it needs the model's weights, and the Arrow
schema of its result table. ``compute_shard`` turns one shard's stored inputs into
result rows; the runner (``tools/runner.py``) fans that out as Ray tasks and writes
``results/<tool>/``. A custom tool is a subclass registered with ``register_tool``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from arrakis_ray.models import HookedModel


@dataclass(frozen=True)
class NoParams:
    """A tool without parameters."""


@dataclass
class ShardInputs:
    """What a tool reads for one shard: its activation tables and its tokens."""

    run_id: str
    shard: int
    manifest: dict
    activations: dict[str, pa.Table]  # hook family -> that shard's table
    tokens: pa.Table
    vocab: np.ndarray  # token id -> token text (object array)


class Tool:
    """Base class of every analysis tool (subclass it; see ``logit_lens.py``)."""

    name: ClassVar[str]
    """The name used by ``arrakis-ray analyze --tool`` and in ``results_<name>``."""
    summary: ClassVar[str]
    """One line: what it computes."""
    reference: ClassVar[str] = ""
    """The paper or method it follows."""
    Params: ClassVar[type] = NoParams
    """Frozen dataclass of the tool's parameters (docstrings become help text)."""
    needs_weights: ClassVar[bool] = False
    """True if ``compute_shard`` needs the model (it is loaded once per worker)."""
    schema_version: ClassVar[int] = 1

    def __init__(self, params: Any):
        self.params = params

    def required_hooks(self, manifest: dict) -> list[str]:
        """Concrete hook names this tool reads, given the run's model."""
        raise NotImplementedError

    def result_schema(self) -> pa.Schema:
        """Arrow schema of the result table, read from ``schemas/result.<name>.v<N>.json``.

        The JSON file is the single definition (a custom tool outside this repo adds its
        own directory with ``arrakis_ray.store.schemas.add_schema_dir``).
        """
        from arrakis_ray.store.schemas import load_schema

        return load_schema(f"result.{self.name}", self.schema_version).arrow()

    def compute_shard(self, inputs: ShardInputs, model: HookedModel | None) -> pa.Table:
        """Result rows for one shard."""
        raise NotImplementedError
