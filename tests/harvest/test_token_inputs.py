"""Pre-tokenized inputs and kept document columns, in the tokenize step without Ray.

Token ids given as a Parquet or JSONL list column or as a .npy array, with or without
BOS, must give exactly the sequences the same texts give when tokenized here, in both
modes. Bad ids fail in one line naming the file and the row.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import DEMO_DATA, pipeline_dict

from arrakis_ray.config import pipeline_from_dict
from arrakis_ray.errors import ConfigError, DataError
from arrakis_ray.harvest.inputs import check_columns, data_fingerprint, plan_shards
from arrakis_ray.harvest.model_source import load_tokenizer
from arrakis_ray.harvest.tokenize import TokenizeShard, documents_table
from arrakis_ray.store.schemas import load_schema

KEYS = ("token_ids", "lengths", "seq_ids", "doc_ids", "doc_pos")
N_DOCS = 40
SHARD_SIZE = 16
CONTEXT = 8  # shorter than most documents: document mode truncates, packed mode spans


@pytest.fixture(scope="module")
def facts():
    """(records, token ids with BOS) of the demo documents, tokenized by the tokenizer."""
    records = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()]
    tokenizer = load_tokenizer(pipeline_from_dict(pipeline_dict()).model)
    ids = [tokenizer(r["text"], add_special_tokens=True)["input_ids"] for r in records]
    assert all(i[0] == tokenizer.bos_token_id for i in ids)  # the zoo tokenizer adds BOS
    return records, ids


def _config(path, mode="document", **data):
    raw = pipeline_dict()
    raw["data"] = {"path": str(path), "context_length": CONTEXT, "mode": mode, **data}
    return pipeline_from_dict(raw)


def _tokenize(config, vocab_size=None) -> list[dict]:
    """The step's output row of every shard."""
    step = TokenizeShard(config, vocab_size=vocab_size)
    rows = []
    for shard in plan_shards(config.data.path, SHARD_SIZE, config.data.max_documents):
        out = step({k: np.array([v]) for k, v in shard.to_dict().items()})
        rows.append({k: v[0] for k, v in out.items()})
    return rows


def _assert_same_sequences(given: list[dict], expected: list[dict]) -> None:
    assert len(given) == len(expected)
    for a, b in zip(given, expected, strict=True):
        for key in KEYS:
            assert a[key].dtype == b[key].dtype, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _write_ids(tmp_path, fmt, ids) -> str:
    if fmt == "parquet":
        path = tmp_path / "ids.parquet"
        # row groups of 7 rows: shards of 16 rows start and end inside them
        pq.write_table(
            pa.table({"ids": pa.array(ids, pa.list_(pa.int64()))}), path, row_group_size=7
        )
    elif fmt == "jsonl":
        path = tmp_path / "ids.jsonl"
        _write_jsonl(path, [{"ids": i} for i in ids])
    else:
        path = tmp_path / "ids.npy"
        np.save(path, np.array(ids, dtype=np.int32))
    return str(path)


@pytest.mark.parametrize("mode", ["document", "packed"])
@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])
@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_id_columns_give_the_sequences_of_their_texts(facts, tmp_path, fmt, bos, mode):
    _, ids = facts
    given = [i if bos else i[1:] for i in ids[:N_DOCS]]
    path = _write_ids(tmp_path, fmt, given)
    expected = _tokenize(_config(DEMO_DATA, mode, max_documents=N_DOCS))
    assert sum(len(r["lengths"]) for r in expected) > N_DOCS / SHARD_SIZE  # several sequences
    _assert_same_sequences(_tokenize(_config(path, mode, token_column="ids")), expected)


@pytest.mark.parametrize("mode", ["document", "packed"])
@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])
def test_npy_rows_give_the_sequences_of_their_texts(facts, tmp_path, bos, mode):
    records, ids = facts
    # a 2-D array holds documents of one length: the demo's most common one
    length, _ = Counter(len(i) for i in ids).most_common(1)[0]
    chosen = [n for n, i in enumerate(ids) if len(i) == length]
    assert len(chosen) > SHARD_SIZE and length > CONTEXT
    texts = tmp_path / "texts.jsonl"
    _write_jsonl(texts, [records[n] for n in chosen])
    path = _write_ids(tmp_path, "npy", [ids[n] if bos else ids[n][1:] for n in chosen])
    expected = _tokenize(_config(texts, mode))
    check_columns(plan_shards(path, SHARD_SIZE), _config(path).data)  # reads no column
    _assert_same_sequences(_tokenize(_config(path, mode)), expected)


