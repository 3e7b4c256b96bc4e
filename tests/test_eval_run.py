"""run_eval / `longtune eval` end to end on a tiny saved model (byte tokenizer, CPU, seconds)."""

import json

import pytest
import torch
import yaml

from data_prep.assets import byte_tokenizer
from finetune.eval import main, run_eval

TEXT = " ".join(
    f"Sentence {w} of the evaluation text talks about the {c} {a} by the river."
    for w, c, a in zip(
        ["one", "two", "three", "four", "five", "six", "seven", "eight"] * 2,
        ["red", "green", "blue", "old", "new", "tall"] * 3,
        ["boat", "house", "tree", "bridge"] * 4,
    )
)


def _save_model(path, config, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)


@pytest.fixture
def run_dir(tmp_path, tiny_llama_config):
    cfg = dict(tiny_llama_config, max_position_embeddings=512)
    run = tmp_path / "run"
    _save_model(run / "export", cfg, 0)
    _save_model(tmp_path / "interp", cfg, 1)
    (tmp_path / "text.txt").write_text(TEXT)
    recipe = {
        "run_dir": str(run),
        "model": {"config": cfg, "tokenizer": "byte"},
        "data": {"sources": [{"type": "text", "path": str(tmp_path / "text.txt")}], "seq_length": 512},
        "eval": {
            "lengths": [384, 448],
            "perplexity_stride": 64,
            "perplexity_max_windows": 2,
            "passkey_trials": 1,
            "needle_depths": [0.5],
            "ruler_depths": [0.5],
            "ruler_samples": 1,
            "kv_decode_tokens": 1,
            "compare": {"interp": str(tmp_path / "interp")},
        },
    }
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return run


def test_run_eval_end_to_end(run_dir, capsys):
    exported = sorted(p.name for p in (run_dir / "export").iterdir())
    results = run_eval(run_dir, progress=False)
    out = run_dir / "eval"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["suites"].keys() == results["suites"].keys()
    assert list(results["models"]) == ["tuned", "interp"]
    assert any("base model not compared" in n for n in results["model_notes"])

    ppl = results["suites"]["perplexity"]
    assert ppl["source"]["held_out"] is False and "may have been seen" in ppl["source"]["note"]
    for model in ("tuned", "interp"):
        for proto in ("longlora", "sliding"):
            for L in ("384", "448"):
                r = ppl["results"][model][proto][L]
                assert r["ppl"] > 1 and r["windows"] <= 2
    pk = results["suites"]["passkey"]["results"]["tuned"]["384"]
    assert pk["accuracy"] in (0.0, 1.0) and len(pk["trials"]) == 1
    nd = results["suites"]["needle"]["results"]["interp"]
    assert nd["lengths"] == [384, 448] and nd["depths"] == [0.5] and len(nd["accuracy"][0]) == 1
    rl = results["suites"]["ruler"]["results"]["interp"]
    assert len(rl["tasks"]) == 7 and set(rl["average"]) == {"384", "448"}
    for per in rl["tasks"].values():  # a score, or why the length cannot hold the task
        assert all((r["score"] is None) == ("error" in r) for r in per.values())
    assert rl["tasks"]["niah_single"]["448"]["score"] is not None
    sk = results["suites"]["sinks"]["results"]["tuned"]
    assert len(sk["per_head"]) == 2 and len(sk["per_head"][0]) == 4 and sk["length"] == 384
    kv = results["suites"]["kv_cache"]
    full = kv["methods"]["full"]["384"]
    assert full["nbytes"] > 0 and full["decode_tokens_per_s"] > 0
    assert "hybrid" in kv["skipped"]
    for rows in kv["methods"].values():  # measured, or the error said -- never a made-up number
        for r in rows.values():
            assert ("error" in r) != ("nbytes" in r)

    for png in ("perplexity.png", "passkey.png", "needle.png", "ruler.png", "sinks.png", "kv_cache.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG") and (out / png).stat().st_size > 1000
    md = (out / "summary.md").read_text()
    for title in (
        "Perplexity vs context length",
        "Passkey retrieval",
        "Needle in a haystack",
        "RULER-style tasks",
        "Attention sinks",
        "KV cache memory and speed",
        "| length | tuned | interp |",
    ):
        assert title in md
    assert "may have been seen in training" in md
    assert "ppl longlora 384" in capsys.readouterr().out  # the summary table printed at the end
    assert sorted(p.name for p in run_dir.iterdir()) == ["eval", "export", "recipe.yaml"]  # no temp dirs left
    # eval writes only under eval/: the export (and its card) is untouched ...
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == exported
    # ... and the card, rendered from eval/results.json where it is written, shows the numbers
    from finetune.export.card import render

    card = render(run_dir / "export", run_dir / "eval")
    assert "## Evaluation" in card and "### Perplexity vs context length" in card
    ppl = results["suites"]["perplexity"]["results"]["tuned"]["longlora"]["384"]["ppl"]
    assert f"{ppl:.3f}" in card


