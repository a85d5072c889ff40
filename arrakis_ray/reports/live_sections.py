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


def live_sections(section) -> list:
    """The live tools' report sections, built with the report's ``Section`` class."""
    from arrakis_ray.reports import patching_charts

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
    ]
