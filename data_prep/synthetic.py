"""Synthetic retrieval documents (source type `synthetic_retrieval`).

A model learns to use information far back only if its training text rewards it. Shakespeare
alone never does, so the demo's small model scored 0 on passkey and needle at every length.
This source writes documents in the formats of the eval suites (`finetune.eval.passkey`,
`finetune.eval.needle`: the same task text, filler, key line and question, the prompt pieces
joined exactly as the eval joins them), each followed by its answer, so that a model trained
on them learns the format at the lengths it is trained on; extending it to longer
documents then shows whether the retrieval carries over.

- `passkey`: the landmark-attention prompt (task line when the document has room for it,
  "The grass is green..." filler repeats, the pass key line at a random repeat, the question)
  and the 5-digit key;
- `needle`: plain sentences (a fixed bank written here: the eval's haystack is the held-out
  text, which training must never see), the needle sentence at a random sentence boundary,
  the question and the 7-digit number.

Keys and numbers come from `random.Random("synthetic-retrieval-<seed>")`: a stream apart from
the eval's (`passkey-<seed>-<length>`, `needle-<seed>-<length>-<depth>`), and every number an
eval with the seeds in `exclude_eval_seeds` (and the default trial counts) would ask is never
used, so a correct answer at eval time is retrieval, not recall of a key seen in training.
Lengths are in characters, which are tokens for the byte tokenizer (`model.tokenizer: byte`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

#: Formats this source writes (SyntheticRetrievalSection.formats).
FORMATS = ("passkey", "needle")

_SUBJECTS = ("The miller", "A young clerk", "The old ferryman", "Her brother", "The baker's son",
             "A tired soldier", "The weaver", "Our neighbour", "The gardener", "A quiet monk",
             "The harbour master", "The shepherd", "A travelling tinker", "The schoolmaster")  # fmt: skip
_VERBS = ("carries", "mends", "counts", "sells", "paints", "sweeps", "watches", "buys",
          "forgets", "polishes", "gathers", "loads", "repairs", "sorts")  # fmt: skip
_OBJECTS = ("a basket of apples", "the broken fence", "the grain sacks", "two copper pots",
            "the chapel door", "a bundle of reeds", "the fishing nets", "a pair of boots",
            "the wool for winter", "the lanterns", "a cart of stones", "the ledger")  # fmt: skip
_PLACES = ("before dawn", "by the river", "in the market square", "near the old mill",
           "after the rain", "at the top of the hill", "behind the inn", "on the quiet pier",
           "under the bridge", "while the bells ring", "in the long evening", "by the north gate")  # fmt: skip

#: Fewest characters a document of each format needs (the question, the key line, one filler).
MIN_CHARS = {"passkey": 110, "needle": 215}


def haystack_sentence(rng: random.Random) -> str:
    """One plain sentence of the needle haystack (no digits: numbers are only the needle's)."""
    place = f" {rng.choice(_PLACES)}" if rng.random() < 0.5 else ""
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{place}."


def passkey_document(chars: int, key: str, rng: random.Random) -> tuple[str, float]:
    """The eval's passkey prompt in at most ``chars`` characters, then `` <key>.``; and the depth."""
    from finetune.eval.passkey import FILLER, INFO, QUESTION, TASK

    tail = "\n" + QUESTION + f" {key}."
    info = "\n" + INFO.format(key=key) + "\n"
    filler = FILLER + " "
    head = TASK + "\n"
    if len(head) + len(info) + len(tail) + len(filler) > chars:
        head = ""  # a short document (the base's 256 tokens) has room for the key, not the task text
    n = (chars - len(head) - len(info) - len(tail)) // len(filler)
    if n < 0:
        raise ValueError(f"{chars} characters are too few for a passkey document")
    k = rng.randint(0, n)  # n = 0: the key line right before the question (the shortest distance)
    return head + filler * k + info + filler * (n - k) + tail, (k / n if n else 1.0)


def needle_document(chars: int, value: str, rng: random.Random) -> tuple[str, float]:
    """Haystack sentences with the eval's needle sentence at a random boundary, the eval's
    question and `` <value>.``, in at most ``chars`` characters; and the depth."""
    from finetune.eval.needle import NEEDLE, QUESTION

    needle = " " + NEEDLE.format(value=value)
    tail = "\n" + QUESTION + f" {value}."
    room = chars - len(needle) - len(tail)
    hay: list[str] = []
    used = 0
    while True:
        s = " " + haystack_sentence(rng)
        if used + len(s) > room:
            break
        hay.append(s)
        used += len(s)
    if not hay:
        raise ValueError(f"{chars} characters are too few for a needle document")
    k = rng.randint(0, len(hay))
    return "".join(hay[:k]) + needle + "".join(hay[k:]) + tail, k / len(hay)


#: Trials per eval cell whose numbers are kept out of training (the suites default to 10 and 1).
EXCLUDED_TRIALS = 20


def _every_draw(rng: random.Random, lo: int, hi: int, words: int) -> set[str]:
    """``randint(lo, hi)`` started at each of the first ``words`` 32-bit outputs of ``rng``: a
    superset of every such draw a caller makes among those outputs, whatever else it draws in
    between (each `randint` / `randrange` below 2**32 starts on a fresh 32-bit output, takes
    its top ``k`` bits and rejects values past the range: CPython's `_randbelow`)."""
    n = hi - lo + 1
    k = n.bit_length()
    assert k <= 32
    top = [rng.getrandbits(32) >> (32 - k) for _ in range(words + 64)]
    out = set()
    for i in range(words):
        j = i
        while j < len(top) - 1 and top[j] >= n:
            j += 1
        out.add(str(lo + top[j]))
    return out


def eval_numbers(seeds: list[int], lengths: list[int], depths: list[float],
                 trials: int = EXCLUDED_TRIALS) -> set[str]:  # fmt: skip
    """Every passkey key and needle number the eval suites can ask with these seeds, lengths
    and needle depths (up to ``trials`` per cell): kept out of the training documents.

    A passkey trial draws the key and the depth, a needle trial the value and the first
    haystack sentence, so ``trials`` trials use well under ``8 * trials`` 32-bit outputs of
    the cell's RNG (rejection sampling included); every draw starting among them is taken."""
    out: set[str] = set()
    for seed in seeds:
        for L in lengths:
            out |= _every_draw(random.Random(f"passkey-{seed}-{L}"), 10000, 99999, 8 * trials)
            for d in depths:
                out |= _every_draw(random.Random(f"needle-{seed}-{L}-{d}"), 1_000_000, 9_999_999, 8 * trials)
    return out


def documents(section, label: str = "synthetic_retrieval") -> Iterator[tuple[str, dict]]:
    """``(where, {"text", "format", "answer", "depth"})`` for each of ``section.documents``."""
    rng = random.Random(f"synthetic-retrieval-{section.seed}")
    held = eval_numbers(section.exclude_eval_seeds, section.exclude_eval_lengths, section.exclude_eval_depths)
    for i in range(section.documents):
        fmt = rng.choice(section.formats)
        chars = rng.randint(max(section.min_chars, MIN_CHARS[fmt]), section.max_chars)
        lo, hi = (10000, 99999) if fmt == "passkey" else (1_000_000, 9_999_999)
        while True:
            answer = str(rng.randint(lo, hi))
            if answer not in held:
                break
        build = passkey_document if fmt == "passkey" else needle_document
        text, depth = build(chars, answer, rng)
        yield f"{label} document {i} ({fmt})", {"text": text, "format": fmt, "answer": answer, "depth": depth}
