"""Session-wide fixtures: one local Ray cluster and one harvested store for the suite.

Ray is started once (mixing scopes fails); the harvest of the shipped demo model over
a slice of the demo data runs once and is shared, read-only, by the tests that query
it. Tests that change a store make their own.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from support import pipeline_dict  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def harvested(ray_session, tmp_path_factory):
    """(config, store path, HarvestResult) of one shared harvest + logit lens."""
    from arrakis_ray.config import pipeline_from_dict
    from arrakis_ray.harvest.driver import harvest
    from arrakis_ray.tools.runner import analyze

    store = tmp_path_factory.mktemp("store") / "store"
    config = pipeline_from_dict(pipeline_dict())
    result = harvest(config, store)
    analyze(result.run_dir, "logit_lens")
    return config, store, result


@pytest.fixture(scope="session")
def hf_model():
    """The demo model and tokenizer loaded straight with transformers (the reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from arrakis_ray.zoo import zoo_path

    path = zoo_path("facts-gpt2")
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, attn_implementation="eager"
    ).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.fixture(autouse=True)
def _one_torch_thread(request):
    """The tool tests (tests/tools, tests/live): tiny matmuls, where more torch threads
    only fight the Ray workers for this machine's 2 cores."""
    if request.path.parent.name not in ("tools", "live"):
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
