"""Per-rank memory features for long sequences (recipe section `memory`, docs/long_sequences.md).

At 64K+ tokens the largest tensors of a LoRA step are not attention's: they are the logits
([tokens, vocab] in fp32, twice: values and gradient) and the MLP's [tokens, FFN] activations.
DeepSpeed's ALST components remove both; this module only wires them into our model:

- tiled logits + loss: lm_head + cross entropy over tiles of ``tiled_loss_tokens`` tokens, so at
  most one tile's logits exist at a time. ``fused_linear_cross_entropy`` (ours) makes the
  gradients tile by tile in the forward and only scales them in backward: no recomputation.
  (DeepSpeed's ``TiledFusedLogitsLoss`` also computes in forward, but writes the lm_head weight
  gradient with an incoming gradient of 1: any later scaling of the loss, gradient accumulation
  or the sequence-parallel reduction, would not reach it.) Under ZeRO-3 the head runs as a
  module per tile through DeepSpeed's ``sequence_tiled_compute``, which recomputes in backward.
- tiled MLP: ``TiledMLP`` runs each decoder MLP over tiles and recomputes it in backward.
  Installed per instance (``install_tiled_mlp``): every MLP object gets a subclass of its own
  class whose ``forward`` tiles; state-dict names and peft's LoRA layers inside are untouched,
  no transformers class is modified.
- activation-checkpoint offload: with gradient checkpointing each decoder layer keeps only its
  input until backward; ``OffloadCheckpoints`` (saved-tensor hooks) moves those inputs to CPU
  memory (pinned, asynchronous on CUDA) and brings each back when backward reaches its layer.
  torch's non-reentrant checkpoint (torch >= 2.13) keeps its inputs as saved tensors, which the
  hooks reach (finetune/checkpointing.py). On a CPU device the tensor stays where it is: there
  is no cheaper memory to move it to, so there the offload costs nothing and saves nothing.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

IGNORE = -100


# --------------------------------------------------------------------------- tiled loss
def tile_count(tokens: int, tile: int) -> int:
    return max(1, math.ceil(tokens / max(1, tile)))


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def tiled_loss_sum(lm_head: torch.nn.Module, hidden: torch.Tensor, shift_labels: torch.Tensor,
                   tile_tokens: int) -> torch.Tensor:
    """Sum of the cross entropy of ``lm_head(hidden)`` against ``shift_labels`` (-100 ignored),
    computed ``tile_tokens`` tokens at a time: the full [tokens, vocab] logits never exist.

    hidden (B, T, h) (the final norm's output), shift_labels (B, T) already shifted (label of
    position t is the token at t + 1). A plain linear head (every case but ZeRO-3) goes through
    ``fused_linear_cross_entropy``: the gradients are made tile by tile in the forward, nothing is
    recomputed. Under ZeRO-3 the head's weight exists only inside its module's forward, so the
    head is called as a module, per tile, through DeepSpeed's ``sequence_tiled_compute``
    (which recomputes each tile in backward)."""
    head = plain_linear(lm_head)
    if head is not None:
        return fused_linear_cross_entropy(hidden, head.weight, head.bias, shift_labels, tile_tokens)
    from deepspeed.runtime.sequence_parallel.ulysses_sp import sequence_tiled_compute

    def loss_fn(x, y):
        logits = lm_head(x).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                               reduction="sum")

    T = hidden.shape[1]
    if tile_count(T, tile_tokens) == 1:  # one tile holds every token: no recomputation needed
        return loss_fn(hidden, shift_labels)
    return sequence_tiled_compute(
        loss_fn, T, tile_count(T, tile_tokens),
        kwargs_to_shard={"x": hidden, "y": shift_labels}, kwargs_to_pass={},
        grad_requiring_tensor_key="x", compute_params=trainable(lm_head),
        output_unshard_dimension=0, output_reduction="sum",
    )


def plain_linear(module: torch.nn.Module) -> torch.nn.Linear | None:
    """The nn.Linear that computes ``module``'s output (peft's modules_to_save wrapper resolved
    to its active copy), or None when the output is not just ``F.linear`` of its weight: hooks,
    an instance-level forward, LoRA on the head, ZeRO-3 partitioned parameters (``ds_id``)."""
    if hasattr(module, "modules_to_save") and hasattr(module, "original_module"):  # peft ModulesToSaveWrapper
        active = module.active_adapter
        active = active[0] if isinstance(active, (list, tuple)) and len(active) == 1 else active
        if getattr(module, "disable_adapters", False) or active not in module.modules_to_save:
            module = module.original_module
        else:
            module = module.modules_to_save[active]
    if type(module) is not torch.nn.Linear or module._forward_hooks or module._forward_pre_hooks:
        return None
    if "forward" in module.__dict__ or hasattr(module, "_hf_hook"):
        return None
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        return None
    return module


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               labels: torch.Tensor, tile_tokens: int) -> torch.Tensor:
    """sum over tokens of cross_entropy(hidden @ weight.T + bias, labels), -100 ignored, with
    the gradients (hidden, and weight / bias when they require grad) made in the forward, one
    tile of ``tile_tokens`` tokens at a time: one [tile, vocab] fp32 buffer, no recomputation,
    and the backward only scales the stored gradients by the incoming one (so gradient
    accumulation's and the sequence group's scaling reach the weight gradient too)."""
    h = hidden.shape[-1]
    if not torch.is_grad_enabled():  # evaluation: the loss alone (inside apply no gradient is known unwanted)
        with torch.no_grad():
            return _FusedLinearCE.forward(_NoGrad(), hidden.reshape(-1, h), weight, bias, labels.reshape(-1),
                                          max(1, int(tile_tokens)))
    return _FusedLinearCE.apply(hidden.reshape(-1, h), weight, bias, labels.reshape(-1), max(1, int(tile_tokens)))


class _NoGrad:
    """The ``ctx`` of a forward run outside autograd: no input wants a gradient."""

    needs_input_grad = (False,) * 5

    def save_for_backward(self, *tensors):
        pass


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, labels, tile):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        total = torch.zeros((), dtype=torch.float32 if x.dtype != torch.float64 else x.dtype, device=x.device)
        gx = torch.empty_like(x) if need_x else None
        gw = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                         device=weight.device) if need_w else None
        gb = torch.zeros(bias.shape, dtype=gw.dtype if gw is not None else torch.float32,
                         device=bias.device) if need_b else None
        for s in range(0, x.shape[0], tile):
            xs, ys = x[s:s + tile], labels[s:s + tile]
            logits = F.linear(xs, weight, bias).to(total.dtype)
            valid = ys != IGNORE
            target = ys.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            total += torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
            if not (need_x or need_w or need_b):
                continue
            # d(sum of losses)/d(logits) = softmax - onehot(label), 0 for ignored rows, in place
            g = logits.sub_(lse[:, None]).exp_()
            g.scatter_add_(1, target[:, None], -torch.ones_like(lse)[:, None])
            g.mul_(valid[:, None].to(g.dtype))
            g = g.to(x.dtype)
            if need_x:
                if weight.dtype == x.dtype:
                    torch.mm(g, weight, out=gx[s:s + tile])
                else:
                    gx[s:s + tile] = g @ weight.to(x.dtype)
            if need_w:
                gw.addmm_(g.t().to(gw.dtype), xs.to(gw.dtype))
            if need_b:
                gb += g.sum(0).to(gb.dtype)
            del g, logits
        ctx.save_for_backward(gx, gw, gb)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad):
        gx, gw, gb = ctx.saved_tensors
        wdt, bdt = ctx.dtypes
        dx = None if gx is None else gx * grad.to(gx.dtype)
        dw = None if gw is None else (gw * grad).to(wdt)
        db = None if gb is None else (gb * grad).to(bdt)
        return dx, dw, db, None, None


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[:, 1:] padded with -100: the target of every position, shifted before any sharding."""
    return F.pad(labels, (0, 1), value=IGNORE)[:, 1:].contiguous()


