"""The run directory: its layout, its metadata and the only way anything in it is written.

Every stage (train, launch, export, push, load, eval, demo) reads and writes a run through
this module, so "which folder is the model", "which checkpoint can be resumed" and "is this
export still the trained model" have one answer each (docs/design.md, "Run directory"):

    <run_dir>/recipe.yaml           resolved recipe (identity of the run)
    <run_dir>/run.json              status written when training ends
    <run_dir>/checkpoint-N/         Trainer checkpoints; complete once trainer_state.json exists
    <run_dir>/final/                adapter (or full weights) + tokenizer + longtune_model.json
    <run_dir>/export/               merged model (`longtune export`), marked by longtune_export.json
    <run_dir>/eval/                 evaluation results
    <run_dir>/logs/                 TensorBoard logs
    <run_dir>/data/                 prepared dataset (unless data.output_dir)

Writes are atomic: a file or a folder is built under a hidden temporary sibling and renamed
into place, so a crash leaves the old version or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: Written by train into final/ (and into checkpoints it makes readable): base, config, id.
MODEL_META = "longtune_model.json"
#: Written by export into every folder it creates: its provenance, and the mark that lets a
#: later export replace the folder (export never deletes a folder without it).
EXPORT_INFO = "longtune_export.json"
RECIPE_FILE = "recipe.yaml"
RUN_FILE = "run.json"
FINAL = "final"
EXPORT = "export"
EVAL = "eval"
LOGS = "logs"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"

#: Sections whose change makes an existing checkpoint belong to another run.
IDENTITY_SECTIONS = ("kind", "model", "rope", "attention", "hybrid", "lora", "data")


# --------------------------------------------------------------------------- atomic writes
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary sibling and a rename."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: the file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def swap_in(tmp: Path, out: Path) -> None:
    """`tmp` (a finished folder) becomes `out`; an old `out` is removed only after the rename,
    and put back if the rename fails."""
    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield an empty hidden sibling folder; when the block succeeds it replaces `out`.

    On any failure (or kill) the temporary folder is dropped and `out` is untouched; a killed
    process leaves only a hidden `.<name>.tmp-*` folder, which `clean_leftovers` removes.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700: the folder gets the usual mode
    try:
        yield tmp
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_once(out: str | Path, marker: str, write: Callable[[Path], dict]) -> Path:
    """Write a cache folder `out` through `write(tmp)`, whose dict becomes `out/marker`, written
    last: a folder with the marker is complete. A folder without it (a build killed half-way) is
    replaced; when a concurrent builder renamed its complete folder first, that one is kept."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        info = write(tmp)
        (tmp / marker).write_text(json.dumps(info, indent=2))
        if out.exists() and not (out / marker).is_file():
            shutil.rmtree(out, ignore_errors=True)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def clean_leftovers(out: str | Path) -> list[Path]:
    """Remove hidden `.<name>.tmp-*` / `.<name>.old-*` folders a killed writer of `out` left."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    gone = []
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for p in out.parent.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


# --------------------------------------------------------------------------- paths
def recipe_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / RECIPE_FILE


def final_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / FINAL


def default_export_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / EXPORT


def eval_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / EVAL


def logs_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / LOGS


def is_model_dir(p: str | Path) -> bool:
    """A folder a model loads from: an export / HF checkpoint (config.json) or a run's final/."""
    p = Path(p)
    return (p / "config.json").is_file() or (p / MODEL_META).is_file()


def model_dir(path: str | Path) -> Path:
    """Which folder is the model: `path` itself, else its export/ (unless stale: the run was
    trained again after it), else its final/."""
    p = Path(path)
    if is_model_dir(p):
        return p
    for sub in (EXPORT, FINAL):
        if is_model_dir(p / sub) and not (sub == EXPORT and export_staleness(p / sub, p)):
            return p / sub
    if is_model_dir(p / EXPORT):
        raise FileNotFoundError(stale_message(export_staleness(p / EXPORT, p), p))
    raise FileNotFoundError(f"{p} is not an exported model, a run directory or a run's final/")


