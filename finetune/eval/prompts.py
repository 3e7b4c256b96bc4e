"""Prompt assembly shared by passkey and needle: token-exact lengths, greedy answers.

Prompts are assembled from separately tokenized pieces (``add_special_tokens=False``) so the
prompt length in tokens is exact; the tokenizer's BOS, if it has one, comes first.
"""

from __future__ import annotations

import re

import torch


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def bos(tokenizer) -> list[int]:
    tid = getattr(tokenizer, "bos_token_id", None)
    return [tid] if tid is not None else []


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def _generate_kwargs(model) -> dict:
    kw = {"do_sample": False}
    tok = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if tok is None and eos is not None:
        kw["pad_token_id"] = eos if isinstance(eos, int) else eos[0]
    return kw


@torch.no_grad()
def greedy_answer(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    """Greedy continuation of ``ids`` decoded to text (the new tokens only)."""
    x = torch.tensor([ids], dtype=torch.long)
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        x = x.to(device)
    kw = _generate_kwargs(model)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, **kw)
    new = out[0, x.shape[1] :].tolist()
    return tokenizer.decode(new, skip_special_tokens=True)


def answer_budget(tokenizer, answer: str) -> int:
    """New tokens to generate for a numeric answer: its own tokens plus slack."""
    return len(encode(tokenizer, " " + answer)) + 4