@pytest.mark.parametrize(
    ("fmt", "where"),
    [("parquet", r"ids\.parquet: row 5: document 5"), ("jsonl", r"ids\.jsonl:6: document 5")],
)
@pytest.mark.parametrize("bad", [-1, 386], ids=["negative", "vocab-size"])
def test_an_out_of_range_id_names_the_file_and_row(facts, tmp_path, fmt, where, bad):
    _, ids = facts
    given = [list(i) for i in ids[:N_DOCS]]
    given[5][3] = bad
    path = _write_ids(tmp_path, fmt, given)
    message = rf"shard 0 .*{where}: token 3 of 'ids' \(data.token_column\) is {bad}, outside the model's vocabulary \[0, 386\)$"  # noqa: E501
    with pytest.raises(DataError, match=message):
        _tokenize(_config(path, token_column="ids"))


def test_ids_are_checked_against_the_given_vocabulary_size(facts, tmp_path):
    _, ids = facts
    path = _write_ids(tmp_path, "npy", [i[:5] for i in ids[:N_DOCS]])
    peak = max(max(i[:5]) for i in ids[:N_DOCS])
    row = next(n for n, i in enumerate(ids) if peak in i[:5])
    message = rf"ids\.npy: row {row}: document {row}: token \d of the row is {peak}, outside"
    with pytest.raises(DataError, match=message):
        _tokenize(_config(path), vocab_size=peak)
    assert len(_tokenize(_config(path), vocab_size=peak + 1)) == 3


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ([0, 5, 2.5], r"token 2 of .* is not an integer: 2\.5"),
        ([0, "5"], r"token 1 of .* is not an integer: '5'"),
        ([0, True], r"token 1 of .* is not an integer: True"),
        ("0 5 7", r"is not a list of token ids: '0 5 7'"),
        ([[0, 5], [7]], r"token 0 of .* is not an integer: \[0, 5\]"),
        ([0, 2**70], r"token 1 of .* is 1180591620717411303424, outside"),
    ],
    ids=["float", "string", "bool", "text", "nested", "huge"],
)
def test_a_non_integer_or_huge_id_names_the_file_and_row(facts, tmp_path, value, problem):
    _, ids = facts
    records = [{"ids": i} for i in ids[:N_DOCS]]
    records[20]["ids"] = value
    path = tmp_path / "ids.jsonl"
    _write_jsonl(path, records)
    with pytest.raises(DataError, match=rf"shard 1 .*ids\.jsonl:21: document 20: .*{problem}"):
        _tokenize(_config(path, token_column="ids"))


def test_a_float_npy_names_its_first_row(tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.zeros((3, 4), np.float32))
    with pytest.raises(
        DataError, match=r"ids\.npy: row 0: document 0: token 0 of the row is not an integer"
    ):
        _tokenize(_config(path))


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_a_missing_token_column_names_the_file(facts, tmp_path, fmt):
    path = _write_ids(tmp_path, fmt, facts[1][:N_DOCS])
    where = (
        r"ids\.parquet: no column 'tokens'; columns: ids"
        if fmt == "parquet"
        else (r"ids\.jsonl:1: expected an object with a field 'tokens'")
    )
    config = _config(path, token_column="tokens")
    with pytest.raises(DataError, match=where):
        _tokenize(config)
    with pytest.raises(DataError, match=where):  # before any work, from the plan
        check_columns(plan_shards(path, SHARD_SIZE), config.data)


def test_npy_must_be_a_two_dimensional_array(tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.arange(5))
    with pytest.raises(DataError, match=r"ids\.npy: expected a 2-D array .* shape \(5,\)"):
        plan_shards(path, SHARD_SIZE)


def test_kept_columns_are_emitted_per_document_in_order(facts, tmp_path):
    records, ids = facts
    config = _config(DEMO_DATA, max_documents=N_DOCS, keep_columns=["relation", "answer"])
    check_columns(plan_shards(DEMO_DATA, SHARD_SIZE), config.data)  # all there
    rows = _tokenize(config)
    kept = [json.loads(r["documents"]) for r in rows]
    assert [list(k) for k in kept] == [["relation", "answer"]] * 3
    assert sum((k["relation"] for k in kept), []) == [r["relation"] for r in records[:N_DOCS]]
    assert sum((k["answer"] for k in kept), []) == [r["answer"] for r in records[:N_DOCS]]
    # with token ids the labels come from the same rows
    path = tmp_path / "ids.jsonl"
    _write_jsonl(
        path, [{"ids": i, "relation": r["relation"]} for i, r in zip(ids, records, strict=True)]
    )
    rows = _tokenize(_config(path, token_column="ids", keep_columns=["relation"]))
    assert json.loads(rows[1]["documents"]) == {
        "relation": [r["relation"] for r in records[SHARD_SIZE : 2 * SHARD_SIZE]]
    }
    assert {r["documents"] for r in _tokenize(_config(DEMO_DATA, max_documents=3))} == {"{}"}


