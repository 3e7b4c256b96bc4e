"""The `lm_eval` suite: named lm-evaluation-harness tasks on the loaded model, with its KV cache.

`LongtuneLM` is an `lm_eval.api.model.LM` over an already loaded model and tokenizer (no second
load, no Hub): generation goes through `finetune.loading.generate_with_cache` with the KV-cache
config (`eval.lm_eval_kv_cache`: the export's `kv_cache_config.json`, or full / h2o / sink /
hybrid), and log-likelihoods are computed the way generation would see the text: the context
prefilled into that cache, then the continuation fed token by token (one forward over context +
continuation for the full cache, where both are the same). Inputs longer than the largest
`eval.lengths` keep their last tokens. lm-eval is the optional `eval` extra
(`pip install -e ".[eval]"`); task YAML folders in `eval.lm_eval_include` are read offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import EvalError

EXTRA_HINT = 'install the optional extra: pip install -e ".[eval]" (lm-eval)'


def check(cfg) -> None:
    """Refuse an lm_eval suite that cannot run, before any model is loaded."""
    if not cfg.lm_eval_tasks:
        raise EvalError(
            "eval.suites has lm_eval but eval.lm_eval_tasks is empty: name the lm-eval tasks, "
            "e.g. eval.lm_eval_tasks=[ruler_niah_single_1] (docs/eval.md)"
        )
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError(f"eval.suites has lm_eval but lm-eval is not installed: {EXTRA_HINT}") from None
    for p in cfg.lm_eval_include:
        if not Path(p).is_dir():
            raise EvalError(f"eval.lm_eval_include: {p} is not a folder of lm-eval task YAML files")


def kv_policy(cfg, source: str) -> dict:
    """The KV-cache config lm-eval generates with: the named method with its defaults, or the
    export's shipped `kv_cache_config.json` (`make_cache` validates either against the model)."""
    import json

    if cfg.lm_eval_kv_cache != "export":
        return {"method": cfg.lm_eval_kv_cache}
    f = Path(source) / "kv_cache_config.json"
    if not f.is_file():
        return {"method": "full"}
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvalError(f"eval.lm_eval_kv_cache=export: {f} is not readable JSON ({e})") from None


def _lm_class():
    from lm_eval.api.model import LM

    class LongtuneLM(LM):
        """lm-eval's LM interface over a loaded model; see the module docstring."""

        def __init__(self, model, tokenizer, kv: dict, max_length: int):
            super().__init__()
            self.model, self.tok, self.kv, self.max_length = model, tokenizer, kv, max_length
            self.full = kv.get("method", "full") == "full"
            self.device_ = getattr(model, "device", torch.device("cpu"))
            prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            self.prefix = [] if prefix is None else [int(prefix)]

        def _enc(self, text: str) -> list[int]:
            return list(self.tok(text, add_special_tokens=False)["input_ids"])

        def _cache(self):
            from finetune.caches import make_cache

            return make_cache(self.model, self.kv)

        @torch.no_grad()
        def _logprobs(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
            """Sum of log p(cont | ctx) and whether cont is the greedy continuation."""
            ctx = self.prefix + ctx  # BOS first, as every longtune prompt and lm-eval's HFLM do
            if not ctx or not cont:
                raise ValueError("lm-eval request with an empty context (no BOS/EOS token) or continuation")
            ids = (ctx + cont)[-(self.max_length + 1) :]
            ctx = ids[: len(ids) - len(cont)]
            x = torch.tensor([ids], device=self.device_)
            if self.full:
                logits = self.model(input_ids=x, use_cache=False).logits[0, len(ctx) - 1 : -1]
            else:
                from .kv_cache import cache_kwarg

                cache, kw = self._cache(), cache_kwarg(self.model)
                out = self.model(input_ids=x[:, : len(ctx)], use_cache=True, **{kw: cache})
                rows = [out.logits[0, -1]]
                for t in cont[:-1]:
                    out = self.model(
                        input_ids=torch.tensor([[t]], device=self.device_), use_cache=True, **{kw: cache}
                    )
                    rows.append(out.logits[0, -1])
                logits = torch.stack(rows)
            lp = F.log_softmax(logits.float(), dim=-1)
            target = torch.tensor(cont, device=lp.device)
            total = float(lp.gather(1, target[:, None]).sum())
            greedy = bool((lp.argmax(-1) == target).all())
            return total, greedy

        def loglikelihood(self, requests):
            return [self._logprobs(self._enc(c), self._enc(x)) for c, x in (r.args for r in requests)]

        def loglikelihood_rolling(self, requests):
            out = []
            for (text,) in (r.args for r in requests):
                ids = self._enc(text)
                total, step = 0.0, self.max_length
                for start in range(0, len(ids), step):  # disjoint windows, each after its own prefix
                    total += self._logprobs([], ids[start : start + step])[0]
                out.append(total)
            return out

        @torch.no_grad()
        def generate_until(self, requests):
            from finetune.loading import generate_with_cache

            out = []
            for ctx, kw in (r.args for r in requests):
                kw = dict(kw or {})
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kw.get("max_gen_toks", 256))
                ids = (self.prefix + self._enc(ctx))[-max(1, self.max_length - max_new) :]
                x = torch.tensor([ids], device=self.device_)
                eos = self.tok.eos_token_id
                gen = generate_with_cache(
                    self.model, input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                    do_sample=False, kv_cache=self.kv, pad_token_id=eos,
                )  # fmt: skip
                text = self.tok.decode(gen[0, x.shape[1] :].tolist(), skip_special_tokens=True)
                cut = [text.index(u) for u in until if u and u in text]
                out.append(text[: min(cut)] if cut else text)
            return out

    return LongtuneLM


def _metrics(task_results: dict) -> dict:
    """``{"acc,none": 0.5, "acc_stderr,none": ..., "alias": ...}`` -> ``{"acc": 0.5, "acc_stderr": ...}``."""
    out = {}
    for k, v in task_results.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "sample_len":
            out[k.split(",")[0]] = float(v)
    return out


def run(ctx) -> dict:
    """``{"tasks": {task: {metric: value}}, "n_samples": {...}, "kv_cache": {...}}`` for one model."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    cfg = ctx.cfg
    kv = kv_policy(cfg, ctx.source)
    include = [str(Path(p).resolve()) for p in cfg.lm_eval_include] or None
    tm = TaskManager(include_path=include, include_defaults=False) if include else None
    if tm is None or any(t not in tm.all_tasks for t in cfg.lm_eval_tasks):
        tm = TaskManager(include_path=include)  # lm-eval's own tasks too (ruler_*, longbench_*)
    unknown = [t for t in cfg.lm_eval_tasks if t not in tm.all_tasks]
    if unknown:
        raise EvalError(f"eval.lm_eval_tasks: unknown lm-eval task(s) {', '.join(unknown)}")
    lm = _lm_class()(ctx.model, ctx.tokenizer, kv, max(cfg.lengths))
    res = lm_eval.simple_evaluate(
        model=lm, tasks=list(cfg.lm_eval_tasks), task_manager=tm, limit=cfg.lm_eval_limit,
        random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed, log_samples=False, bootstrap_iters=0,
    )  # fmt: skip
    return {
        "tasks": {t: _metrics(r) for t, r in (res.get("results") or {}).items()},
        "n_samples": {t: (n or {}).get("effective") for t, n in (res.get("n-samples") or {}).items()},
        "kv_cache": kv,
        "version": getattr(lm_eval, "__version__", "?"),
    }