@contextmanager
def final_hidden_states(model: torch.nn.Module):
    """Captures the decoder's final-norm output (what lm_head would see) during a forward."""
    base = unwrap(model)
    norm = base.get_decoder().norm
    box: dict = {}
    handle = norm.register_forward_hook(lambda _m, _i, out: box.__setitem__("hidden", out))
    try:
        yield box
    finally:
        handle.remove()


def no_logits(device) -> torch.Tensor:
    """``logits_to_keep`` that keeps no position: the model's own lm_head call produces (B, 0, V)."""
    return torch.empty(0, dtype=torch.long, device=device)


# --------------------------------------------------------------------------- tiled MLP
def _mlp_forward(mlp, x):
    return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


def _agreed(n: int, device) -> int:
    """The largest tile count over all ranks: under ZeRO-3 every tile gathers the weights (a
    collective), so ranks with different lengths must still make the same number of calls."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([n], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())
    return n


#: The smallest default MLP tile. ALST tiles by hidden_size tokens (ceil(tokens / hidden) tiles);
#: for a small model that is a few hundred tokens, where the matmuls run far below speed: on the
#: CPU box SmolLM2-135M's MLP (hidden 576) at 8K tokens took 2.3x the untiled forward + backward
#: in 576-token tiles, 1.5x in 4096-token tiles (the recomputation alone is 1.5x). A 4096-token
#: tile of [tile, FFN] activations is small next to everything else a long step holds.
MIN_MLP_TILE = 4096


def mlp_tile_tokens(tile_tokens: int | None, hidden_size: int) -> int:
    """Tokens per MLP tile: the recipe's ``tiled_mlp_tokens``, else max(hidden_size, MIN_MLP_TILE)."""
    return int(tile_tokens) if tile_tokens else max(int(hidden_size), MIN_MLP_TILE)


