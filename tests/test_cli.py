"""The command line: every bad input gets one clear error, exit code 2, store untouched."""

from __future__ import annotations

import csv
import dataclasses
import io
import json

import yaml
from support import pipeline_dict, store_snapshot

from arrakis_ray.cli import main


def _write_pipeline(tmp_path, raw) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _fails(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("arrakis-ray: error:") == 1 and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_sql_formats_agree(harvested, capsys, tmp_path):
    _, store, result = harvested
    query = "SELECT layer, count(*) AS n FROM act_resid_post GROUP BY layer ORDER BY layer"
    assert main(["sql", str(store), query, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert main(["sql", str(store), query, "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [int(r["n"]) for r in rows] == [r["n"] for r in records]
    import pyarrow.parquet as pq

    tokens = pq.read_table(result.run_dir / "tokens").num_rows
    assert all(r["n"] == tokens for r in records)
    out = tmp_path / "r.parquet"
    assert main(["sql", str(store), query, "--format", "parquet", "--out", str(out)]) == 0
    assert pq.read_table(out).column("n").to_pylist() == [r["n"] for r in records]
    assert main(["sql", str(store), query]) == 0
    assert "layer" in capsys.readouterr().out


def test_unknown_hook_suggests_close_matches(ray_session, tmp_path, capsys):
    store = tmp_path / "store"
    raw = pipeline_dict(hooks=["blocks.0.hook_resid_pots"])
    _fails(
        capsys,
        ["harvest", _write_pipeline(tmp_path, raw), "--store", str(store)],
        "blocks.0.hook_resid_pots",
        "blocks.0.hook_resid_post",
    )
    assert not store.exists()


def test_errors_leave_an_existing_store_untouched(harvested, tmp_path, capsys):
    _, store, result = harvested
    before = store_snapshot(store)
    bad_field = pipeline_dict(batch_size="abc")
    _fails(
        capsys,
        ["harvest", _write_pipeline(tmp_path, bad_field), "--store", str(store)],
        "harvest.batch_size",
        "pipeline.yaml",
    )
    unknown_key = pipeline_dict()
    unknown_key["harvest"]["shard_sise"] = 3
    _fails(
        capsys,
        ["harvest", _write_pipeline(tmp_path, unknown_key), "--store", str(store)],
        "harvest.shard_sise",
        "did you mean shard_size",
    )
    missing_model = pipeline_dict()
    missing_model["model"] = {"path": str(tmp_path / "no-such-model")}
    _fails(
        capsys,
        ["harvest", _write_pipeline(tmp_path, missing_model), "--store", str(store)],
        "no-such-model",
    )
    over_budget = pipeline_dict(max_bytes=1000)
    _fails(
        capsys,
        ["harvest", _write_pipeline(tmp_path, over_budget), "--store", str(store)],
        "harvest.max_bytes",
        "over the budget of 1,000",
    )
    _fails(
        capsys,
        ["analyze", str(result.run_dir), "--tool", "logit_lenz"],
        "unknown tool 'logit_lenz'",
        "logit_lens",
    )
    _fails(capsys, ["sql", str(store), "SELEC * FROM tokens"], "SELEC")
    _fails(capsys, ["sql", str(store), "COPY tokens TO '/tmp/x.csv'"])
    assert store_snapshot(store) == before


def test_a_path_that_is_not_a_store(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    _fails(capsys, ["sql", str(tmp_path), "SELECT 1"], str(tmp_path), "not an arrakis-ray store")


def test_tools_lists_logit_lens(capsys):
    assert main(["tools"]) == 0
    out = capsys.readouterr().out
    assert "logit_lens" in out and "include_embed" in out


def test_tools_prints_each_parameters_docstring(capsys):
    import inspect

    from arrakis_ray.cli import field_docs
    from arrakis_ray.tools.logit_lens import LogitLensParams

    # the docstring is the source line under the field, read here without ast
    source = inspect.getsource(LogitLensParams).splitlines()
    at = next(i for i, line in enumerate(source) if line.strip().startswith("include_embed:"))
    expected = source[at + 1].strip().strip('"')
    assert field_docs(LogitLensParams)["include_embed"] == expected
    assert main(["tools"]) == 0
    lines = capsys.readouterr().out.splitlines()
    lines = lines[lines.index(next(x for x in lines if x.startswith("logit_lens:"))) :]
    at = next(i for i, line in enumerate(lines) if line.startswith("    --param include_embed="))
    assert lines[at + 1] == " " * 8 + expected


@dataclasses.dataclass(frozen=True)
class _BaseParams:
    """A base with a documented field."""

    seed: int = 0
    """Seed of everything."""


@dataclasses.dataclass(frozen=True)
class _Params(_BaseParams):
    """Fields with and without docstrings."""

    layers: tuple[int, ...] = dataclasses.field(default_factory=tuple)
    """Layers to read;
    empty: all of them."""
    undocumented: str = "x"
    not_a_doc = 3
    """A class attribute's string, not a field's."""


def test_field_docs_read_multiline_and_inherited_docstrings():
    from arrakis_ray.cli import field_docs

    assert field_docs(_Params) == {
        "seed": "Seed of everything.",
        "layers": "Layers to read;\nempty: all of them.",
    }


def test_sql_without_a_query_opens_a_prompt(harvested, capsys, monkeypatch):
    import pyarrow.parquet as pq

    _, store, result = harvested
    statements = "SELECT count(*) AS n\nFROM tokens;\nSELEC 1;\nSELECT 41 + 1 AS answer;\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(statements))
    assert main(["sql", str(store)]) == 0
    out = capsys.readouterr().out
    tokens = pq.read_table(result.run_dir / "tokens").num_rows
    assert str(tokens) in out
    assert "error:" in out and "SELEC" in out  # a bad statement does not end the session
    assert "42" in out
