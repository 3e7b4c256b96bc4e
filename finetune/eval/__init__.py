"""Evaluation suites: perplexity vs length, passkey, needle-in-a-haystack, RULER-style tasks,
attention sinks, KV-cache memory/speed, lm-evaluation-harness tasks. Entry points:
`run_eval(run_dir, recipe=None, models=None)` and `main(argv)` (`longtune eval RUN_DIR`).
The suite table is `finetune.eval.suites.SUITES`. See docs/eval.md."""

from .cli import main
from .errors import EvalError
from .runner import run_eval

__all__ = ["EvalError", "main", "run_eval"]