def run_of(path: str | Path) -> Path:
    """A run directory, or its final/ (-> the run directory)."""
    p = Path(path)
    return p.parent if (p / MODEL_META).is_file() and p.name == FINAL else p


# --------------------------------------------------------------------------- identity
def identity(recipe) -> dict[str, Any]:
    """The recipe sections that decide what a checkpoint is (not where or how long it runs)."""
    d = recipe.model_dump(mode="json")
    out = {k: d[k] for k in IDENTITY_SECTIONS}
    # Where the data lives and how fast it is read do not change what is trained.
    out["data"] = {k: v for k, v in out["data"].items() if k not in ("output_dir", "num_proc")}
    return out


def identity_hash(recipe) -> str:
    return hashlib.sha256(json.dumps(identity(recipe), sort_keys=True).encode()).hexdigest()[:16]


def base_fingerprint(recipe) -> str | None:
    """Identity of a base read from a local folder (the demo's pretrained model): the id its
    longtune training wrote, else a hash of its config and weight files' sizes and times.
    None for Hub ids and inline configs. A run records it; retraining the base makes the run
    another run, instead of resuming (or reusing) one trained on different weights."""
    name = recipe.model.name_or_path
    if not name or not Path(name).is_dir():
        return None
    p = Path(name)
    meta = model_meta(p)
    if meta is not None and meta.get("model_id"):
        return str(meta["model_id"])
    h = hashlib.sha256()
    for f in sorted(p.glob("*.json")) + sorted(p.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def trained_base_fingerprint(run_dir: str | Path) -> str | None:
    """The base fingerprint recorded by the run's newest model record (final/ or checkpoint)."""
    for d in [final_dir(run_dir), *reversed(checkpoints(run_dir))]:
        meta = model_meta(d)
        if meta is not None and "base_fingerprint" in meta:
            return meta["base_fingerprint"]
    return None


def saved_recipe(run_dir: str | Path):
    """The run's resolved recipe.yaml as a Recipe, or None when there is none."""
    path = recipe_file(run_dir)
    if not path.is_file():
        return None
    from finetune.recipe import load_recipe

    return load_recipe(path)


# --------------------------------------------------------------------------- metadata
def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def model_meta(folder: str | Path) -> dict[str, Any] | None:
    """longtune_model.json of a final/ (or checkpoint) folder, None if absent/unreadable."""
    return read_json(Path(folder) / MODEL_META)


def new_model_id() -> str:
    """A fresh identity for a final/ written by train: exports record it to detect staleness."""
    return uuid.uuid4().hex


def run_status(run_dir: str | Path) -> dict[str, Any] | None:
    return read_json(Path(run_dir) / RUN_FILE)


# --------------------------------------------------------------------------- checkpoints
def checkpoint_step(p: Path) -> int:
    return int(p.name.rsplit("-", 1)[-1])


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Every `checkpoint-N/` folder, oldest first (complete or not)."""
    found = [
        p
        for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*")
        if p.is_dir() and p.name.rsplit("-", 1)[-1].isdigit()
    ]
    return sorted(found, key=checkpoint_step)


def is_complete(ckpt: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint without it (a run killed
    while saving) cannot be resumed from."""
    state = read_json(Path(ckpt) / TRAINER_STATE)
    return state is not None and "global_step" in state


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    return [p for p in checkpoints(run_dir) if is_complete(p)]


def resume_point(run_dir: str | Path) -> tuple[Path | None, list[Path]]:
    """(newest complete checkpoint or None, incomplete checkpoints newer than it)."""
    ckpts = checkpoints(run_dir)
    complete = [p for p in ckpts if is_complete(p)]
    last = complete[-1] if complete else None
    newer = [
        p
        for p in ckpts
        if not is_complete(p) and (last is None or checkpoint_step(p) > checkpoint_step(last))
    ]
    return last, newer


def has_state(run_dir: str | Path) -> bool:
    """Anything trained lives here (checkpoints or final/)."""
    return bool(checkpoints(run_dir)) or final_dir(run_dir).exists()


def finished_step(run_dir: str | Path) -> int | None:
    """The step a finished run ended at, else None: final/ present and run.json `done`, or
    (killed between the two writes) final/'s own record of the step it was saved at."""
    meta = model_meta(final_dir(run_dir))
    if meta is None:
        return None
    status = run_status(run_dir) or {}
    for step in (
        status.get("global_step") if status.get("status") == "done" else None,
        meta.get("global_step"),
    ):
        if isinstance(step, int) and not isinstance(step, bool):
            return step
    return None


def derived_paths(run_dir: str | Path, recipe=None) -> list[Path]:
    """Everything a training run produced: deleting these restarts the run from scratch.

    The prepared data is not here: it is keyed by its own hash and re-prepared when stale.
    An export outside the run (export.output_dir) is listed only if export wrote it."""
    run_dir = Path(run_dir)
    out = checkpoints(run_dir) + [
        final_dir(run_dir),
        run_dir / f"{FINAL}.tmp",
        default_export_dir(run_dir),
        eval_dir(run_dir),
        logs_dir(run_dir),
        run_dir / RUN_FILE,
    ]
    if recipe is not None and recipe.export.output_dir:
        ext = Path(recipe.export.output_dir)
        if (ext / EXPORT_INFO).is_file():
            out.append(ext)
    return [p for p in out if p.exists() or p.is_symlink()]


def clear_derived(run_dir: str | Path, recipe=None) -> list[Path]:
    gone = derived_paths(run_dir, recipe)
    for p in gone:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
    return gone


# --------------------------------------------------------------------------- export provenance
def _file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def source_record(run_dir: str | Path, source: str | Path) -> dict[str, Any]:
    """What an export records about the folder it merged: which one, and its identity.

    final/: the id train wrote into longtune_model.json (a hash of that file for runs older
    than ids); a checkpoint: its step and a hash of its trainer_state.json. Both also record
    the final/ id at the time, so an export made before training finished is stale after."""
    run_dir, source = Path(run_dir), Path(source)
    rec: dict[str, Any] = {}
    fmeta = model_meta(final_dir(run_dir))
    rec["final_id"] = _final_identity(run_dir) if fmeta is not None else None
    if source.resolve() == final_dir(run_dir).resolve():
        rec["source_kind"] = FINAL
        rec["source_id"] = rec["final_id"]
        if fmeta is not None and isinstance(fmeta.get("global_step"), int):
            rec["source_step"] = fmeta["global_step"]
    else:
        rec["source_kind"] = "checkpoint"
        rec["source_id"] = _file_digest(source / TRAINER_STATE)
        with contextlib.suppress(ValueError):
            rec["source_step"] = checkpoint_step(source)
    return rec


def _final_identity(run_dir: Path) -> str | None:
    meta = model_meta(final_dir(run_dir))
    if meta is None:
        return None
    return meta.get("model_id") or _file_digest(final_dir(run_dir) / MODEL_META)


def export_run_dir(export_dir: str | Path) -> Path | None:
    """The run an export belongs to, when it sits in its default place (<run_dir>/export)."""
    parent = Path(export_dir).resolve().parent
    return parent if (parent / RECIPE_FILE).is_file() or (parent / FINAL).is_dir() else None


def export_staleness(export_dir: str | Path, run_dir: str | Path | None = None) -> str | None:
    """Why the export in `export_dir` no longer is the run's trained model, or None if it is.

    The single answer to "is this export stale", used by push and eval. An export made from
    final/ is stale once final/ was rewritten (a longer run, overwrite=true) or deleted; one
    made from a checkpoint is stale once that checkpoint changed or a newer final/ exists.
    A folder that is not a longtune export, or whose run is unknown, cannot be judged: None."""
    export_dir = Path(export_dir)
    info = read_json(export_dir / EXPORT_INFO)
    if info is None:
        return None
    run_dir = Path(run_dir) if run_dir is not None else export_run_dir(export_dir)
    if run_dir is None or not run_dir.is_dir():
        return None
    now_final = _final_identity(run_dir)
    kind = info.get("source_kind")
    if kind is None:  # exported by an older longtune: compare times
        fmeta = final_dir(run_dir) / MODEL_META
        if fmeta.is_file() and fmeta.stat().st_mtime > (export_dir / EXPORT_INFO).stat().st_mtime:
            return f"{export_dir} is older than {final_dir(run_dir)} (trained again after the export)"
        return None
    if kind == FINAL:
        if now_final is None and not has_state(run_dir):
            return None  # nothing trained here (a folder holding only a recipe): nothing to compare
        if now_final is None:
            return (f"{export_dir} was exported from {final_dir(run_dir)}, which no longer exists "
                    "(the run was cleared or restarted)")  # fmt: skip
        if now_final != info.get("source_id"):
            return (
                f"{export_dir} was exported from an earlier {final_dir(run_dir)} (the run was trained again)"
            )
        return None
    src = run_dir / str(info.get("source", ""))
    if _file_digest(src / TRAINER_STATE) != info.get("source_id"):
        return f"{export_dir} was exported from {src}, which no longer exists or has changed"
    if now_final is not None and now_final != info.get("final_id"):
        return f"{export_dir} was exported from {src}; the run has since finished ({final_dir(run_dir)} is newer)"
    return None


def stale_message(reason: str, run_dir: str | Path | None) -> str:
    where = run_dir if run_dir is not None else "RUN_DIR"
    return f"{reason}. Export it again: longtune export {where} --force"


# --------------------------------------------------------------------------- starting a run
def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [prefix]


def _old_recipe(run_dir: Path):
    """The recipe.yaml of the run already there (validated loosely: an older schema may differ)."""
    import yaml

    from finetune.recipe import Recipe

    try:
        return Recipe.model_validate(yaml.safe_load(recipe_file(run_dir).read_text(encoding="utf-8")))
    except Exception:  # noqa: BLE001 - unreadable: treated as another recipe
        return None


def check_run_dir(recipe, overwrite: bool = False) -> list[Path]:
    """Refuse a run directory that holds another recipe's checkpoints; with `overwrite`, delete
    everything the old run produced (checkpoints, final/, export/, eval/, logs/, run.json) so
    nothing stale outlives it. Returns what was deleted."""
    from finetune.recipe import RecipeError

    run_dir = Path(recipe.run_dir)
    if not has_state(run_dir):
        return []
    old = _old_recipe(run_dir)
    if overwrite:
        gone = clear_derived(run_dir, old)
        if old is not None and old.export.output_dir != recipe.export.output_dir:
            gone += clear_derived(run_dir, recipe)
        return gone
    if old is not None:
        diff = _diff(identity(old), identity(recipe))
        trained = trained_base_fingerprint(run_dir)
        if not diff and trained is not None and trained != base_fingerprint(recipe):
            diff = ["model.name_or_path (the base folder was rewritten since this run trained on it)"]
    else:
        diff = [f"<no readable {RECIPE_FILE} in the run directory>"]
    if not diff:
        return []
    shown = ", ".join(diff[:6]) + (" ..." if len(diff) > 6 else "")
    raise RecipeError(
        f"run_dir {run_dir} holds a checkpoint of another recipe (differs in: {shown}). "
        f'Choose another run_dir, or pass overwrite=true (make train ARGS="overwrite=true" / '
        f"longtune train --overwrite) to delete its checkpoints, final/, export/ and eval/ and start again."
    )


def write_resolved(recipe) -> Path:
    """recipe.yaml: the resolved recipe every later stage reads."""
    return atomic_write_text(recipe_file(recipe.run_dir), recipe.to_yaml())


def already_finished(recipe) -> int | None:
    """The step a finished run of this recipe ended at, when its max_steps asks for no more."""
    step = finished_step(recipe.run_dir)
    if step is None or step < recipe.training.max_steps:
        return None
    return step


def finished_message(recipe, step: int) -> str:
    return (
        f"[longtune] {recipe.run_dir} already finished at step {step} (training.max_steps="
        f"{recipe.training.max_steps}); nothing to train. Raise training.max_steps to continue it, "
        "or pass overwrite=true to start again."
    )
