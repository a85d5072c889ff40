"""The grokking study's page: Nanda et al. (2023) retraced on the shipped checkpoints.

``write_report(store, sweep_id, out)`` is the study's ``report:`` function
(``pipelines/studies/grokking.yaml``: one run per checkpoint). Everything comes from the
store through SQL:

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

log = logging.getLogger(__name__)

CHECKPOINT = '"model.checkpoint"'  # the params field the study sweeps
N_COMPONENTS = 8  # principal components analysed for their frequencies (as the seed)
N_HEATMAP = 20  # principal components in the heatmap (the rest look like noise)


def write_report(store: str, sweep_id: str, out: Path) -> None:
    """Write the study's page to ``out`` (an ``.html`` file; its folder is created)."""
    out = Path(out)
    with Store(store) as db:  # a sweep records its tool calls as variants
        runs = study_runs(db, sweep_id)
        final = runs[max(runs)]
        frames = {name: query(db, final) for name, query in _FINAL_QUERIES.items()}
        frames["checkpoints"] = _per_checkpoint(db, runs)
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
        f"SELECT params.{CHECKPOINT} AS checkpoint, run_id FROM sweep_runs "
        f"WHERE sweep_id = {sql_text(sweep_id)} AND status IN ('complete', 'skipped')"
    ).rows(named=True)
    runs = {}
    for row in rows:
        match = re.search(r"epoch_(\d+)", str(row["checkpoint"]))
        if match:
            runs[int(match.group(1))] = row["run_id"]
    if not runs:
        raise ValueError(f"sweep {sweep_id}: no completed run of an epoch_NNNNN checkpoint")
    return dict(sorted(runs.items()))


def _select(table: str, columns: str, order: str, rounded: bool = True, where: str = "true"):
    def query(db: Store, run_id: str):
        frame = db.sql(
            f"SELECT {columns} FROM results_{table} "
            f"WHERE run_id = {sql_text(run_id)} AND {where} ORDER BY {order}"
        ).to_pandas()
        return gc.compact(frame) if rounded else frame

    return query


_FINAL_QUERIES = {
    "curves": _select(
        "training_curves", "step, split, metric, value", "split, metric, step", rounded=False
    ),
    "embed": _select(
        "fourier_embedding",
        "frequency, norm_sq, fraction, rank, cumulative_fraction, in_top_k",
        "frequency",
    ),
    "embed_matrix": _select(
        "fourier_embedding_matrix", "component, label, dim, value", "component, dim"
    ),
    "svd": _select("embedding_svd", "component, singular_value, token, value", "component, token"),
    "attention": _select("attention_to_equals", "head, a, b, weight", "head, a, b"),
    "neurons": _select("fourier_neurons", "neuron, frequency, fraction, explained", "neuron"),
    "grid": _select("fourier_neuron_grid", "neuron, a, b, activation", "neuron, a, b"),
    "spectrum": _select(
        "fourier_neuron_spectrum",
        "a_component, b_component, value",
        "a_component, b_component",
        where="neuron = 0",
    ),
}


def _per_checkpoint(db: Store, runs: dict[int, str]):
    """Every checkpoint's measures: progress_measures, top-5 share, neurons explained."""
    import pandas as pd

    cases = " ".join(f"WHEN {sql_text(r)} THEN {e}" for e, r in runs.items())
    ids = ", ".join(sql_text(r) for r in runs.values())
    epoch = f"CASE run_id {cases} END AS epoch"
    parts = [
        db.sql(
            f"SELECT {epoch}, metric, value FROM results_progress_measures WHERE run_id IN ({ids})"
        ),
        db.sql(
            f"SELECT {epoch}, 'neurons_explained' AS metric, avg(explained::DOUBLE) AS value "
            f"FROM results_fourier_neurons WHERE run_id IN ({ids}) GROUP BY ALL"
        ),
    ]
    return pd.concat([p.to_pandas() for p in parts]).sort_values(["metric", "epoch"])


def _first(curves: Any, split: str, metric: str, at_least: float) -> int | None:
    rows = curves[
        (curves["split"] == split) & (curves["metric"] == metric) & (curves["value"] >= at_least)
    ]
    return int(rows["step"].min()) if len(rows) else None


def phase_epochs(curves: Any) -> list[tuple[str, float, float]]:
    """``(phase, start, end)`` epochs of memorisation, circuit formation and cleanup.

    Memorisation ends when the train accuracy first reaches 100 %; circuit formation when
    the test loss, past its peak, has fallen to half of it; cleanup when the test
    accuracy first reaches 99 %.
    """
    last = float(curves["step"].max())
    memorised = _first(curves, "train", "accuracy", 1.0) or 0
    grokked = _first(curves, "test", "accuracy", 0.99) or int(last)
    test = curves[(curves["split"] == "test") & (curves["metric"] == "loss")].sort_values("step")
    after = test[test["step"] >= memorised]
    falling = int(grokked)
    if len(after):
        peak = after.loc[after["value"].idxmax()]
        half = after[(after["step"] > peak["step"]) & (after["value"] <= peak["value"] / 2)]
        falling = int(half["step"].iloc[0]) if len(half) else falling
    falling = min(max(falling, memorised), grokked)
    return [
        ("1 memorisation", 0.0, float(memorised)),
        ("2 circuit formation", float(memorised), float(falling)),
        ("3 cleanup", float(falling), float(grokked)),
        ("4 generalised", float(grokked), last),
    ]


def rise_and_fall(curves: Any) -> tuple[int | None, int | None]:
    """Epochs at which, after memorisation, the excluded loss first doubles its value at
    memorisation, and the test loss first falls below 1 nat (chance: log 113 = 4.7)."""
    memorised = _first(curves, "train", "accuracy", 1.0)
    if memorised is None:
        return None, None
    excluded = curves[(curves["split"] == "progress") & (curves["metric"] == "excluded_loss")]
    excluded = excluded[excluded["step"] >= memorised].sort_values("step")
    test = curves[(curves["split"] == "test") & (curves["metric"] == "loss")]
    test = test[test["step"] > memorised].sort_values("step")
    rose = (
        excluded[excluded["value"] > 2 * excluded["value"].iloc[0]] if len(excluded) else excluded
    )
    fell = test[test["value"] < 1.0]
    return (
        int(rose["step"].iloc[0]) if len(rose) else None,
        int(fell["step"].iloc[0]) if len(fell) else None,
    )


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


def _intro(frames: dict[str, Any], phases, runs: dict[int, str]) -> str:
    checkpoints = frames["checkpoints"]
    final_epoch = max(runs)
    at_end = checkpoints[checkpoints["epoch"] == final_epoch]
    value = dict(zip(at_end["metric"], at_end["value"], strict=False))
    keys = sorted(int(v) for v in at_end[at_end["metric"] == "key_frequency"]["value"])
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
        f"<li>Key frequencies (the neurons' clusters): <b>{', '.join(map(str, keys))}</b>; "
        f"{100 * value.get('neurons_explained', float('nan')):.0f} % of the neurons are "
        "explained by one frequency.</li>"
        f"<li>At the end the restricted loss is {value.get('restricted_loss', float('nan')):.3g} "
        f"and the excluded loss {value.get('excluded_loss', float('nan')):.3g}.</li>"
        f"<li>The excluded loss doubles (from its value at memorisation) at epoch {rose}, "
        f"before the test loss falls below 1 nat at epoch {fell}.</li>"
        f"<li>Phases (epochs): {html.escape(boundaries)}.</li></ul>"
    )
