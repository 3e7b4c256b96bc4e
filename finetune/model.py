"""Model building: base weights + RoPE scaling + attention layout + LoRA, from a recipe.

The config that comes out of here is the one every later stage trusts: it carries the RoPE
scaling and the per-layer attention layout, so a checkpoint saved from it needs no recipe.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from finetune.recipe import LoraSection, Recipe, RecipeError, RopeSection

#: Modules LongLoRA+ trains fully (beside LoRA) and saves with the adapter.
EMBEDDING_MODULES = ["embed_tokens", "lm_head"]
NORM_MODULES = ["input_layernorm", "post_attention_layernorm", "norm"]


# --------------------------------------------------------------------------- config
def resolve_model_path(name: str) -> str:
    """Bundled aliases (`smollm2-135m`) become local directories; anything else passes through."""
    from data_prep.assets import resolve_model

    return str(resolve_model(name))


def load_base_config(recipe: Recipe) -> PretrainedConfig:
    m = recipe.model
    if m.config is not None:
        try:
            return LlamaConfig(**m.config)
        except (TypeError, ValueError) as e:
            raise RecipeError(f"model.config: not a valid LlamaConfig: {e}") from None
    path = resolve_model_path(m.name_or_path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code)
    except OSError as e:
        # Offline (or the Hub unreachable): the shipped recipes' bases are in a table of their
        # published architectures, so a dry run still works; anything else is a clear error.
        from finetune import architectures

        if architectures.known(m.name_or_path):
            architectures.warn(m.name_or_path)
            return LlamaConfig(**architectures.config_kwargs(m.name_or_path))
        raise RecipeError(
            f"model.name_or_path: cannot read the config of '{m.name_or_path}' (not a local directory, a "
            f"bundled alias, or a Hub model reachable from here): {str(e).splitlines()[0]}"
        ) from None


def original_context_length(config: PretrainedConfig) -> int:
    """The length the base was trained at, before any scaling this recipe adds."""
    return int(config.max_position_embeddings)


def apply_rope(config: PretrainedConfig, rope: RopeSection) -> dict[str, Any]:
    """Write the recipe's RoPE scaling into `config` and return what was done (for docs and card).

    An existing scaling (Llama-3's `llama3`, a YaRN base) is combined, not overwritten: asking
    for `linear` (or the same type) multiplies its factor and keeps its other parameters.
    """
    if rope.type == "none":
        return {"type": "none"}
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if rope.theta is not None:
        theta = float(rope.theta)
    original = original_context_length(config)
    existing = params.get("rope_type", "default")
    if rope.factor is not None:
        factor = float(rope.factor)
    else:
        factor = float(max(1, math.ceil(rope.target_length / original)))

    if rope.type == "theta":
        new = {"rope_type": existing, **_keep(params), "rope_theta": theta}
        factor = 1.0
    elif existing not in ("default", None) and rope.type in ("linear", existing):
        # Combine: the model already scales (e.g. Llama-3): scale its factor further.
        new = {**params, "factor": float(params.get("factor", 1.0)) * factor, "rope_theta": theta}
    elif existing not in ("default", None):
        raise RecipeError(
            f"rope.type: the model already uses '{existing}' RoPE scaling; set rope.type to "
            f"'{existing}' or 'linear' to extend it (combined), not '{rope.type}'"
        )
    else:
        new = {"rope_type": rope.type, "factor": factor, "rope_theta": theta}
        if rope.type in ("yarn", "llama3", "longrope"):
            new["original_max_position_embeddings"] = original
        if rope.type == "llama3":
            new.setdefault("low_freq_factor", 1.0)
            new.setdefault("high_freq_factor", 4.0)
    new.update(rope.extra)
    config.rope_parameters = new
    config.max_position_embeddings = int(rope.target_length)
    return {
        "type": rope.type,
        "factor": factor,
        "original_length": original,
        "target_length": int(rope.target_length),
        "base_scaling": existing,
        "rope_parameters": new,
    }


def _keep(params: dict) -> dict:
    return {k: v for k, v in params.items() if k not in ("rope_type", "rope_theta")}


def build_config(recipe: Recipe) -> PretrainedConfig:
    """Base config + RoPE scaling + attention layout: the architecture the run trains."""
    from kernels.layout import build_layout, install_layout

    config = load_base_config(recipe)
    config.longtune_rope = apply_rope(config, recipe.rope)
    layout = build_layout(recipe, config.num_hidden_layers)
    install_layout(config, layout)
    config.use_cache = False
    return config


# --------------------------------------------------------------------------- dtype / device
def training_precision(recipe: Recipe) -> str:
    p = recipe.training.precision
    if p != "auto":
        return p
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def load_dtype(recipe: Recipe) -> torch.dtype:
    if recipe.model.dtype != "auto":
        return getattr(torch, recipe.model.dtype)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(training_precision(recipe), torch.float32)


def check_tokenizer(recipe: Recipe, config: PretrainedConfig, tokenizer) -> None:
    """A model built from `model.config` must agree with its tokenizer: ids past its embedding
    rows fail mid-step with an index error, and bos/eos/pad ids that are not the tokenizer's
    make packing, padding and generation use the wrong tokens. Both are recipe mistakes."""
    if recipe.model.config is None:
        return
    name = recipe.model.tokenizer or recipe.model.name_or_path
    n = len(tokenizer)
    if n > config.vocab_size:
        raise RecipeError(
            f"model.config.vocab_size = {config.vocab_size} is smaller than tokenizer '{name}' ({n} tokens): "
            f"set model.config.vocab_size: {n}"
        )
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        want, got = getattr(tokenizer, key, None), getattr(config, key, None)
        if want is not None and got != want:
            raise RecipeError(
                f"model.config.{key} = {got}, but tokenizer '{name}' has {key} {want}: set model.config.{key}: {want}"
            )


# --------------------------------------------------------------------------- model
def build_base_model(recipe: Recipe, config: PretrainedConfig | None = None) -> torch.nn.Module:
    config = config or build_config(recipe)
    dtype = load_dtype(recipe)
    if recipe.model.config is not None:
        torch.manual_seed(recipe.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        kwargs: dict[str, Any] = {"config": config, "dtype": dtype, "trust_remote_code": recipe.model.trust_remote_code}
        if recipe.lora.mode == "qlora":
            kwargs["quantization_config"] = _bnb_config(dtype)
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(recipe.model.name_or_path), **kwargs)
    # from_pretrained may reset the implementation: the layout must win.
    from kernels.layout import install_layout

    install_layout(model.config, config.longtune_attention)
    return model


def _bnb_config(dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise RecipeError(
            "lora.mode: qlora needs bitsandbytes: pip install 'longtune[quant]'"
        ) from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.float32,
    )


def modules_to_save(lora: LoraSection, config: PretrainedConfig) -> list[str]:
    mods: list[str] = []
    if lora.trainable_embeddings:
        # Tied embeddings: wrapping lm_head too would untie them; the embedding carries both.
        mods += ["embed_tokens"] if getattr(config, "tie_word_embeddings", False) else EMBEDDING_MODULES
    if lora.trainable_norms:
        mods += NORM_MODULES
    return mods


def apply_lora(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    """LoRA (peft) on the target modules, with embeddings and norms fully trainable (LongLoRA+)."""
    lora = recipe.lora
    if lora.mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    from finetune.quiet import quiet_peft

    if lora.mode == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.training.gradient_checkpointing
        )
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in lora.target_modules if t not in names]
    if missing:
        raise RecipeError(
            f"lora.target_modules: {missing} not found in the model (it has e.g. "
            f"{sorted(n for n in names if n.endswith('proj'))})"
        )
    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        modules_to_save=modules_to_save(lora, model.config) or None,
        task_type="CAUSAL_LM",
        bias="none",
    )
    with quiet_peft():
        model = get_peft_model(model, cfg)
    if recipe.training.gradient_checkpointing and not lora.trainable_embeddings:
        model.enable_input_require_grads()
    return model


def build_model(recipe: Recipe, config: PretrainedConfig | None = None) -> torch.nn.Module:
    """The trainable model of a recipe: base + RoPE + layout + LoRA (`config`: a built one)."""
    model = build_base_model(recipe, config)
    model = apply_lora(model, recipe)
    if recipe.memory.tiled_mlp:
        from finetune.memory import install_tiled_mlp

        install_tiled_mlp(model, recipe.memory.tiled_mlp_tokens)
    if recipe.training.gradient_checkpointing:
        from finetune import checkpointing  # non-reentrant, optionally selective (its docstring)

        checkpointing.enable(model, recipe.memory)
        model.config.use_cache = False
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total); a ModulesToSaveWrapper's frozen original is not counted twice."""
    trainable = total = 0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if ".original_module." in name:
            continue
        n = p.numel()
        if hasattr(p, "ds_numel"):
            n = p.ds_numel
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# --------------------------------------------------------------------------- dry run
def estimate(recipe: Recipe, num_gpus: int, zero_stage: int | None) -> dict[str, Any]:
    """Parameter counts and a per-GPU memory estimate from the config alone (meta device)."""
    config = build_config(recipe)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = apply_lora(model, recipe) if recipe.lora.mode != "qlora" else _meta_qlora(model, recipe)
    trainable, total = count_parameters(model)
    prec = training_precision(recipe)
    wbytes = 0.5 if recipe.lora.mode == "qlora" else (2 if prec in ("bf16", "fp16") else 4)
    # peft keeps the frozen original of every fully trained module (modules_to_save) too.
    originals = sum(p.numel() for n, p in model.named_parameters() if ".original_module." in n)
    weights = (total + originals) * wbytes
    # Trainable: grads (working dtype) + fp32 master (DeepSpeed always keeps one) + Adam m and v.
    master = 0 if zero_stage is None and prec == "fp32" else 4
    states = trainable * ((2 if prec != "fp32" else 4) + 8 + master)
    n = max(1, num_gpus)
    if zero_stage == 3:
        weights /= n
        states /= n
    elif zero_stage in (1, 2):
        states = trainable * (2 if prec != "fp32" else 4) + trainable * 12 / n
    from finetune.memory import activation_estimate

    act = activation_estimate(recipe, config, 2 if prec != "fp32" else 4, zero_stage)  # memory section, SP included
    activations, logits = act["activations"], act["logits"]
    total_bytes = weights + states + activations + logits
    return {
        "trainable_params": trainable,
        "total_params": total,
        "precision": prec,
        "num_gpus": n,
        "zero_stage": zero_stage,
        "per_gpu_gib": {
            "weights": weights / 2**30,
            "grads_and_optimizer": states / 2**30,
            "activations": activations / 2**30,
            "logits": logits / 2**30,
            "total": total_bytes / 2**30,
            "offloaded_to_cpu": act["offloaded_to_cpu"] / 2**30,
        },
        "sequence_parallel": recipe.memory.sequence_parallel,
        "rope": config.longtune_rope,
        "max_position_embeddings": config.max_position_embeddings,
        "attention_layers": [l["pattern"] for l in config.longtune_attention["layers"]],
    }


def _meta_qlora(model, recipe: Recipe):
    # bitsandbytes cannot quantise meta tensors; LoRA counts are the same on the unquantised model.
    r = recipe.model_copy(deep=True)
    r.lora.mode = "lora"
    return apply_lora(model, r)
