"""Data files shipped with the package: the table schemas and the demo pipeline.

In the repository they live at the top level (``schemas/``, ``pipelines/``, the
product's layout); the build maps those folders into the package as the data packages
``arrakis_ray.schemas`` and ``arrakis_ray.pipelines`` (pyproject.toml). So a wheel
installed anywhere and the editable install of a checkout find them the same way:
through the import system, never by counting parent directories.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def data_dir(package: str) -> Path:
    """The directory of the shipped data package ``arrakis_ray.<package>``."""
    found = files(f"arrakis_ray.{package}")
    if not isinstance(found, Path):  # a zip import: the readers need real files
        raise RuntimeError(f"arrakis_ray.{package} is not on the file system ({found})")
    return found


def schemas_dir() -> Path:
    """``schemas/``: one ``<table>.v<N>.json`` per version of every stored table."""
    return data_dir("schemas")


def demo_pipeline() -> Path:
    """``pipelines/demo.yaml``, the pipeline of ``arrakis-ray demo`` (its data beside it)."""
    return data_dir("pipelines") / "demo.yaml"
