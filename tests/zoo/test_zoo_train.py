"""A very short training run: it learns, it is deterministic, its checkpoint loads."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from arrakis_ray.zoo import corpus
from arrakis_ray.zoo.train import (
    TrainConfig,
    answer_accuracy,
    build_model,
    build_tokenizer,
    encode_batch,
    lm_loss,
    train,
)

CFG = TrainConfig(steps=20, batch_size=16, warmup=5, log_every=10)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("facts")
    return out, train(out, CFG)


def test_short_run_lowers_the_loss(short_run):
    _, result = short_run
    assert len(result.losses) == CFG.steps
    first, last = result.losses[:5], result.losses[-5:]
    assert sum(last) / 5 < 0.8 * sum(first) / 5
    # An untrained model over 385 words starts near ln(385) ~ 5.95 nats.
    assert 5.0 < result.losses[0] < 7.0


def test_short_run_checkpoint_loads_offline_and_matches_its_own_accuracy(short_run):
    out, result = short_run
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert (out / "README.md").read_text().count(f"{result.heldout_accuracy:.3f}") == 1
    acc = answer_accuracy(model, tokenizer, corpus.heldout_fact_documents(400, seed=CFG.seed))
    assert acc == pytest.approx(result.heldout_accuracy)


def test_same_seed_same_losses(short_run, tmp_path):
    _, result = short_run
    # warmup=5 in both runs: the first 5 learning rates do not depend on the step count.
    again = train(tmp_path, TrainConfig(steps=5, batch_size=16, warmup=5, log_every=10))
    assert again.losses == result.losses[:5]


def test_padding_is_masked_out_of_the_loss():
    tok = build_tokenizer()
    ids, mask, labels = encode_batch(tok, ["the cat says meow .", "we count one two ."])
    assert ids[0, 0] == tok.bos_token_id and ids[0, 6] == tok.eos_token_id
    assert mask.sum(1).tolist() == [7, 7]  # <bos> + 5 words + <eos>
    longer, lmask, llabels = encode_batch(tok, ["the cat says meow .", "we count one two three ."])
    assert llabels[0, -1] == -100 and lmask[0, -1] == 0 and longer[0, -1] == tok.pad_token_id
    assert torch.equal(labels[1], ids[1])


def test_masked_loss_equals_per_sequence_loss_without_padding():
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(tok, CFG).eval()
    texts = ["the cat says meow .", "my teacher said that the capital of france is paris ."]
    ids, mask, labels = encode_batch(tok, texts)
    with torch.no_grad():
        batched = lm_loss(model, ids, mask, labels)
        # Unpadded, one sequence at a time: sum of token losses / number of tokens.
        total, count = 0.0, 0
        for i in range(len(texts)):
            n = int(mask[i].sum())
            logits = model(input_ids=ids[i : i + 1, :n]).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[i, 1:n], reduction="sum"))
            count += n - 1
    assert float(batched) == pytest.approx(total / count, rel=1e-5)
