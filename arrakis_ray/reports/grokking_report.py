"""The grokking study's page: Nanda et al. (2023) retraced on the shipped checkpoints.

``write_report(store, sweep_id, out)`` is the study's ``report:`` function
(``pipelines/studies/grokking.yaml``: one run per checkpoint). Everything comes from the
store through SQL, each point's rows from its own call of each tool (a store may hold
other calls of a tool on the same run, as variants: ``sweeps.study.point_results_sql``):

- ``sweep_runs``: the study's runs and the checkpoint each loaded (its epoch is in the
  file name, ``epoch_NNNNN.safetensors``); the last epoch is "the final model";
- ``results_training_curves``: train/test loss and accuracy per epoch and the progress
  measures every 100 epochs, as recorded while training (final run);
- ``results_fourier_embedding``, ``results_fourier_embedding_matrix``,
  ``results_embedding_svd``: W_E in the Fourier basis and its principal components;
- ``results_attention_to_equals``: attention from ``=`` to ``a`` per head over (a, b);
- ``results_fourier_neurons``, ``results_fourier_neuron_grid``,
  ``results_fourier_neuron_spectrum``: the neurons over (a, b) and in the 2D Fourier basis;
- ``results_progress_measures``: the measures of every checkpoint.

The key frequencies the page states are measured: those the final model's neurons
cluster on (``results_fourier_neurons``); the page says so when progress_measures used
others (its ``key_frequencies`` parameter).

The phases: memorisation until the train accuracy first reaches 100 %; circuit
formation until the test loss, past its peak, has fallen to half of it; cleanup until
the test accuracy first reaches 99 %.
"""

from __future__ import annotations

import html
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from arrakis_ray.reports import grokking_charts as gc
from arrakis_ray.reports.html import write_report as write_html
from arrakis_ray.reports.site_pages import sql_text
from arrakis_ray.store.catalog import Store
from arrakis_ray.studies.grokking.phases import phase_epochs, rise_and_fall
from arrakis_ray.sweeps.study import point_results_sql, points_sql

log = logging.getLogger(__name__)

PARAM = "model.checkpoint"  # the parameter the study sweeps
N_COMPONENTS = 8  # principal components analysed for their frequencies (as the seed)
N_HEATMAP = 20  # principal components in the heatmap (the rest look like noise)


def write_report(store: str, sweep_id: str, out: Path) -> None:
    """Write the study's page to ``out`` (an ``.html`` file; its folder is created)."""
    out = Path(out)
    with Store(store) as db:
        runs = study_runs(db, sweep_id)
        final = runs[max(runs)]
        frames = {name: query(db, sweep_id, final) for name, query in _FINAL_QUERIES.items()}
        frames["checkpoints"] = _per_checkpoint(db, sweep_id, runs)
    curves = frames["curves"]
    phases = phase_epochs(curves)
    charts = _charts(frames, phases)
    intro = _intro(frames, phases, runs)
    written = write_html(
        charts, out.parent, title="Grokking modular addition", intro_html=intro, png=False
    )
    if written.html != out:
        written.html.replace(out)
    log.info("wrote the grokking report %s", out)


def study_runs(db: Store, sweep_id: str) -> dict[int, str]:
    """``{epoch: run id}`` of the study's completed points (epoch from the checkpoint name)."""
    rows = db.sql(
        f"{points_sql(sweep_id, PARAM, 'checkpoint')}SELECT checkpoint, run_id FROM points"
    ).rows(named=True)
    runs = {}
    for row in rows:
        match = re.search(r"epoch_(\d+)", str(row["checkpoint"]))
        if match:
            runs[int(match.group(1))] = row["run_id"]
    if not runs:
        raise ValueError(f"sweep {sweep_id}: no completed run of an epoch_NNNNN checkpoint")
    return dict(sorted(runs.items()))


