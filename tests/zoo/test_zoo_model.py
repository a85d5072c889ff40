"""The shipped facts-gpt2 checkpoint: loads offline, recalls held-out facts."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from arrakis_ray.errors import ModelLoadError
from arrakis_ray.zoo import ZOO, corpus, zoo_path


@pytest.fixture(scope="module")
def model():
    m = AutoModelForCausalLM.from_pretrained(zoo_path("facts-gpt2"), local_files_only=True)
    return m.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(zoo_path("facts-gpt2"), local_files_only=True)


def test_zoo_lists_the_demo_model_and_names_unknown_ones():
    assert "facts-gpt2" in ZOO
    assert (zoo_path("facts-gpt2") / "model.safetensors").is_file()
    with pytest.raises(ModelLoadError, match=r"'gpt5'.*facts-gpt2"):
        zoo_path("gpt5")


def test_checkpoint_is_small_and_shaped_as_documented(model, tokenizer):
    size = (zoo_path("facts-gpt2") / "model.safetensors").stat().st_size
    assert size < 5_000_000
    cfg = model.config
    assert (cfg.model_type, cfg.n_layer, cfg.n_embd, cfg.n_head) == ("gpt2", 4, 128, 4)
    assert cfg.vocab_size == len(tokenizer) == len(corpus.vocabulary()) + 4
    assert cfg.pad_token_id == tokenizer.pad_token_id
    assert cfg.bos_token_id == tokenizer.bos_token_id


def test_tokenizer_round_trips_and_prepends_bos(tokenizer):
    text = "the capital of france is paris ."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == len(text.split()) + 1  # one id per word, plus <bos>
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.convert_ids_to_tokens(ids[1:]) == text.split()
    # Case and attached punctuation normalise to the same words.
    assert tokenizer("The capital of France is Paris.")["input_ids"] == ids


def test_heldout_fact_accuracy_above_ninety_percent(model, tokenizer):
    # One unpadded forward pass per sentence; the prediction for the answer is read
    # at the position just before it (the answer is the word before the final ".").
    docs = corpus.heldout_fact_documents(400)
    correct = 0
    with torch.no_grad():
        for d in docs:
            ids = tokenizer(d["text"], return_tensors="pt")["input_ids"]
            answer_pos = ids.shape[1] - 2
            assert tokenizer.convert_ids_to_tokens(int(ids[0, answer_pos])) == d["answer"]
            logits = model(input_ids=ids).logits
            correct += int(logits[0, answer_pos - 1].argmax()) == int(ids[0, answer_pos])
    assert correct / len(docs) > 0.9


def test_training_answers_are_recalled_too(model, tokenizer):
    # The phrasings seen in training, sanity check that the held-out rule is the hard part.
    docs = [d for d in corpus.generate_documents(300, seed=123) if d["answer"] is not None]
    enc = tokenizer([d["prompt"] for d in docs], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    last = enc["attention_mask"].sum(1) - 1
    pred = tokenizer.convert_ids_to_tokens(logits[torch.arange(len(docs)), last].argmax(-1))
    acc = sum(p == d["answer"] for p, d in zip(pred, docs, strict=True)) / len(docs)
    assert acc > 0.95
