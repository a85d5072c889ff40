"""The column-block layout at LLM-like widths, and stores of the old layout.

Every macro and view is checked at width 4,100 (nine blocks, the last one padded) on a
few rows against numpy on the arrays written; a layout-1 store (one wide file per shard)
is refused with the command that converts it, converted by that command, and then
answers every question as plain DuckDB answered it over the old files.
"""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from runs import write_run

from arrakis_ray.cli import main
from arrakis_ray.errors import StoreError
from arrakis_ray.store.catalog import Store
from arrakis_ray.store.layout import BLOCK_DIMS, STORE_MARKER, RunLayout
from arrakis_ray.store.reader import RunReader

WIDTH = 4100
N_SEQ, N_POS = 6, 5
VOCAB = [f" w{i}" for i in range(16)]


def _activations(seed: int, width: int = WIDTH) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        f"blocks.{layer}.hook_resid_post": rng.standard_normal((N_SEQ, N_POS, width)).astype(
            np.float32
        )
        for layer in range(2)
    }


@pytest.fixture(scope="module")
def wide_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    acts = _activations(0)
    tokens = np.random.default_rng(1).integers(0, len(VOCAB), (N_SEQ, N_POS))
    write_run(root, "wide", tokens, VOCAB, acts, shard_size=2)
    return root, acts, tokens


def _top(values: np.ndarray, k: int) -> list[tuple[int, int]]:
    """(seq, pos) of the k largest values, ties by (seq, pos) as the macros break them."""
    flat = [(-values[s, p], s, p) for s in range(N_SEQ) for p in range(N_POS)]
    return [(s, p) for _v, s, p in sorted(flat)[:k]]


def test_files_are_column_blocks_with_padding(wide_store):
    root, _acts, _tokens = wide_store
    layout = RunLayout(root, "wide")
    block = pq.read_schema(layout.shard_file(layout.block_dir("resid_post", 1, 8), 0))
    dims = [n for n in block.names if n.startswith("d")]
    assert len(dims) == BLOCK_DIMS and len(block.names) == BLOCK_DIMS + 4
    last = pq.read_table(layout.shard_file(layout.block_dir("resid_post", 1, 8), 0))
    real = WIDTH - 8 * BLOCK_DIMS  # 4 real dimensions, the rest padding
    assert last.column(f"d{real - 1}").null_count == 0
    assert last.column(f"d{real}").null_count == last.num_rows


def test_reader_joins_the_blocks(wide_store):
    root, acts, _tokens = wide_store
    reader = RunReader.open("wide", root)
    seq, pos, matrix = reader.matrix("resid_post", 1, 2)
    expected = acts["blocks.1.hook_resid_post"][4:6].reshape(-1, WIDTH)
    assert matrix.shape == (2 * N_POS, WIDTH)
    np.testing.assert_array_equal(matrix, expected)
    table = reader.activations("resid_post", 0, columns=["seq_id", "d4099", "d3"], layer=0)
    assert table.column_names == ["seq_id", "d4099", "d3"]
    np.testing.assert_array_equal(
        table.column("d4099").to_numpy(), acts["blocks.0.hook_resid_post"][0:2, :, 4099].ravel()
    )


