"""Small models shipped inside the package, loadable offline by name.

Each entry is a ``save_pretrained`` directory next to this file, made by the project's
own training code (``python -m arrakis_ray.zoo.train`` for ``facts-gpt2``).
"""

from __future__ import annotations

from pathlib import Path

from arrakis_ray.errors import ModelLoadError

ZOO: dict[str, str] = {
    "facts-gpt2": (
        "4-layer GPT-2 (128 wide, word-level vocabulary) trained on synthetic fact "
        "sentences ('the capital of france is paris .'); recalls held-out phrasings"
    ),
}
"""Model name -> one-line description."""

_DIRS = {"facts-gpt2": "facts_gpt2"}  # name -> directory beside this file


def zoo_path(name: str) -> Path:
    """The checkpoint directory of zoo model ``name`` (for ``from_pretrained``)."""
    if name not in ZOO:
        known = ", ".join(sorted(ZOO))
        raise ModelLoadError(f"model.zoo: unknown zoo model {name!r} (known: {known})")
    path = Path(__file__).parent / _DIRS[name]
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"model.zoo: {name!r} has no checkpoint at {path}; "
            "rebuild it with `python -m arrakis_ray.zoo.train`"
        )
    return path
