"""Fixtures for the live tools: the demo model in this process, whole and in 2 stages."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_config():
    from arrakis_ray.config import ModelConfig

    return ModelConfig(zoo="facts-gpt2")


@pytest.fixture(scope="session")
def demo_live(demo_config):
    """The demo model as one LiveModel worker (a whole replica)."""
    from arrakis_ray.live.model import local_model

    return local_model(demo_config)


@pytest.fixture(scope="session")
def demo_staged(demo_config):
    """The demo model (4 blocks) as 2 stages, [0, 2) and [2, 4), in this process."""
    from arrakis_ray.live.model import local_model

    return local_model(demo_config, [(0, 2), (2, 4)])


@pytest.fixture(scope="session")
def demo_facts():
    """The demo's held-out facts (prompt, subject, answer, relation, ...) as Arrow."""
    from support import DEMO_DATA, with_run_id

    from arrakis_ray.live.prompts import read_prompts

    return with_run_id(read_prompts(DEMO_DATA, ("prompt", "subject", "answer", "relation")))
