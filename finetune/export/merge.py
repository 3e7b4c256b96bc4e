"""Merge a run's trained result into one plain model: base + RoPE/layout config + adapter.

Reads only the run directory (design.md, "Run directory"):
`final/longtune_model.json` names the base (`"base"` = `final/base/`) and carries the trained
model config (RoPE scaling + attention layout); `final/` holds the adapter (LoRA, with the
embeddings and norms in `modules_to_save`) or full weights. `checkpoint=True` takes the
adapter from the newest `checkpoint-N/` instead, consolidating DeepSpeed ZeRO-3 partitions
with `deepspeed.utils.zero_to_fp32` when the checkpoint's own adapter file is empty.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: Config keys that fix the shape (or the function) of every weight: base and run must agree.
ARCH_KEYS = (
    "model_type",
    "hidden_act",
    "rms_norm_eps",
    "attention_bias",
    "mlp_bias",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)

ADAPTER_FILES = ("adapter_model.safetensors",)
PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin")


from finetune.export.errors import ExportError
from finetune.rundir import FINAL, MODEL_META, complete_checkpoints, final_dir, resume_point


@dataclass
class MergedRun:
    model: torch.nn.Module
    run_dir: Path
    source: Path  # final/ or checkpoint-N/ the weights came from
    base_ref: str  # what longtune_model.json names
    base_path: str  # where the base weights were read
    meta: dict[str, Any] = field(default_factory=dict)
    train_layout: dict | None = None  # the layout the run trained with (before inference_layout)
    lora_mode: str = "lora"


# --------------------------------------------------------------------------- run reading
def find_final(path: str | Path) -> Path:
    """A run directory or its `final/` -> the `final/` directory."""
    p = Path(path)
    if (p / MODEL_META).is_file():
        return p
    if (p / FINAL / MODEL_META).is_file():
        return p / FINAL
    if (p / FINAL).is_dir():
        raise ExportError(f"{p / FINAL} has no {MODEL_META}; was it written by `longtune train`?")
    raise ExportError(
        f"{p} is not a run directory: no final/ (train has not finished; export a checkpoint with --checkpoint)"
    )


def read_meta(final: Path) -> dict[str, Any]:
    path = final / MODEL_META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path} is missing: the run has no record of its base model") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    for key in ("base_model", "model_config"):
        if key not in meta:
            raise ExportError(f"{path}: key '{key}' is missing")
    return meta


def run_meta(run_dir: Path, source: Path | None = None) -> dict[str, Any]:
    """longtune_model.json of `source` (a checkpoint: train writes one into each) or of
    `final/`. Export reads the run's own record; it never rebuilds one from the recipe."""
    for d in ([source] if source is not None else []) + [run_dir / FINAL]:
        if (d / MODEL_META).is_file():
            return read_meta(d)
    if source is None:
        find_final(run_dir)  # raises the right message
    raise ExportError(
        f"{source} has no {MODEL_META} and {run_dir} has no final/: the checkpoint was not written by "
        "this version of `longtune train` (which records the model in every checkpoint); "
        "resume the run to write one"
    )


def newest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint (one killed while saving is skipped)."""
    found = complete_checkpoints(run_dir)
    if not found:
        _, incomplete = resume_point(run_dir)
        extra = f" ({', '.join(p.name for p in incomplete)} incomplete)" if incomplete else ""
        raise ExportError(f"{run_dir} has no complete checkpoint-N/ directories to export (--checkpoint){extra}")
    return found[-1]


def base_location(final: Path, base_ref: str) -> str:
    """`"base"` -> final/base/; a bundled alias -> its directory; a Hub id or path unchanged."""
    if base_ref == "base":
        base = final / "base"
        if not (base / "config.json").is_file():
            if not final.is_dir():
                raise ExportError(
                    f"{final.parent} has no final/: the base weights of an inline-config run (model.config) "
                    "are saved in final/base/ only when training finishes, so a checkpoint cannot be merged"
                )
            raise ExportError(
                f'{final}/{MODEL_META} says the base is inline ("base") but {base}/config.json '
                "is missing; the run's final/ is incomplete"
            )
        return str(base)
    from data_prep.assets import resolve_model

    return str(resolve_model(base_ref))


def config_from_dict(d: dict[str, Any]):
    """The run's saved config dict -> a config object (incl. rope_parameters and longtune keys)."""
    from transformers import AutoConfig

    d = dict(d)
    model_type = d.pop("model_type", "llama")
    if model_type == "longtune_llama":
        model_type = "llama"
    for k in ("transformers_version", "architectures", "auto_map", "_name_or_path", "_attn_implementation"):
        d.pop(k, None)
    config = AutoConfig.for_model(model_type, **d)
    return config


