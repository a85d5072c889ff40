"""The catalog's SQL macros, checked against numpy over the Parquet files themselves."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import family_table, reinventory

from arrakis_ray.errors import QueryError
from arrakis_ray.store.catalog import Store
from arrakis_ray.store.layout import RunLayout
from arrakis_ray.store.manifest import read_manifest, write_manifest
from arrakis_ray.store.parquet import write_table
from arrakis_ray.store.schemas import vocab_schema

from .storedata import N_LAYERS, N_POS, N_SEQ, WIDTH, RunData, _write_dense, build_run

ELLIPSIS = "…"


def _dense_rows(store: Path, run_ids: list[str], family: str = "resid_post") -> list[dict]:
    """Every stored row of a family, read through RunReader (blocks joined again)."""
    rows = []
    for run_id in run_ids:
        table = family_table(RunLayout(store, run_id).root, family)
        dims = [c for c in table.column_names if re.fullmatch(r"d\d+", c)]
        values = np.column_stack([table[c].to_numpy().astype(np.float32) for c in dims])
        for i, key in enumerate(table.select(["run_id", "layer", "seq_id", "pos"]).to_pylist()):
            rows.append({**key, "vec": values[i]})
    return rows


def _token_texts(store: Path, run_id: str) -> dict[tuple[int, int], str]:
    table = pq.read_table(RunLayout(store, run_id).tokens_dir)
    return {
        (r["seq_id"], r["pos"]): r["token_text"]
        for r in table.select(["seq_id", "pos", "token_text"]).to_pylist()
    }


def _plan(store: Store, query: str) -> str:
    return "\n".join(store.sql(f"EXPLAIN {query}")["explain_value"].to_list())


def test_top_contexts_matches_numpy_and_reads_one_column(
    two_runs: tuple[Path, dict[str, RunData]],
) -> None:
    store, _runs = two_runs
    rows = _dense_rows(store, ["run-a", "run-b"])
    texts = {r: _token_texts(store, r) for r in ("run-a", "run-b")}
    query = "SELECT * FROM top_contexts('resid_post', 1, 4, 5)"
    with Store(store) as s:
        got = s.sql(query)
        one_run = s.sql("SELECT * FROM top_contexts('resid_post', 0, 2, 3, run_id := 'run-b')")
        plan = _plan(s, query)
    for result, layer, dim, runs, k in (
        (got, 1, 4, ("run-a", "run-b"), 5),
        (one_run, 0, 2, ("run-b",), 3),
    ):
        candidates = [r for r in rows if r["layer"] == layer and r["run_id"] in runs]
        candidates.sort(key=lambda r: (-r["vec"][dim], r["run_id"], r["seq_id"], r["pos"]))
        top = candidates[:k]
        assert result.columns == ["run_id", "seq_id", "pos", "token_text", "activation"]
        assert result.select("run_id", "seq_id", "pos").rows() == [
            (r["run_id"], r["seq_id"], r["pos"]) for r in top
        ]
        assert result["token_text"].to_list() == [
            texts[r["run_id"]][(r["seq_id"], r["pos"])] for r in top
        ]
        np.testing.assert_array_equal(result["activation"].to_numpy(), [r["vec"][dim] for r in top])
    # the activation scan reads the neuron's column and the keys, no other dimension
    assert set(re.findall(r"\bd\d+\b", plan)) == {"d4"}


def test_top_contexts_ties_and_errors(two_runs: tuple[Path, dict[str, RunData]]) -> None:
    store, _runs = two_runs
    # a run whose dimension 0 takes only two values: the order among ties is by key
    build_run(store, "run-t", "float32", seed=3, full=False)
    ties = np.zeros((N_LAYERS, N_SEQ, N_POS, WIDTH), np.float32)
    ties[:, :, ::2, 0] = 1.0
    _write_dense(RunLayout(store, "run-t"), "resid_post", ties, "float32")
    with Store(store) as s:
        got = s.sql("SELECT * FROM top_contexts('resid_post', 0, 0, 4, run_id := 'run-t')")
        assert got.select("seq_id", "pos").rows() == [(0, 0), (0, 2), (0, 4), (1, 0)]
        with pytest.raises(QueryError, match=r"has dimensions 0 \.\. 5, not 99"):
            s.sql("SELECT * FROM top_contexts('resid_post', 0, 99, 4)")
        with pytest.raises(QueryError, match="give one layer"):
            s.sql("SELECT * FROM cosine_topk('resid_post', NULL, [1, 0, 0, 0, 0, 0], 4)")
        with pytest.raises(QueryError, match=r"no activations of family nope .*resid_post"):
            s.sql("SELECT * FROM vectors('nope', 0)")
        with pytest.raises(QueryError, match="act_nope"):
            s.sql("SELECT * FROM top_contexts('nope', 0, 0, 4)")


def test_cosine_topk_matches_numpy_and_skips_other_widths(
    two_runs: tuple[Path, dict[str, RunData]],
) -> None:
    store, _runs = two_runs
    # a run of another width shares the view; its rows must not enter the ranking
    build_run(store, "run-w", "float32", seed=4, full=False)
    wide = np.random.default_rng(5).standard_normal((N_LAYERS, N_SEQ, N_POS, WIDTH + 2))
    layout = RunLayout(store, "run-w")
    _write_dense(layout, "resid_post", wide.astype(np.float32), "float32")
    manifest = read_manifest(layout)
    write_manifest(layout, manifest.with_changes(shape=replace(manifest.shape, d_model=WIDTH + 2)))
    direction = np.random.default_rng(0).standard_normal(WIDTH).astype(np.float32)
    literal = "[" + ", ".join(repr(float(x)) for x in direction) + "]"
    with Store(store) as s:
        got = s.sql(f"SELECT * FROM cosine_topk('resid_post', 1, {literal}, 6)")
        only_b = s.sql(
            f"SELECT * FROM cosine_topk('resid_post', 1, {literal}, 2, run_id := 'run-b')"
        )
        wide_dir = "[" + ", ".join(["1.0"] * (WIDTH + 2)) + "]"
        wide_rows = s.sql(f"SELECT * FROM cosine_topk('resid_post', 0, {wide_dir}, 100)")
        # vectors() needs the width when the runs disagree, and keeps that width's runs
        with pytest.raises(QueryError, match="several widths"):
            s.sql("SELECT * FROM vectors('resid_post', 0)")
        widths = s.sql(
            "SELECT DISTINCT run_id, len(vec) AS n "
            f"FROM vectors('resid_post', 0, width := {WIDTH + 2})"
        )
        assert widths.rows() == [("run-w", WIDTH + 2)]
    rows = [r for r in _dense_rows(store, ["run-a", "run-b"]) if r["layer"] == 1]
    for r in rows:
        v = r["vec"].astype(np.float64)
        r["cos"] = (
            v @ direction / (np.linalg.norm(v) * np.linalg.norm(direction.astype(np.float64)))
        )
    for result, runs, k in ((got, ("run-a", "run-b"), 6), (only_b, ("run-b",), 2)):
        top = sorted((r for r in rows if r["run_id"] in runs), key=lambda r: -r["cos"])[:k]
        assert result.select("run_id", "seq_id", "pos").rows() == [
            (r["run_id"], r["seq_id"], r["pos"]) for r in top
        ]
        np.testing.assert_allclose(result["cosine"].to_numpy(), [r["cos"] for r in top], rtol=1e-5)
    assert set(wide_rows["run_id"]) == {"run-w"} and wide_rows.height == N_SEQ * N_POS


def test_token_across_layers_matches_numpy(two_runs: tuple[Path, dict[str, RunData]]) -> None:
    store, _runs = two_runs
    rows = _dense_rows(store, ["run-a"])
    with Store(store) as s:
        got = s.sql(
            "SELECT * FROM token_across_layers('resid_post', 'run-a', 1, 3, dims := [5, 0])"
        )
        plain = s.sql("SELECT * FROM token_across_layers('resid_post', 'run-b', 2, 0)")
    mine = sorted((r for r in rows if (r["seq_id"], r["pos"]) == (1, 3)), key=lambda r: r["layer"])
    assert got["layer"].to_list() == list(range(N_LAYERS))
    np.testing.assert_allclose(
        got["norm"].to_numpy(),
        [np.linalg.norm(r["vec"].astype(np.float64)) for r in mine],
        rtol=1e-6,
    )
    assert got["dim_values"].to_list() == [[float(r["vec"][5]), float(r["vec"][0])] for r in mine]
    assert plain["layer"].to_list() == list(range(N_LAYERS))
    assert plain["dim_values"].to_list() == [[]] * N_LAYERS


def _window(texts: list[str], pos: int, width: int, sep: str) -> str:
    """The expected context: the window's texts, the centre in brackets, … where cut."""
    lo, hi = max(0, pos - width), min(len(texts) - 1, pos + width)
    words = [f"[{t}]" if i == pos else t for i, t in enumerate(texts) if lo <= i <= hi]
    return (
        (ELLIPSIS + sep if lo > 0 else "")
        + sep.join(words)
        + (sep + ELLIPSIS if hi < len(texts) - 1 else "")
    )


