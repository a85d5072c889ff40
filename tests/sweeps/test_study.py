"""Studies: ``arrakis-ray run`` of a sweep file with a ``report`` over custom checkpoints.

Two checkpoints of the hand-written toy model (``arrakis_ray.models.toy``) are the
study's points; the report function (``support.study_page``) reads the store's
``sweep_runs`` view, so the page lists what SQL says each checkpoint's run is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from support import DEMO_DATA

from arrakis_ray.cli import main
from arrakis_ray.errors import ConfigError
from arrakis_ray.models.custom import build_custom
from arrakis_ray.models.load import model_fingerprint
from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.manifest import read_manifest
from arrakis_ray.sweeps.spec import load_sweep

FACTORY = "arrakis_ray.models.toy:build"
CONFIG = {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_mlp": 32, "vocab": 386}


def _study(tmp_path: Path, report: str) -> tuple[Path, list[Path]]:
    from safetensors.torch import save_file

    checkpoints = []
    for seed in (1, 2):
        model = build_custom(FACTORY, CONFIG, seed=seed)
        path = tmp_path / f"step{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, str(path))
        checkpoints.append(path)
    base = {
        "name": "toy-study",
        "model": {
            "factory": FACTORY,
            "config": CONFIG,
            "tokenizer": "zoo:facts-gpt2",
            "checkpoint": "step1.safetensors",
        },
        "data": {"path": str(DEMO_DATA), "context_length": 10, "max_documents": 6},
        "harvest": {"hooks": ["blocks.0.hook_resid_post"], "storage_dtype": "float32"},
        "analyze": [{"tool": "logit_lens"}],
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    study = {
        "name": "toy-study",
        "base": "base.yaml",
        "parameters": {"model.checkpoint": {"values": [p.name for p in checkpoints]}},
        "report": report,
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    return tmp_path / "study.yaml", checkpoints


def test_a_study_runs_every_checkpoint_and_writes_its_report(ray_session, tmp_path, capsys):
    study, checkpoints = _study(tmp_path, "support:study_page")
    store = tmp_path / "store"
    assert main(["run", str(study), "--store", str(store)]) == 0
    page = store / "studies" / "toy-study" / "report.html"
    assert page.is_file(), capsys.readouterr().out
    rows = json.loads(page.read_text())
    assert [c for c, _ in rows] == [p.name for p in checkpoints]  # as the study wrote them
    for checkpoint, run_id in rows:
        manifest = read_manifest(RunLayout(store, run_id))
        model = build_custom(FACTORY, CONFIG, checkpoint=tmp_path / checkpoint)
        assert manifest.model_fingerprint == model_fingerprint(model)
    assert rows[0][1] != rows[1][1]


def test_a_study_report_that_does_not_exist_is_refused_before_any_run(tmp_path):
    study, _ = _study(tmp_path, "support:no_such_page")
    with pytest.raises(ConfigError, match="study.yaml: report: support has no function"):
        load_sweep(study)
    assert not (tmp_path / "store").exists()


def test_a_report_that_fails_says_so_in_one_line_and_keeps_the_runs(ray_session, tmp_path, capsys):
    study, _ = _study(tmp_path, "support:failing_study_page")
    store = tmp_path / "store"
    assert main(["run", str(study), "--store", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"arrakis-ray: error: {study}: report support:failing_study_page:")
    assert "no completed run of the final checkpoint" in err[-1]
    assert "Traceback" not in "\n".join(err)
    runs = [p for p in (store / "runs").iterdir() if not p.name.startswith(".")]
    assert len(runs) == 2  # the sweep's runs stay