def test_cli_subset_and_errors(run_dir, tmp_path, capsys):
    rc = main(
        [
            str(run_dir),
            "--suites",
            "perplexity",
            "passkey",
            "--lengths",
            "384",
            "--no-progress",
            "eval.perplexity_protocols=[sliding]",
            "eval.passkey_trials=1",
            "--no-base",
        ]
    )
    assert rc == 0
    res = json.loads((run_dir / "eval" / "results.json").read_text())
    assert list(res["suites"]) == ["perplexity", "passkey"]
    assert list(res["suites"]["perplexity"]["results"]["tuned"]) == ["sliding"]
    assert list(res["suites"]["passkey"]["results"]["tuned"]) == ["384"]
    assert not (run_dir / "eval" / "needle.png").exists()  # the old eval/ was replaced, not merged
    assert main([str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert "not found" in capsys.readouterr().err


def test_given_models_and_skip_reasons(run_dir, tiny_llama_config):
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.recipe import load_recipe

    recipe = load_recipe(
        run_dir / "recipe.yaml",
        ["eval.suites=[perplexity, passkey]", "eval.lengths=[64, 2000]", "eval.passkey_trials=1"],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**tiny_llama_config)).eval()
    res = run_eval(run_dir, recipe=recipe, models={"mine": (model, byte_tokenizer())}, progress=False)
    ppl = res["suites"]["perplexity"]["results"]["mine"]["longlora"]
    assert ppl["64"]["ppl"] > 1 and ppl["2000"] is None  # text too short: no number
    pk = res["suites"]["passkey"]["results"]["mine"]
    assert pk["64"]["accuracy"] is None and "too short" in pk["64"]["error"]
    md = (run_dir / "eval" / "summary.md").read_text()
    assert "text too short" in md and "not run:" in md


def test_base_model_location(tmp_path, tiny_llama_config):
    from finetune.eval.runner import base_ref
    from finetune.recipe import validate

    recipe = validate({"model": {"config": tiny_llama_config, "tokenizer": "byte"}})
    ref, why = base_ref(tmp_path, recipe)
    assert ref is None and "inline config" in why
    final = tmp_path / "final"
    _save_model(final / "base", tiny_llama_config, 0)
    (final / "longtune_model.json").write_text(json.dumps({"base_model": "base", "model_config": {}}))
    assert base_ref(tmp_path, recipe) == (str(final / "base"), None)
    pre = validate({"kind": "pretrain", "model": {"config": tiny_llama_config, "tokenizer": "byte"}})
    assert "pretrain" in base_ref(tmp_path, pre)[1]
    hub = validate({"model": {"name_or_path": "org/some-model"}})
    assert base_ref(tmp_path / "elsewhere", hub) == ("org/some-model", None)


def test_base_and_compare_models_load_their_own_paths(tmp_path, monkeypatch):
    """Regression: the base loader once late-bound the loop variable of the compare models."""
    from finetune.eval import runner
    from finetune.recipe import validate

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "longtune_model.json").write_text(json.dumps({"base_model": str(tmp_path / "the-base")}))
    monkeypatch.setattr(runner, "_load_plain", lambda ref: ("plain", ref))
    monkeypatch.setattr(runner, "_load_any", lambda ref, run_dir: ("any", ref))
    monkeypatch.setattr(runner, "_load_longtune", lambda ref: ("longtune", ref))
    monkeypatch.setattr(runner, "tuned_path", lambda run_dir, recipe: run_dir / "export")
    recipe = validate({"model": {"name_or_path": str(tmp_path / "the-base")},
                       "eval": {"compare": {"a": "/x/a", "b": "/x/b"}}})
    specs = runner.model_specs(run, recipe, recipe.eval, [])
    loaded = {s.name: s.load() for s in specs}
    assert loaded["base"] == ("plain", str(tmp_path / "the-base"))
    assert loaded["a"] == ("any", "/x/a") and loaded["b"] == ("any", "/x/b")