def _select(
    tool: str, table: str, columns: str, order: str, rounded: bool = True, where: str = "true"
):
    """A query of one results table for one run: only the rows of the run's own call of
    ``tool`` in the sweep (a store may hold other calls of it, as other variants)."""

    def query(db: Store, sweep_id: str, run_id: str):
        sql = point_results_sql(
            sweep_id,
            PARAM,
            "checkpoint",
            tool,
            f"results_{table}",
            ", ".join(f"r.{c.strip()}" for c in columns.split(",")),
            where=f"WHERE r.run_id = {sql_text(run_id)} AND {where} ORDER BY {order}",
        )
        frame = db.sql(sql).to_pandas().drop(columns="checkpoint")
        return gc.compact(frame) if rounded else frame

    return query


_FINAL_QUERIES = {
    "curves": _select(
        "training_curves",
        "training_curves",
        "step, split, metric, value",
        "split, metric, step",
        rounded=False,
    ),
    "embed": _select(
        "fourier_embedding",
        "fourier_embedding",
        "frequency, norm_sq, fraction, rank, cumulative_fraction, in_top_k",
        "frequency",
    ),
    "embed_matrix": _select(
        "fourier_embedding",
        "fourier_embedding_matrix",
        "component, label, dim, value",
        "component, dim",
    ),
    "svd": _select(
        "fourier_embedding",
        "embedding_svd",
        "component, singular_value, token, value",
        "component, token",
    ),
    "attention": _select(
        "attention_to_equals", "attention_to_equals", "head, a, b, weight", "head, a, b"
    ),
    "neurons": _select(
        "fourier_neurons",
        "fourier_neurons",
        "neuron, frequency, fraction, explained",
        "neuron",
    ),
    "grid": _select(
        "fourier_neurons", "fourier_neuron_grid", "neuron, a, b, activation", "neuron, a, b"
    ),
    "spectrum": _select(
        "fourier_neurons",
        "fourier_neuron_spectrum",
        "a_component, b_component, value",
        "a_component, b_component",
        where="r.neuron = 0",
    ),
}


def _per_checkpoint(db: Store, sweep_id: str, runs: dict[int, str]):
    """Every checkpoint's measures: progress_measures, and the share of neurons explained
    by one frequency (fourier_neurons), each from the point's own call of the tool."""
    import pandas as pd

    parts = [
        point_results_sql(
            sweep_id,
            PARAM,
            "checkpoint",
            "progress_measures",
            "results_progress_measures",
            "r.run_id, r.metric, r.value",
        ),
        point_results_sql(
            sweep_id,
            PARAM,
            "checkpoint",
            "fourier_neurons",
            "results_fourier_neurons",
            "r.run_id, 'neurons_explained' AS metric, avg(r.explained::DOUBLE) AS value",
            where="GROUP BY ALL",
        ),
    ]
    frame = pd.concat([db.sql(q).to_pandas() for q in parts])
    epoch_of = {run: epoch for epoch, run in runs.items()}
    frame = frame[frame["run_id"].isin(epoch_of)]
    frame.insert(0, "epoch", frame["run_id"].map(epoch_of))
    return frame[["epoch", "metric", "value"]].sort_values(["metric", "epoch"])


