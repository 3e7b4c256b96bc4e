"""Perplexity vs context length, the two protocols of docs/algorithms.md section 9.

Both functions take a model (anything whose ``model(input_ids=...)`` returns ``.logits``, or a
Hugging Face causal LM) and a 1-D LongTensor of token ids, and return
``{"ppl", "loss", "windows", "tokens"}`` where ``tokens`` is the number of scored tokens.

- ``longlora``: LongLoRA's eval.py. Windows of ``length`` tokens start every ``stride`` tokens
  (0, stride, 2*stride, ... while the window fits in the text); every token of a window but
  the first is scored (the usual causal shift: ``length - 1`` predictions per window); the
  window loss is the mean over its tokens; ppl = exp(mean of window losses). LongLoRA drops
  the last window start (``all_ix.pop()``); we keep every full window.
- ``sliding``: the standard sliding window (Hugging Face "Perplexity of fixed-length
  models"). Window ``[begin, begin + length)`` with ``begin`` advancing by ``stride``; only
  the tokens not scored by an earlier window are scored (the first window scores
  ``length - 1`` tokens, later ones ``stride``, the last possibly fewer); ppl =
  exp(total NLL / total scored tokens).

``max_windows`` caps the windows scored (CPU budget): for ``longlora`` the kept windows are
spread evenly over the text (first and last included); for ``sliding`` the first
``max_windows`` windows are scored (a prefix of the text, as the protocol is sequential).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

#: Positions per lm_head chunk when computing the loss from hidden states (bounds logits memory).
LOGITS_CHUNK = 1024


def longlora_window_starts(
    n_tokens: int, length: int, stride: int, max_windows: int | None = None
) -> list[int]:
    """Start offsets of the LongLoRA windows (see module docstring)."""
    if length < 2 or n_tokens < length:
        return []
    starts = list(range(0, n_tokens - length + 1, stride))
    if max_windows is not None and len(starts) > max_windows:
        if max_windows == 1:
            return [starts[0]]
        idx = [round(k * (len(starts) - 1) / (max_windows - 1)) for k in range(max_windows)]
        starts = [starts[i] for i in sorted(set(idx))]
    return starts


def sliding_windows(
    n_tokens: int, length: int, stride: int, max_windows: int | None = None
) -> list[tuple[int, int, int]]:
    """``(begin, end, n_scored)`` of each sliding window (the last ``n_scored`` targets of
    ``[begin, end)`` are scored; the first window scores ``end - begin - 1``)."""
    if stride > length:
        raise ValueError(f"sliding stride {stride} > window length {length} leaves tokens unscored")
    out = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + length, n_tokens)
        n_scored = end - max(prev_end, begin + 1)
        if n_scored > 0:
            out.append((begin, end, n_scored))
        prev_end = end
        if end == n_tokens or (max_windows is not None and len(out) >= max_windows):
            break
    return out


def _forward_kwargs(model) -> dict:
    return {"use_cache": False} if _is_hf(model) else {}


def _is_hf(model) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, n_scored: int) -> torch.Tensor:
    """NLL (float32, nats) of the last ``n_scored`` tokens of ``ids`` (1-D) given their prefix."""
    ids = ids.reshape(1, -1)
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        ids = ids.to(device)
    n = ids.shape[1]
    if not 0 < n_scored < n:
        raise ValueError(f"n_scored={n_scored} must be in [1, {n - 1}]")
    targets = ids[0, n - n_scored :]
    body = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    if (
        _is_hf(model)
        and body is not None
        and head is not None
        and not getattr(model.config, "final_logit_softcapping", None)
    ):
        # Hidden states once, lm_head in chunks: the full (length x vocab) logits never exist.
        hidden = body(input_ids=ids, use_cache=False).last_hidden_state[0, n - n_scored - 1 : n - 1]
        out = []
        for s in range(0, n_scored, LOGITS_CHUNK):
            logits = head(hidden[s : s + LOGITS_CHUNK]).float()
            out.append(F.cross_entropy(logits, targets[s : s + LOGITS_CHUNK], reduction="none"))
        return torch.cat(out)
    logits = model(input_ids=ids, **_forward_kwargs(model)).logits
    logits = logits[0, n - n_scored - 1 : n - 1].float()
    return F.cross_entropy(logits, targets, reduction="none")


def _result(loss: float, windows: int, tokens: int) -> dict:
    return {
        "ppl": math.exp(loss) if loss < 700 else float("inf"),
        "loss": loss,
        "windows": windows,
        "tokens": tokens,
    }


@torch.no_grad()
def perplexity_longlora(
    model,
    ids: torch.Tensor,
    length: int,
    stride: int = 256,
    max_windows: int | None = None,
    progress: bool = True,
) -> dict | None:
    """LongLoRA protocol; None when the text is shorter than ``length``."""
    ids = ids.reshape(-1)
    starts = longlora_window_starts(ids.numel(), length, stride, max_windows)
    if not starts:
        return None
    losses = []
    for s in tqdm(starts, desc=f"ppl longlora L={length}", leave=False, disable=not progress):
        losses.append(token_nll(model, ids[s : s + length], length - 1).mean().item())
    return _result(sum(losses) / len(losses), len(starts), len(starts) * (length - 1))


@torch.no_grad()
def perplexity_sliding(
    model,
    ids: torch.Tensor,
    length: int,
    stride: int | None = None,
    max_windows: int | None = None,
    progress: bool = True,
) -> dict | None:
    """Sliding-window protocol (stride defaults to ``length // 2``); None when the text is
    shorter than ``length`` (the result would measure a shorter context)."""
    ids = ids.reshape(-1)
    if ids.numel() < length or length < 2:
        return None
    stride = stride or max(1, length // 2)
    windows = sliding_windows(ids.numel(), length, stride, max_windows)
    total, count = 0.0, 0
    for begin, end, n_scored in tqdm(
        windows, desc=f"ppl sliding L={length}", leave=False, disable=not progress
    ):
        nll = token_nll(model, ids[begin:end], n_scored)
        total += nll.double().sum().item()
        count += n_scored
    return _result(total / count, len(windows), count)


def run(models: dict, ids: torch.Tensor, cfg, progress: bool = True) -> dict:
    """Both protocols for every model and length: ``{model: {protocol: {length: result|None}}}``."""
    out: dict = {}
    for name, (model, _tok) in models.items():
        per = out.setdefault(name, {})
        for proto in cfg.perplexity_protocols:
            rows = per.setdefault(proto, {})
            for length in tqdm(cfg.lengths, desc=f"perplexity {name} {proto}", disable=not progress):
                if proto == "longlora":
                    r = perplexity_longlora(
                        model, ids, length, cfg.perplexity_stride, cfg.perplexity_max_windows, progress
                    )
                else:
                    stride = getattr(cfg, "perplexity_sliding_stride", None)
                    r = perplexity_sliding(model, ids, length, stride, cfg.perplexity_max_windows, progress)
                rows[str(length)] = r
    return out