# --------------------------------------------------------------------------- checks
def check_same_architecture(base_config, run_config, base_path: str, run_file: Path) -> None:
    """The base being loaded must be the one the run trained on (shape-wise)."""
    diffs = []
    for k in ARCH_KEYS:
        a, b = getattr(base_config, k, None), getattr(run_config, k, None)
        if k == "model_type":
            a, b = ("llama" if x == "longtune_llama" else x for x in (a, b))
        if a != b:
            diffs.append(f"{k}: run {b!r} vs base {a!r}")
    if diffs:
        raise ExportError(
            f"the base model {base_path} does not match the run's model ({run_file}): "
            + "; ".join(diffs)
            + ". Export with the base the run was trained on."
        )


def safetensors_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def check_no_pickles(d: Path) -> None:
    bad = [d / n for n in PICKLE_FILES if (d / n).exists()]
    if bad and not safetensors_files(d):
        raise ExportError(
            f"{bad[0]} is a pickle; longtune only reads safetensors (re-save with safe_serialization=True)"
        )


def empty_tensors(files: list[Path]) -> list[str]:
    """Names of zero-size tensors: what ZeRO-3 writes when partitions were not gathered."""
    from safetensors import safe_open

    out = []
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                shape = fh.get_slice(name).get_shape()
                if any(s == 0 for s in shape):
                    out.append(f"{f.name}:{name}")
    return out


def refuse_empty(files: list[Path], where: Path) -> None:
    if not files:
        raise ExportError(f"{where} has no safetensors weights")
    bad = empty_tensors(files)
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise ExportError(
            f"{where} holds {len(bad)} empty (zero-size) tensors ({shown}): DeepSpeed ZeRO-3 saved its "
            "partition placeholders instead of the gathered weights. Set "
            '"stage3_gather_16bit_weights_on_model_save": true in the DeepSpeed config and save again, '
            "or export from the DeepSpeed checkpoint: longtune export RUN_DIR --checkpoint"
        )


def check_adapter_shapes(
    peft_state: dict[str, torch.Tensor], base: torch.nn.Module, base_path: str, src: Path
):
    """Every LoRA / modules_to_save tensor must fit the base module it attaches to."""
    params = dict(base.named_parameters())
    for name, t in peft_state.items():
        key = name.removeprefix("base_model.model.")
        if ".lora_A" in key or ".lora_B" in key:
            mod_name = key.split(".lora_")[0]
            w = params.get(mod_name + ".weight")
            if w is None:
                raise ExportError(
                    f"adapter {src}: tensor {name} targets {mod_name}, which the base {base_path} lacks"
                )
            expect = w.shape[1] if ".lora_A" in key else w.shape[0]
            got = t.shape[1] if ".lora_A" in key else t.shape[0]
            if expect != got:
                raise ExportError(
                    f"adapter {src} does not match the base model {base_path}: {name} has shape "
                    f"{list(t.shape)} but {mod_name}.weight is {list(w.shape)}"
                )
        else:  # modules_to_save (embeddings, norms): saved under the plain module name
            plain = key.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
            w = params.get(plain)
            if w is not None and tuple(w.shape) != tuple(t.shape):
                raise ExportError(
                    f"adapter {src} does not match the base model {base_path}: {name} has shape "
                    f"{list(t.shape)} but the base's {plain} is {list(w.shape)}"
                )


# --------------------------------------------------------------------------- adapter sources
def _adapter_state_from_dir(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    check_no_pickles(d)
    f = d / "adapter_model.safetensors"
    if not f.is_file():
        raise ExportError(f"{d} has no adapter_model.safetensors (LoRA run) and no model weights")
    refuse_empty([f], d)
    return load_file(str(f))


def _has_deepspeed_state(ckpt: Path) -> bool:
    return (ckpt / "latest").is_file() or any(ckpt.glob("global_step*"))


def zero_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Consolidate DeepSpeed ZeRO-2/3 partitions of `ckpt` into one fp32 state dict."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:  # a third-party package (the `deepspeed` extra), not ours
        raise ExportError("consolidating a DeepSpeed checkpoint needs deepspeed installed") from None
    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), exclude_frozen_parameters=True)
    sd = {k: v for k, v in sd.items() if v is not None}
    if not sd:
        raise ExportError(f"{ckpt}: the DeepSpeed checkpoint holds no trainable parameters")
    return sd


