"""The CLI's error policy, shared by every stage's `main`: one paragraph and exit code 2 for a
failure, the traceback only under `--debug` (`LONGTUNE_DEBUG=1`, inherited by training ranks).

Its own module so that the stages ask it without importing the console script that calls them.
"""

from __future__ import annotations

import os

DEBUG_ENV = "LONGTUNE_DEBUG"


def debug() -> bool:
    """Whether `--debug` was given (the subcommands re-raise instead of printing an error)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def error_paragraph(e: BaseException) -> str:
    """One paragraph for any exception: its message without blank lines; the type name for
    exceptions that are not ours (a library's own message may not say what failed)."""
    text = "\n".join(line for line in str(e).strip().splitlines() if line.strip())
    ours = type(e).__module__.split(".")[0] in ("finetune", "data_prep", "kernels")
    return text if ours and text else f"{type(e).__name__}: {text}" if text else type(e).__name__
