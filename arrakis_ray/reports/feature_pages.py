"""Feature pages: one Neuronpedia-like page per neuron or SAE feature, from lookups.

A page is built from the neuron dashboard's tables alone (tool neuron_dashboard and its
companions), each read by its key ``(run_id, family, layer, neuron)``; the tables are
sorted by that key with Parquet statistics on it, so a page costs a few row-group reads
however large the run, and the activations are never scanned. A section is shown when
its table exists in the store:

- statistics and density: ``results_neuron_stats`` (firing frequency, mean, max,
  percentiles), and where the neuron's density sits among its layer's neurons;
- top activating contexts: ``results_neuron_top_contexts``, the centre token highlighted;
- contexts sampled from activation quantiles: ``results_neuron_quantile_contexts``;
- the activation histogram: ``results_neuron_histograms``;
- the logit effect (tokens promoted and suppressed through W_out·W_U, or the decoder
  direction · W_U of an SAE feature): ``results_neuron_logit_effects``.

Which features get a page: the ``top`` neurons of each (family, layer) by largest
activation, from ``results_neuron_stats``; for ``family = 'sae:<hook>'`` the neurons are
the SAE's features.
"""

from __future__ import annotations

import html
import logging
import re

from arrakis_ray.reports.site_pages import (
    DENSITY_BIN,
    Page,
    QueryLog,
    anchor,
    cell,
    density_bin_sql,
    density_log10,
    link,
    nav,
    safe_name,
    sql_block,
    sql_text,
    table_html,
)

log = logging.getLogger(__name__)

STATS = "results_neuron_stats"
TOP_CONTEXTS = "results_neuron_top_contexts"
QUANTILE_CONTEXTS = "results_neuron_quantile_contexts"
HISTOGRAMS = "results_neuron_histograms"
LOGIT_EFFECTS = "results_neuron_logit_effects"

TOP_BY_MAX = """
SELECT family, layer, neuron, freq, mean, max, p99, n_tokens
FROM (
  SELECT *, row_number() OVER (PARTITION BY family, layer ORDER BY max DESC, neuron) AS pick
  FROM results_neuron_stats WHERE run_id = {run}
)
WHERE pick <= {top}
ORDER BY family, layer, pick
"""

KEY = "run_id = {run} AND family = {family} AND layer = {layer} AND neuron = {neuron}"

NEURON_STATS = f"SELECT freq, mean, max, p50, p90, p99, n_tokens FROM {STATS} WHERE {KEY}"

# where the neuron's density sits among the neurons of its layer
DENSITY_RANK = f"""
SELECT count(*) AS neurons,
       count(*) FILTER (WHERE s.freq < me.freq) AS sparser,
       count(*) FILTER (WHERE s.freq > me.freq) AS denser,
       count(*) FILTER (WHERE s.freq = 0) AS dead
FROM {STATS} s, (SELECT freq FROM {STATS} WHERE {KEY}) me
WHERE s.run_id = {{run}} AND s.family = {{family}} AND s.layer = {{layer}}
"""

LAYER_DENSITY = f"""
SELECT {density_bin_sql("freq")} AS log10_freq,
       count(*) AS neurons
FROM {STATS}
WHERE run_id = {{run}} AND family = {{family}} AND layer = {{layer}}
GROUP BY 1 ORDER BY 1
"""

NEURON_TOP_CONTEXTS = f"""
SELECT rank, activation, context, seq_id, pos
FROM {TOP_CONTEXTS} WHERE {KEY} ORDER BY rank
"""

NEURON_QUANTILE_CONTEXTS = f"""
SELECT interval, interval_low, interval_high, rank, activation, context, seq_id, pos
FROM {QUANTILE_CONTEXTS} WHERE {KEY} ORDER BY interval DESC, rank
"""

NEURON_HISTOGRAM = f"""
SELECT bin, bin_low, bin_high, count
FROM {HISTOGRAMS} WHERE {KEY} ORDER BY bin
"""

NEURON_LOGIT_EFFECTS = f"""
SELECT direction, rank, token, token_id, effect
FROM {LOGIT_EFFECTS} WHERE {KEY} ORDER BY direction, rank
"""

_CANDIDATE = re.compile(r"\[([^\[\]]*)\]")


def feature_page_path(run_id: str, family: str, layer: int, neuron: int) -> str:
    """Site path of a feature's page."""
    name = f"{safe_name(family)}-l{int(layer)}-n{int(neuron)}.html"
    return f"runs/{safe_name(run_id)}/features/{name}"


