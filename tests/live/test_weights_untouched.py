"""Every live tool leaves the model as it found it: the same weights, bit for bit, and
the same outputs. Interventions are hook functions for one forward, never edits."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from support import DEMO_DATA, REPO, with_run_id

from arrakis_ray.live.holder import weights_digest
from arrakis_ray.live.prompts import read_prompts
from arrakis_ray.tools import TOOLS
from arrakis_ray.tools.runner import make_tool

LIVE_TOOLS = sorted(name for name, cls in TOOLS.items() if cls.scope == "live")
PAIRS = REPO / "pipelines" / "data" / "facts_pairs.jsonl"
FACT_COLUMNS = ("text", "prompt", "subject", "answer", "relation")


def _items(tool) -> pa.Table:
    if not tool.prompt_columns:
        return with_run_id(pa.table({"item": pa.array([0], pa.int64())}))
    source = PAIRS if "clean" in tool.prompt_columns else DEMO_DATA
    columns = tool.prompt_columns if source == PAIRS else FACT_COLUMNS
    return with_run_id(read_prompts(source, tuple(columns)).slice(0, 3))


def _outputs(model) -> torch.Tensor:
    ids = torch.tensor([model.encode("the capital of france is paris .")])
    logits, _ = model.meta.run_with_cache(ids, hooks=["logits", "blocks.1.hook_resid_post"])
    return logits


def test_every_live_tool_is_checked():
    assert {"activation_patching", "attribution_patching", "causal_tracing", "ablation"} <= set(
        LIVE_TOOLS
    )
    assert {"model_surgery", "knowledge_graph_extractor", "profile_model"} <= set(LIVE_TOOLS)


@pytest.mark.parametrize("name", LIVE_TOOLS)
@pytest.mark.parametrize("staged", [False, True], ids=["whole", "2-stages"])
def test_weights_and_outputs_unchanged(name, staged, demo_live, demo_staged):
    model = demo_staged if staged else demo_live
    digests = [weights_digest(w.model.model) for w in model.workers]
    before = _outputs(demo_live)
    tool = make_tool(name)
    items = _items(tool)
    prepared = tool.prepare(items, model) if tool.prepare is not None else None
    result = tool.compute_live(items, model, prepared)
    tables = result.values() if isinstance(result, dict) else [result]
    assert all(table.num_rows > 0 for table in tables)
    assert [weights_digest(w.model.model) for w in model.workers] == digests
    assert torch.equal(_outputs(demo_live), before)
    for worker in model.workers:
        assert all(p.grad is None for p in worker.model.model.parameters())
