"""Evaluation suites: perplexity vs length, passkey, needle-in-a-haystack, attention sinks,
KV-cache memory/speed. Entry points: `run_eval(run_dir, recipe=None, models=None)` and
`main(argv)` (`longtune eval RUN_DIR`). See docs/eval.md."""

from .runner import EvalError, main, run_eval

__all__ = ["EvalError", "main", "run_eval"]
