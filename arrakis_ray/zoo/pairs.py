"""Clean/corrupted prompt pairs over the demo model's facts, for activation patching.

Each pair asks the same question about two subjects of one relation, in the relation's
first phrasing (seen in training with every fact): "the capital of france is" (paris)
against "the capital of germany is" (berlin). Subjects are one word each, so the two
prompts have the same length, and they differ only at the subject. Each subject is
paired with the next one in the knowledge base whose answer differs.

``python -m arrakis_ray.zoo.pairs pipelines/data/facts_pairs.jsonl`` writes the demo's
pairs.
"""

from __future__ import annotations

import argparse

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the .jsonl file to write")
    write_jsonl(parser.parse_args(argv).out, patching_pairs())


if __name__ == "__main__":
    main()