def peft_state_from_zero(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trainer/DeepSpeed parameter names (`...lora_A.default.weight`) -> adapter-file names."""
    out = {}
    for k, v in sd.items():
        if "lora_" not in k and ".modules_to_save." not in k:
            continue
        k2 = k.replace(".modules_to_save.default.", ".").replace(".default.", ".")
        if not k2.startswith("base_model.model."):
            k2 = "base_model.model." + k2
        out[k2] = v
    return out


def adapter_state(source: Path) -> dict[str, torch.Tensor]:
    """The adapter tensors of `final/` or a checkpoint (real, non-empty)."""
    f = source / "adapter_model.safetensors"
    if f.is_file() and not empty_tensors([f]):
        return _adapter_state_from_dir(source)
    if _has_deepspeed_state(source):
        state = peft_state_from_zero(zero_state_dict(source))
        if not state:
            raise ExportError(f"{source}: the DeepSpeed checkpoint has no LoRA or modules_to_save tensors")
        empty = [k for k, v in state.items() if v.numel() == 0]
        if empty:
            raise ExportError(f"{source}: consolidated DeepSpeed weights are empty: {empty[:4]}")
        return state
    return _adapter_state_from_dir(source)  # raises the right error


# --------------------------------------------------------------------------- loading + merging
def _layout_of(config) -> dict | None:
    return getattr(config, "longtune_attention", None)


def load_base(final: Path, meta: dict, dtype=torch.float32):
    """Base weights under the run's config (RoPE scaling + layout), and where they came from."""
    from transformers import AutoConfig, AutoModelForCausalLM

    run_config = config_from_dict(meta["model_config"])
    base_path = base_location(final, str(meta["base_model"]))
    try:
        base_config = AutoConfig.from_pretrained(base_path)
    except OSError as e:
        raise ExportError(
            f"cannot read the base model {base_path} named by {final}/{MODEL_META}: {str(e).splitlines()[0]}"
        ) from None
    check_same_architecture(base_config, run_config, base_path, final / MODEL_META)
    base_dir = Path(base_path)
    if base_dir.is_dir():
        check_no_pickles(base_dir)
        refuse_empty(safetensors_files(base_dir), base_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(base_path, config=run_config, dtype=dtype)
    except (RuntimeError, ValueError) as e:
        raise ExportError(f"cannot load the base model {base_path} with the run's config: {e}") from None
    return model, run_config, base_path


def load_merged(run_dir: str | Path, checkpoint: bool | str | Path = False, dtype=torch.float32) -> MergedRun:
    """Base + adapter (+ trained embeddings/norms), merged, in `dtype` (fp32 by default).

    `checkpoint`: False = `final/`; True = the newest `checkpoint-N/`; a path = that checkpoint.
    """
    run_dir = Path(run_dir)
    if (run_dir / MODEL_META).is_file():  # given final/ itself
        final, run_dir = run_dir, run_dir.parent
    else:
        final = final_dir(run_dir)
    source = final
    if checkpoint:
        source = newest_checkpoint(run_dir) if checkpoint is True else Path(checkpoint)
        if not source.is_dir():
            raise ExportError(f"checkpoint {source} does not exist")
    meta = run_meta(run_dir, source if checkpoint else None)
    lora_mode = meta.get("lora_mode") or (
        "full" if not (source / "adapter_config.json").is_file() else "lora"
    )
    if lora_mode == "full" or (
        (source / "config.json").is_file() and not (source / "adapter_config.json").is_file()
    ):
        return _load_full(run_dir, source, meta, dtype)

    base, run_config, base_path = load_base(final, meta, dtype=torch.float32)
    train_layout = _layout_of(run_config)
    if not (source / "adapter_config.json").is_file():
        raise ExportError(f"{source} has no adapter_config.json (LoRA run) and no config.json (full run)")
    state = adapter_state(source)
    check_adapter_shapes(state, base, base_path, source)

    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    lcfg = LoraConfig.from_pretrained(str(source))
    lcfg.inference_mode = True

    from finetune.quiet import quiet_peft

    with quiet_peft():
        peft_model = get_peft_model(base, lcfg)
    result = set_peft_model_state_dict(peft_model, state)
    missing = [k for k in getattr(result, "missing_keys", []) if ("lora_" in k or ".modules_to_save." in k)]
    if missing:
        raise ExportError(f"adapter {source} lacks trained tensors the adapter config needs: {missing[:4]}")
    merged = peft_model.merge_and_unload()
    merged.to(dtype)
    merged.eval()
    return MergedRun(
        model=merged,
        run_dir=run_dir,
        source=source,
        base_ref=str(meta["base_model"]),
        base_path=base_path,
        meta=meta,
        train_layout=train_layout,
        lora_mode=lora_mode,
    )


def load_peft(run_dir: str | Path, dtype=torch.float32):
    """The unmerged peft model of a run's `final/` (tests, comparisons)."""
    final = find_final(run_dir)
    meta = read_meta(final)
    base, _, _ = load_base(final, meta, dtype=dtype)
    from peft import PeftModel

    from finetune.quiet import quiet_peft

    with quiet_peft():
        return PeftModel.from_pretrained(base, str(final)).eval()


def _load_full(run_dir: Path, source: Path, meta: dict, dtype) -> MergedRun:
    from transformers import AutoModelForCausalLM

    check_no_pickles(source)
    files = safetensors_files(source)
    refuse_empty(files, source)
    run_config = config_from_dict(meta["model_config"])
    saved = config_from_dict(json.loads((source / "config.json").read_text()))
    check_same_architecture(saved, run_config, str(source), source / MODEL_META)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), config=run_config, dtype=torch.float32)
    except (RuntimeError, ValueError) as e:
        raise ExportError(f"cannot load the full weights in {source}: {e}") from None
    model.to(dtype).eval()
    return MergedRun(
        model=model,
        run_dir=run_dir,
        source=source,
        base_ref=str(meta["base_model"]),
        base_path=str(source),
        meta=meta,
        train_layout=_layout_of(run_config),
        lora_mode="full",
    )
