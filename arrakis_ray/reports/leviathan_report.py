"""The Leviathan study's page: correlation attention against dot-product attention.

``write_report(store, sweep_id, out)`` is the study's ``report:`` function
(``pipelines/studies/leviathan.yaml``). Everything comes from the store through SQL:

- ``sweep_runs``: the study's two runs and which attention each model has;
- ``results_training_curves``: validation loss and bits per character per evaluation
  step, and training wall seconds per step, as recorded while training;
- ``results_logit_lens``: each character's predicted probability on the validation
  excerpt (the last layer gives the excerpt's bpc, earlier layers the logit lens');
- ``results_residual_layers``: the residual norm and movement per layer;
- ``results_attention_head_scores``: per-head entropy, previous-token and duplicate-token
  scores;
- ``act_attn_pattern``: the patterns of one window, for both models side by side;
- ``runs.manifest``: the correlation run's checkpoint, whose learned lag weights are shown
  (the one thing not in the store's tables: they are weights, not activations).

The verdict compares the validation bpc at the last evaluation and averaged over the
last ``LAST_EVALS`` evaluations; the models are called equal when the averages differ by
less than ``EQUAL_WITHIN`` (relative).
"""

from __future__ import annotations

import html
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arrakis_ray.reports.html import write_report as write_html
from arrakis_ray.reports.site_pages import sql_text
from arrakis_ray.store.catalog import Store
from arrakis_ray.sweeps.study import point_results_sql, points_sql

log = logging.getLogger(__name__)

LAST_EVALS = 5  # evaluations averaged for the verdict
EQUAL_WITHIN = 0.01  # relative bpc difference under which the two models are "equal"
PATTERN_POSITIONS = 32  # query and key positions of the window shown
ATTENTION_PARAM = "model.config.attention"  # the swept parameter that tells the models apart


@dataclass(frozen=True)
class Verdict:
    """How the correlation model's validation bpc compares with the dot model's."""

    final: dict[str, float]
    """Validation bpc at the last evaluation, per attention kind."""
    last_mean: dict[str, float]
    """Mean validation bpc over the last ``LAST_EVALS`` evaluations."""
    seconds_per_step: dict[str, float]
    """Mean training wall seconds per optimiser step."""

    @property
    def relative(self) -> float:
        """(correlation - dot) / dot of the last-evaluations mean: < 0 is better."""
        return self.last_mean["correlation"] / self.last_mean["dot"] - 1

    @property
    def word(self) -> str:
        if abs(self.relative) < EQUAL_WITHIN:
            return "equal"
        return "better" if self.relative < 0 else "worse"

    def sentence(self) -> str:
        diff = self.last_mean["correlation"] - self.last_mean["dot"]
        final_diff = self.final["correlation"] - self.final["dot"]
        cost = self.seconds_per_step["correlation"] / self.seconds_per_step["dot"]
        return (
            f"Correlation attention is <b>{self.word}</b>: its validation bpc averaged over "
            f"the last {LAST_EVALS} evaluations is {self.last_mean['correlation']:.4f} against "
            f"{self.last_mean['dot']:.4f} for dot-product attention ({diff:+.4f} bits per "
            f"character, {100 * self.relative:+.2f} %; 'equal' means within "
            f"{100 * EQUAL_WITHIN:.0f} %). At the last evaluation: "
            f"{self.final['correlation']:.4f} against {self.final['dot']:.4f} "
            f"({final_diff:+.4f}). A training step costs "
            f"{1000 * self.seconds_per_step['correlation']:.0f} ms against "
            f"{1000 * self.seconds_per_step['dot']:.0f} ms ({cost:.2f}x)."
        )


