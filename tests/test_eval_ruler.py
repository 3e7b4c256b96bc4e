"""RULER-style tasks: generators against a rule-based solver (an always-right answerer), the
recall scorer on hand-built cases, determinism per seed, the shared prefill against separate
greedy generation, and the suite end to end through the CLI on a tiny run."""

import json
import re
from collections import Counter

import pytest
import torch

from data_prep.assets import byte_tokenizer
from finetune.eval import ruler, ruler_tasks
from finetune.eval.needle import SYNTHETIC
from finetune.recipe import validate

TOK = byte_tokenizer()
LENGTH = 1100  # the byte tokenizer: every task fits


def _solve(prompt: str) -> list[str]:
    """Answer a RULER prompt from its text alone (independent of the generator's bookkeeping)."""
    question = prompt.rsplit("\n", 1)[1]
    if "special magic" in question:
        keys = re.search(r"special magic \w+ for (.+?) mentioned", question).group(1)
        keys = re.split(r", | and ", keys)
        found = re.findall(r"One of the special magic \w+ for ([\w-]+) is: ([\w-]+)\.", prompt)
        return [v for k in keys for kk, v in found if kk == k]
    if "assigned the value" in question:
        value = re.search(r"assigned the value (\d+)", question).group(1)
        names = re.findall(rf"VAR ([A-Z]+) = {value}\.", prompt)
        while True:
            more = [x for x in re.findall(r"VAR ([A-Z]+) = VAR ([A-Z]+)\.", prompt) if x[1] in names and x[0] not in names]
            if not more:
                return names
            names += [x[0] for x in more]
    if "most common words" in question:
        n = int(re.search(r"the (\d+) most common", question).group(1))
        return [w for w, _ in Counter(re.findall(r"\d+\. (\w+)", prompt)).most_common(n)]
    if "three most frequently" in question:
        body = prompt.split("coded words.\n", 1)[1].split("\nQuestion", 1)[0]
        return [w for w, _ in Counter(body.split()).most_common(3)]
    raise AssertionError(f"unknown question: {question}")


def _samples(seed=0, length=LENGTH):
    hay = ruler_tasks.Haystack(TOK, SYNTHETIC)
    out = []
    for task in ruler_tasks.TASKS:
        depths = [0.0, 0.5, 1.0] if task in ruler_tasks.DEPTH_TASKS else [None]
        for d in depths:
            for i in range(3):  # the three value types of the niah tasks
                out.append(ruler_tasks.generate(task, TOK, hay, length, d, i, seed, ["number", "word", "uuid"]))
    return out


def test_generators_fit_the_length_and_an_always_right_answerer_scores_1():
    for s in _samples():
        for q in s.questions:
            assert len(s.context) + len(q.ids) + q.max_new_tokens <= LENGTH
            prompt = TOK.decode(s.context + q.ids, skip_special_tokens=True)
            solved = _solve(prompt)
            assert sorted(solved) == sorted(q.expected), (s.task, s.info)
            assert ruler_tasks.recall(" " + ", ".join(solved), q.expected) == 1.0
            assert ruler_tasks.recall("I do not know.", q.expected) == 0.0


def test_task_shapes():
    by = {}
    for s in _samples():
        by.setdefault(s.task, []).append(s)
    assert [len(s.questions[0].expected) for s in by["niah_multivalue"][:1]] == [4]
    assert [len(s.questions[0].expected) for s in by["niah_multiquery"][:1]] == [4]
    assert by["niah_multikey"][0].info["distractors"] == 3 and by["niah_single"][0].info["distractors"] == 0
    assert len(by["vt"][0].questions) == 2  # one question per chain, sharing one prefill
    assert all(len(q.expected) == 5 for q in by["vt"][0].questions)
    kinds = {s.info["value_type"] for s in by["niah_single"]}
    assert kinds == {"number", "word", "uuid"}
    uuid_s = next(s for s in by["niah_single"] if s.info["value_type"] == "uuid")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuid_s.questions[0].expected[0])
    # depth: the needle at depth 0 comes before the one at depth 1
    d0, d1 = by["niah_single"][0], by["niah_single"][-1]
    assert d0.info["needle_depths"][0] < 0.1 and d1.info["needle_depths"][0] > 0.9
    cwe = by["cwe"][0]
    counts = Counter(re.findall(r"\d+\. (\w+)", TOK.decode(cwe.context, skip_special_tokens=True)))
    common = cwe.questions[0].expected
    assert min(counts[w] for w in common) > max(c for w, c in counts.items() if w not in common)


def test_generators_are_deterministic_per_seed():
    a, b, c = _samples(0), _samples(0), _samples(1)
    assert [(s.context, [q.ids for q in s.questions]) for s in a] == [(s.context, [q.ids for q in s.questions]) for s in b]
    assert [s.context for s in a] != [s.context for s in c]


def test_recall_partial_answers():
    assert ruler_tasks.recall("alpha and GAMMA", ["alpha", "beta", "gamma", "delta"]) == 0.5
    assert ruler_tasks.recall("", ["x"]) == 0.0


def test_too_short_is_an_error_not_a_zero():
    hay = ruler_tasks.Haystack(TOK, SYNTHETIC)
    with pytest.raises(ValueError, match="fwe at length 300"):
        ruler_tasks.generate("fwe", TOK, hay, 300, None, 0, 0, ["number"])


