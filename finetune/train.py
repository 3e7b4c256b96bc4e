"""Training: HF Trainer (+ DeepSpeed) on a prepared dataset, one process per rank.

`finetune.launch` starts this module on every rank with the resolved recipe of the run
directory; run alone (`python -m finetune.train --recipe R`) it trains in one process.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from finetune.recipe import Recipe, RecipeError, load_recipe
from finetune.rundir import (
    CHECKPOINT_PREFIX,
    FINAL,
    MODEL_META,
    RUN_FILE,
    already_finished,
    base_fingerprint,
    check_run_dir,
    final_dir,
    finished_message,
    identity_hash,
    new_model_id,
    resume_point,
    swap_in,
    write_json,
    write_resolved,
)


# --------------------------------------------------------------------------- trainer pieces
def training_seed(recipe) -> int:
    """`training.seed` where set (a second seed of the same run: initialisation and data order
    change, the prepared data does not), else the recipe's `seed`."""
    return recipe.seed if recipe.training.seed is None else recipe.training.seed


def training_arguments(recipe: Recipe, has_eval: bool):
    from transformers import TrainingArguments

    from finetune.deepspeed_config import deepspeed_config
    from finetune.model import training_precision
    from finetune.sequence_parallel import parallelism_config

    t = recipe.training
    prec = training_precision(recipe)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(Path(recipe.run_dir) / "logs"))
    return TrainingArguments(
        output_dir=recipe.run_dir,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        bf16=prec == "bf16",
        fp16=prec == "fp16",
        use_cpu=not torch.cuda.is_available(),
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval and t.eval_steps else "no",
        eval_steps=t.eval_steps if has_eval else None,
        report_to=t.report_to,
        seed=training_seed(recipe),
        data_seed=training_seed(recipe),
        full_determinism=t.deterministic,
        remove_unused_columns=False,
        dataloader_num_workers=t.dataloader_num_workers,
        deepspeed=deepspeed_config(recipe),
        parallelism_config=parallelism_config(recipe),
        activation_checkpointing=False,  # enabled on the model in build_model (peft-aware)
        ddp_find_unused_parameters=False,
        optim="adamw_torch",
        disable_tqdm=False,
    )


class KernelCheck(TrainerCallback):
    """Fails the run at its first step if the recipe's attention kernel did not run.

    SinkLoRA's only logged run silently trained with SDPA; this makes that impossible here.
    """

    def __init__(self, expected: set[str], start_step: int = 0):
        self.expected = expected
        self.first_step = start_step + 1  # a resumed run checks its first new step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step != self.first_step:
            return
        from kernels.registry import kernel_calls

        ran = {p for (p, _b), n in kernel_calls().items() if n > 0}
        missing = self.expected - ran
        if missing:
            raise RuntimeError(
                f"attention pattern(s) {sorted(missing)} chosen by the recipe never ran "
                f"(kernels that ran: {kernel_calls()}); check model.config._attn_implementation"
            )


def expected_patterns(layout: dict) -> set[str]:
    return {l["pattern"] for l in layout["layers"]}


def base_reference(recipe: Recipe) -> str:
    """What longtune_model.json names as the base: a path / Hub id, or "base" (= final/base/,
    saved with the run when the base cannot be reloaded: inline config, pretrain)."""
    if recipe.lora.mode != "full" and (recipe.kind == "pretrain" or recipe.model.config is not None):
        return "base"
    return recipe.model.name_or_path


def model_meta_dict(recipe: Recipe, base_config, global_step: int | None) -> dict:
    """The record of a trained model (final/ or a checkpoint): base, config, identity."""
    return {
        "base_model": base_reference(recipe),
        "kind": recipe.kind,
        "lora_mode": recipe.lora.mode,
        "recipe_hash": identity_hash(recipe),
        "base_fingerprint": base_fingerprint(recipe),
        # A new id per folder written: an export records it, and is stale once it changes.
        "model_id": new_model_id(),
        "global_step": global_step,
        "model_config": base_config.to_dict(),
    }


