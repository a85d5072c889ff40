"""What a tool may touch: the run contract, the hook vocabulary and models/, nothing else.

Checked on the source of every module under ``arrakis_ray/tools/``: no tool imports the
harvest, another tool or a private helper, indexes a manifest dict, or spells a file
name; and the runner's "harvest again with ..." hint names hooks that exist.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from support import REPO

import arrakis_ray.tools as tools_package
from arrakis_ray.tools.runner import harvest_hint

TOOLS_DIR = Path(tools_package.__file__).parent
# shared modules, not tools (modular: the modular-arithmetic tools' checks)
INFRASTRUCTURE = {"__init__", "base", "runner", "decompose", "patching", "live_metrics", "modular"}
TOOL_MODULES = sorted(p for p in TOOLS_DIR.glob("*.py") if p.stem not in INFRASTRUCTURE)
# the neuron dashboard is one tool in several modules (sketch, contexts, histograms,
# logit effects, SAE access): they may import each other, and no other tool them
PARTS = {p.stem: "neuron_dashboard" for p in TOOLS_DIR.glob("neuron_*.py")}


def _family(stem: str) -> str:
    return PARTS.get(stem, stem)


def _imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


def test_there_are_tools_to_check():
    assert len(TOOL_MODULES) >= 11


@pytest.mark.parametrize("path", TOOL_MODULES, ids=lambda p: p.stem)
def test_a_tool_goes_through_the_contract_only(path):
    source = path.read_text()
    tree = ast.parse(source)
    for module, names in _imports(tree):
        assert not module.startswith("arrakis_ray.harvest"), f"{path.name} imports {module}"
        if module.startswith("arrakis_ray.tools"):
            leaf = module.removeprefix("arrakis_ray.tools").lstrip(".")
            own = _family(leaf) == _family(path.stem)
            assert own or leaf in ("", *INFRASTRUCTURE), f"{path.name} imports the tool {module}"
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{path.name} imports private helpers {private} from {module}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute | ast.Name):
            name = node.value.attr if isinstance(node.value, ast.Attribute) else node.value.id
            assert name != "manifest", f"{path.name}:{node.lineno} indexes a manifest dict"
        if isinstance(node, ast.Attribute) and node.attr == "config":
            owner = node.value.attr if isinstance(node.value, ast.Attribute) else None
            owner = owner or (node.value.id if isinstance(node.value, ast.Name) else None)
            assert owner != "manifest", f"{path.name}:{node.lineno} reads the raw config dict"
        if isinstance(node, ast.Attribute):
            assert node.attr not in ("layout", "shard_file", "activation_dir"), (
                f"{path.name}:{node.lineno} reaches into the store's paths ({node.attr})"
            )
    assert ".parquet" not in source, f"{path.name} spells a file name"


def test_the_harvest_hint_names_hooks_the_model_has():
    from arrakis_ray.config import load_pipeline
    from arrakis_ray.harvest.model_source import describe_model

    model = describe_model(load_pipeline(REPO / "pipelines" / "demo.yaml").model)
    every = model.hook_names()
    for hook in every:
        (glob,) = harvest_hint([hook])
        # the suggested glob is a real selection, and it selects the missing hook
        assert hook in model.resolve_hooks([glob]), (hook, glob)
    # the three names the old hint invented
    hints = harvest_hint(["hook_embed", "blocks.1.hook_attn_out", "ln_final.hook_normalized"])
    assert hints == ["blocks.*.hook_attn_out", "hook_embed", "ln_final.hook_normalized"]
