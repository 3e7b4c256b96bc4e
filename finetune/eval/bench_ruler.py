"""Benchmark of the RULER suite's cost: prompt building vs model time, and the shared prefill
against answering every question with its own `generate` call.

    python -m finetune.eval.bench_ruler [--lengths 1024 2048] [--samples 1] [--layers 6] [--hidden 256]

A Llama built from a config (the demo's size by default, random weights: the speed does not
depend on them), the byte tokenizer and the bundled Shakespeare as haystack. Prints a markdown
table; run it on a quiet machine (on a loaded CPU the thread count matters more than the code).
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m finetune.eval.bench_ruler", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048])
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    from data_prep.assets import byte_tokenizer, resolve_corpus
    from finetune.eval import ruler
    from finetune.eval import ruler_tasks as T
    from finetune.eval.needle import split_sentences
    from finetune.eval.prompts import greedy_answer
    from finetune.recipe import validate

    heads = max(1, a.hidden // 32)
    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=int(a.hidden * 2.7), num_hidden_layers=a.layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=259,
                      max_position_embeddings=max(a.lengths), bos_token_id=256, eos_token_id=257, pad_token_id=258)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    tok = byte_tokenizer()
    sentences = split_sentences("\n".join(d["text"] for d in list(resolve_corpus("shakespeare"))[:2]))
    print(
        f"model: {a.layers} layers, hidden {a.hidden}; {torch.get_num_threads()} threads; samples {a.samples}\n"
    )
    print("| length | build s | model s | tokens/s | prompt tokens/s | separate generate s | saved |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for L in a.lengths:
        ec = validate({"model": {"name_or_path": "x"},
                       "eval": {"lengths": [L], "ruler_depths": [0.5], "ruler_samples": a.samples}}).eval  # fmt: skip
        g = ruler.ruler_grid(model, tok, sentences, ec, progress=False)
        sp = g["speed"]
        # the same vt samples (2 questions per context) answered with one generate call each
        hay = T.Haystack(tok, sentences)
        vt = [T.generate("vt", tok, hay, L, 0.5, i, ec.seed, ["number"]) for i in range(a.samples)]
        t0 = time.perf_counter()
        for s in vt:
            for q in s.questions:
                greedy_answer(model, tok, s.context + q.ids, q.max_new_tokens)
        sep = time.perf_counter() - t0
        t0 = time.perf_counter()
        for s in vt:
            ruler.answer_questions(model, s.context, [(q.ids, q.max_new_tokens) for q in s.questions])
        shared = time.perf_counter() - t0
        print(f"| {L} | {sp['build_seconds']:.2f} | {sp['model_seconds']:.1f} | {sp['tokens_per_s']} | "
              f"{sp['prompt_tokens_per_s']} | vt: {sep:.2f} vs shared {shared:.2f} | {1 - shared / sep:.0%} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