def features_index_path(run_id: str) -> str:
    return f"runs/{safe_name(run_id)}/features/index.html"


def feature_pages(
    db, run_id: str, *, top: int, store: str, trail: list[tuple[str, str]]
) -> list[Page]:
    """The run's features index and one page per chosen feature ([] without
    ``results_neuron_stats`` rows for the run). ``trail``: the breadcrumb above."""
    if STATS not in db.views() or top <= 0:
        return []
    q = QueryLog(db)
    sql = TOP_BY_MAX.format(run=sql_text(run_id), top=int(top))
    chosen = q.sql(sql)
    if chosen.is_empty():
        return []
    index_path = features_index_path(run_id)
    index = Page(index_path, f"Top features of run {run_id}", queries=q.queries)
    index.blocks += [
        nav(index_path, trail),
        f"<p>The {int(top)} neurons of each layer with the largest activation "
        f"(<code>{STATS}</code>); for an <code>sae:</code> family, the features of the "
        "run's sparse autoencoder. Each page is a lookup in the dashboard tables.</p>",
        table_html(
            chosen,
            links={
                "neuron": lambda r: link(
                    index_path, feature_page_path(run_id, r["family"], r["layer"], r["neuron"])
                )
            },
        ),
        sql_block(sql, store),
    ]
    pages = [index]
    trail = [*trail, ("features", index_path)]
    for row in chosen.iter_rows(named=True):
        pages.append(
            feature_page(db, run_id, row["family"], row["layer"], row["neuron"], store, trail)
        )
    return pages


def feature_page(db, run_id: str, family: str, layer: int, neuron: int, store: str, trail) -> Page:
    """One feature's page: a handful of key lookups in the dashboard tables."""
    import altair as alt

    from arrakis_ray.reports.html import ChartBlock

    q = QueryLog(db)
    views = set(db.views())
    key = {
        "run": sql_text(run_id),
        "family": sql_text(family),
        "layer": int(layer),
        "neuron": int(neuron),
    }
    path = feature_page_path(run_id, family, layer, neuron)
    kind = "feature" if family.startswith("sae:") else "neuron"
    page = Page(path, f"{family} layer {layer} {kind} {neuron}", queries=q.queries)
    page.blocks.append(nav(path, trail))
    stats_sql = NEURON_STATS.format(**key)
    stats = q.sql(stats_sql)
    if stats.is_empty():
        page.blocks.append("<p>No statistics for this neuron in the store.</p>")
        return page
    s = stats.row(0, named=True)
    page.blocks += [
        f"<p>Run {anchor(path, f'runs/{safe_name(run_id)}/index.html', run_id)}, family "
        f"<code>{html.escape(family)}</code>, layer {int(layer)}, {kind} {int(neuron)}: "
        f"max activation <b>{cell(s['max'])}</b>, fires on <b>{cell(100 * s['freq'])}%</b> "
        f"of {s['n_tokens']} tokens.</p>",
        "<h2>Statistics</h2>",
        table_html(stats),
        sql_block(stats_sql, store),
    ]
    page.blocks += _density(q, key, s["freq"], store)
    if TOP_CONTEXTS in views:
        sql = NEURON_TOP_CONTEXTS.format(**key)
        top = q.sql(sql)
        page.blocks += [
            "<h2>Top activating contexts</h2>",
            table_html(top, render={"context": lambda r: context_html(r["context"])}),
            sql_block(sql, store),
        ]
    if QUANTILE_CONTEXTS in views:
        page.blocks += _quantile_contexts(q, key, store)
    if HISTOGRAMS in views:
        sql = NEURON_HISTOGRAM.format(**key)
        bins = q.sql(sql)
        if not bins.is_empty():
            chart = (
                alt.Chart(bins)
                .mark_bar()
                .encode(
                    x=alt.X("bin_low:Q", bin="binned", title="activation"),
                    x2="bin_high:Q",
                    # symlog: the spike of inactive tokens does not flatten the tail
                    y=alt.Y("count:Q", title="tokens", scale=alt.Scale(type="symlog")),
                    tooltip=["bin_low:Q", "bin_high:Q", "count:Q"],
                )
                .properties(width=480, height=200)
            )
            page.blocks.append(
                ChartBlock("Activation histogram", chart, after_html=sql_block(sql, store))
            )
    if LOGIT_EFFECTS in views:
        page.blocks += _logit_effects(q, key, store)
    return page


