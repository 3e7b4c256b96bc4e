"""Upload an export to the Hugging Face Hub: `longtune push RUN_DIR --repo user/name`.

The token comes from `token=`, `HF_TOKEN`, or the user's `huggingface-cli login`; it is never
printed. `--dry-run` lists what would be uploaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from finetune import rundir
from finetune.export.card import refresh_card
from finetune.export.repo_id import check_repo_id

#: Files an export must hold before it can be pushed.
REQUIRED = ("config.json", "README.md", "kv_cache_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class PushError(RuntimeError):
    pass


def resolve_export_dir(path: str | Path) -> tuple[Path, Path | None]:
    """(export directory, its run directory or None) for an export or a run directory.

    A run directory's own `export/` comes first: a copied run pushes its copy, never the
    export of the run its recipe names. An `export.output_dir` outside the run is used only
    when the run has no export/ of its own (a relative one inside the run is rebased)."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p, rundir.export_run_dir(p)
    cands = [rundir.default_export_dir(p)]
    recipe = rundir.saved_recipe(p) if rundir.recipe_file(p).is_file() else None
    if recipe is not None and recipe.export.output_dir:
        named, trained_in = Path(recipe.export.output_dir), Path(recipe.run_dir)
        try:  # inside the run the recipe was trained in: the same place in this one
            cands.append(p / named.resolve().relative_to(trained_in.resolve()))
        except ValueError:
            cands.append(named)
    for c in dict.fromkeys(cands):
        if (c / "config.json").is_file():
            return c, p
    looked = " or ".join(str(c) for c in dict.fromkeys(cands))
    raise PushError(
        f"{p} holds no export (no config.json in it or in {looked}); run `longtune export {p}` first"
    )


def upload_files(export_dir: Path) -> list[tuple[str, int]]:
    """(relative path, bytes) of everything that would be uploaded; hidden files are skipped."""
    files = []
    for f in sorted(export_dir.rglob("*")):
        rel = f.relative_to(export_dir)
        if not f.is_file() or any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        files.append((rel.as_posix(), f.stat().st_size))
    return files


def check_export(export_dir: Path, files: list[tuple[str, int]]) -> None:
    names = {n for n, _ in files}
    missing = [r for r in REQUIRED if r not in names]
    if missing:
        raise PushError(f"{export_dir} is not a complete longtune export (missing {', '.join(missing)})")
    if not any(n.endswith(".safetensors") for n in names):
        raise PushError(f"{export_dir} has no safetensors weights")
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise PushError(
            f"{export_dir} holds pickle files ({', '.join(pickles)}); longtune only publishes safetensors"
        )


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def push(
    export_dir, repo: str, private: bool = True, dry_run: bool = False, token: str | None = None, out=None
):
    """Create `repo` (if needed) and upload the export folder. Returns the files as (path, bytes).

    `export_dir` may be a run directory (its `export/` is used).
    """
    out = out or sys.stdout
    try:
        check_repo_id(repo)
    except ValueError as e:
        raise PushError(f"--repo: {e}") from None
    export_dir, run_dir = resolve_export_dir(export_dir)
    stale = rundir.export_staleness(export_dir, run_dir)
    if stale:
        raise PushError(rundir.stale_message(stale, run_dir))
    if run_dir is not None:  # the card shows the run's latest eval/results.json
        refresh_card(run_dir, export_dir)
    files = upload_files(export_dir)
    check_export(export_dir, files)
    total = sum(s for _, s in files)
    visibility = "private" if private else "public"
    if dry_run:
        print(f"dry run: would upload {len(files)} files ({_size(total)}) from {export_dir} "
              f"to {visibility} model repo {repo}:", file=out)  # fmt: skip
        for name, size in files:
            print(f"  {name}  {_size(size)}", file=out)
        return files

    from huggingface_hub import HfApi, get_token

    token = token or os.environ.get("HF_TOKEN") or get_token()  # the cached `hf auth login` token
    if not token:
        raise PushError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (or try --dry-run to list the files)"
        )
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id=repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(export_dir),
            repo_id=repo,
            repo_type="model",
            commit_message="Upload longtune export",
            allow_patterns=[n for n, _ in files],
        )
    except Exception as e:  # noqa: BLE001 - network, auth, quota: one paragraph, never the token
        raise PushError(f"could not upload to {repo}: {_hub_reason(e, token)}") from None
    print(f"uploaded {len(files)} files ({_size(total)}) to {url}", file=out)
    return files


def _hub_reason(e: BaseException, token: str) -> str:
    """The first line of a Hub/network error, the token scrubbed, with what to check."""
    first = (str(e).strip().splitlines() or [""])[0][:300].replace(token, "***")
    text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403):
        return f"{text} (the token was refused: check HF_TOKEN / `hf auth login` and its write access)"
    return f"{text} (is the Hub reachable from here, and the token valid?)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="longtune push", description="Upload a run's export to the Hugging Face Hub"
    )
    ap.add_argument("run_dir", help="run directory (its export/ is pushed) or an export directory")
    ap.add_argument("--repo", help="user/name on the Hub (default: the recipe's export.hub_repo)")
    vis = ap.add_mutually_exclusive_group()
    vis.add_argument(
        "--private", dest="private", action="store_true", default=None, help="private repo (default)"
    )
    vis.add_argument("--public", dest="private", action="store_false", help="public repo")
    ap.add_argument("--dry-run", action="store_true", help="list the files and sizes, upload nothing")
    a = ap.parse_intermixed_args(argv)
    repo, private = a.repo, a.private
    try:
        if (repo is None or private is None) and rundir.recipe_file(a.run_dir).is_file():
            r = rundir.saved_recipe(a.run_dir)
            repo = repo or r.export.hub_repo
            private = r.export.private if private is None else private
        if repo is None:
            raise PushError("--repo user/name is required (or set export.hub_repo in the recipe)")
        push(a.run_dir, repo, private=True if private is None else private, dry_run=a.dry_run)
    except (PushError, ValueError) as e:  # RecipeError is a ValueError
        from finetune.debug import debug

        if debug():
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