def verdict_from_curves(curves: Any) -> Verdict:
    """The verdict from curve rows ``attention, step, split, metric, value`` (Polars)."""
    import polars as pl

    val = curves.filter((pl.col("split") == "validation") & (pl.col("metric") == "bpc"))
    wall = curves.filter(pl.col("metric") == "wall_s_per_step")
    final, last_mean, seconds = {}, {}, {}
    for kind in ("dot", "correlation"):
        bpc = val.filter(pl.col("attention") == kind).sort("step")["value"].to_list()
        if not bpc:
            raise ValueError(f"no validation bpc for the {kind} model")
        final[kind] = bpc[-1]
        last_mean[kind] = sum(bpc[-LAST_EVALS:]) / len(bpc[-LAST_EVALS:])
        steps = wall.filter(pl.col("attention") == kind)["value"].to_list()
        seconds[kind] = sum(steps) / len(steps) if steps else math.nan
    return Verdict(final, last_mean, seconds)


def write_report(store: str, sweep_id: str, out: Path) -> None:
    """Write the study's page to ``out`` (an ``.html`` file; its folder is created)."""
    out = Path(out)
    # a sweep stores each point's tool results as a variant of its run: read them all
    # and pick each point's own through sweep_runs.variants
    with Store(store, variants=True) as db:
        runs = _runs(db, sweep_id)
        frames = {name: db.sql(query(sweep_id)) for name, query in _QUERIES.items()}
        checkpoint = db.sql(
            "SELECT json_extract_string(manifest, '$.config.model.checkpoint') AS path "
            f"FROM runs WHERE run_id = {sql_text(runs['correlation'])}"
        )["path"][0]
    lags = lag_weights(checkpoint)
    verdict = verdict_from_curves(frames["curves"])
    charts = _charts(frames)
    if lags is not None:
        charts.append(("Learned lag weights of the correlation model", _lag_chart(lags)))
    intro = _intro(verdict, frames, runs) + _lag_note(lags)
    title = "Leviathan: correlation attention against dot-product attention"
    written = write_html(charts, out.parent, title=title, intro_html=intro, png=False)
    if written.html != out:
        written.html.replace(out)
    log.info("wrote the Leviathan report %s", out)


def _points(sweep_id: str) -> str:
    """SQL CTE ``points``: each completed point's attention kind, run and tool variants."""
    return points_sql(sweep_id, ATTENTION_PARAM, "attention")


def _results(tool: str, view: str, columns: str, sweep_id: str, where: str = "") -> str:
    """The rows of a point's own call of ``tool`` in ``view``, with its attention kind."""
    return point_results_sql(sweep_id, ATTENTION_PARAM, "attention", tool, view, columns, where)


def _runs(db: Store, sweep_id: str) -> dict[str, str]:
    """``{attention kind: run id}`` of the study's completed points."""
    rows = db.sql(f"{_points(sweep_id)}SELECT attention, run_id FROM points").rows(named=True)
    runs = {r["attention"]: r["run_id"] for r in rows}
    missing = {"dot", "correlation"} - set(runs)
    if missing:
        raise ValueError(f"sweep {sweep_id}: no completed run for {', '.join(sorted(missing))}")
    return runs


def _curves(sweep_id: str) -> str:
    return _results(
        "training_curves",
        "results_training_curves",
        "r.step, r.split, r.metric, r.value",
        sweep_id,
        "ORDER BY 1, 2",
    )


def _logit_lens(sweep_id: str) -> str:
    # bits per character of each layer's read-out; the last layer is the model's own
    return _results(
        "logit_lens",
        "results_logit_lens",
        "r.layer, avg(-log2(greatest(r.target_prob, 1e-30))) AS bpc, count(*) AS n_chars",
        sweep_id,
        "WHERE r.target_prob IS NOT NULL GROUP BY ALL ORDER BY 1, 2",
    )


def _residual(sweep_id: str) -> str:
    return _results(
        "residual_tools",
        "results_residual_layers",
        "r.layer, r.norm_mean, r.movement_mean",
        sweep_id,
        "ORDER BY 1, 2",
    )


def _heads(sweep_id: str) -> str:
    return _results(
        "attention_tools",
        "results_attention_head_scores",
        "r.layer, r.head, r.entropy, r.prev_token_score, r.duplicate_token_score",
        sweep_id,
        "ORDER BY 1, 2, 3",
    )