class CheckpointMeta(TrainerCallback):
    """Writes longtune_model.json into every checkpoint (rank 0), so export can merge a
    checkpoint of an unfinished run from the run's own record, without the recipe."""

    def __init__(self, recipe: Recipe, base_config):
        self.recipe, self.base_config = recipe, base_config

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
            if ckpt.is_dir():
                write_json(ckpt / MODEL_META, model_meta_dict(self.recipe, self.base_config, state.global_step))


def save_final(trainer, model, recipe: Recipe, tokenizer, base_config) -> Path:
    """`final/`: the adapter (or full weights), tokenizer, longtune_model.json, and the base
    weights when the base cannot be reloaded from a path (inline config, pretrain)."""
    run_dir = Path(recipe.run_dir)
    final = final_dir(run_dir)
    tmp = run_dir / f"{FINAL}.tmp"
    if trainer.args.should_save:
        shutil.rmtree(tmp, ignore_errors=True)
    if base_reference(recipe) == "base":
        # The base as it was before this run: no RoPE scaling, no layout (eval's "before").
        from finetune.model import load_base_config

        _save_base(trainer, model, tmp / "base", load_base_config(recipe))  # collective under ZeRO-3
    trainer.save_model(str(tmp))  # gathers ZeRO-3 partitions (stage3_gather_16bit_weights_on_model_save)
    if not trainer.args.should_save:
        return final
    tokenizer.save_pretrained(str(tmp))
    meta = model_meta_dict(recipe, base_config, getattr(getattr(trainer, "state", None), "global_step", None))
    write_json(tmp / MODEL_META, meta)
    swap_in(tmp, final)
    return final


def _save_base(trainer, model, path: Path, base_config) -> None:
    """The frozen base of a random-init run, so export can merge without the recipe's seed.

    Called on every rank: under ZeRO-3 the parameters are gathered (a collective)."""
    import contextlib

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = [p for n, p in base.named_parameters() if "lora_" not in n and ".modules_to_save." not in n]
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gather:
        if not trainer.args.should_save:
            return
        sd = {}
        for name, p in base.state_dict().items():
            if "lora_" in name or ".modules_to_save." in name:
                continue
            sd[name.replace(".original_module.", ".").replace(".base_layer.", ".")] = p.detach().cpu().clone()
    if any(t.numel() == 0 for t in sd.values()):
        raise RuntimeError("base weights came out empty (partitioned); cannot save the base of this run")
    # Written directly: building a model shell here would re-enter ZeRO-3's zero.Init (a collective).
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    base_config.save_pretrained(str(path))


def run_train_loss(log_history: list[dict], start_step: int, session_mean: float, global_step: int) -> float:
    """Mean training loss over every step of the run, a resumed one included.

    The Trainer's `training_loss` averages only the steps of the current call. The steps
    before `start_step` are recovered from the logged losses (each the mean since the previous
    log, restored from the checkpoint's trainer_state.json), weighted by the steps they cover;
    steps before the resume that were never logged count at the mean of the logged ones.
    """
    session = max(global_step - start_step, 0)
    if start_step <= 0:
        return float(session_mean)
    total = covered = prev = 0
    for h in log_history:
        step = h.get("step")
        if "loss" not in h or not isinstance(step, int) or step > start_step:
            continue
        total += float(h["loss"]) * (step - prev)
        covered += step - prev
        prev = step
    if covered == 0:
        return float(session_mean)
    before = total * start_step / covered
    return (before + float(session_mean) * session) / max(start_step + session, 1)


