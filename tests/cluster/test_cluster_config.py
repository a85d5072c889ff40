"""The cluster launcher files (cluster.yaml on AWS, cluster.onprem.yaml on your own
machines) are valid for Ray's cluster launcher: against Ray's own autoscaler schema, then
through the preparation and checks ``ray up`` runs before it contacts any machine."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from support import REPO

FILES = ["cluster.yaml", "cluster.onprem.yaml"]


@pytest.fixture(scope="module")
def schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


@pytest.mark.parametrize("name", FILES)
def test_cluster_file_is_valid_for_ray_up(name, schema):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(name)
    jsonschema.validate(raw, schema)
    validate_config(prepare_config(copy.deepcopy(raw)))  # defaults filled in, as ray up does


def test_the_schema_catches_a_misspelt_field(schema):
    raw = _load("cluster.yaml")
    raw["head_start_ray_comands"] = raw.pop("head_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError, match="head_start_ray_comands"):
        jsonschema.validate(raw, schema)


@pytest.mark.parametrize("name", FILES)
def test_the_head_starts_the_sweep_scheduler_after_ray(name):
    commands = _load(name)["head_start_ray_commands"]
    starts = [i for i, c in enumerate(commands) if c.startswith("ray start --head")]
    (scheduler,) = [i for i, c in enumerate(commands) if "arrakis-ray scheduler" in c]
    assert starts and starts[0] < scheduler
    words = shlex.split(commands[scheduler])
    assert words[:3] == ["nohup", "arrakis-ray", "scheduler"] and words[-1] == "&"
    assert words[words.index("--address") + 1] == "http://127.0.0.1:8265"  # the head's Jobs API
    assert words[words.index("--store") + 1]  # the store the schedules live in


def test_the_onprem_cluster_starts_every_listed_worker():
    from ray.autoscaler._private.util import prepare_config

    raw = _load("cluster.onprem.yaml")
    assert raw["provider"]["type"] == "local" and raw["provider"]["head_ip"]
    (node_type,) = prepare_config(copy.deepcopy(raw))["available_node_types"].values()
    workers = len(raw["provider"]["worker_ips"])
    assert workers >= 2 and node_type["min_workers"] == node_type["max_workers"] == workers