@pytest.mark.parametrize("suffix", ["npy", "txt"])
def test_kept_columns_of_inputs_without_columns_are_refused(tmp_path, suffix):
    path = tmp_path / f"docs.{suffix}"
    if suffix == "npy":
        np.save(path, np.ones((4, 3), np.int64))
    else:
        path.write_text("one document\nanother\n")
    config = _config(path, keep_columns=["relation"])
    with pytest.raises(DataError, match=rf"docs\.{suffix}: .*'relation'"):
        check_columns(plan_shards(path, SHARD_SIZE), config.data)
    with pytest.raises(DataError, match=rf"shard 0 .*docs\.{suffix}: .*'relation'"):
        _tokenize(config)


def test_documents_table_holds_one_row_per_document_and_column():
    kept = {"relation": ["capital", "capital"], "count": [3, None], "tags": [["a"], {"b": 1}]}
    table = documents_table("run-1", 16, json.dumps(kept))
    assert table.schema == load_schema("documents").arrow()
    assert table.to_pylist() == [
        {"run_id": "run-1", "doc_id": 16, "column": "relation", "value": "capital"},
        {"run_id": "run-1", "doc_id": 16, "column": "count", "value": "3"},
        {"run_id": "run-1", "doc_id": 16, "column": "tags", "value": '["a"]'},
        {"run_id": "run-1", "doc_id": 17, "column": "relation", "value": "capital"},
        {"run_id": "run-1", "doc_id": 17, "column": "count", "value": None},
        {"run_id": "run-1", "doc_id": 17, "column": "tags", "value": '{"b": 1}'},
    ]
    assert documents_table("run-1", 0, "{}").num_rows == 0


def test_documents_table_from_the_step(tmp_path):
    config = _config(DEMO_DATA, max_documents=N_DOCS, keep_columns=["subject"])
    row = _tokenize(config)[2]
    table = documents_table("r", int(row["first_doc"]), str(row["documents"]))
    records = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()]
    assert table["doc_id"].to_pylist() == list(range(2 * SHARD_SIZE, N_DOCS))
    assert table["value"].to_pylist() == [r["subject"] for r in records[2 * SHARD_SIZE : N_DOCS]]
    assert set(row["doc_ids"].tolist()) == set(table["doc_id"].to_pylist())  # joins tokens


def test_the_token_column_and_kept_columns_change_the_data_fingerprint(tmp_path):
    shards = plan_shards(DEMO_DATA, SHARD_SIZE)
    texts = data_fingerprint(shards, "text")
    assert data_fingerprint(shards, "text", None, ()) == texts
    assert data_fingerprint(shards, "text", "ids") != texts
    assert data_fingerprint(shards, "text", keep_columns=("relation",)) != texts


def test_token_column_and_text_column_are_exclusive():
    raw = pipeline_dict()
    raw["data"] = {"path": str(DEMO_DATA), "text_column": "body", "token_column": "ids"}
    with pytest.raises(ConfigError, match=r"data: give text_column or token_column, not both"):
        pipeline_from_dict(raw)
    raw["data"] = {"path": str(DEMO_DATA), "keep_columns": ["relation", "relation"]}
    with pytest.raises(ConfigError, match=r"data: keep_columns: relation given more than once"):
        pipeline_from_dict(raw)


def test_a_harvest_of_token_ids_stores_what_the_texts_store(harvested, facts, tmp_path):
    """End to end through Ray: ids without BOS in a JSONL column, harvested like the
    shared text run, store the same tokens and activations."""
    from arrakis_ray.harvest.driver import harvest
    from arrakis_ray.store.reader import RunReader

    config, _, text_run = harvested
    records, ids = facts
    path = tmp_path / "ids.jsonl"
    path.write_text(
        "".join(json.dumps({"ids": i[1:], "relation": r["relation"]}) + "\n"
                for i, r in zip(ids, records, strict=True))
    )  # fmt: skip
    raw = pipeline_dict()
    raw["data"].update(path=str(path), token_column="ids")
    result = harvest(pipeline_from_dict(raw), tmp_path / "store")
    assert result.run_id != text_run.run_id  # other data, other run
    by_ids, by_text = RunReader.open(result.run_dir), RunReader.open(text_run.run_dir)
    assert by_ids.shards == by_text.shards
    assert by_ids.documents("relation") == by_text.documents("relation")
    for shard in by_text.shards:
        keys = ["seq_id", "pos", "token_id", "doc_id", "doc_pos"]
        assert by_ids.tokens(shard).select(keys).equals(by_text.tokens(shard).select(keys))
        for layer in (0, by_text.shape.n_layers - 1):
            np.testing.assert_array_equal(
                by_ids.matrix("resid_post", layer, shard)[2],
                by_text.matrix("resid_post", layer, shard)[2],
            )
