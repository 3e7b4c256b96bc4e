"""RULER-style task generators and their scorer (Hsieh et al., 2024; docs/eval.md "ruler").

Pure functions of (tokenizer, haystack sentences, length, depth, seeded RNG): every prompt is
assembled from separately tokenized pieces, so its length in tokens is exact and
``context + longest question + answer budget <= length`` (RULER subtracts the tokens to
generate from the length too). A sample is one *context* (BOS, haystack with the inserted
needles / statements / word list) and one or more *questions* appended to it; questions of one
context share its prefill (``finetune.eval.ruler``).

Scoring is RULER's ``string_match_all``: the recall of the expected strings in the answer
(case-insensitive substring match), averaged over a task's samples, then over tasks.
"""

from __future__ import annotations

import random
import re
import string
import uuid
from collections import Counter
from dataclasses import dataclass, field

from .prompts import bos, encode

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
#: Tasks whose first insert is placed at a depth; the others (word lists) have no depth.
DEPTH_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt")

ADJECTIVES = (
    "amber", "bold", "brisk", "calm", "clever", "crimson", "dusty", "eager", "fancy", "gentle",
    "golden", "hollow", "icy", "jolly", "kind", "lively", "misty", "noble", "olive", "proud",
    "quiet", "rapid", "rusty", "silver", "sturdy", "tidy", "vivid", "wild", "young", "zesty",
)  # fmt: skip
NOUNS = (
    "anchor", "badger", "canyon", "dolphin", "ember", "falcon", "glacier", "harbor", "island",
    "jasmine", "kettle", "lantern", "meadow", "nectar", "orchard", "pebble", "quartz", "raven",
    "saddle", "thistle", "umbrella", "violin", "walnut", "yarrow", "zephyr", "beacon", "cobalt",
    "delta", "fjord", "garnet",
)  # fmt: skip
KIND = {"number": "numbers", "word": "words", "uuid": "uuids"}
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_QUESTION = (
    "What are all the special magic {kind} for {keys} mentioned in the provided text? "
    "The special magic {kind} for {keys} mentioned in the provided text are"
)
VT_STATEMENT_FIRST = "VAR {var} = {value}."
VT_STATEMENT = "VAR {var} = VAR {prev}."
VT_QUESTION = (
    "Question: Find all variables that are assigned the value {value} in the text above. "
    "Answer: According to the chain(s) of variable assignment in the text above, {n} variables "
    "are assigned the value {value}, they are:"
)
CWE_HEAD = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
CWE_QUESTION = (
    "Question: What are the {n} most common words in the above list? "
    "Answer: The top {n} words appearing most often in the list are:"
)
FWE_HEAD = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words.\n"
)
FWE_QUESTION = (
    "Question: What are the three most frequently appeared words in the above coded text? "
    "Answer: According to the coded text above, the three most frequently appeared words are:"
)


@dataclass
class Question:
    ids: list[int]
    expected: list[str]
    max_new_tokens: int


@dataclass
class Sample:
    task: str
    length: int
    depth: float | None
    context: list[int]
    questions: list[Question]
    info: dict = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the prompts as if each question had its own copy of the context."""
        return sum(len(self.context) + len(q.ids) for q in self.questions)


# --------------------------------------------------------------------------- scoring
def recall(answer: str, expected: list[str]) -> float:
    """RULER string_match_all: share of the expected strings found in the answer (case-insensitive)."""
    a = answer.lower()
    return sum(e.lower() in a for e in expected) / len(expected)


# --------------------------------------------------------------------------- values
def value(kind: str, rng: random.Random) -> str:
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "word":
        return f"{rng.choice(ADJECTIVES)}{rng.choice(NOUNS)}"
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown value type {kind!r}")


def keys(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct keys like ``silver-falcon``."""
    pool = [f"{a}-{b}" for a in ADJECTIVES for b in NOUNS]
    return rng.sample(pool, n)


def distinct_values(kind: str, n: int, rng: random.Random) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = value(kind, rng)
        if v not in out:
            out.append(v)
    return out


def answer_budget(tokenizer, expected: list[str]) -> int:
    """New tokens for an answer listing ``expected``: 1.5 x their tokens with separators (room
    for a numbered list or a repeated key) + 10."""
    return int(1.5 * len(encode(tokenizer, " " + ", ".join(expected)))) + 10


