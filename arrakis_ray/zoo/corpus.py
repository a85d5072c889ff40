"""The synthetic corpus the demo model ``facts-gpt2`` is trained on.

Most documents state one fact of a fixed knowledge base ("the capital of france is
paris ."): the answer word is predictable only from the subject and the relation, so a
logit lens shows it emerging in the later layers. The rest are other sentence kinds
that exercise other mechanisms: random narrative sentences (grammar, no recall),
counting (successor), and a repeated code (induction / copying).

Every relation has ``TEMPLATES_PER_RELATION`` phrasings. The split is a fixed rule:
for each fact exactly one phrasing is *held out* (chosen by a stable hash of the
relation and subject), so every fact is seen in training in the other phrasings, and
the held-out sentences test recall through a phrasing never seen with that fact.

Text is lower case, words separated by single spaces, punctuation a word of its own,
so a whitespace word-level tokenizer round-trips it exactly.

``python -m arrakis_ray.zoo.corpus pipelines/data/facts.jsonl`` writes the demo's
held-out fact set.
"""

from __future__ import annotations

import argparse
import json
import random
import zlib
from collections.abc import Iterator
from pathlib import Path

# (country, capital, language, continent)
_COUNTRIES = [
    ("france", "paris", "french", "europe"),
    ("germany", "berlin", "german", "europe"),
    ("italy", "rome", "italian", "europe"),
    ("spain", "madrid", "spanish", "europe"),
    ("portugal", "lisbon", "portuguese", "europe"),
    ("greece", "athens", "greek", "europe"),
    ("poland", "warsaw", "polish", "europe"),
    ("sweden", "stockholm", "swedish", "europe"),
    ("norway", "oslo", "norwegian", "europe"),
    ("finland", "helsinki", "finnish", "europe"),
    ("hungary", "budapest", "hungarian", "europe"),
    ("austria", "vienna", "german", "europe"),
    ("netherlands", "amsterdam", "dutch", "europe"),
    ("denmark", "copenhagen", "danish", "europe"),
    ("ireland", "dublin", "english", "europe"),
    ("japan", "tokyo", "japanese", "asia"),
    ("china", "beijing", "chinese", "asia"),
    ("korea", "seoul", "korean", "asia"),
    ("thailand", "bangkok", "thai", "asia"),
    ("vietnam", "hanoi", "vietnamese", "asia"),
    ("iran", "tehran", "persian", "asia"),
    ("india", "delhi", "hindi", "asia"),
    ("egypt", "cairo", "arabic", "africa"),
    ("kenya", "nairobi", "swahili", "africa"),
    ("morocco", "rabat", "arabic", "africa"),
    ("brazil", "brasilia", "portuguese", "america"),
    ("peru", "lima", "spanish", "america"),
    ("canada", "ottawa", "english", "america"),
    ("cuba", "havana", "spanish", "america"),
    ("australia", "canberra", "english", "oceania"),
]

# (animal, sound, habitat)
_ANIMALS = [
    ("dog", "woof", "house"),
    ("cat", "meow", "house"),
    ("cow", "moo", "farm"),
    ("sheep", "baa", "field"),
    ("duck", "quack", "pond"),
    ("pig", "oink", "farm"),
    ("horse", "neigh", "stable"),
    ("lion", "roar", "savanna"),
    ("owl", "hoot", "forest"),
    ("snake", "hiss", "grass"),
    ("bee", "buzz", "hive"),
    ("frog", "croak", "pond"),
    ("mouse", "squeak", "hole"),
    ("wolf", "howl", "forest"),
    ("crow", "caw", "tree"),
    ("donkey", "bray", "farm"),
    ("goose", "honk", "lake"),
    ("monkey", "chatter", "jungle"),
    ("elephant", "trumpet", "savanna"),
    ("dolphin", "click", "sea"),
]

# (job, workplace, tool)
_JOBS = [
    ("doctor", "hospital", "stethoscope"),
    ("teacher", "school", "chalk"),
    ("chef", "kitchen", "knife"),
    ("pilot", "airport", "radio"),
    ("farmer", "farm", "tractor"),
    ("baker", "bakery", "oven"),
    ("judge", "court", "gavel"),
    ("sailor", "harbor", "rope"),
    ("miner", "mine", "pickaxe"),
    ("librarian", "library", "book"),
    ("nurse", "hospital", "bandage"),
    ("banker", "bank", "calculator"),
    ("scientist", "laboratory", "microscope"),
    ("painter", "studio", "brush"),
    ("mechanic", "garage", "wrench"),
    ("barber", "salon", "scissors"),
]

_COLORS = {
    "banana": "yellow", "lemon": "yellow", "apple": "red", "cherry": "red",
    "strawberry": "red", "tomato": "red", "lime": "green", "cucumber": "green",
    "leaf": "green", "grape": "purple", "plum": "purple", "eggplant": "purple",
    "blueberry": "blue", "sky": "blue", "carrot": "orange", "pumpkin": "orange",
    "coconut": "brown", "chocolate": "brown", "milk": "white", "snow": "white",
    "salt": "white", "coal": "black", "pepper": "black",
}  # fmt: skip

