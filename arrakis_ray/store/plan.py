"""A run's plan: what a harvest of one pipeline config will write, known before it runs.

``harvest.plan.plan_run(config)`` makes one without Ray and without a forward pass, so a
sweep can plan a thousand configs in seconds to dedupe them (same run id: same run) and
to estimate their size. The harvest driver then executes a plan; its manifest starts as
``RunPlan.new_manifest``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from arrakis_ray.config import to_dict
from arrakis_ray.store.manifest import (
    DataInfo,
    HarvestRecord,
    ModelShape,
    RunManifest,
    Shard,
)

if TYPE_CHECKING:
    from arrakis_ray.config import PipelineConfig


@dataclass(frozen=True)
class RunPlan:
    """What a harvest of ``config`` will do, and the id of the run it makes."""

    config: PipelineConfig
    """The config with every default resolved (``harvest.shard_size`` filled in)."""
    run_id: str
    """Content hash of ``identity``: an identical config plans the same run."""
    identity: dict[str, Any]
    """What determines the output: model and data fingerprints, hooks, settings."""
    hooks: tuple[str, ...]
    """Concrete hook names, resolved from the config's globs."""
    shape: ModelShape
    shards: tuple[Shard, ...]
    stages: tuple[tuple[int, int], ...]
    """[start, stop) block ranges, one per pipeline stage."""
    max_tokens: int
    """Upper bound of the tokens harvested."""
    predicted_bytes: int
    """Upper bound of the run's size on disk."""
    model_source: str

    @property
    def n_documents(self) -> int:
        return sum(s.count for s in self.shards)

    def new_manifest(self, created_at: str, versions: dict[str, Any]) -> RunManifest:
        """The manifest of this run before any shard is harvested."""
        from arrakis_ray.store import schemas

        return RunManifest(
            run_id=self.run_id,
            name=self.config.name,
            status="running",
            created_at=created_at,
            config=to_dict(self.config),
            hooks=self.hooks,
            shape=self.shape,
            model_source=self.model_source,
            model_fingerprint=self.identity["model"],
            data=DataInfo(
                path=self.config.data.path,
                fingerprint=self.identity["data"],
                n_documents=self.n_documents,
                n_sequences=self.n_documents,  # one per document until packed mode counts
                n_shards=len(self.shards),
            ),
            shard_plan=self.shards,
            stages=self.stages,
            schemas={n: schemas.load_schema(n).version for n in schemas.known_schemas()},
            harvest=HarvestRecord(predicted_max_bytes=self.predicted_bytes),
            versions=versions,
        )
