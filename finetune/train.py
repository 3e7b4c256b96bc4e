"""Training: HF Trainer (+ DeepSpeed) on a prepared dataset, one process per rank.

`finetune.launch` starts this module on every rank with the resolved recipe of the run
directory; run alone (`python -m finetune.train --recipe R`) it trains in one process.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import TrainerCallback

from finetune.recipe import Recipe, RecipeError, load_recipe

#: Sections whose change makes an existing checkpoint belong to another run.
IDENTITY_SECTIONS = ("kind", "model", "rope", "attention", "hybrid", "lora", "data")


def identity(recipe: Recipe) -> dict[str, Any]:
    d = recipe.model_dump(mode="json")
    out = {k: d[k] for k in IDENTITY_SECTIONS}
    # Where the data lives and how fast it is read do not change what is trained.
    out["data"] = {k: v for k, v in out["data"].items() if k not in ("output_dir", "num_proc")}
    return out


def identity_hash(recipe: Recipe) -> str:
    return hashlib.sha256(json.dumps(identity(recipe), sort_keys=True).encode()).hexdigest()[:16]


def checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [prefix]


def check_run_dir(recipe: Recipe, overwrite: bool = False) -> None:
    """Refuse a run directory that holds another recipe's checkpoints (unless overwriting)."""
    run_dir = Path(recipe.run_dir)
    saved = run_dir / "recipe.yaml"
    has_state = bool(checkpoints(run_dir)) or (run_dir / "final").exists()
    if not has_state:
        return
    if saved.is_file():
        old = identity(Recipe.model_validate(yaml.safe_load(saved.read_text())))
        diff = _diff(old, identity(recipe))
    else:
        diff = ["<no recipe.yaml in the run directory>"]
    if not diff:
        return
    if overwrite:
        for p in checkpoints(run_dir) + [run_dir / "final"]:
            shutil.rmtree(p, ignore_errors=True)
        return
    shown = ", ".join(diff[:6]) + (" ..." if len(diff) > 6 else "")
    raise RecipeError(
        f"run_dir {run_dir} holds a checkpoint of another recipe (differs in: {shown}). "
        f"Choose another run_dir, or pass overwrite=true (make train ARGS=\"overwrite=true\" / "
        f"longtune train --overwrite) to delete its checkpoints and start again."
    )


def write_resolved(recipe: Recipe) -> Path:
    run_dir = Path(recipe.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "recipe.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(recipe.to_yaml())
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- trainer pieces
def training_arguments(recipe: Recipe, has_eval: bool):
    from transformers import TrainingArguments

    from finetune.launch import deepspeed_config
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
        seed=recipe.seed,
        data_seed=recipe.seed,
        remove_unused_columns=False,
        dataloader_num_workers=t.dataloader_num_workers,
        deepspeed=deepspeed_config(recipe),
        parallelism_config=parallelism_config(recipe),
        gradient_checkpointing=False,  # enabled on the model in build_model (peft-aware)
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


def save_final(trainer, model, recipe: Recipe, tokenizer, base_config) -> Path:
    """`final/`: the adapter (or full weights), tokenizer, longtune_model.json, and the base
    weights when the base cannot be reloaded from a path (inline config, pretrain)."""
    run_dir = Path(recipe.run_dir)
    final = run_dir / "final"
    tmp = run_dir / "final.tmp"
    if trainer.args.should_save:
        shutil.rmtree(tmp, ignore_errors=True)
    base_ref = recipe.model.name_or_path
    if recipe.lora.mode != "full" and (recipe.kind == "pretrain" or recipe.model.config is not None):
        base_ref = "base"
        # The base as it was before this run: no RoPE scaling, no layout (eval's "before").
        from finetune.model import load_base_config

        _save_base(trainer, model, tmp / "base", load_base_config(recipe))  # collective under ZeRO-3
    trainer.save_model(str(tmp))  # gathers ZeRO-3 partitions (stage3_gather_16bit_weights_on_model_save)
    if not trainer.args.should_save:
        return final
    tokenizer.save_pretrained(str(tmp))
    meta = {
        "base_model": base_ref,
        "kind": recipe.kind,
        "lora_mode": recipe.lora.mode,
        "recipe_hash": identity_hash(recipe),
        "model_config": base_config.to_dict(),
    }
    (tmp / "longtune_model.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
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


def train(recipe: Recipe, overwrite: bool = False) -> Path:
    from transformers import set_seed

    from data_prep.collate import DataCollator
    from data_prep.prepare import is_prepared, prepare
    from finetune.model import build_config, build_model, count_parameters

    check_run_dir(recipe, overwrite=overwrite)
    from finetune import sequence_parallel

    sequence_parallel.check_world(recipe, int(os.environ.get("WORLD_SIZE", "1")))
    rank = int(os.environ.get("RANK", "0"))
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
    set_seed(recipe.seed)
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
    resume = checkpoints(Path(recipe.run_dir))
    resume_from = str(resume[-1]) if resume else None
    start_step = int(resume[-1].name.split("-")[-1]) if resume else 0
    check = KernelCheck(expected_patterns(model.config.longtune_attention), start_step)
    if resume_from and rank == 0:
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
        callbacks=[check],
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
            "train_loss": result.training_loss,
            "log_history": trainer.state.log_history,
            "trainable_params": trainable,
            "total_params": total,
            "recipe_hash": identity_hash(recipe),
            "sequence_parallel": sequence_parallel.report(),
        }
        (Path(recipe.run_dir) / "run.json").write_text(json.dumps(status, indent=2, default=str))
        print(f"[longtune] saved {final}")
    return final


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


if __name__ == "__main__":
    main()