def _patterns(sweep_id: str) -> str:
    # the first window of each run (same data, same packing: the same characters)
    return (
        f"{_points(sweep_id)}, first AS (SELECT a.run_id, min(a.seq_id) AS seq "
        "FROM act_attn_pattern a JOIN points USING (run_id) GROUP BY ALL) "
        "SELECT p.attention, 'L' || a.layer || ' H' || a.head AS head, a.q_pos, a.k_pos, "
        "round(a.weight, 4) AS weight FROM act_attn_pattern a JOIN points p USING (run_id) "
        "JOIN first f ON a.run_id = f.run_id AND a.seq_id = f.seq "
        f"WHERE a.q_pos < {PATTERN_POSITIONS} ORDER BY 1, 2, 3, 4"
    )


def lag_weights(checkpoint: str | None):
    """Rows ``layer, head, lag, weight`` of a correlation checkpoint (None if unreadable)."""
    import polars as pl

    if not checkpoint or not Path(checkpoint).is_file():
        return None
    from safetensors.torch import load_file

    rows = []
    for name, w in load_file(checkpoint).items():
        if not name.endswith("attn.lag_weights"):
            continue
        layer, max_lag = int(name.split(".")[1]), (w.shape[1] - 1) // 2
        for head in range(w.shape[0]):
            for i in range(w.shape[1]):
                rows.append(dict(layer=layer, head=head, lag=i - max_lag, weight=float(w[head, i])))
    return pl.DataFrame(rows) if rows else None


def _lag_chart(lags):
    import altair as alt

    return (
        alt.Chart(lags.to_pandas())
        .mark_rect()
        .encode(
            x=alt.X("lag:O", title="lag l (key dimension minus query dimension, within a head)"),
            y=alt.Y("head:O"),
            color=alt.Color("weight:Q", scale=alt.Scale(scheme="redblue", domainMid=0)),
            column=alt.Column("layer:O", title="layer"),
            tooltip=["layer", "head", "lag", "weight"],
        )
        .properties(width=240, height=120)
    )


def _lag_note(lags) -> str:
    if lags is None:
        return "<p>The correlation checkpoint is not readable here: no lag weights shown.</p>"
    import polars as pl

    total = lags["weight"].abs().sum()
    at_zero = lags.filter(pl.col("lag") == 0)["weight"]
    return (
        f"<p>Learned lags: {100 * at_zero.abs().sum() / total:.0f} % of the lag weights' "
        f"absolute mass sits at lag 0, whose weight (a per-head inverse temperature) ranges "
        f"{at_zero.min():.2f} to {at_zero.max():.2f}; the largest off-zero lag weight is "
        f"{lags.filter(pl.col('lag') != 0)['weight'].abs().max():.3f}. The lag weights "
        "start at lag 0 only (weight 1), which is dot-product attention.</p>"
    )


_QUERIES = {
    "curves": _curves,
    "logit_lens": _logit_lens,
    "residual": _residual,
    "heads": _heads,
    "patterns": _patterns,
}


