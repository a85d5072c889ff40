"""Prompt datasets: read once in the driver, refused in one line naming file and what."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from arrakis_ray.errors import DataError
from arrakis_ray.live.prompts import find_span, read_prompts

COLUMNS = ("prompt", "answer")


def _jsonl(tmp_path, text: str):
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    return path


def test_rows_keep_their_line_number_as_item(tmp_path):
    path = _jsonl(
        tmp_path, '{"prompt": "a", "answer": "b", "x": 1}\n{"prompt": "c", "answer": "d"}\n'
    )
    table = read_prompts(path, COLUMNS)
    assert table.column_names == ["prompt", "answer", "item"]
    assert table.to_pylist() == [
        {"prompt": "a", "answer": "b", "item": 0},
        {"prompt": "c", "answer": "d", "item": 1},
    ]
    pq.write_table(table.drop(["item"]), tmp_path / "p.parquet")
    assert read_prompts(tmp_path / "p.parquet", COLUMNS).equals(table)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"prompt": "a"}\n', "lacks column\\(s\\) answer \\(it has prompt\\)"),
        ('{"prompt": "a", "answer": 3}\n', "column answer holds int64; give text"),
        (
            '{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": null}\n',
            "row 2: column answer is empty",
        ),
        ('{"prompt": "a", "answer": "b"}\n{"prompt": \n', "cannot read it"),
        ("", "holds no rows|cannot read it"),
    ],
    ids=["missing-column", "number", "null", "broken-json", "empty"],
)
def test_bad_files_are_refused_naming_the_file(tmp_path, text, message):
    path = _jsonl(tmp_path, text)
    with pytest.raises(
        DataError, match=f"prompts: {path}: .*{message}|prompts: {path} .*{message}"
    ):
        read_prompts(path, COLUMNS)


def test_a_missing_file_a_foreign_format_and_a_uri_are_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_prompts(tmp_path / "nope.jsonl", COLUMNS)
    (tmp_path / "p.csv").write_text("prompt,answer\na,b\n")
    with pytest.raises(DataError, match="give a .jsonl or .json or .parquet file"):
        read_prompts(tmp_path / "p.csv", COLUMNS)
    with pytest.raises(DataError, match="give a local file"):
        read_prompts("s3://bucket/p.jsonl", COLUMNS)


def test_find_span_finds_the_last_occurrence():
    assert find_span([1, 2, 3, 2, 3], [2, 3]) == (3, 5)
    assert find_span([1, 2, 3], [4]) is None