def tiled_forward(fn, module, x: torch.Tensor, shards: int) -> torch.Tensor:
    """``fn(module, x)`` over ``shards`` tiles of the flattened tokens, as DeepSpeed's backward
    tiles them. A tile cut from (B, T, h) along T is a (1, T/n, h) view whose batch stride is not
    its size: ``F.linear`` then takes the batched-matmul path (at 8K tokens on the CPU box, about
    1.8x the time of the same product as one matmul); a tile of the (B*T, h) view is a plain
    matrix."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.cat([fn(module, part) for part in torch.chunk(flat, shards, dim=0)], dim=0)
    return out.view(*x.shape[:-1], out.shape[-1])


class _SaveInput(torch.autograd.Function):
    """Identity that saves its input for ``_TiledMLPFromSaved``'s backward.

    DeepSpeed's ``TiledMLP`` saves its input itself, and a custom Function's saves are packed
    only after its forward has run: under gradient checkpointing the recomputation (which stops
    once the last saved tensor is back) runs the whole tiled MLP forward again just to reach
    that save, and throws the output away (a third MLP forward per step, about 10% of an 8K
    step on the CPU box). Saved here, before the MLP, the recomputation stops before it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _TiledMLPFromSaved(torch.autograd.Function):
    """DeepSpeed's ``TiledMLP`` (same forward, its backward called as is), reading its input from
    the ``_SaveInput`` node in front of it instead of saving it again."""

    @staticmethod
    def forward(ctx, fn, module, x, saved_by, shards, compute_params):
        ctx.fn, ctx.module, ctx.shards, ctx.saved_by = fn, module, shards, saved_by
        ctx.compute_params = [p for p in compute_params if p.requires_grad]
        with torch.no_grad():
            return tiled_forward(fn, module, x, shards)

    @staticmethod
    def backward(ctx, *grads):
        from types import SimpleNamespace

        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

        as_deepspeed = SimpleNamespace(fn=ctx.fn, self=ctx.module, shards=ctx.shards,
                                       compute_params=ctx.compute_params, saved_tensors=ctx.saved_by.saved_tensors)
        ctx.saved_by = None
        gx = TiledMLP.backward(as_deepspeed, *grads)[2]
        return None, None, gx, None, None, None


