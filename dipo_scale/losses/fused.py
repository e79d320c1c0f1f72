"""Fused LM head + loss: DiPO and NLL straight from final hidden states, never materialising logits.

At long sequences and large vocabularies the [B, T, V] logits (and their gradient) dominate
memory. The functions here take the policy's final hidden states `hidden` [B, T, H] (the input
of its LM head) and the LM-head `weight` [V, H] (optional `bias` [V]) and evaluate the loss chunk
by chunk over the valid positions: inside a chunk `z = hidden[idx] @ weight.T (+ bias)` is
computed in float32 (at least; float64 inputs stay float64), fed to the same per-position
functions as `dipo_scale.losses` (`_dipo_position_margin`, `_target_logprob`), and dropped.
The backward pass recomputes each chunk, writes that chunk's rows of `grad_hidden` and adds
`grad_z.T @ hidden_chunk` into `grad_weight` (one float32 [V, H] accumulator, cast to the
weight's dtype at the end). The autograd graph stores only the inputs (and the [N] index of
valid positions): no [B, T, V] tensor exists at any point, on the policy or on the reference
side.

Reference side (`fused_dipo_loss`): either
* `ref_logits` [B, T, V] (e.g. an `online` reference forward, or a cache of full logits), or
* `ref_hidden` [B, T, H] + `ref_weight` [V, H] (+ `ref_bias`): the `hidden` reference-cache form
  of docs/DIPO.md; the reference logits are rebuilt per chunk, so they never exist whole either.

Conventions are exactly those of `dipo_scale.losses`: `targets` are already shifted, -100 marks
a position that contributes nothing, `reduction` is `sum` or `mean` over a row's valid tokens,
and `fused_dipo_loss(h, W, ...)` equals `dipo_loss(h @ W.T, ...)` (tests/losses/test_fused.py).

Chunk size. `chunk_size` counts positions. Each chunk holds a handful of [chunk, V] float32
temporaries (logits, reference logits, the preference distributions, the gradient), so the
memory a chunk costs grows with V: 1024 positions at V = 128256 is ~525 MB *per temporary*.
`chunk_size=None` (the default) picks `max(1, min(1024, CHUNK_ELEMENTS // V))` positions, i.e.
~16 MiB per [chunk, V] float32 temporary whatever the vocabulary (131 positions at V = 32000,
32 at V = 128256); with the ~10 such temporaries a chunk needs, that is ~170 MB in flight.
Pass an int to force a size (on a GPU, where a [chunk, H] x [H, V] matmul wants >= 128 rows to
run near peak, a larger chunk may be faster at 128k vocabularies). Smaller chunks re-read the
weight more often (one pass over [V, H] per chunk and matmul); see docs/benchmarks.md.

Precision and memory notes. The matmul runs in the compute dtype (float32 for bf16/fp16/fp32
inputs), so a bf16 `weight` is upcast once per forward and once per backward pass (a transient
float32 copy of [V, H]; none when the weight is already float32), and `grad_weight` is
accumulated in float32 before the cast back. `grad_hidden` has the dtype of `hidden`. Gradients
are computed only for the inputs that require them (a frozen head costs no [V, H] accumulator).
The reference side never receives gradients.

Under DeepSpeed ZeRO-3 the LM-head weight is partitioned: outside the forward that uses it,
`model.lm_head.weight` is an empty placeholder (its shard lives in `ds_tensor`), and the caller
must pass the *gathered* weight.
* `deepspeed.zero.GatheredParameters(lm_head.weight, modifier_rank=None)` gathers it for reads
  only (evaluation, a no-grad pass, a reference-cache precompute). It is not a way to train:
  the parameter is re-partitioned when the context exits, i.e. before `engine.backward`, so the
  weight saved for the backward pass is gone, and no gradient reaches ZeRO's partitioned grads.
* For training, compute the fused loss inside a forward that DeepSpeed coordinates, so that
  ZeRO-3 gathers the weight for the forward, re-gathers it for the backward, and reduce-scatters
  its gradient like any other parameter's:
  - in the engine-wrapped module's forward: e.g. a wrapper `nn.Module` holding the HF model whose
    `forward(batch)` runs the decoder trunk only, `h = self.model.model(input_ids,
    attention_mask=...)[0]`, and returns `fused_dipo_loss(h, self.model.lm_head.weight, ...)`.
    Register the weight once, after building the wrapper, with
    `deepspeed.zero.register_external_parameter(wrapper, wrapper.model.lm_head.weight)`: ZeRO-3
    then gathers it around the wrapper's forward and backward. (The DeepSpeed installed here,
    0.19, also does this automatically: while `engine(...)` runs, reading a partitioned parameter
    outside its owning module registers it as an external parameter of the module running; the
    explicit call makes it independent of that behaviour.) The loss must be returned from that
    forward, so that the hooks DeepSpeed puts on the module's outputs fire in the backward; or
  - inside the LM head's own forward: replace `lm_head.forward` by one taking `(hidden, targets,
    ...)` and returning the fused loss; ZeRO-3's pre-forward hook on `lm_head` has gathered
    `lm_head.weight` by then, and its backward hook re-gathers it.
  Tied embeddings (`lm_head.weight is embed_tokens.weight`) work the same way: the parameter is
  one object, and its gradient sums both uses.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from dipo_scale.losses import (
    IGNORE_INDEX,
    HiddenReference,
    LogitsReference,
    Select,
    _dipo_position_margin,
    _linear,
    CHUNK_ELEMENTS,
    _target_logprob,
    auto_chunk_size,
    compute_dtype,
    token_counts,
)

__all__ = ["fused_dipo_loss", "fused_nll_loss", "fused_sequence_logprob", "auto_chunk_size",
           "CHUNK_ELEMENTS"]


class _FusedHeadPositionwise(torch.autograd.Function):
    """values[n] = fn(hidden[n] @ weight.T + bias, targets[n], *ref[n]) over valid positions n.

    `ref` is () (no reference), or the reference logits of position n: `ref_logits[n]`, or
    `ref_hidden[n] @ ref_weight.T + ref_bias` rebuilt per chunk. Forward holds one chunk of
    [chunk, V] tensors at a time; backward recomputes each chunk. Saved: the inputs only.
    """

    @staticmethod
    def forward(ctx, fn, chunk, positions, hidden, weight, bias, targets, ref_logits, ref_hidden,
                ref_weight, ref_bias):
        dtype = torch.promote_types(compute_dtype(hidden), compute_dtype(weight))
        ctx.fn, ctx.chunk, ctx.dtype = fn, chunk, dtype
        ctx.save_for_backward(positions, hidden, weight, bias, targets, ref_logits, ref_hidden,
                              ref_weight, ref_bias)
        out = hidden.new_empty(positions.numel(), dtype=dtype)
        with torch.no_grad():
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            ref = _RefSource(ref_logits, ref_hidden, ref_weight, ref_bias, dtype)
            for s in range(0, positions.numel(), chunk):
                idx = positions[s : s + chunk]
                z = _linear(hidden[idx].to(dtype), w, b)
                out[s : s + chunk] = fn(z, targets[idx], *ref.chunk(idx))
                del z
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (positions, hidden, weight, bias, targets, ref_logits, ref_hidden, ref_weight,
         ref_bias) = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[3], ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        dtype = ctx.dtype
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if need_b else None
        if need_h or need_w or need_b:
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            ref = _RefSource(ref_logits, ref_hidden, ref_weight, ref_bias, dtype)
            for s in range(0, positions.numel(), ctx.chunk):
                idx = positions[s : s + ctx.chunk]
                h = hidden[idx].to(dtype)
                refs = ref.chunk(idx)
                z = _linear(h, w, b)  # backward runs without grad mode: a fresh leaf
                with torch.enable_grad():
                    z.requires_grad_(True)
                    values = ctx.fn(z, targets[idx], *refs)
                    (g,) = torch.autograd.grad(values, z, grad_out[s : s + ctx.chunk].to(dtype))
                del z, values, refs
                if need_h:
                    grad_h[idx] = (g @ w).to(grad_h.dtype)
                if need_w:
                    grad_w.addmm_(g.T, h)
                if need_b:
                    grad_b += g.sum(dim=0)
                del g, h
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return (None, None, None, grad_h, grad_w, grad_b) + (None,) * 5


class _RefSource:
    """Reference logits of a chunk of positions, from full logits or from the hidden cache form
    (the `Reference` classes of `dipo_scale.losses`, on [B*T, ...] flattened tensors)."""

    def __init__(self, ref_logits, ref_hidden, ref_weight, ref_bias, dtype):
        self.dtype = dtype
        self.ref = (LogitsReference(ref_logits) if ref_logits is not None
                    else HiddenReference(ref_hidden, ref_weight, ref_bias) if ref_hidden is not None
                    else None)
        self.aux = () if self.ref is None else self.ref.per_position()

    def chunk(self, idx: torch.Tensor) -> tuple:
        if self.ref is None:
            return ()
        with torch.no_grad():
            return (self.ref.logits(*(a[idx] for a in self.aux)).to(self.dtype),)


def _check(hidden, weight, bias, targets):
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must be [V, H={hidden.shape[2]}], got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"targets must be [B, T]={tuple(hidden.shape[:2])}, got {tuple(targets.shape)}")


def _per_row_fused(fn: Callable, hidden, weight, bias, targets, *, ref_logits=None, ref_hidden=None,
                   ref_weight=None, ref_bias=None, chunk_size: Optional[int] = None) -> torch.Tensor:
    """Sum of fn over each row's valid positions -> [B] (differentiable in hidden, weight, bias)."""
    _check(hidden, weight, bias, targets)
    B, T, H = hidden.shape
    V = weight.shape[0]
    chunk = auto_chunk_size(V) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat_targets = targets.reshape(-1)
    positions = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
    if ref_logits is not None:
        if tuple(ref_logits.shape) != (B, T, V):
            raise ValueError(f"ref_logits must be [B, T, V]={(B, T, V)}, got {tuple(ref_logits.shape)}")
        ref_logits = ref_logits.detach().reshape(B * T, V)
    if ref_hidden is not None:
        if ref_hidden.shape[:2] != hidden.shape[:2] or ref_weight.shape[0] != V \
                or ref_weight.shape[1] != ref_hidden.shape[2]:
            raise ValueError("ref_hidden must be [B, T, H_ref] and ref_weight [V, H_ref] with the "
                             f"policy's B, T, V; got {tuple(ref_hidden.shape)}, {tuple(ref_weight.shape)}")
        ref_hidden = ref_hidden.detach().reshape(B * T, -1)
        ref_weight = ref_weight.detach()
        ref_bias = None if ref_bias is None else ref_bias.detach()
    values = _FusedHeadPositionwise.apply(fn, chunk, positions, hidden.reshape(B * T, H), weight, bias,
                                          flat_targets.clamp_min(0), ref_logits, ref_hidden, ref_weight,
                                          ref_bias)
    rows = torch.div(positions, T, rounding_mode="floor")
    return values.new_zeros(B).index_add(0, rows, values)