def _charts(frames: dict[str, Any], phases) -> list[tuple[str, Any]]:
    import altair as alt
    import pandas as pd

    from arrakis_ray.studies.grokking import fourier

    curves = frames["curves"]
    svd = frames["svd"]
    singular = svd.drop_duplicates("component")[["component", "singular_value"]]
    pcs = svd[svd["component"] < N_COMPONENTS]
    # the frequencies of each principal component over the tokens (numpy FFT: |X_k|^2)
    p = int(svd["token"].max()) + 1
    freq_rows = []
    for comp, group in pcs.groupby("component"):
        power = np.abs(np.fft.rfft(group.sort_values("token")["value"].to_numpy())) ** 2
        freq_rows += [(comp, k, power[k]) for k in range(1, (p - 1) // 2 + 1)]
    pc_freqs = pd.DataFrame(freq_rows, columns=["component", "frequency", "power"])
    basis, labels = fourier.fourier_basis(p)
    comp, x = np.divmod(np.arange(p * p), p)
    basis_frame = pd.DataFrame({"component": comp, "x": x, "value": basis.reshape(-1)})
    label_sort = list(dict.fromkeys(frames["embed_matrix"].sort_values("component")["label"]))
    attention = frames["attention"]
    grid = frames["grid"]
    spectrum = frames["spectrum"]
    return [
        (
            "Train and test loss (log scale) with the phases",
            gc.loss_curves(curves, phases, "loss", True),
        ),
        ("Train and test accuracy", gc.loss_curves(curves, phases, "accuracy", False)),
        (
            f"Principal components of W_E: the first {N_COMPONENTS} over the number tokens",
            gc.lines_by(
                pcs,
                "token",
                "value",
                "component",
                title_x="token",
                title_y="U[token, c]",
                columns=4,
            ),
        ),
        (
            f"Principal components of W_E: the first {N_HEATMAP} over the tokens",
            gc.heatmap(
                svd[svd["component"] < N_HEATMAP],
                "component",
                "token",
                "value",
                title_x="component",
                title_y="token",
            ).properties(width=300, height=400),
        ),
        (
            "Singular values of W_E",
            alt.Chart(singular)
            .mark_line(point=True)
            .encode(x="component:Q", y="singular_value:Q", tooltip=["component", "singular_value"])
            .properties(width=640, height=220),
        ),
        (
            f"Key frequencies: power spectrum (numpy FFT) of the first {N_COMPONENTS} "
            "principal components",
            gc.heatmap(
                pc_freqs,
                "frequency",
                "component",
                "power",
                title_x="frequency",
                title_y="component",
                scheme="blues",
                size=None,
            ).properties(width=640, height=160),
        ),
        (
            "Key frequencies: share of |W_E|^2 per frequency (top 5 coloured)",
            gc.bar(
                frames["embed"],
                "frequency",
                "fraction",
                color="in_top_k",
                title_y="share of |W_E|^2",
            ),
        ),
        (
            "The Fourier basis (rows: const, cos 1, sin 1, ...)",
            gc.heatmap(basis_frame, "x", "component", "value", title_x="x", title_y="component"),
        ),
        (
            "W_E in the Fourier basis (B @ W_E)",
            gc.heatmap(
                frames["embed_matrix"],
                "dim",
                "label",
                "value",
                title_x="residual dimension",
                title_y="Fourier component",
                sort_y=label_sort,
                size=None,
            ).properties(width=520, height=560),
        ),
        (
            "Attention from '=' to a, per head, over (a, b)",
            alt.concat(
                *[
                    gc.heatmap(
                        attention[attention["head"] == h],
                        "b",
                        "a",
                        "weight",
                        title_x="b",
                        title_y="a",
                        scheme="viridis",
                        size=220,
                    ).properties(title=f"head {h}")
                    for h in sorted(attention["head"].unique())
                ],
                columns=2,
            ),
        ),
        (
            "The first 5 neurons' activations over (a, b)",
            alt.concat(
                *[
                    gc.heatmap(
                        grid[grid["neuron"] == n],
                        "b",
                        "a",
                        "activation",
                        title_x="b",
                        title_y="a",
                        scheme="viridis",
                        size=180,
                    ).properties(title=f"neuron {n}")
                    for n in sorted(grid["neuron"].unique())[:5]
                ],
                columns=3,
            ).resolve_scale(color="independent"),
        ),
        (
            "2D Fourier transform of neuron 0 (rows: components over a, columns: over b; "
            "0 = const, 2k-1 = cos k, 2k = sin k; the const x const term, its mean, left out)",
            gc.heatmap(
                spectrum[(spectrum["a_component"] > 0) | (spectrum["b_component"] > 0)],
                "b_component",
                "a_component",
                "value",
                title_x="component over b",
                title_y="component over a",
                size=420,
            ),
        ),
        ("Progress measures: restricted and excluded loss", gc.progress_curves(curves, phases)),
        (
            "Progress measures: Gini coefficient of the Fourier norms",
            gc.measure_curve(
                curves, {"gini_embed": "W_E", "gini_neuron_logit": "W_U W_out"}, "Gini", phases
            ),
        ),
        (
            "Progress measures: total sum of squared weights",
            gc.measure_curve(
                curves, {"weight_norm_sq": "sum of squared weights"}, "sum of squares", phases
            ),
        ),
        (
            "Per shipped checkpoint (tool progress_measures): excluded loss",
            gc.checkpoint_points(frames["checkpoints"], "excluded_loss", "excluded loss"),
        ),
        (
            "Per shipped checkpoint (tool fourier_neurons): share of neurons explained by "
            "one frequency",
            gc.checkpoint_points(frames["checkpoints"], "neurons_explained", "share of neurons"),
        ),
    ]


def measured_key_frequencies(neurons: Any) -> list[int]:
    """The final model's key frequencies as measured: the frequencies its neurons cluster
    on, from ``results_fourier_neurons`` (each neuron's dominant frequency and whether
    one frequency explains it), by the rule of ``fourier.key_frequencies``."""
    from arrakis_ray.studies.grokking import fourier

    return fourier.cluster_frequencies(
        neurons["frequency"].to_numpy(), neurons["explained"].to_numpy(dtype=bool)
    )


def _key_frequencies_item(neurons: Any, used: list[int], value: dict[str, float]) -> str:
    """The list item on the key frequencies: measured on the final model's neurons, and
    whether progress_measures (a study parameter) used the same ones."""
    keys = measured_key_frequencies(neurons)
    same = (
        "the progress measures use the same ones"
        if keys == used
        else f"<b>the progress measures used others</b>: {', '.join(map(str, used)) or 'none'} "
        "(the study's progress_measures key_frequencies)"
    )
    return (
        "<li>Key frequencies, measured on the final model (the frequencies its neurons "
        f"cluster on, tool fourier_neurons): <b>{', '.join(map(str, keys)) or 'none'}</b>; "
        f"{100 * value.get('neurons_explained', float('nan')):.0f} % of the neurons are "
        f"explained by one frequency; {same}.</li>"
    )


def _intro(frames: dict[str, Any], phases, runs: dict[int, str]) -> str:
    checkpoints = frames["checkpoints"]
    final_epoch = max(runs)
    at_end = checkpoints[checkpoints["epoch"] == final_epoch]
    value = dict(zip(at_end["metric"], at_end["value"], strict=False))
    used = sorted(int(v) for v in at_end[at_end["metric"] == "key_frequency"]["value"])
    embed = frames["embed"]
    top5 = float(embed[embed["rank"] == 5]["cumulative_fraction"].iloc[0])
    top = ", ".join(str(int(f)) for f in embed.sort_values("rank")["frequency"][:5])
    rose, fell = rise_and_fall(frames["curves"])
    boundaries = "; ".join(f"{name[2:]} {int(a):,}-{int(b):,}" for name, a, b in phases)
    return (
        "<p>A one-layer transformer (d_model 128, 4 heads, 512 ReLU neurons, no LayerNorm) "
        "trained on 30 % of the pairs of <i>a + b mod 113</i> memorises the training set "
        "early and generalises much later (Nanda et al. 2023). The study harvests every "
        "shipped checkpoint on all 113<sup>2</sup> inputs and analyses it with the Fourier "
        "tools.</p><ul>"
        f"<li>Final checkpoint (epoch {final_epoch:,}): test accuracy "
        f"<b>{100 * value.get('test_accuracy', float('nan')):.2f} %</b>, train accuracy "
        f"{100 * value.get('train_accuracy', float('nan')):.2f} %.</li>"
        f"<li>The top 5 frequencies of W_E ({html.escape(top)}) hold <b>{100 * top5:.1f} %</b> "
        "of its norm<sup>2</sup>.</li>"
        f"{_key_frequencies_item(frames['neurons'], used, value)}"
        f"<li>At the end the restricted loss is {value.get('restricted_loss', float('nan')):.3g} "
        f"and the excluded loss {value.get('excluded_loss', float('nan')):.3g}.</li>"
        f"<li>The excluded loss doubles (from its value at memorisation) at epoch {rose}, "
        f"before the test loss falls below 1 nat at epoch {fell}.</li>"
        f"<li>Phases (epochs): {html.escape(boundaries)}.</li></ul>"
    )