class _TiledMLPMixin:
    """Mixed into an MLP instance's class by ``install_tiled_mlp``."""

    longtune_tile_tokens: int

    def forward(self, x):
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

        if not torch.is_grad_enabled():  # eval / generation: nothing to save, run it whole
            return _mlp_forward(self, x)
        shards = _agreed(tile_count(x.shape[-2], self.longtune_tile_tokens), x.device)
        if shards == 1:  # one tile holds every token: tiling would only add a recomputation
            return _mlp_forward(self, x)
        if not x.requires_grad:  # nothing before the MLP trains: DeepSpeed's Function as it is
            return TiledMLP.apply(_mlp_forward, self, x, shards, trainable(self))
        x = _SaveInput.apply(x)
        return _TiledMLPFromSaved.apply(_mlp_forward, self, x, x.grad_fn, shards, trainable(self))


_TILED_CLASSES: dict[type, type] = {}


def install_tiled_mlp(model: torch.nn.Module, tile_tokens: int | None) -> int:
    """Every decoder layer's ``mlp`` runs tiled; returns how many were converted.

    ``tile_tokens`` None = ``mlp_tile_tokens``' default (hidden_size, at least MIN_MLP_TILE)."""
    base = unwrap(model)
    tile = mlp_tile_tokens(tile_tokens, base.config.hidden_size)
    n = 0
    for layer in base.get_decoder().layers:
        mlp = layer.mlp
        cls = type(mlp)
        if not issubclass(cls, _TiledMLPMixin):
            if cls not in _TILED_CLASSES:
                _TILED_CLASSES[cls] = type(f"Tiled{cls.__name__}", (_TiledMLPMixin, cls), {})
            mlp.__class__ = _TILED_CLASSES[cls]
        mlp.longtune_tile_tokens = tile
        n += 1
    return n


