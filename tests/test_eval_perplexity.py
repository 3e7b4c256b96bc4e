"""Perplexity protocols against hand computations (stub models with known logits)."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from finetune.eval import perplexity as P

V = 4
PROBS = torch.tensor([0.1, 0.2, 0.3, 0.4])


class FixedLogits(nn.Module):
    """Same next-token distribution at every position: nll(token t) = -log PROBS[t]."""

    def forward(self, input_ids, **kw):
        b, t = input_ids.shape
        return SimpleNamespace(logits=PROBS.log().expand(b, t, V).clone())


class PositionalLogits(nn.Module):
    """The distribution depends on the position inside the window: row j favours token j % V
    (prob 0.7, others 0.1) -- so the expected loss depends on how windows are cut."""

    def forward(self, input_ids, **kw):
        b, t = input_ids.shape
        rows = torch.full((t, V), 0.1)
        rows[torch.arange(t), torch.arange(t) % V] = 0.7
        return SimpleNamespace(logits=rows.log().expand(b, t, V).clone())


def p_positional(j: int, token: int) -> float:
    """Probability PositionalLogits gives `token` as the prediction made at window position j."""
    return 0.7 if token == j % V else 0.1


IDS = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 1, 3])  # n = 10


def nll_fixed(t: int) -> float:
    return -math.log(PROBS[t].item())


def test_window_arithmetic():
    assert P.longlora_window_starts(10, 4, 2) == [0, 2, 4, 6]
    assert P.longlora_window_starts(10, 4, 2, max_windows=2) == [0, 6]
    assert P.longlora_window_starts(10, 4, 2, max_windows=3) == [0, 4, 6]
    assert P.longlora_window_starts(3, 4, 2) == []
    assert P.sliding_windows(10, 4, 2) == [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert P.sliding_windows(10, 4, 3) == [(0, 4, 3), (3, 7, 3), (6, 10, 3)]
    assert P.sliding_windows(11, 4, 3) == [(0, 4, 3), (3, 7, 3), (6, 10, 3), (9, 11, 1)]
    assert P.sliding_windows(10, 4, 2, max_windows=2) == [(0, 4, 3), (2, 6, 2)]
    with pytest.raises(ValueError):
        P.sliding_windows(10, 4, 5)


def test_uniform_logits_give_vocab_size():
    class Uniform(nn.Module):
        def forward(self, input_ids, **kw):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 7))

    ids = torch.randint(0, 7, (50,))
    assert P.perplexity_longlora(Uniform(), ids, 16, 5, progress=False)["ppl"] == pytest.approx(7.0)
    assert P.perplexity_sliding(Uniform(), ids, 16, 8, progress=False)["ppl"] == pytest.approx(7.0)


def test_longlora_fixed_logits_by_hand():
    # windows [0,4) [2,6) [4,8) [6,10); each scores its tokens 1..3
    windows = [(1, 2, 3), (3, 4, 5), (5, 6, 7), (7, 8, 9)]
    means = [sum(nll_fixed(IDS[i].item()) for i in w) / 3 for w in windows]
    expected = math.exp(sum(means) / 4)
    r = P.perplexity_longlora(FixedLogits(), IDS, 4, 2, progress=False)
    assert r["ppl"] == pytest.approx(expected, rel=1e-6)
    assert (r["windows"], r["tokens"]) == (4, 12)


def test_longlora_positional_logits_and_cap():
    # window starting at s: the prediction at window position j (0..2) scores token ids[s + j + 1]
    def window_loss(s):
        return sum(-math.log(p_positional(j, IDS[s + j + 1].item())) for j in range(3)) / 3

    expected = math.exp((window_loss(0) + window_loss(6)) / 2)  # max_windows=2 keeps first and last
    r = P.perplexity_longlora(PositionalLogits(), IDS, 4, 2, max_windows=2, progress=False)
    assert r["ppl"] == pytest.approx(expected, rel=1e-6)
    assert r["windows"] == 2


def test_sliding_fixed_logits_scores_every_token_once():
    expected = math.exp(sum(nll_fixed(t) for t in IDS[1:].tolist()) / 9)
    for stride in (1, 2, 3):
        r = P.perplexity_sliding(FixedLogits(), IDS, 4, stride, progress=False)
        assert r["ppl"] == pytest.approx(expected, rel=1e-6), stride
        assert r["tokens"] == 9
    # stride == length: windows do not overlap, the first token of each window has no context
    scored = [1, 2, 3, 5, 6, 7, 9]
    r = P.perplexity_sliding(FixedLogits(), IDS, 4, 4, progress=False)
    assert r["ppl"] == pytest.approx(math.exp(sum(nll_fixed(IDS[i].item()) for i in scored) / 7), rel=1e-6)


def test_sliding_positional_logits_by_hand():
    # L=4, stride=2: windows (0,4) scores ids[1..3] at positions 0..2; (2,6) scores ids[4], ids[5]
    # at positions 1, 2 of its window; (4,8): ids[6], ids[7]; (6,10): ids[8], ids[9].
    terms = [
        (0, 1),
        (1, 2),
        (2, 3),
        (1, 4),
        (2, 5),
        (1, 6),
        (2, 7),
        (1, 8),
        (2, 9),
    ]  # (position, token index)
    expected = math.exp(sum(-math.log(p_positional(j, IDS[i].item())) for j, i in terms) / len(terms))
    r = P.perplexity_sliding(PositionalLogits(), IDS, 4, 2, progress=False)
    assert r["ppl"] == pytest.approx(expected, rel=1e-6)
    # default stride = length // 2 gives the same windows
    assert P.perplexity_sliding(PositionalLogits(), IDS, 4, progress=False)["ppl"] == pytest.approx(expected)


def test_text_shorter_than_length_is_not_scored():
    assert P.perplexity_longlora(FixedLogits(), IDS, 11, 2, progress=False) is None
    assert P.perplexity_sliding(FixedLogits(), IDS, 11, 2, progress=False) is None


def test_hf_model_chunked_loss_matches_transformers(tiny_llama_config, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**tiny_llama_config)).eval()
    ids = torch.randint(0, 256, (24,))
    monkeypatch.setattr(P, "LOGITS_CHUNK", 5)  # several lm_head chunks
    with torch.no_grad():
        ref = model(input_ids=ids[None], labels=ids[None]).loss.item()
    r = P.perplexity_longlora(model, ids, 24, 256, progress=False)
    assert r["loss"] == pytest.approx(ref, rel=1e-5)
    # sliding, one window: the same tokens
    assert P.perplexity_sliding(model, ids, 24, 12, progress=False)["loss"] == pytest.approx(ref, rel=1e-5)