def test_context_window_matches_the_tokens(two_runs: tuple[Path, dict[str, RunData]]) -> None:
    store, _runs = two_runs
    # run-b gets a word-level vocabulary (no token starts with a space): words are spaced
    words = pa.table({"token_id": pa.array([0, 1], pa.int32()), "token_text": ["cat", "dog"]})
    layout = RunLayout(store, "run-b")
    write_table(
        words, layout.vocab_path, schema_name="vocab", schema_version=1, expected=vocab_schema()
    )
    reinventory(layout)
    with Store(store) as s:
        for run_id, sep in (("run-a", ""), ("run-b", " ")):
            texts = _token_texts(store, run_id)
            for seq in range(N_SEQ):
                sequence = [texts[(seq, p)] for p in range(N_POS)]
                for pos in range(N_POS):
                    for width in (0, 1, 3):
                        got = s.sql(
                            f"SELECT * FROM context_window('{run_id}', {seq}, {pos}, {width})"
                        )
                        assert got.rows() == [
                            (run_id, seq, pos, _window(sequence, pos, width, sep))
                        ]
        assert s.sql("SELECT * FROM context_window('run-a', 0, 99, 2)").height == 0


def test_macros_are_listed_and_the_surface_stays_read_only(
    two_runs: tuple[Path, dict[str, RunData]],
) -> None:
    store, _runs = two_runs
    with Store(store) as s:
        assert list(s.macros()) == [
            "context_window",
            "cosine_topk",
            "neuron",
            "token_across_layers",
            "top_contexts",
            "vectors",
        ]
        assert s.macros()["top_contexts"].startswith("top_contexts(family, layer, neuron, k")
        before = s.sql("SELECT * FROM top_contexts('resid_post', 1, 0, 3)")
        for statement in (
            "CREATE MACRO mine(x) AS TABLE SELECT x",
            "CREATE OR REPLACE MACRO top_contexts(family, layer, neuron, k) AS TABLE SELECT 1",
            "CREATE TEMP MACRO twice(x) AS x * 2",
            "DROP MACRO TABLE top_contexts",
            # the cosine macro builds its query as text: query() takes only a SELECT
            "SELECT * FROM query('DROP VIEW tokens')",
        ):
            with pytest.raises(QueryError):
                s.sql(statement)
        assert s.sql("SELECT * FROM top_contexts('resid_post', 1, 0, 3)").equals(before)
        with pytest.raises(QueryError):
            s.sql("SELECT * FROM mine(1)")