def _charts(frames: dict[str, Any]) -> list[tuple[str, Any]]:
    import altair as alt
    import polars as pl

    curves = frames["curves"]
    val = curves.filter(pl.col("split") == "validation").to_pandas()
    wall = curves.filter(pl.col("metric") == "wall_s_per_step").to_pandas()
    color = alt.Color("attention:N", scale=alt.Scale(domain=["dot", "correlation"]))

    def curve(metric: str, title: str):
        data = val[val["metric"] == metric]
        return (
            alt.Chart(data)
            .mark_line(point=True)
            .encode(
                x=alt.X("step:Q", title="training step"),
                y=alt.Y("value:Q", title=title, scale=alt.Scale(zero=False)),
                color=color,
                tooltip=["attention", "step", "value"],
            )
            .properties(width=520, height=260)
        )

    heads = frames["heads"].to_pandas()
    head_long = heads.melt(
        id_vars=["attention", "layer", "head"],
        value_vars=["entropy", "prev_token_score", "duplicate_token_score"],
    )
    patterns = frames["patterns"].to_pandas()
    return [
        ("Validation bits per character", curve("bpc", "validation bpc")),
        ("Validation loss (nats per character)", curve("loss", "validation loss")),
        (
            "Training wall seconds per step",
            alt.Chart(wall)
            .mark_line(point=True)
            .encode(
                x="step:Q",
                y=alt.Y("value:Q", title="seconds per step"),
                color=color,
                tooltip=["attention", "step", "value"],
            )
            .properties(width=520, height=200),
        ),
        (
            "Harvest: bits per character on the validation excerpt, per layer (logit lens)",
            alt.Chart(frames["logit_lens"].to_pandas())
            .mark_line(point=True)
            .encode(
                x="layer:O",
                y=alt.Y("bpc:Q", scale=alt.Scale(zero=False)),
                color=color,
                tooltip=["attention", "layer", "bpc", "n_chars"],
            )
            .properties(width=360, height=220),
        ),
        (
            "Harvest: residual stream norm per layer",
            alt.Chart(frames["residual"].to_pandas())
            .mark_line(point=True)
            .encode(
                x="layer:O",
                y="norm_mean:Q",
                color=color,
                tooltip=["attention", "layer", "norm_mean", "movement_mean"],
            )
            .properties(width=360, height=220),
        ),
        (
            "Harvest: attention head scores",
            alt.Chart(head_long)
            .mark_bar()
            .encode(
                x=alt.X("attention:N", title=None),
                y="value:Q",
                color=color,
                column=alt.Column("variable:N", title=None),
                row=alt.Row("layer:O"),
                xOffset="head:N",
                tooltip=["attention", "layer", "head", "variable", "value"],
            )
            .properties(width=160, height=120),
        ),
        (
            f"Attention patterns of one window (first {PATTERN_POSITIONS} positions), side by side",
            alt.Chart(patterns)
            .mark_rect()
            .encode(
                x=alt.X("k_pos:O", title="key position", axis=None),
                y=alt.Y("q_pos:O", title="query position", axis=None),
                color=alt.Color("weight:Q", scale=alt.Scale(scheme="blues")),
                column=alt.Column("attention:N", sort=["dot", "correlation"], title=None),
                row=alt.Row("head:N", title=None),
                tooltip=["attention", "head", "q_pos", "k_pos", "weight"],
            )
            .properties(width=200, height=200),
        ),
    ]


def _intro(verdict: Verdict, frames: dict[str, Any], runs: dict[str, str]) -> str:
    import polars as pl

    lens = frames["logit_lens"]
    last = lens.filter(pl.col("layer") == lens["layer"].max())
    excerpt = {r["attention"]: (r["bpc"], r["n_chars"]) for r in last.rows(named=True)}
    rows = "".join(
        f"<tr><td>{k}</td><td><code>{html.escape(runs[k])}</code></td>"
        f"<td>{verdict.final[k]:.4f}</td><td>{verdict.last_mean[k]:.4f}</td>"
        f"<td>{excerpt.get(k, (math.nan, 0))[0]:.4f}</td>"
        f"<td>{1000 * verdict.seconds_per_step[k]:.1f}</td></tr>"
        for k in ("dot", "correlation")
    )
    n_chars = max((n for _, n in excerpt.values()), default=0)
    return (
        "<p>The Leviathan model scores a query against a key by a learned, lag-weighted "
        "cross-correlation along the head dimension (<code>arrakis_ray/studies/leviathan/"
        "attention.py</code>); its twin uses the scaled dot product. Both are 2-layer "
        "character LMs trained on Shakespeare with the same tokenizer, initial weights, "
        "batches, steps and seed; their parameter counts differ only by the lag weights.</p>"
        f"<p>{verdict.sentence()}</p>"
        "<table><tr><th>attention</th><th>run</th><th>final val bpc</th>"
        f"<th>mean of last {LAST_EVALS}</th><th>excerpt bpc ({n_chars} chars, harvest)</th>"
        f"<th>ms per step</th></tr>{rows}</table>"
        "<p>Note: the lags only mix each key along the head dimension (a banded Toeplitz "
        "matrix per head), and <code>T<sup>T</sup> W_K</code> is itself a linear map, so "
        "correlation attention can represent nothing dot-product attention cannot; any difference "
        "comes from the parametrisation, that is from optimisation.</p>"
    )