def train(recipe: Recipe, overwrite: bool = False) -> Path:
    from transformers import set_seed

    from data_prep.collate import DataCollator
    from data_prep.prepare import is_prepared, prepare
    from finetune.model import build_config, build_model, count_parameters

    check_run_dir(recipe, overwrite=overwrite)
    from finetune import sequence_parallel

    sequence_parallel.check_world(recipe, int(os.environ.get("WORLD_SIZE", "1")))
    rank = int(os.environ.get("RANK", "0"))
    done = already_finished(recipe)
    if done is not None:
        if rank == 0:
            print(finished_message(recipe, done), flush=True)
        return final_dir(recipe.run_dir)
    if rank == 0:
        write_resolved(recipe)
    if not is_prepared(recipe):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RecipeError(f"dataset {recipe.data_dir} is not prepared; run `longtune prepare` first")
        prepare(recipe)
    from datasets import load_from_disk

    data = load_from_disk(str(recipe.data_dir))
    train_ds = data["train"] if hasattr(data, "keys") and "train" in data else data
    eval_ds = data["eval"] if hasattr(data, "keys") and "eval" in data else None

    from data_prep.assets import load_tokenizer

    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.name_or_path)
    set_seed(training_seed(recipe))
    args = training_arguments(recipe, has_eval=eval_ds is not None)  # before the model: ZeRO-3 init
    _ = args.device  # initialises torch.distributed on every rank
    if args.deepspeed:
        import deepspeed

        # zero.Init reads the world size from deepspeed.comm, which accelerate leaves
        # uninitialised on the CPU accelerator: without this ZeRO-3 sees a world of 1.
        deepspeed.init_distributed()
    base_config = build_config(recipe)
    model = build_model(recipe, copy.deepcopy(base_config))  # the model mutates its own config
    trainable, total = count_parameters(model)
    if rank == 0:
        print(f"[longtune] trainable parameters: {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.2f}%)")

    from kernels.registry import reset_kernel_calls

    reset_kernel_calls()
    last, incomplete = resume_point(recipe.run_dir)
    resume_from = str(last) if last is not None else None
    start_step = int(last.name.split("-")[-1]) if last is not None else 0
    check = KernelCheck(expected_patterns(model.config.longtune_attention), start_step)
    if rank == 0:
        for p in incomplete:
            print(f"[longtune] skipping incomplete checkpoint {p} (no trainer_state.json: the run "
                  "stopped while saving it); it is written again when training reaches that step")  # fmt: skip
        if resume_from:
            print(f"[longtune] resuming from {resume_from}")
    sequence_parallel.install(recipe)
    trainer_cls = sequence_parallel.trainer_class()
    trainer_cls.longtune_recipe = recipe
    sp = sequence_parallel.degree(recipe)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=DataCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=sp if sp > 1 else None),
        callbacks=[check, CheckpointMeta(recipe, base_config)],
    )
    result = trainer.train(resume_from_checkpoint=resume_from)
    # Training ran without a KV cache; whatever loads these weights next generates with one.
    base_config.use_cache = True
    unwrapped = model.get_base_model() if hasattr(model, "get_base_model") else model
    unwrapped.config.use_cache = True
    final = save_final(trainer, model, recipe, tokenizer, base_config)
    if rank == 0:
        status = {
            "status": "done",
            "global_step": trainer.state.global_step,
            "train_loss": run_train_loss(
                trainer.state.log_history, start_step, result.training_loss, trainer.state.global_step
            ),
            "log_history": trainer.state.log_history,
            "trainable_params": trainable,
            "total_params": total,
            "recipe_hash": identity_hash(recipe),
            # What decides the numbers besides the recipe (docs/reproducibility.md).
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "torch_threads": torch.get_num_threads(),
            "versions": _versions(),
            "sequence_parallel": sequence_parallel.report(),
        }
        write_json(Path(recipe.run_dir) / RUN_FILE, status)
        print(f"[longtune] saved {final}")
    return final


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "deepspeed", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m finetune.train")
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    try:
        recipe = load_recipe(a.recipe, a.overrides)
        train(recipe, overwrite=a.overwrite)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _leave()


def _leave() -> None:
    """End a finished rank without the interpreter's teardown.

    Everything is written by now (final/, run.json, checkpoints, TensorBoard closed at train end).
    Tearing down a process that still holds gloo/DeepSpeed communication threads occasionally
    aborts ("terminate called without an active exception", SIGABRT) after a run that succeeded,
    and the launcher then reports the whole run as failed: the process group is destroyed after
    a last barrier, and the rank exits 0 directly."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        from finetune.deepspeed_config import release_cpu_comm_buffers

        release_cpu_comm_buffers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
