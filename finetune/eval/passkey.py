"""Passkey retrieval with the landmark-attention prompt (Mohtashami & Jaggi; LongLoRA's
passkey_retrivial.py): task description, filler sentences repeated, the pass key line at a
random depth (a whole number of filler repeats before it), the question; greedy decoding;
exact match of the first number in the answer against the 5-digit key.
"""

from __future__ import annotations

import random

from tqdm.auto import tqdm

from .prompts import answer_budget, bos, encode, first_number, greedy_answer

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
INFO = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def build_prompt(tokenizer, length: int, key: str, rng: random.Random) -> tuple[list[int], float]:
    """Token ids of a prompt of at most ``length`` tokens (as many filler repeats as fit) and
    the depth of the key line (fraction of filler repeats before it)."""
    head = bos(tokenizer) + encode(tokenizer, TASK + "\n")
    filler = encode(tokenizer, FILLER + " ")
    info = encode(tokenizer, "\n" + INFO.format(key=key) + "\n")
    question = encode(tokenizer, "\n" + QUESTION)
    fixed = len(head) + len(info) + len(question)
    if fixed + len(filler) > length:
        raise ValueError(
            f"length {length} is too short for the passkey prompt ({fixed + len(filler)} tokens at least)"
        )
    n = (length - fixed) // len(filler)
    k = rng.randint(0, n)
    ids = head + filler * k + info + filler * (n - k) + question
    return ids, (k / n if n else 0.0)


def passkey_accuracy(
    model, tokenizer, length: int, trials: int, seed: int = 0, progress: bool = True
) -> dict:
    """``{"accuracy", "trials": [{"key", "depth", "answer", "correct", "prompt_tokens"}]}``."""
    rng = random.Random(f"passkey-{seed}-{length}")
    rows = []
    for _ in tqdm(range(trials), desc=f"passkey L={length}", leave=False, disable=not progress):
        key = str(rng.randint(10000, 99999))
        ids, depth = build_prompt(tokenizer, length, key, rng)
        text = greedy_answer(model, tokenizer, ids, answer_budget(tokenizer, key))
        got = first_number(text)
        rows.append(
            {
                "key": key,
                "depth": round(depth, 4),
                "answer": text,
                "correct": got == key,
                "prompt_tokens": len(ids),
            }
        )
    return {"accuracy": sum(r["correct"] for r in rows) / len(rows), "trials": rows}


def run(models: dict, cfg, progress: bool = True) -> dict:
    """``{model: {length: result}}`` (``{"accuracy": None, "error"}`` where the prompt cannot fit)."""
    out: dict = {}
    for name, (model, tok) in models.items():
        for length in tqdm(cfg.lengths, desc=f"passkey {name}", disable=not progress):
            try:
                r = passkey_accuracy(model, tok, length, cfg.passkey_trials, cfg.seed, progress)
            except ValueError as e:  # prompt does not fit: this length only
                r = {"accuracy": None, "error": str(e)}
            out.setdefault(name, {})[str(length)] = r
    return out
