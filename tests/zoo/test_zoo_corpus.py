"""The synthetic corpus: determinism, the held-out rule, and the shipped demo data."""

import json
from collections import Counter
from pathlib import Path

import pytest

from arrakis_ray.zoo import corpus

FACTS_JSONL = Path(__file__).parents[2] / "pipelines" / "data" / "facts.jsonl"


def _template_of(doc: dict) -> int:
    """Which phrasing a fact document uses, found by re-rendering every phrasing."""
    matches = [
        t
        for t in range(corpus.TEMPLATES_PER_RELATION)
        if doc["text"].endswith(
            corpus.TEMPLATES[doc["relation"]][t].format(s=doc["subject"], a=doc["answer"])
        )
    ]
    assert len(matches) == 1, doc
    return matches[0]


def test_same_seed_same_documents_other_seed_other_documents():
    assert corpus.generate_documents(300, seed=7) == corpus.generate_documents(300, seed=7)
    assert corpus.generate_documents(300, seed=7) != corpus.generate_documents(300, seed=8)


def test_train_split_never_shows_the_heldout_phrasing_but_shows_every_fact():
    train = corpus.generate_documents(20_000, seed=0)
    facts = [d for d in train if d["answer"] is not None]
    seen = set()
    for d in facts:
        template = _template_of(d)
        assert template != corpus.heldout_template(d["relation"], d["subject"])
        seen.add((d["relation"], d["subject"]))
    assert seen == {(r, s) for r, s, _ in corpus.all_facts()}
    # Roughly the configured mixture: 70 % facts.
    assert 0.66 < len(facts) / len(train) < 0.74


def test_heldout_split_uses_only_the_heldout_phrasing():
    docs = corpus.generate_documents(2_000, seed=0, split="heldout")
    facts = [d for d in docs if d["answer"] is not None]
    assert facts
    for d in facts:
        assert _template_of(d) == corpus.heldout_template(d["relation"], d["subject"])


def test_documents_fit_the_vocabulary_and_the_prompt_precedes_the_answer():
    words = set(corpus.vocabulary())
    docs = corpus.generate_documents(3_000, seed=1) + corpus.heldout_fact_documents(400)
    for d in docs:
        assert set(d["text"].split()) <= words
        assert len(d["text"].split()) < 31  # fits the demo's 32-token context with <bos>
        if d["answer"] is not None:
            assert d["answer"] == corpus.FACTS[d["relation"]][d["subject"]]
            assert d["text"] == f"{d['prompt']} {d['answer']} ."


def test_every_relation_has_its_templates_and_one_answer_slot_each():
    assert set(corpus.TEMPLATES) == set(corpus.FACTS)
    for patterns in corpus.TEMPLATES.values():
        assert len(patterns) == corpus.TEMPLATES_PER_RELATION
        for p in patterns:
            assert p.count("{s}") == 1 and p.endswith("{a} .")


def test_bad_split_is_refused():
    with pytest.raises(ValueError, match="split"):
        corpus.generate_documents(1, seed=0, split="test")


def test_shipped_facts_jsonl_is_the_heldout_fact_set():
    lines = FACTS_JSONL.read_text().splitlines()
    docs = [json.loads(line) for line in lines]
    assert docs == corpus.heldout_fact_documents(len(docs))
    assert 350 <= len(docs) <= 450
    # Every fact appears, each in its held-out phrasing only.
    assert Counter((d["relation"], d["subject"]) for d in docs).keys() == {
        (r, s) for r, s, _ in corpus.all_facts()
    }
    assert all(
        _template_of(d) == corpus.heldout_template(d["relation"], d["subject"]) for d in docs
    )