# --------------------------------------------------------------------------- offload
class OffloadCheckpoints(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors of the forward (with checkpointing: each layer's input) go to
    CPU memory and come back in backward. ``offloaded_bytes`` counts what was moved (on a CPU
    device the tensor stays where it is: there is nowhere cheaper to put it)."""

    def __init__(self, min_bytes: int = 1 << 16):
        self.offloaded_bytes = 0
        self.offloaded_shapes: list[tuple[int, ...]] = []
        self.min_bytes = min_bytes

        def pack(t: torch.Tensor):
            nbytes = t.numel() * t.element_size()
            if nbytes < self.min_bytes or isinstance(t, torch.nn.Parameter):  # weights stay
                return t
            self.offloaded_bytes += nbytes
            self.offloaded_shapes.append(tuple(t.shape))
            if t.device.type == "cpu":
                return (t.device, t)
            cpu = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=True)
            cpu.copy_(t, non_blocking=True)
            return (t.device, cpu)

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, t = packed
            return t.to(device, non_blocking=True)

        super().__init__(pack, unpack)


def offload_context(memory):
    """The context the forward of a training step runs in (a no-op without offload)."""
    import contextlib

    return OffloadCheckpoints() if memory.offload_activations else contextlib.nullcontext()


# --------------------------------------------------------------------------- the step's loss
def loss_sum_and_outputs(model, inputs: dict, targets: torch.Tensor, memory):
    """(sum of the token losses against ``targets`` (shifted labels), model outputs) of one
    forward, with the recipe's ``memory`` features; the caller divides by its token count."""
    with offload_context(memory):
        if memory.tiled_loss:
            with final_hidden_states(model) as box:
                outputs = model(**inputs, logits_to_keep=no_logits(targets.device))
            head = unwrap(model).get_output_embeddings()
            return tiled_loss_sum(head, box["hidden"], targets, memory.tiled_loss_tokens), outputs
        outputs = model(**inputs)
        logits = outputs.logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                               reduction="sum")
        return loss, outputs


# --------------------------------------------------------------------------- estimate
#: Elements per (local) token that one decoder layer keeps for its backward, besides its MLP:
#: the input norm's output, q, o (h each), k, v (kv each), rotary q/k copies (h + kv), the
#: attention output and o_proj's output (h each), the residual sum (h).
ATTN_PER_TOKEN = (6, 3)  # (x hidden, x kv width)
#: The MLP: post-attention norm output and down_proj output (h each); gate, up, act(gate),
#: act(gate) * up (F each).
MLP_PER_TOKEN = (2, 4)  # (x hidden, x FFN)
#: Ulysses' all-to-all copies: q, k, v gathered over the sequence and the output sent back.
ULYSSES_PER_TOKEN = (2, 2)  # (x hidden, x kv width)
#: fp32 logits, their log-softmax and its gradient exist together in the cross entropy.
LOGITS_COPIES = 3


def activation_estimate(recipe, config, act_bytes: int, zero_stage: int | None = None) -> dict[str, float]:
    """Bytes of activations per rank for one micro-batch: what the dry run adds to weights and
    optimizer states. Models sequence parallelism (T/P tokens per rank; attention's heads/P of
    the whole sequence hold the same number of elements), gradient checkpointing (the layer
    inputs plus one layer recomputed with its gradients; with ``save_attention`` every layer's
    attention output and log-sum-exp too), tiled MLP, tiled loss and the
    checkpoint offload (reported as ``offloaded_to_cpu``, host memory, not in the total).
    The tiled loss holds one fp32 copy of a tile's logits (plus its working-dtype copy) on the
    fused path, three (values, log-softmax, gradient) under ZeRO-3, where DeepSpeed's
    recomputing path runs (``tiled_loss_sum``)."""
    mem = recipe.memory
    h, layers, F = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    heads = config.num_attention_heads
    kv = h * (getattr(config, "num_key_value_heads", None) or heads) // heads
    V = config.vocab_size
    P = mem.sequence_parallel
    b = recipe.training.per_device_batch_size
    tokens = b * recipe.seq_length // P
    mlp_tokens = tokens
    if mem.tiled_mlp:
        mlp_tokens = min(tokens, b * mlp_tile_tokens(mem.tiled_mlp_tokens, h))
    per_layer = tokens * (ATTN_PER_TOKEN[0] * h + ATTN_PER_TOKEN[1] * kv + MLP_PER_TOKEN[0] * h)
    per_layer += mlp_tokens * MLP_PER_TOKEN[1] * F
    if P > 1:
        per_layer += tokens * (ULYSSES_PER_TOKEN[0] * h + ULYSSES_PER_TOKEN[1] * kv)
    per_layer *= act_bytes
    checkpoints = 0.0
    if recipe.training.gradient_checkpointing:
        checkpoints = layers * tokens * h * act_bytes
        layers_bytes = 2 * per_layer  # the recomputed layer and its gradients
    else:
        layers_bytes = (layers + 1) * per_layer
    logit_tokens = min(tokens, b * mem.tiled_loss_tokens) if mem.tiled_loss else tokens
    fused = mem.tiled_loss and zero_stage != 3
    logits = logit_tokens * V * 4 * (1 if fused else LOGITS_COPIES)
    if act_bytes != 4:
        logits += logit_tokens * V * act_bytes  # the lm_head output before the fp32 upcast
    offloaded = checkpoints if mem.offload_activations else 0.0
    if recipe.training.gradient_checkpointing and mem.save_attention:
        # selective checkpointing keeps every layer's attention output (working dtype) and its
        # fp32 log-sum-exp (heads/P of all tokens = heads x local tokens); not offloaded
        layers_bytes += layers * tokens * (h * act_bytes + heads * 4)
    return {"activations": layers_bytes + checkpoints - offloaded, "logits": logits, "offloaded_to_cpu": offloaded}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DeepSpeed's engine and peft's wrapper."""
    m = getattr(model, "module", model)
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m
