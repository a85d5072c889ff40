"""The report's sections for the live tools (interventions): their SQL and charts.

Kept apart from ``run_report.py`` so each file stays readable; the queries are the
ones a researcher would type into ``arrakis-ray sql``.
"""

from __future__ import annotations

# the first pair's patching sweep: positions are that pair's tokens
PATCHING_FIRST_PAIR = """
SELECT family, layer, pos, token, metric
FROM {view}
WHERE run_id = '{run_id}' AND pos IS NOT NULL
  AND item = (SELECT min(item) FROM {view} WHERE run_id = '{run_id}')
"""

# heads are patched at every position, so pairs of any length average together
PATCHING_HEADS = """
SELECT layer, head, avg(metric) AS metric
FROM {view}
WHERE run_id = '{run_id}' AND head IS NOT NULL AND NOT isnan(metric)
GROUP BY layer, head
"""

# a sample keeps the chart light; the sample clause of a subquery applies after its WHERE
EXACT_AGAINST_ATTRIBUTION = """
SELECT * FROM (
  SELECT e.family, e.metric AS exact, a.metric AS attribution
  FROM results_activation_patching e
  JOIN results_attribution_patching a
    ON a.run_id = e.run_id AND a.item = e.item AND a.family = e.family
   AND a.layer = e.layer AND a.pos IS NOT DISTINCT FROM e.pos
   AND a.head IS NOT DISTINCT FROM e.head
  WHERE e.run_id = '{run_id}' AND NOT isnan(e.metric)
) USING SAMPLE 2000 ROWS (reservoir, 0)
"""


TRACING_FIRST_PROMPT = """
SELECT * FROM {view}
WHERE run_id = '{run_id}' AND item = (SELECT min(item) FROM {view} WHERE run_id = '{run_id}')
"""

# means over prompts by position group, computed in SQL: one row per (kind, role, layer)
TRACING_BY_ROLE = """
SELECT kind, role, layer, avg(effect) AS effect, min(item) AS item
FROM {view}
WHERE run_id = '{run_id}'
GROUP BY kind, role, layer
"""


# per component, averaged in SQL over the prompts (one method: the latest call's)
ABLATION_MEANS = """
SELECT component, layer, method, avg(loss_delta) AS loss_delta
FROM {view}
WHERE run_id = '{run_id}'
GROUP BY component, layer, method
"""

SURGERY_MEANS = """
SELECT plan, layers, avg(loss_delta) AS loss_delta
FROM {view}
WHERE run_id = '{run_id}'
GROUP BY plan, layers
"""

EVERY_ROW = "SELECT * FROM {view} WHERE run_id = '{run_id}'"


def _role_heatmaps(df):
    import altair as alt

    from arrakis_ray.reports import tracing_charts

    kinds = [k for k in tracing_charts.KINDS if k in set(df["kind"])]
    return alt.hconcat(*(tracing_charts.tracing_role_heatmap(df, kind=k) for k in kinds))


def live_sections(section) -> list:
    """The live tools' report sections, built with the report's ``Section`` class."""
    from arrakis_ray.reports import (
        ablation_charts,
        knowledge_charts,
        patching_charts,
        profile_charts,
        tracing_charts,
    )

    return [
        section(
            "results_activation_patching",
            "Activation patching: the first pair, per layer and position",
            PATCHING_FIRST_PAIR,
            patching_charts.position_heatmap,
        ),
        section(
            "results_activation_patching",
            "Activation patching: each head, mean over pairs",
            PATCHING_HEADS,
            patching_charts.head_heatmap,
        ),
        section(
            "results_attribution_patching",
            "Attribution patching (AtP) against exact patching",
            EXACT_AGAINST_ATTRIBUTION,
            patching_charts.exact_against_attribution,
            needs=("results_activation_patching",),
        ),
        section(
            "results_causal_tracing",
            "Causal tracing: the first prompt (ROME's three heatmaps)",
            TRACING_FIRST_PROMPT,
            tracing_charts.tracing_heatmaps,
        ),
        section(
            "results_causal_tracing",
            "Causal tracing: mean over prompts, by position group",
            TRACING_BY_ROLE,
            _role_heatmaps,
        ),
        section(
            "results_ablation",
            "Ablation: the components that matter most",
            ABLATION_MEANS,
            ablation_charts.ablation_ranking,
        ),
        section(
            "results_model_surgery",
            "Model surgery: loss change per plan",
            SURGERY_MEANS,
            ablation_charts.surgery_bars,
        ),
        section(
            "results_knowledge_graph",
            "Knowledge graph: the layer where each fact first becomes top-1",
            EVERY_ROW,
            knowledge_charts.first_layer_bars,
        ),
        section(
            "results_profile_model",
            "Profile: time and FLOPs per module",
            EVERY_ROW,
            profile_charts.profile_bars,
        ),
    ]
