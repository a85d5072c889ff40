"""The Arrakis bench on arrakis-ray: the original's walkthrough runs with only its
imports changed, and every experiment is recorded in a store (views ``experiments``,
``experiment_calls``, ``hypotheses``). See the README, "Coming from Arrakis"."""

from arrakis_ray.bench.automodel import HookedAutoConfig, HookedAutoModel
from arrakis_ray.bench.bench import BaseInterpretabilityBench
from arrakis_ray.bench.plots import PlotSpec

__all__ = ["BaseInterpretabilityBench", "HookedAutoConfig", "HookedAutoModel", "PlotSpec"]
