"""The lm-evaluation-harness bridge, offline: a local task YAML over a local JSON Lines file,
scored by lm-eval through `LongtuneLM`, against the same numbers computed directly."""

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval", reason='lm-eval is the optional `eval` extra: pip install -e ".[eval]"')

from data_prep.assets import byte_tokenizer
from finetune.eval import lm_eval_bridge
from finetune.eval.errors import EvalError
from finetune.eval.suites import Context
from finetune.recipe import validate

TOK = byte_tokenizer()
DOCS = [
    {"question": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
    {"question": "Two plus two is", "choices": [" four", " five"], "answer": 0},
    {"question": "Grass is", "choices": [" red", " green"], "answer": 1},
    {"question": "Snow is", "choices": [" white", " black"], "answer": 0},
]
MC = """task: longtune_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GEN = """task: longtune_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture
def tasks(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "mc.yaml").write_text(MC.format(data=data))
    (folder / "gen.yaml").write_text(GEN.format(data=data))
    return folder


@pytest.fixture
def model(tiny_llama_config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**tiny_llama_config)).eval()


def _cfg(tasks, **kw):
    return validate({"model": {"name_or_path": "x"},
                     "eval": {"suites": ["lm_eval"], "lm_eval_tasks": ["longtune_tiny_mc", "longtune_tiny_gen"],
                              "lm_eval_include": [str(tasks)], "lengths": [100], **kw}}).eval  # fmt: skip


def _direct_logprob(model, ctx: str, cont: str) -> float:
    c = [256] + TOK(ctx, add_special_tokens=False)["input_ids"]
    x = TOK(cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([c + x])).logits[0].float(), -1)
    return float(sum(lp[len(c) - 1 + i, t] for i, t in enumerate(x)))


def test_local_task_scores_match_a_direct_computation(tasks, model):
    from finetune.eval.prompts import greedy_answer

    out = lm_eval_bridge.run(Context("m", "/no/export", model, TOK, _cfg(tasks), None, None, False))
    acc = sum(
        max(range(len(d["choices"])), key=lambda i: _direct_logprob(model, d["question"], " " + d["choices"][i].strip()))
        == d["answer"]
        for d in DOCS
    ) / len(DOCS)  # lm-eval joins context and choice with its target_delimiter " "
    assert out["tasks"]["longtune_tiny_mc"]["acc"] == pytest.approx(acc)
    gen = []
    for d in DOCS:
        ids = [256] + TOK(d["question"], add_special_tokens=False)["input_ids"]
        text = greedy_answer(model, TOK, ids, 5).split(".")[0]
        gen.append(text.strip() == d["choices"][d["answer"]].strip())
    assert out["tasks"]["longtune_tiny_gen"]["exact_match"] == pytest.approx(sum(gen) / len(gen))
    assert out["kv_cache"] == {"method": "full"} and out["n_samples"]["longtune_tiny_mc"] == 4


@pytest.mark.parametrize(
    "kv", [{"method": "sink", "window": 200, "num_sink_tokens": 4}, {"method": "h2o", "heavy": 100, "recent": 100}]
)
def test_cache_policy_path_equals_full_when_nothing_is_evicted(tasks, model, kv):
    """A sink / H2O cache with budgets wider than every input keeps everything: same log-likelihoods."""
    cls = lm_eval_bridge._lm_class()
    full = cls(model, TOK, {"method": "full"}, 100)
    sink = cls(model, TOK, kv, 100)
    for d in DOCS:
        ctx, cont = TOK(d["question"], add_special_tokens=False)["input_ids"], TOK(" blue sky", add_special_tokens=False)["input_ids"]
        a, b = full._logprobs(ctx, cont), sink._logprobs(ctx, cont)
        assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
        assert a[0] == pytest.approx(_direct_logprob(model, d["question"], " blue sky"), abs=1e-4)


def test_bad_lm_eval_settings_are_refused_before_loading(tasks, tmp_path):
    with pytest.raises(EvalError, match="lm_eval_tasks is empty"):
        lm_eval_bridge.check(_cfg(tasks, lm_eval_tasks=[]))
    with pytest.raises(EvalError, match="lm_eval_include"):
        lm_eval_bridge.check(_cfg(tmp_path / "nowhere"))


def test_unknown_task_looks_in_lm_evals_own_tasks_then_names_the_key(tasks, monkeypatch):
    import lm_eval.tasks

    made = []

    class FakeTaskManager:  # lm-eval's real index of its own tasks takes ~15 s to build
        def __init__(self, include_path=None, include_defaults=True):
            made.append(include_defaults)
            self.all_tasks = ["longtune_tiny_mc"] + (["niah_single_1"] if include_defaults else [])

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", FakeTaskManager)
    with pytest.raises(EvalError, match="eval.lm_eval_tasks: unknown lm-eval task.*longtune_tiny_nope"):
        lm_eval_bridge.run(Context("m", "/x", None, TOK, _cfg(tasks, lm_eval_tasks=["longtune_tiny_nope"]), None, None, False))
    assert made == [False, True]  # the local folder alone first, then with lm-eval's own tasks


def test_an_evicting_cache_policy_changes_the_log_likelihood(model):
    """The policy is applied, not silently replaced by the full cache."""
    cls = lm_eval_bridge._lm_class()
    ctx = TOK("The lantern by the door has burned all night.", add_special_tokens=False)["input_ids"]
    cont = TOK(" Wind moves through the tall grass.", add_special_tokens=False)["input_ids"]
    full = cls(model, TOK, {"method": "full"}, 100)._logprobs(ctx, cont)[0]
    small = cls(model, TOK, {"method": "sink", "window": 4, "num_sink_tokens": 1}, 100)._logprobs(ctx, cont)[0]
    assert abs(full - small) > 1e-3
