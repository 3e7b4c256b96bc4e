"""The suite table: name -> how it runs on one model, its summary section, figure and headline.

`run_eval` walks this table; adding a suite is adding a row (and its name to the recipe's
`eval.suites` choices). A row's ``run`` gets a `Context` (one loaded model and the shared
evaluation text) and returns that model's result, stored under ``results[model]`` of the
suite's entry in results.json; a ``primary_only`` suite (kv_cache) runs on the first model only
and returns the whole entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import kv_cache as kv_suite
from . import needle as needle_suite
from . import passkey as passkey_suite
from . import perplexity as ppl_suite
from . import plots, report
from . import ruler as ruler_suite
from . import sinks as sinks_suite
from .texts import EvalText, token_stream

#: Characters of the evaluation text split into haystack sentences (more is never needed: the
#: haystack cycles through its sentences).
HAYSTACK_CHARS = 2_000_000


class SuiteSkipped(Exception):
    """The suite cannot run at all (e.g. no text); the reason lands under "Skipped"."""


@dataclass
class Context:
    """What a suite sees of one model: the model, its tokenizer, where it came from, the
    eval config, the shared evaluation text and that text tokenized by this tokenizer."""

    name: str
    source: str
    model: Any
    tokenizer: Any
    cfg: Any
    text: EvalText | None
    ids: Any  # 1-D LongTensor or None
    progress: bool = True


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    run: Callable[[Context], Any]
    report: Callable[[dict], str]
    plot: Callable[[Any, Path], Path | None] | None = None
    headline: Callable[[dict], list[tuple[str, Callable[[str], Any]]]] | None = None
    describe: Callable[[Any, EvalText | None], dict] | None = None  # extra fields of the entry
    primary_only: bool = False


# --------------------------------------------------------------------------- shared inputs
def haystack_sentences(text: EvalText | None) -> tuple[list[str], str]:
    """Whole sentences of the evaluation text (synthetic filler when there are fewer than 8)."""
    if text and text.documents:
        docs, n = [], 0
        for d in text.documents:
            docs.append(d)
            n += len(d)
            if n >= HAYSTACK_CHARS:
                break
        sentences = needle_suite.split_sentences("\n".join(docs))
        if len(sentences) >= 8:
            return sentences, f"sentences of {text.description}"
    return needle_suite.SYNTHETIC, "synthetic filler sentences (no corpus available)"


def _filler_ids(ctx: Context, repeat: int):
    return token_stream(ctx.tokenizer, [" ".join(needle_suite.SYNTHETIC * repeat)])


# --------------------------------------------------------------------------- runs
def _perplexity(ctx: Context):
    if ctx.ids is None:
        raise SuiteSkipped(f"no evaluation text ({ctx.text.note if ctx.text else 'no source'})")
    return ppl_suite.run({ctx.name: (ctx.model, ctx.tokenizer)}, ctx.ids, ctx.cfg, ctx.progress)[ctx.name]


def _passkey(ctx: Context):
    return passkey_suite.run({ctx.name: (ctx.model, ctx.tokenizer)}, ctx.cfg, ctx.progress)[ctx.name]


def _needle(ctx: Context):
    sentences, _ = haystack_sentences(ctx.text)
    return needle_suite.run({ctx.name: (ctx.model, ctx.tokenizer)}, sentences, ctx.cfg, ctx.progress)[
        ctx.name
    ]


def _ruler(ctx: Context):
    sentences, _ = haystack_sentences(ctx.text)
    return ruler_suite.ruler_grid(ctx.model, ctx.tokenizer, sentences, ctx.cfg, ctx.progress)


def _sinks(ctx: Context):
    ids = ctx.ids if ctx.ids is not None else _filler_ids(ctx, 200)  # no corpus: filler is still text
    return sinks_suite.run({ctx.name: (ctx.model, ctx.tokenizer)}, ids, ctx.cfg, progress=ctx.progress)[
        ctx.name
    ]


def _kv(ctx: Context):
    import json

    ids = ctx.ids if ctx.ids is not None else _filler_ids(ctx, 400)
    export_cfg = None
    f = Path(ctx.source) / "kv_cache_config.json"
    if f.is_file():
        try:
            export_cfg = json.loads(f.read_text())
        except json.JSONDecodeError:
            export_cfg = None
    out = kv_suite.run(ctx.model, ids, ctx.cfg, export_cfg, ctx.progress)
    out["model"] = ctx.name
    return out


def _lm_eval(ctx: Context):
    from . import lm_eval_bridge

    return lm_eval_bridge.run(ctx)


# --------------------------------------------------------------------------- describe
def _ppl_describe(cfg, text: EvalText | None) -> dict:
    return {
        "protocols": list(cfg.perplexity_protocols),
        "stride": cfg.perplexity_stride,
        "sliding_stride": cfg.perplexity_sliding_stride,
        "max_windows": cfg.perplexity_max_windows,
        "source": {
            "description": text.description if text else None,
            "held_out": text.held_out if text else None,
            "note": text.note if text else None,
            "tokens": None,
        },
    }


def _haystack_describe(cfg, text: EvalText | None) -> dict:
    return {"haystack": haystack_sentences(text)[1], "held_out": text.held_out if text else None}


def _ruler_describe(cfg, text: EvalText | None) -> dict:
    return {
        **_haystack_describe(cfg, text),
        "tasks": list(cfg.ruler_tasks),
        "depths": list(cfg.ruler_depths),
        "samples": cfg.ruler_samples,
        "value_types": list(cfg.ruler_value_types),
        "seed": cfg.seed,
    }


def _lm_eval_describe(cfg, text: EvalText | None) -> dict:
    return {
        "tasks": list(cfg.lm_eval_tasks),
        "limit": cfg.lm_eval_limit,
        "kv_cache_setting": cfg.lm_eval_kv_cache,
    }


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite("perplexity", "Perplexity vs context length", _perplexity, report.perplexity_md,
              plots.perplexity, report.perplexity_headline, _ppl_describe),
        Suite("passkey", "Passkey retrieval", _passkey, report.passkey_md, plots.passkey, report.passkey_headline),
        Suite("needle", "Needle in a haystack", _needle, report.needle_md, plots.needle,
              report.needle_headline, _haystack_describe),
        Suite("ruler", "RULER-style tasks", _ruler, report.ruler_md, plots.ruler, report.ruler_headline,
              _ruler_describe),
        Suite("sinks", "Attention sinks", _sinks, report.sinks_md, plots.sinks, report.sinks_headline),
        Suite("lm_eval", "lm-evaluation-harness tasks", _lm_eval, report.lm_eval_md, None,
              report.lm_eval_headline, _lm_eval_describe),
        # last: make_cache switches the model to the longtune attention for the compressed caches
        Suite("kv_cache", "KV cache memory and speed", _kv, report.kv_md, plots.kv_cache, primary_only=True),
    )
}  # fmt: skip
