"""Analysis tools. ``TOOLS`` maps a name to its class; ``register_tool`` adds your own.

An explicit dict, not a metaclass registry: reading this file tells you every tool.
"""

from __future__ import annotations

import re

from arrakis_ray.errors import ToolError
from arrakis_ray.store.reader import RunReader
from arrakis_ray.tools.ablation import Ablation
from arrakis_ray.tools.activation_patching import ActivationPatching
from arrakis_ray.tools.attention_head_composition import AttentionHeadComposition
from arrakis_ray.tools.attention_to_equals import AttentionToEquals
from arrakis_ray.tools.attention_tools import AttentionTools
from arrakis_ray.tools.attribution_patching import AttributionPatching
from arrakis_ray.tools.base import ShardInputs, Tool
from arrakis_ray.tools.causal_tracing import CausalTracing
from arrakis_ray.tools.fourier_embedding import FourierEmbedding
from arrakis_ray.tools.fourier_neurons import FourierNeurons
from arrakis_ray.tools.knowledge_graph import KnowledgeGraphExtractor
from arrakis_ray.tools.knowledge_prober import KnowledgeProber
from arrakis_ray.tools.logit_attribution import LogitAttribution
from arrakis_ray.tools.logit_lens import LogitLens
from arrakis_ray.tools.model_surgery import ModelSurgery
from arrakis_ray.tools.neuron_dashboard import NeuronDashboard
from arrakis_ray.tools.profile_model import ProfileModel
from arrakis_ray.tools.progress_measures import ProgressMeasures
from arrakis_ray.tools.read_write_heads import ReadWriteHeads
from arrakis_ray.tools.residual_decomposition import ResidualDecomposition
from arrakis_ray.tools.residual_tools import ResidualTools
from arrakis_ray.tools.sparsity_analyzer import SparsityAnalyzer
from arrakis_ray.tools.superposition_disentangler import SuperpositionDisentangler
from arrakis_ray.tools.training_curves import TrainingCurves

TOOLS: dict[str, type[Tool]] = {
    cls.name: cls
    for cls in (
        LogitLens,
        LogitAttribution,
        ResidualDecomposition,
        ResidualTools,
        AttentionTools,
        AttentionHeadComposition,
        ReadWriteHeads,
        SparsityAnalyzer,
        SuperpositionDisentangler,
        KnowledgeProber,
        NeuronDashboard,
        # training history shipped with a checkpoint (no activations, no weights)
        TrainingCurves,
        # modular arithmetic (the grokking study): Fourier views of the model
        FourierEmbedding,
        FourierNeurons,
        AttentionToEquals,
        ProgressMeasures,
        # live: they run the model again (arrakis_ray.live)
        ActivationPatching,
        AttributionPatching,
        CausalTracing,
        Ablation,
        ModelSurgery,
        KnowledgeGraphExtractor,
        ProfileModel,
    )
}

STUDY_TOOLS: frozenset[str] = frozenset(
    {
        "training_curves",
        "fourier_embedding",
        "fourier_neurons",
        "attention_to_equals",
        "progress_measures",
    }
)
"""Built-in tools that need a study's inputs (a curves file shipped with a checkpoint, a
modular-arithmetic model on all its input pairs), so the demo pipeline cannot run them."""


_TOOL_NAME = re.compile(r"[A-Za-z0-9_]+")


def register_tool(cls: type[Tool]) -> type[Tool]:
    """Make a user-defined tool available by name (usable as a class decorator).

    The name must be letters, digits and underscores (ToolError otherwise): a variant's
    record key is ``<tool>.<variant>`` (``store.manifest.record_key``), split at the
    first dot, so a dot in the name would read back as another tool's variant."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
        raise ToolError(
            f"tool class {cls.__module__}.{cls.__qualname__}: name {name!r} must be letters, "
            "digits and underscores only (it names the tool's records and results)"
        )
    TOOLS[cls.name] = cls
    return cls


__all__ = ["STUDY_TOOLS", "TOOLS", "RunReader", "ShardInputs", "Tool", "register_tool"]
