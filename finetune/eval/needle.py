"""Needle-in-a-haystack: accuracy over (context length x depth).

The haystack is whole sentences of a text (the evaluation corpus, or synthetic filler when
none is available), the needle sentence goes between sentences at the token offset closest
to ``depth`` x haystack length (0.0 = start, 1.0 = just before the question), the model
answers greedily and the first number of its answer must equal the needle's 7-digit number.
"""

from __future__ import annotations

import random
import re

from tqdm.auto import tqdm

from .prompts import answer_budget, bos, encode, first_number, greedy_answer

NEEDLE = "The special magic number is {value}."
QUESTION = "What is the special magic number mentioned in the text above? The special magic number is"
SYNTHETIC = [
    "The river bends twice before it reaches the old mill.",
    "A gray cat sleeps on the warm stones near the gate.",
    "Merchants count their coins while the market slowly empties.",
    "The lantern by the door has burned all night.",
    "Wind moves through the tall grass on the hill.",
    "Two sailors mend a net on the quiet pier.",
    "The library keeps its oldest maps in a locked drawer.",
    "Rain taps on the roof of the small bakery.",
]


def split_sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?;:])\s+|\n+", text)
    return [p.strip() for p in parts if p and p.strip() and not re.search(r"\d{4,}", p)]


def build_prompt(
    tokenizer, sentences: list[str], length: int, depth: float, value: str, rng: random.Random
) -> tuple[list[int], float]:
    """Prompt ids (at most ``length`` tokens) and the achieved depth (token fraction)."""
    head = bos(tokenizer)
    needle = encode(tokenizer, " " + NEEDLE.format(value=value))
    question = encode(tokenizer, "\n" + QUESTION)
    budget = length - len(head) - len(needle) - len(question)
    if budget < 1:
        raise ValueError(f"length {length} is too short for the needle prompt")
    start = rng.randrange(len(sentences))
    hay: list[list[int]] = []
    used = 0
    i = start
    while True:
        piece = encode(tokenizer, " " + sentences[i % len(sentences)])
        if used + len(piece) > budget:
            break
        hay.append(piece)
        used += len(piece)
        i += 1
        if not piece:  # pragma: no cover - a tokenizer that drops a whole sentence
            break
    # insertion point: sentence boundary whose cumulative offset is closest to depth * used
    target = depth * used
    cum = [0]
    for p in hay:
        cum.append(cum[-1] + len(p))
    k = min(range(len(cum)), key=lambda j: abs(cum[j] - target))
    ids = head + [t for p in hay[:k] for t in p] + needle + [t for p in hay[k:] for t in p] + question
    return ids, (cum[k] / used if used else 0.0)


def needle_grid(
    model,
    tokenizer,
    sentences: list[str],
    lengths: list[int],
    depths: list[float],
    trials: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """``{"accuracy": [[acc per depth] per length], "lengths", "depths", "trials": [...]}``
    (accuracy None where the length cannot hold the prompt)."""
    acc, rows = [], []
    cells = [(L, d) for L in lengths for d in depths]
    bar = tqdm(total=len(cells) * trials, desc="needle", leave=False, disable=not progress)
    for L in lengths:
        line = []
        for d in depths:
            rng = random.Random(f"needle-{seed}-{L}-{d}")
            ok = 0
            for _ in range(trials):
                value = str(rng.randint(1_000_000, 9_999_999))
                try:
                    ids, got_depth = build_prompt(tokenizer, sentences, L, d, value, rng)
                except ValueError as e:  # this length cannot hold the prompt: no number for the cell
                    rows.append({"length": L, "depth": d, "error": str(e)})
                    ok = None
                    bar.update(trials)
                    break
                text = greedy_answer(model, tokenizer, ids, answer_budget(tokenizer, value))
                correct = first_number(text) == value
                ok += correct
                rows.append(
                    {
                        "length": L,
                        "depth": d,
                        "actual_depth": round(got_depth, 4),
                        "value": value,
                        "answer": text,
                        "correct": correct,
                        "prompt_tokens": len(ids),
                    }
                )
                bar.update(1)
            line.append(None if ok is None else ok / trials)
        acc.append(line)
    bar.close()
    return {"lengths": list(lengths), "depths": list(depths), "accuracy": acc, "trials": rows}


def run(models: dict, sentences: list[str], cfg, progress: bool = True) -> dict:
    return {
        name: needle_grid(
            model, tok, sentences, cfg.lengths, cfg.needle_depths, cfg.needle_trials, cfg.seed, progress
        )
        for name, (model, tok) in models.items()
    }
