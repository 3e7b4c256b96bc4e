"""The RULER-style suite: generate every task's samples, answer them with one shared prefill per
context, score recall, and time it (docs/eval.md "ruler").

Speed: the context (BOS + haystack) of a sample is prefilled once into a KV cache; each of its
questions is fed on top of that cache, answered greedily, and the cache is cropped back to the
context, so a context with k questions costs one prefill instead of k. Tokens/s counts the
tokens the model actually processed (prefill, questions, generated) over the model's time;
the seconds spent building prompts are reported beside it.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from . import ruler_tasks as T


def _eos_ids(model, tokenizer) -> set[int]:
    out = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        e = getattr(src, "eos_token_id", None)
        if isinstance(e, int):
            out.add(e)
        elif isinstance(e, (list, tuple)):
            out.update(int(x) for x in e)
    return out


@torch.no_grad()
def answer_questions(
    model, context: list[int], questions: list[tuple[list[int], int]], eos=()
) -> tuple[list[list[int]], int]:
    """Greedy answers (new token ids) to each ``(question ids, max new tokens)`` asked after
    ``context``, with one prefill of the context. Returns (answers, tokens processed)."""
    from transformers import DynamicCache

    from .kv_cache import cache_kwarg

    kw = cache_kwarg(model)
    device = getattr(model, "device", torch.device("cpu"))
    cache = DynamicCache(config=model.config)
    x = torch.tensor([context], dtype=torch.long, device=device)
    model(input_ids=x, use_cache=True, **{kw: cache})
    n_ctx = len(context)
    processed = n_ctx
    answers = []
    for q_ids, max_new in questions:
        out = model(
            input_ids=torch.tensor([q_ids], dtype=torch.long, device=device), use_cache=True, **{kw: cache}
        )
        processed += len(q_ids)
        new: list[int] = []
        for step in range(max_new):
            nxt = int(out.logits[0, -1].argmax())
            new.append(nxt)
            if nxt in eos or step == max_new - 1:
                break
            out = model(input_ids=torch.tensor([[nxt]], device=device), use_cache=True, **{kw: cache})
            processed += 1
        answers.append(new)
        extra = cache.get_seq_length() - n_ctx
        if extra > 0:
            cache.crop(-extra)  # back to the context alone (transformers 5: a negative count to drop)
    return answers, processed


def ruler_grid(model, tokenizer, sentences: list[str], cfg, progress: bool = True) -> dict:
    """``{"tasks": {task: {length: {"score", "by_depth", "samples"} | {"score": None, "error"}}},
    "average": {length: mean of the task scores}, "samples": [...], "speed": {...}}``."""
    hay = T.Haystack(tokenizer, sentences)
    eos = _eos_ids(model, tokenizer)
    tasks, rows = {}, []
    build_s = model_s = 0.0
    processed = prompt_tokens = generated = 0
    cells = [(t, L) for t in cfg.ruler_tasks for L in cfg.lengths]
    bar = tqdm(total=len(cells), desc="ruler", leave=False, disable=not progress)
    for task, L in cells:
        depths = cfg.ruler_depths if task in T.DEPTH_TASKS else [None]
        by_depth: dict[str, float] = {}
        scores: list[float] = []
        try:
            for d in depths:
                cell = []
                for i in range(cfg.ruler_samples):
                    t0 = time.perf_counter()
                    s = T.generate(task, tokenizer, hay, L, d, i, cfg.seed, list(cfg.ruler_value_types))
                    t1 = time.perf_counter()
                    answers, n = answer_questions(
                        model, s.context, [(q.ids, q.max_new_tokens) for q in s.questions], eos
                    )
                    model_s += time.perf_counter() - t1
                    build_s += t1 - t0
                    processed += n
                    prompt_tokens += s.prompt_tokens
                    for q, a in zip(s.questions, answers):
                        text = tokenizer.decode(a, skip_special_tokens=True)
                        r = T.recall(text, q.expected)
                        generated += len(a)
                        cell.append(r)
                        rows.append({"task": task, "length": L, "depth": d, "index": i, "expected": q.expected,
                                     "answer": text, "recall": r, "prompt_tokens": len(s.context) + len(q.ids),
                                     **s.info})  # fmt: skip
                by_depth["none" if d is None else str(d)] = sum(cell) / len(cell)
                scores += cell
            tasks.setdefault(task, {})[str(L)] = {
                "score": sum(scores) / len(scores),
                "by_depth": by_depth,
                "samples": len(scores),
            }
        except ValueError as e:  # this length cannot hold the task: no number for the cell
            tasks.setdefault(task, {})[str(L)] = {"score": None, "error": str(e)}
        bar.update(1)
    bar.close()
    average = {}
    for L in map(str, cfg.lengths):
        got = [tasks[t][L]["score"] for t in cfg.ruler_tasks if tasks[t][L]["score"] is not None]
        average[L] = {
            "score": sum(got) / len(got) if got else None,
            "tasks": len(got),
            "of": len(cfg.ruler_tasks),
        }
    return {
        "tasks": tasks,
        "average": average,
        "samples": rows,
        "speed": {
            "build_seconds": round(build_s, 3),
            "model_seconds": round(model_s, 3),
            "tokens_processed": processed,
            "prompt_tokens_unshared": prompt_tokens,
            "generated_tokens": generated,
            "tokens_per_s": round(processed / model_s, 1) if model_s else None,
            "prompt_tokens_per_s": round(prompt_tokens / model_s, 1) if model_s else None,
        },
    }
