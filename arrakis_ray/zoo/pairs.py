"""Clean/corrupted prompt pairs over the demo model's facts, for activation patching.

Each pair asks the same question about two subjects of one relation, in the relation's
first phrasing (seen in training with every fact): "the capital of france is" (paris)
against "the capital of germany is" (berlin). Subjects are one word each, so the two
prompts have the same length, and they differ only at the subject. Each subject is
paired with the next one in the knowledge base whose answer differs.

``python -m arrakis_ray.zoo.pairs pipelines/data`` writes the demo's pairs
(``facts_pairs.jsonl``) and the facts it traces (``facts_trace.jsonl``: the first
``TRACED_PER_RELATION`` held-out facts of each relation in ``facts.jsonl``, so that
causal tracing, a few hundred forwards per fact, stays a small part of the demo).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from arrakis_ray.zoo.corpus import FACTS, TEMPLATES, write_jsonl


def question(relation: str, subject: str) -> str:
    """The relation's first phrasing up to the answer: ``the capital of france is``."""
    template = TEMPLATES[relation][0]
    return template[: template.index("{a}")].format(s=subject).strip()


def patching_pairs() -> list[dict]:
    """One pair per subject: (clean, corrupted, answer, wrong, relation, subject)."""
    pairs = []
    for relation, answers in FACTS.items():
        subjects = list(answers)
        for i, subject in enumerate(subjects):
            others = subjects[i + 1 :] + subjects[:i]
            other = next((s for s in others if answers[s] != answers[subject]), None)
            if other is None:
                continue
            pairs.append(
                {
                    "clean": question(relation, subject),
                    "corrupted": question(relation, other),
                    "answer": answers[subject],
                    "wrong": answers[other],
                    "relation": relation,
                    "subject": subject,
                }
            )
    return pairs


TRACED_PER_RELATION = 5


def traced_facts(facts: list[dict]) -> list[dict]:
    """The first ``TRACED_PER_RELATION`` facts of each relation, in file order."""
    kept: list[dict] = []
    for fact in facts:
        if sum(k["relation"] == fact["relation"] for k in kept) < TRACED_PER_RELATION:
            kept.append(fact)
    return kept


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="the demo's data directory (holding facts.jsonl)")
    data = Path(parser.parse_args(argv).data)
    write_jsonl(data / "facts_pairs.jsonl", patching_pairs())
    facts = [json.loads(line) for line in (data / "facts.jsonl").read_text().splitlines()]
    write_jsonl(data / "facts_trace.jsonl", traced_facts(facts))


if __name__ == "__main__":
    main()
