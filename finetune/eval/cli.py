"""`longtune eval RUN_DIR`: run the recipe's evaluation suites on the run's export (docs/eval.md).

Overrides may come before, between or after the flags: `--suites` and `--lengths` take their
values up to the next flag, and any value that looks like `key=value` is an override, not a
suite or a length. Every failure is one paragraph on stderr with exit code 2 (`--debug` shows
the traceback).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from finetune import rundir

from .errors import EvalError
from .runner import SUITES, run_eval


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longtune eval", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="run directory (recipe.yaml, export/ or final/)")
    p.add_argument(
        "overrides", nargs="*", help="recipe overrides section.key=value, e.g. eval.passkey_trials=3"
    )
    p.add_argument("--recipe", help="recipe file (default: RUN_DIR/recipe.yaml)")
    p.add_argument(
        "--suites",
        nargs="+",
        metavar="SUITE",
        help=f"suites to run: {', '.join(SUITES)} (default: eval.suites)",
    )
    p.add_argument(
        "--lengths", nargs="+", metavar="N", help="context lengths in tokens (default: eval.lengths)"
    )
    p.add_argument(
        "--text",
        metavar="PATH",
        help="your own text file or folder (UTF-8) as the evaluation text of every suite "
        "(sets eval.perplexity_source to {type: text, path: PATH})",
    )
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="extra model to compare (repeatable; added to eval.compare)",
    )
    p.add_argument("--no-base", action="store_true", help="do not compare with the base model")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _split(values: list[str] | None, overrides: list[str]) -> list[str]:
    """Values of a multi-value flag; `key=value` items among them go to ``overrides``."""
    out = []
    for v in values or []:
        (overrides if "=" in v else out).append(v)
    return out


def recipe_overrides(args) -> tuple[list[str], dict[str, str]]:
    """(overrides for apply_overrides, compare models) from the parsed flags."""
    from finetune.recipe import RecipeError

    overrides = list(args.overrides)
    suites = _split(args.suites, overrides)
    lengths = _split(args.lengths, overrides)
    if args.suites is not None:
        bad = [s for s in suites if s not in SUITES]
        if bad or not suites:
            raise RecipeError(
                f"--suites: {', '.join(bad) or 'no suite given'} is not a suite (choose from {', '.join(SUITES)})"
            )
        overrides.append(f"eval.suites=[{', '.join(suites)}]")
    if args.lengths is not None:
        if not lengths:
            raise RecipeError("--lengths (eval.lengths): give at least one length in tokens")
        bad = [n for n in lengths if not n.isdigit()]
        if bad:
            raise RecipeError(f"--lengths (eval.lengths): {bad[0]!r} is not a whole number of tokens")
        overrides.append(f"eval.lengths=[{', '.join(lengths)}]")
    if args.no_base:
        overrides.append("eval.compare_base=false")
    compare = {}
    for item in args.compare:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise RecipeError(f"--compare '{item}' must look like NAME=PATH")
        compare[name] = path
    return overrides, compare


def main(argv: list[str] | None = None) -> int:
    from data_prep.errors import DataError
    from finetune.recipe import RecipeError, apply_overrides, load_raw, validate

    args = build_parser().parse_intermixed_args(argv)
    run_dir = Path(args.run_dir)
    rfile = Path(args.recipe) if args.recipe else rundir.recipe_file(run_dir)
    try:
        if not rfile.is_file():
            raise EvalError(f"{rfile} not found: is {run_dir} a run directory? (or pass --recipe FILE)")
        overrides, compare = recipe_overrides(args)
        data = apply_overrides(load_raw(rfile), overrides)
        if compare:
            data.setdefault("eval", {}).setdefault("compare", {}).update(compare)
        if args.text:
            data.setdefault("eval", {})["perplexity_source"] = {"type": "text", "path": args.text}
        recipe = validate(data, origin=str(rfile))
        results = run_eval(run_dir, recipe=recipe, progress=not args.no_progress)
        if not results["models"]:
            raise EvalError(f"no model could be loaded: {'; '.join(results['model_notes'])}")
    except (RecipeError, EvalError, DataError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"longtune eval: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one paragraph for people; --debug for the traceback
        if args.debug:
            traceback.print_exc()
        print(
            f"longtune eval: failed: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