def _density(q: QueryLog, key: dict, freq: float, store: str) -> list:
    """The neuron's density against its layer's: a rank and a histogram with a marker."""
    import altair as alt

    from arrakis_ray.reports.html import ChartBlock

    rank_sql = DENSITY_RANK.format(**key)
    rank = q.sql(rank_sql).row(0, named=True)
    n = rank["neurons"]
    bins_sql = LAYER_DENSITY.format(**key)
    bins = q.sql(bins_sql)
    bars = (
        alt.Chart(bins)
        .transform_calculate(upper=f"datum.log10_freq + {DENSITY_BIN}")
        .mark_bar(color="#9ab")
        .encode(
            x=alt.X("log10_freq:Q", bin="binned", title="log10 firing frequency"),
            x2="upper:Q",
            y=alt.Y("neurons:Q", title="neurons of the layer"),
            tooltip=["log10_freq:Q", "neurons:Q"],
        )
    )
    here = density_log10(freq)
    marker = (
        alt.Chart(alt.Data(values=[{"log10_freq": here}]))
        .mark_rule(color="#d62728", strokeWidth=2)
        .encode(x="log10_freq:Q", tooltip=[alt.Tooltip("log10_freq:Q", title="this neuron")])
    )
    chart = alt.layer(bars, marker).properties(width=480, height=180)
    text = (
        f"<p>Density (firing frequency) {cell(freq)}. Of the {n} neurons of its layer, "
        f"{cell(100 * rank['sparser'] / n)}% fire less often and "
        f"{cell(100 * rank['denser'] / n)}% more often; {rank['dead']} never fire. "
        "Red: this neuron.</p>"
    )
    return [
        ChartBlock(
            "Density among the layer's neurons",
            chart,
            before_html=text,
            after_html=sql_block(rank_sql, store, summary="SQL (rank)")
            + sql_block(bins_sql, store, summary="SQL (histogram)"),
        )
    ]


def _quantile_contexts(q: QueryLog, key: dict, store: str) -> list[str]:
    sql = NEURON_QUANTILE_CONTEXTS.format(**key)
    rows = q.sql(sql)
    if rows.is_empty():
        return []
    blocks = ["<h2>Contexts sampled from activation quantiles</h2>"]
    for (interval,), group in rows.group_by(["interval"], maintain_order=True):
        low, high = group["interval_low"][0], group["interval_high"][0]
        blocks += [
            f"<h3>Interval {cell(interval)}: activation from {cell(low)} to {cell(high)}</h3>",
            table_html(
                group.select("rank", "activation", "context", "seq_id", "pos"),
                render={"context": lambda r: context_html(r["context"])},
            ),
        ]
    blocks.append(sql_block(sql, store))
    return blocks


def _logit_effects(q: QueryLog, key: dict, store: str) -> list:
    import altair as alt

    from arrakis_ray.reports.html import ChartBlock

    sql = NEURON_LOGIT_EFFECTS.format(**key)
    effects = q.sql(sql)
    if effects.is_empty():
        return []
    tables = []
    for direction in ("promoted", "suppressed"):
        part = effects.filter(effects["direction"] == direction)
        if not part.is_empty():
            tables.append(
                f"<div><h3>{direction}</h3>"
                f"{table_html(part.select('rank', 'token', 'token_id', 'effect'))}</div>"
            )
    chart = (
        alt.Chart(effects)
        .transform_calculate(label="datum.token + ' (' + datum.token_id + ')'")
        .mark_bar()
        .encode(
            x=alt.X("effect:Q", title="logit effect"),
            y=alt.Y("label:N", sort="-x", title="token"),
            color=alt.Color(
                "direction:N",
                scale=alt.Scale(domain=["promoted", "suppressed"], range=["#2a9d8f", "#e76f51"]),
            ),
            tooltip=["direction:N", "rank:Q", "token:N", "token_id:Q", "effect:Q"],
        )
        .properties(width=420)
    )
    return [
        ChartBlock(
            "Logit effect: tokens promoted and suppressed",
            chart,
            after_html='<div class="arrakis-row">'
            + "".join(tables)
            + "</div>"
            + sql_block(sql, store),
        )
    ]


def context_html(context: str) -> str:
    """A context's text, escaped, with its centre token (the one in [brackets])
    highlighted. When brackets are ambiguous (a token that is itself a bracket), the
    text is shown as stored, brackets and all."""
    found = list(_CANDIDATE.finditer(context))
    if len(found) != 1:
        return f'<span class="context">{html.escape(context)}</span>'
    (m,) = found
    return (
        f'<span class="context">{html.escape(context[: m.start()])}'
        f'<mark class="centre">{html.escape(m.group(1))}</mark>'
        f"{html.escape(context[m.end() :])}</span>"
    )
