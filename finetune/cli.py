"""`longtune` console script: one subcommand per pipeline stage.

A failure is one paragraph on stderr and exit code 2, never a traceback; `--debug` (anywhere
on the command line) shows the traceback instead, also from the training ranks.
"""

from __future__ import annotations

import os
import sys

from finetune.debug import DEBUG_ENV, debug, error_paragraph

USAGE = """usage: longtune [--debug] <command> [args]

commands:
  prepare RECIPE [k=v ...]        tokenize and pack the recipe's data
  train   RECIPE [k=v ...]        train (DeepSpeed launcher; --dry-run for an estimate)
  export  RUN_DIR [--force]       merge LoRA, write safetensors + KV-cache config + model card
  push    RUN_DIR --repo user/x   upload an export to the Hugging Face Hub (--dry-run lists files)
  eval    RUN_DIR                 run the recipe's evaluation suites
  bench   attention|kv|long [...] attention-kernel, KV-cache or long-sequence training benchmarks
                                  -> docs/benchmarks.md
  recipe  RECIPE [k=v ...]        validate a recipe and print it resolved

--debug: show the traceback of a failure instead of a one-paragraph error
"""


def _recipe(argv: list[str]) -> int:
    from finetune.recipe import RecipeError, load_recipe

    if not argv:
        print("usage: longtune recipe RECIPE [k=v ...]", file=sys.stderr)
        return 2
    try:
        print(load_recipe(argv[0], argv[1:]).to_yaml())
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        os.environ[DEBUG_ENV] = "1"  # inherited by the training ranks
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "prepare":
        from data_prep.prepare import main as run
    elif cmd == "train":
        from finetune.launch import main as run
    elif cmd == "export":
        from finetune.export import main as run
    elif cmd == "push":
        from finetune.export.push import main as run
    elif cmd == "eval":
        from finetune.eval import main as run
    elif cmd == "recipe":
        run = _recipe
    elif cmd == "bench":
        if not rest or rest[0] not in ("attention", "kv", "long"):
            print("usage: longtune bench attention|kv|long [...]", file=sys.stderr)
            return 2
        if rest[0] == "attention":
            from kernels.bench import main as run
        elif rest[0] == "long":
            from finetune.long_bench import main as run
        else:
            from finetune.caches.bench import main as run
        rest = rest[1:]
    else:
        print(f"longtune: unknown command '{cmd}'\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        rc = run(rest)
    except KeyboardInterrupt:
        print("longtune: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug():
            raise
        print(f"error: {error_paragraph(e)}\n(longtune --debug {cmd} ... shows the traceback)", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