def test_every_macro_and_view_at_width_4100(wide_store):
    root, acts, tokens = wide_store
    l1 = acts["blocks.1.hook_resid_post"]
    with Store(root) as s:
        # neuron(): one dimension as rows, at one layer or every layer
        got = s.sql("SELECT * FROM neuron('resid_post', 1, 4097) ORDER BY seq_id, pos")
        np.testing.assert_array_equal(got["value"].to_numpy(), l1[:, :, 4097].ravel())
        means = s.sql(
            "SELECT layer, avg(value) AS m FROM neuron('resid_post', NULL, 1337) "
            "GROUP BY layer ORDER BY layer"
        )
        for layer in (0, 1):
            want = acts[f"blocks.{layer}.hook_resid_post"][:, :, 1337].astype(np.float64).mean()
            assert means["m"][layer] == pytest.approx(want, rel=1e-6)
        # top_contexts(): the k largest with their token text
        top = s.sql("SELECT * FROM top_contexts('resid_post', 1, 1337, 4)")
        want = _top(l1[:, :, 1337], 4)
        assert list(zip(top["seq_id"], top["pos"], strict=True)) == want
        assert list(top["token_text"]) == [VOCAB[tokens[q, p]] for q, p in want]
        # vectors(): the whole vector, FLOAT[width]
        vec = s.sql("SELECT * FROM vectors('resid_post', 0) WHERE seq_id = 3 AND pos = 2")
        np.testing.assert_array_equal(
            np.asarray(vec["vec"][0]), acts["blocks.0.hook_resid_post"][3, 2]
        )
        assert str(vec.schema["vec"]) == f"Array(Float32, shape=({WIDTH},))"
        # cosine_topk(): against a direction
        direction = np.random.default_rng(5).standard_normal(WIDTH)
        cos = s.sql(f"SELECT * FROM cosine_topk('resid_post', 1, {direction.tolist()}, 3)")
        as_text = s.sql(f"SELECT * FROM cosine_topk('resid_post', 1, '{direction.tolist()}', 3)")
        assert as_text.equals(cos)  # the direction as a string: the same answer
        unit = l1 / np.linalg.norm(l1, axis=-1, keepdims=True)
        want_cos = unit @ (direction / np.linalg.norm(direction))
        assert list(zip(cos["seq_id"], cos["pos"], strict=True)) == _top(want_cos, 3)
        np.testing.assert_allclose(cos["cosine"], np.sort(want_cos.ravel())[::-1][:3], rtol=1e-4)
        # token_across_layers(): norms and chosen dimensions per layer
        tal = s.sql(
            "SELECT * FROM token_across_layers('resid_post', 'wide', 2, 4, dims := [0, 4099])"
        )
        for layer in (0, 1):
            v = acts[f"blocks.{layer}.hook_resid_post"][2, 4]
            assert tal["norm"][layer] == pytest.approx(float(np.linalg.norm(v)), rel=1e-5)
            np.testing.assert_array_equal(np.asarray(tal["dim_values"][layer]), v[[0, 4099]])
        # context_window() does not depend on the width: the top token's context
        q, p = want[0]
        window = s.sql(f"SELECT context FROM context_window('wide', {q}, {p}, 1)")
        texts = [VOCAB[t] for t in tokens[q, max(p - 1, 0) : p + 2]]
        assert window["context"][0].replace("[", "").replace("]", "").replace("…", "") == "".join(
            texts
        )
        # the view: dimension i is column d<i % 512> of block i // 512
        raw = s.sql(
            "SELECT seq_id, pos, d5 FROM act_resid_post WHERE layer = 1 AND block = 2 "
            "ORDER BY seq_id, pos"
        )
        np.testing.assert_array_equal(raw["d5"].to_numpy(), l1[:, :, 2 * BLOCK_DIMS + 5].ravel())
        explain = s.sql("EXPLAIN ANALYZE SELECT max(value) FROM neuron('resid_post', 1, 1337)")[
            "explain_value"
        ][0]
        assert "Scanning Files: 3/54" in explain  # the 3 shards of one (layer, block)