def _oracle(mode):
    """An answer_questions replacement that answers from the prompt text: right, wrong or half."""

    def answer(model, context, questions, eos=()):
        outs = []
        for q_ids, _ in questions:
            solved = _solve(TOK.decode(context + q_ids, skip_special_tokens=True))
            words = {"right": solved, "wrong": ["nothing"], "half": solved[: len(solved) // 2]}[mode]
            outs.append(TOK(" " + ", ".join(words), add_special_tokens=False)["input_ids"])
        return outs, len(context)

    return answer


@pytest.mark.parametrize("mode", ["right", "wrong", "half"])
def test_grid_scores_and_averages(monkeypatch, mode):
    monkeypatch.setattr(ruler, "answer_questions", _oracle(mode))
    cfg = validate({"model": {"name_or_path": "x"},
                    "eval": {"lengths": [300, LENGTH], "ruler_depths": [0.2, 0.8], "ruler_samples": 2}}).eval  # fmt: skip
    g = ruler.ruler_grid(None, TOK, SYNTHETIC, cfg, progress=False)
    assert g["tasks"]["fwe"]["300"]["score"] is None and "too short" in g["tasks"]["fwe"]["300"]["error"]
    for task in ruler_tasks.TASKS:
        cell = g["tasks"][task][str(LENGTH)]
        rows = [r for r in g["samples"] if r["task"] == task and r["length"] == LENGTH]
        if mode == "half":
            expect = sum(len(r["expected"]) // 2 / len(r["expected"]) for r in rows) / len(rows)
        else:
            expect = 1.0 if mode == "right" else 0.0
        assert cell["score"] == pytest.approx(expect)
        assert cell["samples"] == len(rows) == (4 if task in ruler_tasks.DEPTH_TASKS else 2) * (2 if task == "vt" else 1)
    scores = [g["tasks"][t][str(LENGTH)]["score"] for t in ruler_tasks.TASKS]
    assert g["average"][str(LENGTH)]["score"] == pytest.approx(sum(scores) / len(scores))
    assert g["speed"]["prompt_tokens_unshared"] > g["speed"]["tokens_processed"] > 0


@pytest.mark.parametrize("hybrid", [False, True])
def test_shared_prefill_answers_equal_separate_generation(tiny_llama_config, hybrid):
    """Also for a LongGen hybrid layout (a sink_window layer under the longtune attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.eval.prompts import greedy_answer
    from kernels.layout import install_layout

    cfg = LlamaConfig(**tiny_llama_config)
    if hybrid:
        install_layout(cfg, {"version": 1, "backend": "auto", "cross_document": False,
                             "layers": [{"pattern": "causal"}, {"pattern": "sink_window", "window": 8, "num_sink_tokens": 2}]})  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    context = [256] + TOK("The lantern by the door has burned all night.", add_special_tokens=False)["input_ids"]
    qs = [TOK(q, add_special_tokens=False)["input_ids"] for q in ("\nWhat burned?", "\nWhere is the lantern? It is")]
    got, processed = ruler.answer_questions(model, context, [(q, 6) for q in qs], eos={257})
    for q, a in zip(qs, got):
        assert TOK.decode(a, skip_special_tokens=True) == greedy_answer(model, TOK, context + q, 6)
    assert processed <= len(context) + sum(len(q) + 5 for q in qs)  # the context was prefilled once


def test_cli_ruler_end_to_end_on_a_tiny_run(tmp_path, tiny_llama_config):
    """`longtune eval RUN --suites ruler <override> --lengths N`: overrides after the flags are
    kept (issue 10), a length past max_position_embeddings runs with a note."""
    import yaml

    from finetune.eval import main

    cfg = dict(tiny_llama_config, max_position_embeddings=512)
    run = tmp_path / "run"
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(run / "export")
    TOK.save_pretrained(run / "export")
    (tmp_path / "hay.txt").write_text(" ".join(SYNTHETIC * 3))
    recipe = {"run_dir": str(run), "model": {"config": cfg, "tokenizer": "byte"},
              "data": {"sources": [{"type": "text", "path": str(tmp_path / "hay.txt")}], "seq_length": 64}}  # fmt: skip
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    rc = main([str(run), "--suites", "ruler", "eval.ruler_samples=1", "--lengths", str(LENGTH),
               "eval.ruler_depths=[0.5]", "--no-progress", "--text", str(tmp_path / "hay.txt")])  # fmt: skip
    assert rc == 0
    res = json.loads((run / "eval" / "results.json").read_text())
    assert res["eval_config"]["ruler_samples"] == 1 and res["eval_config"]["ruler_depths"] == [0.5]
    g = res["suites"]["ruler"]["results"]["tuned"]
    assert set(g["tasks"]) == set(ruler_tasks.TASKS)
    for task in ruler_tasks.TASKS:
        assert 0.0 <= g["tasks"][task][str(LENGTH)]["score"] <= 1.0
    assert g["average"][str(LENGTH)]["tasks"] == 7 and g["speed"]["tokens_per_s"] > 0
    assert "hay.txt" in res["suites"]["ruler"]["haystack"]
    assert any("max_position_embeddings 512" in n and str(LENGTH) in n for n in res["model_notes"])
    assert res["models"]["tuned"]["lengths_beyond_positions"] == [LENGTH]
    md = (run / "eval" / "summary.md").read_text()
    assert "RULER-style tasks" in md and "tokens/s" in md and "**average**" in md and "max_position_embeddings 512" in md
    assert (run / "eval" / "ruler.png").read_bytes().startswith(b"\x89PNG")


def test_haystack_vocabulary_holds_whole_words_only():
    hay = ruler_tasks.Haystack(TOK, ["The honeysuckle grew by a wall.", "An extraordinarily quiet bee."])
    assert "honeysuckl" not in hay.vocabulary and "extraordin" not in hay.vocabulary
    assert {"grew", "wall", "quiet", "bee"} <= set(hay.vocabulary)
