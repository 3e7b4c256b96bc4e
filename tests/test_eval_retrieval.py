"""Passkey and needle: prompt construction, and accuracy of models that always / never answer."""

import random
import re

import pytest
import torch

from data_prep.assets import byte_tokenizer
from finetune.eval import needle, passkey


class Oracle:
    """A 'model' whose generate reads the prompt and answers the hidden number (or a wrong one)."""

    def __init__(self, tok, pattern: str, right: bool):
        self.tok, self.pattern, self.right = tok, pattern, right
        self.prompts = []

    def generate(self, input_ids, max_new_tokens, **kw):
        assert kw.get("do_sample") is False  # greedy
        text = self.tok.decode(input_ids[0].tolist(), skip_special_tokens=True)
        self.prompts.append(text)
        value = re.search(self.pattern, text).group(1)
        answer = f" {value}." if self.right else " 00000."
        new = self.tok(answer, add_special_tokens=False)["input_ids"][:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([new])], dim=1)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_passkey_prompt(tok):
    rng = random.Random(0)
    ids, depth = passkey.build_prompt(tok, 600, "48213", rng)
    filler = len(tok(passkey.FILLER + " ", add_special_tokens=False)["input_ids"])
    assert 600 - filler < len(ids) <= 600  # as many filler repeats as fit
    text = tok.decode(ids, skip_special_tokens=True)
    assert text.startswith(passkey.TASK)
    assert text.endswith(passkey.QUESTION)
    assert "The pass key is 48213. Remember it. 48213 is the pass key." in text
    assert 0.0 <= depth <= 1.0
    with pytest.raises(ValueError):
        passkey.build_prompt(tok, 100, "48213", rng)


def test_passkey_accuracy_always_and_never(tok):
    right = Oracle(tok, r"The pass key is (\d{5})\.", right=True)
    r = passkey.passkey_accuracy(right, tok, 500, trials=4, seed=1, progress=False)
    assert r["accuracy"] == 1.0
    keys = [t["key"] for t in r["trials"]]
    assert all(len(k) == 5 for k in keys) and len(set(keys)) > 1
    assert all(t["prompt_tokens"] <= 500 for t in r["trials"])
    wrong = Oracle(tok, r"The pass key is (\d{5})\.", right=False)
    assert passkey.passkey_accuracy(wrong, tok, 500, trials=4, seed=1, progress=False)["accuracy"] == 0.0
    # same seed -> same keys and depths
    again = passkey.passkey_accuracy(right, tok, 500, trials=4, seed=1, progress=False)
    assert [t["key"] for t in again["trials"]] == keys


def test_needle_grid_depths_and_accuracy(tok):
    sentences = needle.split_sentences(
        "One fish swims. Two birds fly! The tree is tall; the sky is wide.\nA line 12345 here."
    )
    assert "A line 12345 here." not in sentences  # numbers that could be mistaken for the needle are dropped
    rng = random.Random(0)
    ids, d0 = needle.build_prompt(tok, needle.SYNTHETIC, 400, 0.0, "1234567", rng)
    text = tok.decode(ids, skip_special_tokens=True)
    assert len(ids) <= 400 and d0 == 0.0
    assert text.lstrip().startswith("The special magic number is 1234567.")
    ids, d1 = needle.build_prompt(tok, needle.SYNTHETIC, 400, 1.0, "1234567", rng)
    assert d1 == 1.0
    assert tok.decode(ids, skip_special_tokens=True).endswith(
        "The special magic number is 1234567.\n" + needle.QUESTION
    )
    _, dm = needle.build_prompt(tok, needle.SYNTHETIC, 400, 0.5, "1234567", rng)
    assert 0.3 < dm < 0.7

    pattern = r"The special magic number is (\d{7})\."
    g = needle.needle_grid(
        Oracle(tok, pattern, True),
        tok,
        needle.SYNTHETIC,
        [200, 300],
        [0.0, 0.5, 1.0],
        trials=2,
        progress=False,
    )
    assert g["accuracy"] == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    g = needle.needle_grid(
        Oracle(tok, pattern, False), tok, needle.SYNTHETIC, [200], [0.0, 1.0], progress=False
    )
    assert g["accuracy"] == [[0.0, 0.0]]
    # a length too short for the prompt gives no number, not a zero
    g = needle.needle_grid(Oracle(tok, pattern, True), tok, needle.SYNTHETIC, [50], [0.5], progress=False)
    assert g["accuracy"] == [[None]]


def test_greedy_answer_on_a_real_model(tok, tiny_llama_config):
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.eval.prompts import greedy_answer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**tiny_llama_config)).eval()
    ids = tok("hello", add_special_tokens=False)["input_ids"]
    a = greedy_answer(model, tok, ids, 5)
    assert a == greedy_answer(model, tok, ids, 5)  # deterministic
    assert isinstance(a, str)
