"""Labels live in the store: ``data.keep_columns`` is written at harvest time.

A run is then analysable where its inputs are not mounted: the input file is deleted
before the labels are read back (through RunReader and SQL) and compared with the file's
own values.
"""

from __future__ import annotations

import json
import shutil

import pytest
from support import DEMO_DATA, pipeline_dict

from arrakis_ray.config import pipeline_from_dict
from arrakis_ray.errors import StoreError
from arrakis_ray.harvest.driver import harvest
from arrakis_ray.store.catalog import Store
from arrakis_ray.store.reader import RunReader


def test_kept_columns_are_read_from_the_store_alone(ray_session, tmp_path):
    data = tmp_path / "facts.jsonl"
    shutil.copy(DEMO_DATA, data)
    lines = [json.loads(line) for line in data.read_text().splitlines()][:40]
    raw = pipeline_dict(hooks=["blocks.*.hook_resid_post"], stages=2)
    raw["data"].update(path=str(data), keep_columns=["relation", "answer"])
    result = harvest(pipeline_from_dict(raw), tmp_path / "store")
    data.unlink()  # the run must not need its inputs any more

    reader = RunReader.open(result.run_dir)
    assert reader.documents("relation") == {i: d["relation"] for i, d in enumerate(lines)}
    assert reader.documents("answer") == {i: d["answer"] for i, d in enumerate(lines)}
    with pytest.raises(StoreError, match=r"did not keep the input column 'subject'.*keep_columns"):
        reader.documents("subject")

    with Store(tmp_path / "store") as db:
        frame = db.sql(
            "SELECT d.value AS relation, count(DISTINCT t.seq_id) AS sequences "
            "FROM tokens t JOIN documents d USING (run_id, doc_id) "
            "WHERE d.column = 'relation' GROUP BY ALL ORDER BY relation"
        )
    expected = {}
    for d in lines:
        expected[d["relation"]] = expected.get(d["relation"], 0) + 1
    assert dict(zip(frame["relation"], frame["sequences"], strict=True)) == expected
