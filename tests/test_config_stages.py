"""harvest.stages (formerly model_shards): validation, and the rename's one clear error."""

from __future__ import annotations

import pytest
import yaml
from support import pipeline_dict

from arrakis_ray.config import load_pipeline, pipeline_from_dict
from arrakis_ray.errors import ConfigError


def test_stages_is_read_and_validated() -> None:
    assert pipeline_from_dict(pipeline_dict()).harvest.stages == 1
    assert pipeline_from_dict(pipeline_dict(stages=3)).harvest.stages == 3
    with pytest.raises(ConfigError, match=r"harvest: stages must be at least 1"):
        pipeline_from_dict(pipeline_dict(stages=0))
    with pytest.raises(ConfigError, match=r"harvest: give stages or layer_ranges, not both"):
        pipeline_from_dict(pipeline_dict(stages=2, layer_ranges=[[0, 2], [2, 4]]))


def test_an_old_model_shards_key_names_the_new_one(tmp_path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(pipeline_dict(model_shards=2)))
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    assert str(info.value) == f"{path}: harvest.model_shards: renamed to harvest.stages"


def test_model_shards_is_only_renamed_in_the_harvest_section() -> None:
    raw = pipeline_dict()
    raw["data"]["model_shards"] = 2
    with pytest.raises(ConfigError, match=r"data\.model_shards: unknown field"):
        pipeline_from_dict(raw)
