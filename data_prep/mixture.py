"""Per-source document selection: the eval split, length upsampling and mixture weights.

The eval split is chosen first, by document (`choose_eval_documents`): the mixture then draws
(and repeats) training documents only, so no document is in both splits.

Length upsampling ("Data Engineering for Scaling LMs to 128K Context", Fu et al. 2024): documents
of at least `long_doc_tokens` tokens are all kept, shorter ones each with probability
`short_keep_prob`, which raises the share of long documents without changing the domain mix.

Mixture weights set each source's share of the tokens drawn: with `T` the tokens of all
sources after filtering and upsampling and `W` the sum of the weights, source `i` contributes
`T * w_i / W` tokens. A source asked for more than it has is repeated (whole passes, each in a
fresh random order, then a prefix of one more); one asked for less contributes a random subset.
The draw stops at the first document that reaches the target, so each source overshoots by
less than one document. One source, or weights proportional to the sources' sizes, draws
every document exactly once.
"""

from __future__ import annotations

import numpy as np


def length_upsample(
    lengths: np.ndarray, long_doc_tokens: int | None, short_keep_prob: float, rng
) -> np.ndarray:
    """Boolean mask of documents kept: every long one, short ones with probability `short_keep_prob`."""
    keep = np.ones(len(lengths), dtype=bool)
    if long_doc_tokens is None or short_keep_prob >= 1.0:
        return keep
    short = lengths < long_doc_tokens
    draws = rng.random(len(lengths))  # one draw per document, so the result does not depend on batching
    keep[short] = draws[short] < short_keep_prob
    return keep


def draw_mixture(lengths: list[np.ndarray], weights: list[float], rng) -> list[np.ndarray]:
    """Indices (with repeats) drawn from each source so its token share follows `weights`."""
    totals = [int(x.sum()) for x in lengths]
    total = sum(totals)
    wsum = float(sum(weights))
    out = []
    for x, t, w in zip(lengths, totals, weights):
        if t == 0:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        target = total * (w / wsum)
        passes = int(target // t)
        remaining = target - passes * t
        if remaining < 1e-6 * t:  # float noise: weights proportional to sizes give whole passes
            remaining = 0.0
        parts = [rng.permutation(len(x)) for _ in range(passes)]
        if remaining > 0:
            perm = rng.permutation(len(x))
            n = int(np.searchsorted(np.cumsum(x[perm]), remaining, side="left")) + 1
            parts.append(perm[: min(n, len(x))])
        out.append(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
    return out


def choose_eval_documents(lengths: np.ndarray, fraction: float, min_tokens: float, rng) -> np.ndarray:
    """Boolean mask of one source's documents held out for the eval split (whole documents).

    Chosen before packing and before the mixture draw, so no document (and no repeat of one)
    can be on both sides: a seeded random subset whose tokens first reach
    ``max(fraction * tokens, min_tokens)``, never every document.
    """
    mask = np.zeros(len(lengths), dtype=bool)
    if fraction <= 0 or not len(lengths):
        return mask
    target = max(fraction * float(lengths.sum()), float(min_tokens))
    perm = rng.permutation(len(lengths))
    k = int(np.searchsorted(np.cumsum(lengths[perm]), target, side="left")) + 1
    mask[perm[: min(k, len(lengths) - 1)]] = True
    return mask
