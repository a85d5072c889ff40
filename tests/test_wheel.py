"""The wheel alone carries what the product needs: built, installed (not editable) into a
fresh virtual environment, ``arrakis-ray demo`` runs from a directory outside the repo.

Installing the dependencies from the registry would take minutes, so the fresh venv
gets only the wheel (``--no-deps``) and finds its dependencies in the project's venv
through a ``.pth`` line. That line appends the directory to ``sys.path`` without running
the ``.pth`` files inside it, so the editable install's import finder (which maps
``arrakis_ray`` back to this checkout) never loads: the test checks that the package,
its schemas and its demo pipeline are all read from the fresh venv.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# what the build reads: the package, the two data folders mapped into it, the metadata
SOURCES = ("arrakis_ray", "schemas", "pipelines", "pyproject.toml", "README.md")

pytestmark = pytest.mark.wheel


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # built as `pip install .` builds (an isolated build environment), from a copy: an
    # in-tree build would write build/ into a checkout that other runs may be building
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path_factory.mktemp("dist")
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)],
        timeout=300,
    )
    (built,) = dist.glob("arrakis_ray-*.whl")
    return built


def test_the_wheel_holds_every_module_schema_and_the_demo(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "arrakis_ray").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert modules <= names, (
        f"not in the wheel (list the package in pyproject.toml): {sorted(modules - names)}"
    )
    schemas = {f"arrakis_ray/schemas/{p.name}" for p in (REPO / "schemas").glob("*.json")}
    assert schemas and schemas <= names
    assert {"arrakis_ray/pipelines/demo.yaml", "arrakis_ray/pipelines/data/facts.jsonl"} <= names
    assert any(n.startswith("arrakis_ray/zoo/facts_gpt2/") for n in names)


def test_the_installed_wheel_runs_the_demo_outside_the_repo(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120)
    python = venv / "bin" / "python"
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
        + ["--no-deps", "--no-index", str(wheel)],
        timeout=300,
    )
    (fresh_site,) = (venv / "lib").glob("python3.*/site-packages")
    # the dependencies: the project venv's site-packages, as a plain path entry
    (fresh_site / "project-dependencies.pth").write_text(site.getsitepackages()[0] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env |= {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "ARRAKIS_RAY_LOG_DIR": str(tmp_path)}
    where = _run(
        [
            str(python),
            "-c",
            "import arrakis_ray, arrakis_ray.resources as r, arrakis_ray.store.schemas as s;"
            "print(arrakis_ray.__file__); print(r.demo_pipeline()); print(s.SCHEMAS_DIR);"
            "import sys; print(any('__editable__' in repr(f) for f in sys.meta_path))",
        ],
        cwd=elsewhere,
        env=env,
        timeout=120,
    ).stdout.splitlines()
    assert all(Path(p).is_relative_to(fresh_site) for p in where[:3]), where
    assert where[3] == "False"  # the checkout's editable finder is not loaded

    store = tmp_path / "store"
    done = _run(
        [str(venv / "bin" / "arrakis-ray"), "demo", "--store", str(store)],
        cwd=elsewhere,
        env=env,
        timeout=600,
    )
    assert "layer  mean_p_next  top1_acc" in done.stdout  # the example SQL's result table
    report = next(line for line in done.stdout.splitlines() if line.startswith("report: "))
    assert Path(report.removeprefix("report: ").strip()).is_file()
    assert Path(report.removeprefix("report: ").strip()).is_relative_to(store)