def _downgrade_to_layout_1(root) -> None:
    """Rewrite a store as arrakis-ray wrote it before column blocks (store version 1):
    one file per (family, shard) with every layer and dimension."""
    layout = RunLayout(root, "old")
    reader = RunReader.open("old", root)
    for family in reader.families:
        directory = layout.activation_dir(family)
        for shard in reader.shards:
            table = reader.activations(family, shard)
            meta = {b"arrakis.schema": b"activation.dense", b"arrakis.schema_version": b"1"}
            pq.write_table(
                table.replace_schema_metadata(meta), directory / f"shard-{shard:05d}.parquet"
            )
        for path in sorted(directory.glob("layer=*"), reverse=True):
            for f in sorted(path.rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
            path.rmdir()
    (root / STORE_MARKER).write_text(json.dumps({"format": "arrakis-ray-store", "version": 1}))


def test_layout_1_store_is_refused_then_migrated_with_equal_answers(tmp_path, capsys):
    root = tmp_path / "store"
    acts = _activations(7, width=600)
    tokens = np.random.default_rng(8).integers(0, len(VOCAB), (N_SEQ, N_POS))
    write_run(root, "old", tokens, VOCAB, acts, shard_size=2)
    _downgrade_to_layout_1(root)

    with pytest.raises(StoreError, match=f"arrakis-ray migrate {root}"):
        Store(root)

    # the answers plain DuckDB gives over the old files
    old = str(root / "runs/old/activations/resid_post/shard-*.parquet")
    con = duckdb.connect()
    direction = np.random.default_rng(9).standard_normal(600)
    vec = "[" + ", ".join(f"d{i}" for i in range(600)) + "]::FLOAT[600]"
    questions = {
        "top": (
            f"SELECT seq_id, pos, d577::FLOAT AS v FROM read_parquet('{old}') WHERE layer = 1 "
            "ORDER BY v DESC, seq_id, pos LIMIT 5",
            "SELECT seq_id, pos, activation AS v FROM top_contexts('resid_post', 1, 577, 5)",
        ),
        "mean": (
            f"SELECT layer, avg(d3::FLOAT) AS m FROM read_parquet('{old}') GROUP BY layer "
            "ORDER BY layer",
            "SELECT layer, avg(value) AS m FROM neuron('resid_post', NULL, 3) GROUP BY layer "
            "ORDER BY layer",
        ),
        "cosine": (
            f"SELECT seq_id, pos, array_cosine_similarity({vec}, "
            f"{direction.tolist()}::FLOAT[600]) AS c FROM read_parquet('{old}') "
            "WHERE layer = 0 ORDER BY c DESC, seq_id, pos LIMIT 4",
            f"SELECT seq_id, pos, cosine AS c FROM cosine_topk('resid_post', 0, "
            f"{direction.tolist()}, 4)",
        ),
        "vector": (
            f"SELECT layer, {vec}::FLOAT[] AS v FROM read_parquet('{old}') "
            "WHERE seq_id = 4 AND pos = 1 ORDER BY layer",
            "SELECT layer, vec::FLOAT[] AS v FROM vectors('resid_post', NULL) "
            "WHERE seq_id = 4 AND pos = 1 ORDER BY layer",
        ),
    }
    before = {name: con.sql(old_sql).fetchall() for name, (old_sql, _new) in questions.items()}

    assert main(["migrate", str(root)]) == 0
    assert "1 runs" in capsys.readouterr().out
    assert not list((root / "runs/old/activations/resid_post").glob("shard-*"))
    with Store(root) as s:
        for name, (_old, new_sql) in questions.items():
            after = [tuple(r) for r in s.sql(new_sql).rows()]
            assert len(after) == len(before[name]), name
            for got, want in zip(after, before[name], strict=True):
                for g, w in zip(got, want, strict=True):
                    if isinstance(w, float):
                        assert g == pytest.approx(w, rel=1e-5), name
                    elif isinstance(w, list):
                        np.testing.assert_allclose(g, w, rtol=1e-6)
                    else:
                        assert g == w, name
    assert main(["migrate", str(root)]) == 0  # a second call has nothing to do
    assert "nothing to do" in capsys.readouterr().out


def test_an_open_store_follows_a_running_harvest_into_its_parts(tmp_path):
    from arrakis_ray.store import compact
    from arrakis_ray.store.inventory import PartsInventory, write_parts_inventory
    from arrakis_ray.store.manifest import read_manifest, write_manifest

    acts = _activations(3, width=600)
    tokens = np.random.default_rng(4).integers(0, len(VOCAB), (N_SEQ, N_POS))
    layout = write_run(tmp_path, "live", tokens, VOCAB, acts, shard_size=2)
    write_manifest(layout, read_manifest(layout).with_changes(status="running"))
    query = "SELECT layer, count(*) AS n, sum(value) AS s FROM neuron('resid_post', NULL, 577) "
    query += "GROUP BY layer ORDER BY layer"
    with Store(tmp_path) as s:
        before = s.sql(query)
        # the harvest's last step, as the driver does it: parts, manifest, then removal
        manifest = read_manifest(layout)
        directories = compact.block_directories(layout)
        parts = [e for d in directories for e in compact.compact_directory(layout, d, 3, 3)]
        write_parts_inventory(layout, PartsInventory(3, tuple(parts)))
        write_manifest(layout, manifest.with_changes(shards_per_part=3, status="complete"))
        for directory in directories:
            assert compact.remove_shard_files(layout, directory, 3) == 3
        after = s.sql(query)
    assert before.equals(after) and before["n"].to_list() == [N_SEQ * N_POS] * 2
    assert sorted(p.name for p in layout.block_dir("resid_post", 0, 1).iterdir()) == [
        "part-00000.parquet"
    ]
