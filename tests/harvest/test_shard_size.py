"""The automatic shard size in packed mode: each shard holds ~128 MiB of activations.

Plans are built by ``plan_run`` (no Ray) over JSONL corpora of documents of varied
length; each shard's size is predicted from its documents' tokens counted here, by the
run's tokenizer, never from the plan's own estimate.
"""

from __future__ import annotations

import json
import random
from itertools import islice

import numpy as np
import pytest

from arrakis_ray.config import pipeline_from_dict
from arrakis_ray.harvest import plan
from arrakis_ray.harvest.batch import SHARD_FIELDS
from arrakis_ray.harvest.model_source import load_tokenizer
from arrakis_ray.harvest.tokenize import TokenizeShard

CONTEXT = 256
# words of an encyclopedia page: some in the zoo tokenizer's vocabulary, most <unk>
WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are "
    "which this be also has had first one their its new after who they have two people "
    "government university history international development population capital france "
    "paris language music river village station district century railway published "
    "northern championship album elected"
).split()


def _corpus(path, n_docs: int, seed: int = 0, token_ids: bool = False) -> None:
    """``n_docs`` JSONL records with an id, a url and a text of 300 to 3,000 characters
    (or, with ``token_ids``, the text's words as ids in a 'tokens' column)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n_docs):
            length, words = rng.randint(300, 3000), []
            while length > 0:
                word = rng.choice(WORDS)
                if rng.random() < 0.07:
                    word += rng.choice([".", ",", ";"])
                words.append(word.capitalize() if rng.random() < 0.05 else word)
                length -= len(word) + 1
            record = {"id": i, "url": f"https://example.org/wiki/Page_{i}"}
            if token_ids:
                record["tokens"] = [3 + WORDS.index(w.lower().rstrip(".,;")) for w in words]
            else:
                record["text"] = " ".join(words)
            f.write(json.dumps(record) + "\n")


def _pipeline(path, n_embd: int, hooks: list[str], **data) -> dict:
    return {
        "name": "shard-size",
        "model": {
            "arch": "gpt2",
            "config": {
                "n_embd": n_embd,
                "n_layer": 4,
                "n_head": 8,
                "vocab_size": 400,
                "n_positions": CONTEXT,
            },
            "tokenizer": "zoo:facts-gpt2",
        },
        "data": {"path": str(path), "context_length": CONTEXT, "mode": "packed", **data},
        "harvest": {"hooks": hooks, "storage_dtype": "float16"},
    }


def _shard_tokens(run_plan, path) -> list[int]:
    """Tokens of each shard's packed stream, counted from the corpus file: every
    document as <bos> text <eos> through the run's tokenizer (or its given ids)."""
    n_docs = sum(s.count for s in run_plan.shards)
    with open(path) as f:
        records = [json.loads(line) for line in islice(f, n_docs)]
    tokenizer = load_tokenizer(run_plan.config.model)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def doc_tokens(record) -> int:
        if "tokens" in record:
            return 1 + len(record["tokens"]) + 1
        ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
        return len(ids) + (ids[0] != bos) + 1

    assert bos is not None and eos is not None
    counts = [doc_tokens(r) for r in records]
    return [sum(counts[s.first_doc : s.first_doc + s.count]) for s in run_plan.shards]


def _harvest_tokens(run_plan, shard) -> int:
    """Tokens the harvest's tokenize step makes of one shard."""
    step = TokenizeShard(run_plan.config, run_plan.shape.d_vocab)
    out = step({f: np.array([getattr(shard, f)]) for f in SHARD_FIELDS})
    return int(out["lengths"][0].sum())


def _assert_shards_near_target(run_plan, path) -> None:
    """Every full shard's predicted activations lie within 2x of SHARD_BYTES."""
    config = run_plan.config
    shard_size = config.harvest.shard_size
    n_docs = sum(s.count for s in run_plan.shards)
    # the byte target decides, not the bounds (16 to 4,096, at least MIN_SHARDS shards)
    assert plan.SHARD_SIZE_RANGE[0] < shard_size < -(-n_docs // plan.MIN_SHARDS)
    tokens = _shard_tokens(run_plan, path)
    assert tokens[0] == _harvest_tokens(run_plan, run_plan.shards[0])  # counted as it does
    shapes = plan.hook_shapes(config)
    sizes = [
        plan.predict_bytes(shapes, t, CONTEXT, "float16")
        for t, s in zip(tokens, run_plan.shards, strict=True)
        if s.count == shard_size
    ]
    assert len(sizes) >= plan.MIN_SHARDS - 1
    for size in sizes:
        assert plan.SHARD_BYTES / 2 <= size <= 2 * plan.SHARD_BYTES, (shard_size, size >> 20)


def test_first_600_documents_of_a_larger_corpus(tmp_path):
    # the report: max_documents 600 of a bigger file planned 16-document shards (the
    # floor) of ~40 MiB, the whole file's bytes counted as tokens of the 600 documents
    corpus = tmp_path / "pages.jsonl"
    _corpus(corpus, 3000)
    config = pipeline_from_dict(
        _pipeline(corpus, 1024, ["blocks.*.hook_resid_post"], max_documents=600)
    )
    run_plan = plan.plan_run(config)
    assert sum(s.count for s in run_plan.shards) == 600
    _assert_shards_near_target(run_plan, corpus)

    # the documents after the first 600 change nothing
    first = tmp_path / "first.jsonl"
    first.write_text("".join(corpus.read_text().splitlines(keepends=True)[:600]))
    alone = plan.plan_run(pipeline_from_dict(_pipeline(first, 1024, ["blocks.*.hook_resid_post"])))
    assert alone.config.harvest.shard_size == run_plan.config.harvest.shard_size


@pytest.mark.parametrize(
    ("n_embd", "hooks", "token_ids"),
    [
        (256, ["blocks.*.hook_resid_post", "blocks.*.mlp.hook_post"], False),
        (512, ["blocks.*.hook_resid_post"], False),
        (1024, ["blocks.*.hook_resid_post"], True),  # ids as JSON lists, ~4 bytes each
    ],
)
def test_whole_corpus(tmp_path, n_embd, hooks, token_ids):
    corpus = tmp_path / "pages.jsonl"
    _corpus(corpus, 1200, seed=n_embd, token_ids=token_ids)
    data = {"token_column": "tokens"} if token_ids else {}
    run_plan = plan.plan_run(pipeline_from_dict(_pipeline(corpus, n_embd, hooks, **data)))
    _assert_shards_near_target(run_plan, corpus)