# --------------------------------------------------------------------------- haystack
class Haystack:
    """Sentences of the evaluation text, tokenized once per tokenizer (memoised)."""

    def __init__(self, tokenizer, sentences: list[str]):
        if not sentences:
            raise ValueError("the haystack needs at least one sentence")
        self.tokenizer = tokenizer
        self.sentences = sentences
        self._ids: dict[int, list[int]] = {}
        # whole words of 3-10 letters (not the first 10 letters of a longer word)
        self.vocabulary = sorted({w.lower() for s in sentences for w in re.findall(r"\b[A-Za-z]{3,10}\b", s)})

    def sentence(self, i: int) -> list[int]:
        i %= len(self.sentences)
        if i not in self._ids:
            self._ids[i] = encode(self.tokenizer, " " + self.sentences[i])
        return self._ids[i]

    def fill(self, budget: int, inserts: list[tuple[float, list[int]]], rng: random.Random):
        """Whole sentences from a seeded start up to ``budget`` tokens (inserts included), each
        insert at the sentence boundary closest to its depth. Returns (ids, achieved depths)."""
        room = budget - sum(len(t) for _, t in inserts)
        if room < 1:
            raise ValueError("too short for the inserted statements")
        i = rng.randrange(len(self.sentences))
        hay: list[list[int]] = []
        used = 0
        while True:
            piece = self.sentence(i)
            if not piece or used + len(piece) > room:
                break
            hay.append(piece)
            used += len(piece)
            i += 1
        cum = [0]
        for p in hay:
            cum.append(cum[-1] + len(p))
        at: dict[int, list[list[int]]] = {}
        got = []
        for d, toks in inserts:
            k = min(range(len(cum)), key=lambda j: abs(cum[j] - d * used))
            at.setdefault(k, []).append(toks)
            got.append(cum[k] / used if used else 0.0)
        ids: list[int] = []
        for k in range(len(hay) + 1):
            for toks in at.get(k, []):
                ids += toks
            if k < len(hay):
                ids += hay[k]
        return ids, got


def _niah(task, tok, hay: Haystack, length: int, depth: float, kind: str, rng: random.Random) -> Sample:
    n_keys = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 1, "niah_multiquery": 4}[task]
    ks = keys(n_keys, rng)
    if task == "niah_multivalue":
        vals = distinct_values(kind, 4, rng)
        needles = [(ks[0], v) for v in vals]
        asked, expected = ks[:1], vals
    else:
        vals = distinct_values(kind, n_keys, rng)
        needles = list(zip(ks, vals))
        asked = ks if task == "niah_multiquery" else ks[:1]
        expected = vals if task == "niah_multiquery" else vals[:1]
    # the first needle at the cell's depth, the others (more values, more keys, distractors) at
    # seeded random depths
    depths = [depth] + [rng.random() for _ in needles[1:]]
    inserts = [
        (d, encode(tok, " " + NEEDLE.format(kind=KIND[kind], key=k, value=v)))
        for d, (k, v) in zip(depths, needles)
    ]
    key_txt = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + " and " + asked[-1]
    q = encode(tok, "\n" + NIAH_QUESTION.format(kind=KIND[kind], keys=key_txt))
    budget_new = answer_budget(tok, expected)
    head = bos(tok)
    room = length - len(head) - len(q) - budget_new
    ids, got = hay.fill(room, inserts, rng)
    return Sample(task, length, depth, head + ids, [Question(q, expected, budget_new)],
                  {"value_type": kind, "needle_depths": [round(g, 4) for g in got],
                   "distractors": len(needles) - len(expected)})  # fmt: skip


def _var_names(n: int, rng: random.Random) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(string.ascii_uppercase) for _ in range(5)))
    return sorted(out, key=lambda _: rng.random())


def _vt(
    tok, hay: Haystack, length: int, depth: float, rng: random.Random, chains: int = 2, hops: int = 4
) -> Sample:
    """``chains`` chains of ``hops`` + 1 variables, one question per chain (they share the prefill).
    Statement j of each chain sits at depth ``depth + (1 - depth) * j / (hops + 1)``."""
    names = _var_names(chains * (hops + 1), rng)
    values = [str(v) for v in rng.sample(range(10000, 99999), chains)]
    inserts, questions = [], []
    for c in range(chains):
        var = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        for j, x in enumerate(var):
            text = (
                VT_STATEMENT_FIRST.format(var=x, value=values[c])
                if j == 0
                else VT_STATEMENT.format(var=x, prev=var[j - 1])
            )
            inserts.append((depth + (1 - depth) * j / (hops + 1), encode(tok, " " + text)))
        q = encode(tok, "\n" + VT_QUESTION.format(value=values[c], n=hops + 1))
        questions.append(Question(q, var, answer_budget(tok, var)))
    head = bos(tok)
    room = length - len(head) - max(len(q.ids) for q in questions) - max(q.max_new_tokens for q in questions)
    ids, got = hay.fill(room, inserts, rng)
    return Sample("vt", length, depth, head + ids, questions,
                  {"chains": chains, "hops": hops, "first_statement_depth": round(got[0], 4)})  # fmt: skip


def _numbered(tok, words: list[str]) -> list[int]:
    ids: list[int] = []
    for i, w in enumerate(words, 1):
        ids += encode(tok, f" {i}. {w}")
    return ids


