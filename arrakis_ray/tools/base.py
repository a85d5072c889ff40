"""The Tool contract: what an analysis tool declares and the function(s) it implements.

A tool is a small class. It names itself, declares its parameters as a frozen
dataclass (validated like pipeline config: unknown or mistyped parameters get a clear
error), the hook points it reads, whether it needs the model's weights, and the names
of the result tables it writes (each with a schema in ``schemas/result.<output>.v1.json``
and a SQL view ``results_<output>``). Then it implements one of two shapes:

- ``scope = "shard"``: ``compute_shard(inputs, model)`` turns one shard's stored inputs
  into rows. The runner runs it as one Ray task per shard. If the tool also defines
  ``reduce(partials, manifest)``, the per-shard tables are partial aggregates that one
  final Ray task combines (per-neuron statistics, per-head averages).
- ``scope = "run"``: ``compute_run(inputs, model)`` runs once, in one Ray task, for tools
  that need no activations (weights only) or that stream over every shard themselves
  (training a dictionary or a probe). ``RunReader`` (store/reader.py) streams shards.

- ``scope = "live"``: ``compute_live(items, model, prepared)`` runs the model again,
  with interventions (``arrakis_ray.live``). ``items`` is a slice of the tool's prompt
  dataset (``prompt_columns``, plus ``item``: the row number); the runner fans the
  slices out over actors holding the model (replicas, or the run's stages), each
  writing its rows. ``model`` is a ``LiveModel``. An optional ``prepare(items, model)``
  runs once over the whole dataset first (a dataset mean, say); what it returns is
  passed to every ``compute_live`` as ``prepared``.

A result is a ``pyarrow.Table`` (for the tool's only output) or a dict output name ->
table. A custom tool is a subclass registered with ``register_tool``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from arrakis_ray.store.reader import RunReader

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from arrakis_ray.live.model import LiveModel
    from arrakis_ray.models import HookedModel
    from arrakis_ray.store.manifest import ModelShape, RunManifest

Result = "pa.Table | dict[str, pa.Table]"


@dataclass(frozen=True)
class NoParams:
    """A tool without parameters."""


@dataclass
class ShardInputs:
    """What a shard-scope tool reads for one shard: its activation tables and tokens."""

    run_id: str
    shard: int
    manifest: RunManifest
    activations: dict[str, pa.Table]  # hook family -> that shard's table (all layers)
    tokens: pa.Table
    vocab: np.ndarray  # token id -> token text (object array)

    @property
    def shape(self) -> ModelShape:
        return self.manifest.shape


class Tool:
    """Base class of every analysis tool (subclass it; see ``logit_lens.py``)."""

    name: ClassVar[str]
    """The name used by ``arrakis-ray analyze --tool``."""
    summary: ClassVar[str]
    """One line: what it computes."""
    reference: ClassVar[str] = ""
    """The paper or method it follows."""
    Params: ClassVar[type] = NoParams
    """Frozen dataclass of the tool's parameters (docstrings become help text)."""
    needs_weights: ClassVar[bool] = False
    """True if compute_shard/compute_run needs the model (loaded once per worker process)."""
    reduce_needs_weights: ClassVar[bool] = False
    """True if ``reduce`` needs the model (then only the reduce task loads it)."""
    scope: ClassVar[Literal["shard", "run", "live"]] = "shard"
    """"shard": compute_shard per shard (+ optional reduce); "run": compute_run once;
    "live": compute_live per slice of a prompt dataset, on the live model."""
    prompt_columns: ClassVar[tuple[str, ...]] = ()
    """Live tools: the columns their prompt dataset must have (none: no dataset read)."""
    items_per_task: ClassVar[int] = 32
    """Live tools: prompt rows per actor call (and per result file)."""
    outputs: ClassVar[tuple[str, ...]] = ()
    """Result tables it writes; empty means one table named like the tool."""
    reduced_outputs: ClassVar[tuple[str, ...] | None] = None
    """With ``reduce``: the outputs whose per-shard tables are partials for ``reduce``
    (None: all). The others are final per-shard rows, written by the shard tasks, so a
    per-token table never funnels through the one reduce task."""
    schema_version: ClassVar[int] = 1

    def __init__(self, params: Any):
        self.params = params

    @classmethod
    def output_names(cls) -> tuple[str, ...]:
        return cls.outputs or (cls.name,)

    def check(self, manifest: RunManifest) -> None:
        """Refuse (ToolError, one line) parameters this run's model cannot take: a layer
        or head out of range, a length beyond its positions. The runner calls it before
        any task or actor starts, so a bad call writes nothing."""

    def required_hooks(self, manifest: RunManifest) -> list[str]:
        """Concrete hook names this tool reads, given the run's manifest (model shape)."""
        return []

    def selected_layers(self, manifest: RunManifest, layers: Sequence[int]) -> list[int]:
        """``layers`` (sorted, deduplicated; empty: every layer), checked against the model."""
        from arrakis_ray.errors import ToolError

        n_layers = manifest.shape.n_layers
        chosen = sorted(set(layers)) or list(range(n_layers))
        bad = [layer for layer in chosen if not 0 <= layer < n_layers]
        if bad:
            raise ToolError(f"{self.name}: layers {bad} out of range (model has {n_layers})")
        return chosen

    def result_schema(self, output: str | None = None) -> pa.Schema:
        """Arrow schema of an output, read from ``schemas/result.<output>.v<N>.json``.

        The JSON file is the single definition (a custom tool outside this repo adds its
        own directory with ``arrakis_ray.store.schemas.add_schema_dir``).
        """
        from arrakis_ray.store.schemas import load_schema

        return load_schema(
            f"result.{output or self.output_names()[0]}", self.schema_version
        ).arrow()

    def compute_shard(self, inputs: ShardInputs, model: HookedModel | None) -> Any:
        """Result rows (or partial aggregates, with ``reduce``) for one shard."""
        raise NotImplementedError(f"tool {self.name} has scope 'shard' but no compute_shard")

    def compute_run(self, inputs: RunReader, model: HookedModel | None) -> Any:
        """The whole result, computed once for the run."""
        raise NotImplementedError(f"tool {self.name} has scope 'run' but no compute_run")

    def compute_live(self, items: pa.Table, model: LiveModel, prepared: Any = None) -> Any:
        """Result rows for a slice of the prompt dataset, from the live model."""
        raise NotImplementedError(f"tool {self.name} has scope 'live' but no compute_live")

    def prompts_path(self, manifest: RunManifest) -> str | None:
        """The prompt dataset: the ``prompts`` parameter, else the run's own data file."""
        return getattr(self.params, "prompts", None) or manifest.data_path

    prepare = None
    """Live tools, optional: ``prepare(self, items: pa.Table, model: LiveModel) -> Any``,
    run once over every prompt before ``compute_live``."""

    reduce = None
    """Optional ``reduce(self, partials: dict[str, list[pa.Table]], manifest, model) -> result``
    (``model`` is None unless ``reduce_needs_weights``)."""