_TASTES = {
    "lemon": "sour", "lime": "sour", "vinegar": "sour", "sugar": "sweet",
    "honey": "sweet", "cake": "sweet", "salt": "salty", "cheese": "salty",
    "coffee": "bitter", "tea": "bitter", "pepper": "spicy", "ginger": "spicy",
}  # fmt: skip

FACTS: dict[str, dict[str, str]] = {
    "capital": {c: cap for c, cap, _, _ in _COUNTRIES},
    "language": {c: lang for c, _, lang, _ in _COUNTRIES},
    "continent": {c: cont for c, _, _, cont in _COUNTRIES},
    "sound": {a: s for a, s, _ in _ANIMALS},
    "habitat": {a: h for a, _, h in _ANIMALS},
    "color": dict(_COLORS),
    "taste": dict(_TASTES),
    "workplace": {j: w for j, w, _ in _JOBS},
    "tool": {j: t for j, _, t in _JOBS},
}
"""The knowledge base: relation -> subject -> answer (one word each)."""

# Phrasings per relation; ``{s}`` is the subject, ``{a}`` the answer. Each answer is
# the last word before the final "." so that the answer position is the same kind of
# position in every fact sentence.
TEMPLATES: dict[str, list[str]] = {
    "capital": [
        "the capital of {s} is {a} .",
        "{s} has its capital in {a} .",
        "the capital city of {s} is called {a} .",
        "in {s} the government sits in {a} .",
    ],
    "language": [
        "people in {s} speak {a} .",
        "the language of {s} is {a} .",
        "most people who live in {s} speak {a} .",
        "in {s} the main language is {a} .",
    ],
    "continent": [
        "{s} is a country in {a} .",
        "{s} is located in {a} .",
        "the country of {s} lies in {a} .",
        "on a map , {s} is in {a} .",
    ],
    "sound": [
        "the {s} says {a} .",
        "the sound the {s} makes is {a} .",
        "when the {s} is happy it goes {a} .",
        "you can hear the {s} say {a} .",
    ],
    "habitat": [
        "the {s} lives in the {a} .",
        "the home of the {s} is the {a} .",
        "you can find the {s} in the {a} .",
        "the {s} spends its days in the {a} .",
    ],
    "color": [
        "the color of the {s} is {a} .",
        "the {s} is colored {a} .",
        "the {s} has the color {a} .",
        "look at the {s} , its color is {a} .",
    ],
    "taste": [
        "the {s} tastes {a} .",
        "the taste of the {s} is {a} .",
        "when you eat the {s} it tastes {a} .",
        "the flavor of the {s} is {a} .",
    ],
    "workplace": [
        "the {s} works at the {a} .",
        "the workplace of the {s} is the {a} .",
        "every day the {s} goes to the {a} .",
        "you can meet the {s} at the {a} .",
    ],
    "tool": [
        "the {s} works with the {a} .",
        "the tool of the {s} is the {a} .",
        "the {s} cannot work without the {a} .",
        "the {s} picks up the {a} .",
    ],
}
TEMPLATES_PER_RELATION = 4

# Lead-ins put the fact at different positions in the sequence. They avoid subject words
# (an earlier "my teacher said that" taught the model to ignore "teacher" as a subject).
PREFIXES = [
    "",
    "did you know that",
    "my friend said that",
    "it is true that",
    "everyone knows that",
    "i read that",
    "we learned that",
]

_NAMES = ["anna", "tom", "maria", "ben", "lucy", "sam", "nina", "leo", "emma", "max"]
_VERBS = ["sees", "finds", "likes", "carries", "opens", "paints", "buys", "drops", "holds"]
_OBJECTS = ["box", "ball", "cup", "door", "key", "hat", "letter", "chair", "lamp", "bag"]
_PLACES = ["garden", "park", "street", "room", "market", "yard", "hall", "shop"]
_NUMBERS = [
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen", "twenty",
]  # fmt: skip
_CODES = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
_OTHER_TEMPLATES = [
    "{n1} {v} the {o} in the {p} .",
    "{n1} and {n2} walk to the {p} and look for a {o} .",
]

# Share of each document kind in the mixture (facts first; the rest sum to 1 - 0.7).
_KIND_WEIGHTS = {"fact": 0.7, "story": 0.15, "count": 0.075, "code": 0.075}
SPLITS = ("train", "heldout")


def heldout_template(relation: str, subject: str) -> int:
    """Index of the one phrasing of this fact that training never sees."""
    # crc32, not hash(): Python's str hash is salted per process.
    return zlib.crc32(f"{relation}:{subject}".encode()) % TEMPLATES_PER_RELATION


def all_facts() -> Iterator[tuple[str, str, str]]:
    """Every fact as (relation, subject, answer), in a fixed order."""
    for relation, table in FACTS.items():
        for subject, answer in table.items():
            yield relation, subject, answer