def _cwe(tok, hay: Haystack, length: int, rng: random.Random) -> Sample:
    """Common words: ``num_cw`` words ``freq_cw`` times each, as many uncommon words as fit
    ``freq_ucw`` times each, shuffled into a numbered list (RULER: 10, 30, 3; fewer common
    words / repeats when the length cannot hold 300 entries)."""
    pool = [w for w in hay.vocabulary if len(w) >= 4]
    if len(pool) < 40:
        pool = sorted(set(pool) | {n for n in NOUNS} | {a for a in ADJECTIVES})
    rng.shuffle(pool)
    head = bos(tok) + encode(tok, CWE_HEAD)
    per_entry = max(1, len(_numbered(tok, pool[:20])) / 20) * 1.15
    for num_cw, freq_cw in ((10, 30), (10, 10), (5, 10), (5, 6), (3, 6), (2, 5)):
        common = pool[:num_cw]
        q = encode(tok, "\n" + CWE_QUESTION.format(n=num_cw))
        budget_new = answer_budget(tok, common)
        room = length - len(head) - len(q) - budget_new
        if num_cw * freq_cw * per_entry <= 0.8 * room:
            break
    else:
        raise ValueError(f"length {length} is too short for the common-words list")
    freq_ucw = min(3, freq_cw - 2)
    n_ucw = min(len(pool) - num_cw, int((room / per_entry - num_cw * freq_cw) / freq_ucw))
    while True:
        words = common * freq_cw + pool[num_cw : num_cw + max(0, n_ucw)] * freq_ucw
        order = random.Random(rng.random()).sample(words, len(words))
        ids = _numbered(tok, order)
        if len(ids) <= room or n_ucw <= 0:
            break
        n_ucw -= max(1, n_ucw // 10)
    if len(ids) > room:
        raise ValueError(f"length {length} is too short for the common-words list")
    return Sample("cwe", length, None, head + ids, [Question(q, common, budget_new)],
                  {"num_cw": num_cw, "freq_cw": freq_cw, "freq_ucw": freq_ucw, "uncommon": max(0, n_ucw)})  # fmt: skip


def _fwe(tok, hay: Haystack, length: int, rng: random.Random, alpha: float = 2.0) -> Sample:
    """Frequent words: coded words (random letter strings) with Zipf counts ``N / rank**alpha``;
    the three most frequent are asked (counts of ranks 3 and 4 differ by at least one)."""
    vocab: list[str] = []
    while len(vocab) < 60:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))
        if w not in vocab:
            vocab.append(w)
    head = bos(tok) + encode(tok, FWE_HEAD)
    q = encode(tok, "\n" + FWE_QUESTION)
    budget_new = answer_budget(tok, vocab[:3])
    room = length - len(head) - len(q) - budget_new
    per_word = len(encode(tok, " " + " ".join(vocab[:20]))) / 20 * 1.1

    def counts(n):
        return [int(n / r**alpha) for r in range(1, len(vocab) + 1)]

    n = int(room / per_word / sum(1 / r**alpha for r in range(1, len(vocab) + 1)))
    while n >= 24:
        words = [w for w, c in zip(vocab, counts(n)) for _ in range(c)]
        ids = encode(tok, " " + " ".join(random.Random(rng.random()).sample(words, len(words))))
        if len(ids) <= room:
            break
        n -= max(1, n // 10)
    else:
        raise ValueError(f"length {length} is too short for the frequent-words text")
    c = Counter(words)
    top = [w for w, _ in c.most_common(3)]
    assert c[top[2]] > c.most_common(4)[3][1]  # the top 3 is unambiguous by construction
    return Sample("fwe", length, None, head + ids, [Question(q, top, budget_new)],
                  {"alpha": alpha, "total_words": len(words), "top_counts": [c[w] for w in top]})  # fmt: skip


def generate(
    task: str, tokenizer, hay: Haystack, length: int, depth: float | None, index: int, seed: int,
    value_types: list[str],
) -> Sample:  # fmt: skip
    """Sample ``index`` of ``task`` at ``length`` / ``depth``: the same for every model and run
    with the same seed and tokenizer (the RNG is seeded by all of them)."""
    rng = random.Random(f"ruler-{seed}-{task}-{length}-{depth}-{index}")
    try:
        if task.startswith("niah_"):
            return _niah(task, tokenizer, hay, length, depth, value_types[index % len(value_types)], rng)
        if task == "vt":
            return _vt(tokenizer, hay, length, depth, rng)
        if task == "cwe":
            return _cwe(tokenizer, hay, length, rng)
        if task == "fwe":
            return _fwe(tokenizer, hay, length, rng)
    except ValueError as e:
        raise ValueError(f"{task} at length {length}: {e}") from None
    raise ValueError(f"unknown RULER task {task!r} (known: {', '.join(TASKS)})")
