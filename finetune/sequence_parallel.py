"""Ulysses sequence parallelism through DeepSpeed ALST, accelerate and the HF Trainer.

No sequence-parallel runtime lives here: accelerate's ``ParallelismConfig(sp_backend="deepspeed",
sp_size=P)`` makes the Trainer register DeepSpeed's ``UlyssesSPAttentionHF`` around our
"longtune" attention and wrap the training dataloader in ``UlyssesSPDataLoaderAdapter``
(which shards every batch along the sequence and pre-shifts the labels). This module holds
what our side must add (docs/long_sequences.md):

- validation of the recipe (degree vs sequence length, heads, KV heads, world size, DeepSpeed),
  run by the recipe schema and by the launcher before any process is spawned;
- the attention's head offset: after Ulysses' all-to-all rank r holds the global heads
  r*H/P .. (r+1)*H/P - 1, and S2/SF-Attn's shifted heads and block_sparse's per-head strides
  are defined by the GLOBAL head index (kernels/heads.py applies it);
- ``LongSequenceTrainer.compute_loss``: the loss of a sequence-parallel group is the sum of
  every rank's token losses over the number of valid tokens of the group (not a mean of rank
  means), optionally with the tiled logits + loss of finetune/memory.py.

accelerate's ``DeepSpeedSequenceParallelConfig`` accepts only flash/sdpa names as the core
attention at construction; DeepSpeed itself takes any implementation registered with
transformers' AttentionInterface that equals the model's, so "longtune" is set on the handler
after construction (``parallelism_config``).
"""

from __future__ import annotations

from typing import Any

from finetune.recipe import SP_KEY as KEY
from finetune.recipe import RecipeError, check_heads


def check_world(recipe, world_size: int, config=None) -> None:
    """The launcher's check, before any process is spawned: world size and the real model's heads."""
    P = recipe.memory.sequence_parallel
    if P == 1:
        return
    if world_size % P:
        raise RecipeError(f"{KEY}: {P} does not divide the world size {world_size} (ranks: --ngpus / "
                          f"deepspeed.num_gpus x nodes); the ranks form world/{KEY} sequence-parallel groups")
    if config is not None:
        try:
            check_heads(P, config.num_attention_heads,
                        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                        recipe.model.name_or_path or "model.config")
        except ValueError as e:
            raise RecipeError(str(e)) from None


def degree(recipe) -> int:
    return recipe.memory.sequence_parallel


# --------------------------------------------------------------------------- wiring
def parallelism_config(recipe):
    """accelerate's ParallelismConfig for TrainingArguments, or None at degree 1."""
    P = recipe.memory.sequence_parallel
    if P == 1:
        return None
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    handler = DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True)
    # Set after construction: its __post_init__ only knows flash/sdpa (module docstring).
    handler.sp_attn_implementation = "longtune"
    return ParallelismConfig(sp_size=P, sp_backend="deepspeed", sp_handler=handler)


def sp_head_offset(local_heads: int) -> int:
    """First global head this rank holds after Ulysses' all-to-all."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    return mpu.get_sequence_parallel_rank() * local_heads


def install(recipe) -> None:
    """Per process, before the Trainer: lets the attention find its global heads."""
    if recipe.memory.sequence_parallel > 1:
        from kernels.registry import set_head_offset

        set_head_offset(sp_head_offset)


def report() -> dict:
    """For run.json: this rank's attention calls on a head slice (empty without SP)."""
    from kernels.registry import head_slice_calls

    return {"head_slice_calls": head_slice_calls()}


def zero3_gradient_factor(recipe) -> int:
    """P under ZeRO-3 with reduce-scatter (its default), else 1.

    DeepSpeed 0.19.8's ZeRO-3 reduce-scatter path (``__avg_scatter_grads``) averages gradients
    over the whole sequence-data-parallel group, P times more ranks than its other paths (ZeRO-1/2
    and ZeRO-3's all-reduce path divide by world / P): the gradient would be 1/P of the data's.
    Scaling what this rank back-propagates by P restores it (tests/test_train_sp.py compares the
    gradient norms of a ZeRO-3 degree-2 run with a degree-1 run)."""
    from finetune.deepspeed_config import deepspeed_config

    P = recipe.memory.sequence_parallel
    zero = (deepspeed_config(recipe) or {}).get("zero_optimization", {})
    if P > 1 and int(zero.get("stage", 0)) == 3 and zero.get("reduce_scatter", True):
        return P
    return 1


# --------------------------------------------------------------------------- trainer
def trainer_class():
    from transformers import Trainer

    class LongSequenceTrainer(Trainer):
        """HF Trainer whose loss knows sequence parallelism and the tiled loss.

        Without either feature it is the stock Trainer (``compute_loss`` defers to it)."""

        longtune_recipe: Any = None

        def _sp_active(self, model) -> bool:
            pc = getattr(self.accelerator, "parallelism_config", None)
            return bool(pc is not None and pc.sp_backend == "deepspeed" and pc.sp_enabled and model.training)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            from finetune.memory import loss_sum_and_outputs, shift_labels

            mem = self.longtune_recipe.memory
            sp = self._sp_active(model)
            if not (sp or mem.tiled_loss or mem.offload_activations):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs = dict(inputs)
            if "shift_labels" in inputs:  # the Ulysses adapter shifted before sharding
                targets = inputs.pop("shift_labels")
                inputs.pop("labels", None)
            else:
                targets = shift_labels(inputs.pop("labels"))
            loss_sum, outputs = loss_sum_and_outputs(model, inputs, targets, mem)
            count = (targets != -100).sum()
            if sp:
                import torch.distributed as dist
                from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

                group = mpu.get_sequence_parallel_group()
                total = loss_sum.detach().clone()
                count = count.clone()
                dist.all_reduce(total, group=group)
                dist.all_reduce(count, group=group)
                # The value is the group's loss on every rank; the gradient is this rank's own
                # tokens' share only: DeepSpeed SUMS gradients over the sequence-parallel ranks
                # (it divides by the data-parallel size alone). A differentiable all-reduce
                # would hand every rank the whole group's gradient: P times too large.
                scaled = loss_sum * zero3_gradient_factor(self.longtune_recipe)
                loss = (scaled + (total - scaled.detach())) / count.clamp(min=1)
            elif self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                # The stock path: sum over every micro-batch's tokens (all ranks with
                # average_tokens_across_devices), as transformers' ForCausalLMLoss does.
                loss = loss_sum / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            else:
                loss = loss_sum / count.clamp(min=1)
            return (loss, outputs) if return_outputs else loss

    return LongSequenceTrainer