def test_cli_overrides_after_flags_and_one_paragraph_errors(run_dir, tmp_path, capsys):
    """Regressions (issue 10): overrides after --suites/--lengths were swallowed; `eval.lengths=[]`
    was a traceback; `--lengths 0` ran; a misspelled perplexity_source said "skipped" and replaced
    the previous results. Every failure: exit 2, one paragraph, no traceback, results untouched."""
    rc = main([str(run_dir), "--suites", "perplexity", "eval.perplexity_stride=32", "--lengths", "384",
               "eval.perplexity_max_windows=1", "--no-progress", "--no-base"])  # fmt: skip
    assert rc == 0
    before = (run_dir / "eval" / "results.json").read_bytes()
    res = json.loads(before)
    assert res["eval_config"]["perplexity_stride"] == 32 and res["eval_config"]["perplexity_max_windows"] == 1
    capsys.readouterr()
    missing = tmp_path / "no-such-text.txt"
    cases = [
        (["eval.lengths=[]"], "eval.lengths"),
        (["--lengths", "0"], "eval.lengths"),
        (["--lengths", "many"], "eval.lengths"),
        ([f"eval.perplexity_source={{type: text, path: {missing}}}"], "eval.perplexity_source"),
        (["--text", str(missing)], "eval.perplexity_source"),
        (["--suites", "perplexity", "nonsense"], "--suites"),
        (["--suites", "lm_eval"], "eval.lm_eval_tasks"),
    ]
    for extra, key in cases:
        rc = main([str(run_dir), "--no-progress", "--suites", "perplexity", *extra])
        err = capsys.readouterr().err
        assert rc == 2, extra
        assert key in err and "Traceback" not in err and "\n\n" not in err.strip(), (extra, err)
        assert (run_dir / "eval" / "results.json").read_bytes() == before, extra


def test_cli_no_loadable_model_is_exit_2(run_dir, capsys):
    (run_dir / "export" / "config.json").write_text("{ not json")
    rc = main([str(run_dir), "--suites", "passkey", "--no-base", "eval.compare={}", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "no model could be loaded" in err and "`tuned`" in err and "Traceback" not in err


def test_demo_writes_the_readme_table_from_results(tmp_path):
    """The README's demo numbers are rewritten from the run's results.json, never typed by hand."""
    import json as _json

    from finetune import demo

    results = {"created": "2026-11-29 18:00 UTC", "environment": {"device": "CPU (x86_64, 2 threads)"},
               "suites": {"perplexity": {"results": {
                   "base": {"longlora": {"256": {"ppl": 6.844}, "2048": {"ppl": 15.151}}},
                   "tuned": {"longlora": {"256": {"ppl": 8.431}, "2048": {"ppl": 9.126}}}}}}}  # fmt: skip
    res = tmp_path / "results.json"
    res.write_text(_json.dumps(results))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{demo.README_START}\nold table\n{demo.README_END}\noutro\n")
    demo.write_readme_table(res, 600.0, readme)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "| context length | base (trained at 256) | SF-Attn + LoRA+ |" in text
    assert "| 256 | 6.84 | 8.43 |" in text and "| 2048 | 15.15 | 9.13 |" in text and "10.0 min" in text