def fact_document(relation: str, subject: str, template: int, prefix: str = "") -> dict:
    """One fact sentence as a document: text, relation, subject, answer and prompt.

    ``prompt`` is the text up to (not including) the answer word, so the answer is
    the next token after the prompt's last token.
    """
    answer = FACTS[relation][subject]
    pattern = TEMPLATES[relation][template]
    sentence = pattern.format(s=subject, a=answer)
    prompt = pattern.split("{a}")[0].format(s=subject).rstrip()
    if prefix:
        sentence, prompt = f"{prefix} {sentence}", f"{prefix} {prompt}"
    return {
        "text": sentence,
        "relation": relation,
        "subject": subject,
        "answer": answer,
        "prompt": prompt,
    }


def _other_document(kind: str, rng: random.Random) -> dict:
    if kind == "story":
        n1, n2 = rng.sample(_NAMES, 2)
        text = rng.choice(_OTHER_TEMPLATES).format(
            n1=n1, n2=n2, v=rng.choice(_VERBS), o=rng.choice(_OBJECTS), p=rng.choice(_PLACES)
        )
    elif kind == "count":
        length = rng.randint(4, 8)
        start = rng.randrange(len(_NUMBERS) - length + 1)
        text = "we count " + " ".join(_NUMBERS[start : start + length]) + " ."
    else:  # code: the second half repeats the first, so it is predictable by copying
        code = " ".join(rng.choices(_CODES, k=rng.randint(3, 5)))
        text = f"the code is {code} and again the code is {code} ."
    return {"text": text, "relation": None, "subject": None, "answer": None, "prompt": None}


def generate_documents(n: int, seed: int, split: str = "train") -> list[dict]:
    """``n`` documents of the mixture, the same for the same (n, seed, split).

    Fact documents of ``split="train"`` use only the training phrasings of each fact,
    those of ``"heldout"`` only its held-out phrasing. Non-fact documents are random
    draws in both splits. Each document has keys text, relation, subject, answer and
    prompt (the last four are None for non-fact documents).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    # The split goes into the seed so that the two splits never share a stream.
    rng = random.Random(f"{split}:{seed}")
    facts = list(all_facts())
    kinds, weights = list(_KIND_WEIGHTS), list(_KIND_WEIGHTS.values())
    docs = []
    for _ in range(n):
        kind = rng.choices(kinds, weights)[0]
        if kind != "fact":
            docs.append(_other_document(kind, rng))
            continue
        relation, subject, _ = rng.choice(facts)
        held = heldout_template(relation, subject)
        if split == "heldout":
            template = held
        else:
            template = rng.choice([t for t in range(TEMPLATES_PER_RELATION) if t != held])
        docs.append(fact_document(relation, subject, template, rng.choice(PREFIXES)))
    return docs


def heldout_fact_documents(n: int, seed: int = 0) -> list[dict]:
    """``n`` held-out fact documents: every fact once without a lead-in, then random ones.

    The first ``len(list(all_facts()))`` documents cover each fact once in its
    held-out phrasing; the rest add random lead-ins (so ``n`` may be any size).
    """
    docs = [fact_document(r, s, heldout_template(r, s)) for r, s, _ in all_facts()]
    rng = random.Random(f"heldout-facts:{seed}")
    facts = list(all_facts())
    while len(docs) < n:
        r, s, _ = rng.choice(facts)
        docs.append(fact_document(r, s, heldout_template(r, s), rng.choice(PREFIXES[1:])))
    return docs[:n]


def vocabulary() -> list[str]:
    """Every word the corpus can produce, sorted: the tokenizer's word list."""
    words: set[str] = set()
    for relation, subject, answer in all_facts():
        words.update((subject, answer))
        for pattern in TEMPLATES[relation]:
            words.update(pattern.replace("{s}", "").replace("{a}", "").split())
    for prefix in PREFIXES:
        words.update(prefix.split())
    for pattern in _OTHER_TEMPLATES:
        words.update(w for w in pattern.split() if not w.startswith("{"))
    words.update(_NAMES + _VERBS + _OBJECTS + _PLACES + _NUMBERS + _CODES)
    words.update("we count the code is and again .".split())
    return sorted(words)


def write_jsonl(path: str | Path, docs: list[dict]) -> None:
    """Write documents one JSON object per line (the format of ``pipelines/data``)."""
    lines = [json.dumps(d, ensure_ascii=False) for d in docs]
    Path(path).write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    """``python -m arrakis_ray.zoo.corpus OUT.jsonl [--n N]``: the held-out fact set."""
    parser = argparse.ArgumentParser(description="Write held-out fact documents as JSONL.")
    parser.add_argument("out", type=Path, help="output .jsonl file")
    parser.add_argument("--n", type=int, default=400, help="number of documents")
    args = parser.parse_args(argv)
    write_jsonl(args.out, heldout_fact_documents(args.n))


if __name__ == "__main__":
    main()