# --------------------------------------------------------------------------------------------
# Public fused losses.
# --------------------------------------------------------------------------------------------
def fused_sequence_logprob(hidden, weight, targets, *, bias=None, chunk_size: Optional[int] = None):
    """Σ_t log π(y_t|s_t) per row ([B]), with π = softmax(hidden @ weight.T + bias)."""
    return _per_row_fused(_target_logprob, hidden, weight, bias, targets, chunk_size=chunk_size)


def fused_nll_loss(hidden, weight, targets, *, bias=None, chunk_size: Optional[int] = None) -> torch.Tensor:
    """`losses.nll_loss(hidden @ weight.T + bias, targets)` without the logits: token-mean NLL per
    row, averaged over rows (plain fine-tuning cross-entropy, the `gd` retain term)."""
    logprob = fused_sequence_logprob(hidden, weight, targets, bias=bias, chunk_size=chunk_size)
    return (-logprob / token_counts(targets)).mean()


def fused_dipo_loss(hidden, weight, targets, *, bias=None, ref_logits=None, ref_hidden=None,
                    ref_weight=None, ref_bias=None, alpha, beta, select: Select = "topk", k=1, p=0.9,
                    reduction: Literal["sum", "mean"] = "sum", source="reference",
                    chunk_size: Optional[int] = None):
    """`losses.dipo_loss(hidden @ weight.T + bias, ref, targets, ...)` without the logits.

    The reference is `ref_logits` [B, T, V], or `ref_hidden` [B, T, H_ref] + `ref_weight`
    [V, H_ref] (+ `ref_bias`) from which the reference logits are rebuilt chunk by chunk.
    Returns (loss, margin[B]) exactly like `losses.dipo_loss`.
    """
    if (ref_logits is None) == (ref_hidden is None):
        raise ValueError("pass exactly one reference: ref_logits, or ref_hidden + ref_weight")
    if ref_hidden is not None and ref_weight is None:
        raise ValueError("ref_hidden needs ref_weight (the reference LM-head weight [V, H])")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"unknown dipo reduction {reduction!r}")
    if source not in ("reference", "policy"):
        raise ValueError(f"unknown dipo source {source!r}")

    def fn(z, y, z_ref):
        return _dipo_position_margin(z, y, z_ref, alpha=alpha, select=select, k=k, p=p, source=source)

    margin = _per_row_fused(fn, hidden, weight, bias, targets, ref_logits=ref_logits,
                            ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
                            chunk_size=chunk_size)
    if reduction == "mean":
        margin = margin / token_counts(targets)
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean(), margin
