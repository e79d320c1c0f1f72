"""The chunking machinery every loss runs on: a per-position function summed over each row's
valid positions, chunk by chunk (`per_row`), so no [B, T, V] float32 intermediate exists beyond
the logits; the fused LM head (`LMHead`: the logits computed inside the chunks, forward and
backward); the chunk size (`auto_chunk_size`); and the per-position log-likelihood every loss
shares (`target_logprob`, `sequence_logprob`). Conventions: dipo_scale/losses/__init__.py."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from dipo_scale.losses.references import Reference


IGNORE_INDEX = -100


# float32), at most 1024 positions (docs/benchmarks.md, "Loss": what measured best there). Elsewhere
# (GPUs): the chunk's temporaries within a memory budget, at most 4096 positions.
CHUNK_ELEMENTS = 2 ** 22


MAX_CHUNK = 1024


ACCELERATOR_CHUNK_BUDGET = 4 << 30  # bytes for a chunk's CHUNK_TEMPORARIES [chunk, V] temporaries


ACCELERATOR_MAX_CHUNK = 4096


# or backward, logits or fused: 8 in kl_retain_loss's backward; DiPO top-k 4 (forward), NLL 5
# (backward). tests/losses/test_chunking.py counts them from the allocations of every loss.
CHUNK_TEMPORARIES = 8


def auto_chunk_size(vocab_size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    budget_bytes: int | None = None) -> int:
    """Positions per loss chunk for logits (or an `LMHead`) of `dtype` on `device`: what the losses
    use when `chunk_size=None`, and what a memory plan reserves (`loss_chunk_bytes`).

    * CPU (and no `budget_bytes`): `CHUNK_ELEMENTS // V` positions, at most `MAX_CHUNK`: 131 at
      V = 32000, 32 at V = 128256, whatever the dtype (measured best on the CPU, where the
      temporaries stay near the caches).
    * Other devices: the chunk's `CHUNK_TEMPORARIES` [chunk, V] temporaries in the compute dtype
      (`compute_dtype`: float32, float64 for float64 logits) fit `budget_bytes` (default
      `ACCELERATOR_CHUNK_BUDGET`, 4 GiB), at most `ACCELERATOR_MAX_CHUNK` positions: 1046 at
      V = 128256 and 4096 at V = 32000 in float32. Large chunks keep the fused head's
      [chunk, H] x [H, V] matmul compute-bound (its weight is read once per chunk).
    `budget_bytes` applies the budget rule on any device (a planner's own figure)."""
    vocab = max(1, vocab_size)
    if budget_bytes is None:
        if torch.device(device).type == "cpu":
            return max(1, min(MAX_CHUNK, CHUNK_ELEMENTS // vocab))
        budget_bytes = ACCELERATOR_CHUNK_BUDGET
    return max(1, min(ACCELERATOR_MAX_CHUNK, budget_bytes // loss_chunk_bytes(1, vocab, dtype)))


def loss_chunk_bytes(chunk: int, vocab_size: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one loss chunk's temporaries at most: `CHUNK_TEMPORARIES` [chunk, V] tensors in the
    compute dtype of `dtype` logits (what a memory plan reserves for the loss)."""
    return CHUNK_TEMPORARIES * chunk * vocab_size * torch.promote_types(dtype, torch.float32).itemsize


class _PositionwiseChunked(torch.autograd.Function):
    """values[n] = fn(logits[n], *aux[n]) for each selected position n, computed in chunks.

    Forward holds one [chunk, V] float32 slice at a time; backward recomputes each chunk (or
    only its derivative, `_chunk_grad`) and writes its gradient into a gradient tensor shaped like
    `logits` (no other [N, V] state). With `side` (a function like fn), the forward also returns
    side(logits[n], *aux[n]) from the same chunks, without gradient (a statistic riding along the
    loss's pass; not recomputed in the backward).

    When fn has a closed-form derivative (`fn.value_and_derivative`), a gradient will be wanted
    (`keep_grad`) and the logits already have the compute dtype, the forward writes each chunk's
    derivative into that gradient tensor as it goes (the same tensor the backward would allocate,
    held from the forward on), and the backward multiplies its rows by grad_out in place: the
    chunks are computed once. The values are those of the recomputing backward, bit for bit (the
    same products); a second backward through the same graph recomputes.
    """

    @staticmethod
    def forward(ctx, fn, side, chunk, keep_grad, positions, logits, *aux):
        ctx.fn, ctx.chunk, ctx.dtype = fn, chunk, compute_dtype(logits)
        ctx.save_for_backward(positions, logits, *aux)
        out = logits.new_empty(positions.numel(), dtype=ctx.dtype)
        side_out = None if side is None else torch.empty_like(out)
        derivatives = torch.zeros_like(logits) if (  # the gradient tensor, filled chunk by chunk below
            keep_grad and hasattr(fn, "value_and_derivative") and logits.dtype == ctx.dtype) else None
        with torch.no_grad():
            for s in range(0, positions.numel(), chunk):
                idx = positions[s : s + chunk]
                z, chunk_aux = logits[idx].to(ctx.dtype), [a[idx] for a in aux]
                if derivatives is None:
                    out[s : s + chunk] = fn(z, *chunk_aux)
                else:
                    out[s : s + chunk], derivative = fn.value_and_derivative(z, *chunk_aux)
                    if torch.promote_types(derivative.dtype, derivatives.dtype) == derivatives.dtype:
                        derivatives[idx] = derivative.to(derivatives.dtype)
                    else:  # wider than the gradient (a float64 reference): the backward recomputes
                        derivatives = None
                if side is not None:
                    side_out[s : s + chunk] = side(z, *chunk_aux)
        ctx.derivatives = derivatives
        return _with_side(ctx, out, side_out)

    @staticmethod
    def backward(ctx, grad_out, *_):
        positions, logits, *aux = ctx.saved_tensors
        if ctx.derivatives is not None:  # the forward's derivatives, scaled in place (once)
            grad, ctx.derivatives = ctx.derivatives, None
            scale = grad_out.new_zeros(len(grad))
            scale[positions] = grad_out
            return (None, None, None, None, None, grad.mul_(scale[:, None])) + (None,) * len(aux)
        grad = torch.zeros_like(logits)
        for s in range(0, positions.numel(), ctx.chunk):
            idx = positions[s : s + ctx.chunk]
            g = _chunk_grad(ctx.fn, lambda: logits[idx].to(ctx.dtype), [a[idx] for a in aux],
                            grad_out[s : s + ctx.chunk])
            grad[idx] = g.to(grad.dtype)
        return (None, None, None, None, None, grad) + (None,) * len(aux)


def _chunk_grad(fn, policy_logits: Callable[[], torch.Tensor], aux: list, grad_out: torch.Tensor) -> torch.Tensor:
    """grad_out[:, None] · ∂fn(z, *aux)/∂z for one chunk ([C, V]): from fn's closed form when it
    has one (`fn.derivative`; the policy's logits `policy_logits()` are built only if it reads them,
    `fn.derivative_reads_policy`), else by autograd through fn."""
    if hasattr(fn, "derivative"):
        with torch.no_grad():
            z = policy_logits() if fn.derivative_reads_policy else None
            return product_into(fn.derivative(z, *aux), grad_out[:, None])
    with torch.enable_grad():
        z = policy_logits().detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(z, *aux), z, grad_out)
    return g


def _with_side(ctx, out: torch.Tensor, side_out: torch.Tensor | None):
    """The outputs of a chunked forward: `out`, or (out, side_out) with side_out non-differentiable."""
    if side_out is None:
        return out
    ctx.mark_non_differentiable(side_out)
    return out, side_out


class _FusedHeadPositionwise(torch.autograd.Function):
    """values[n] = fn(hidden[n] @ weight.T + bias, targets[n], *aux[n]) for each selected position n
    (and, with `side`, side(...) of the same chunks, as in `_PositionwiseChunked`).

    Forward holds one chunk of [chunk, V] tensors at a time; backward recomputes each chunk (or
    only its gradient, `_chunk_grad`), writes that chunk's rows of grad_hidden and adds
    grad_z.T @ hidden_chunk into one [V, H] accumulator in the compute dtype (float32), cast to
    the weight's dtype at the end. Saved: the inputs only. Gradients are computed only for the
    inputs that require them (a frozen head costs no [V, H] accumulator).

    The matmuls run in `matmul` (`LMHead.matmul_dtype`): in the compute dtype (float32) the
    weight is upcast once per pass (a transient [V, H] copy), and every product is float32. In
    the weight's dtype (bf16, the default on GPUs) nothing is upcast but the chunk's [chunk, V]
    logits; the chunk's gradient is rounded to bf16 for its two products, as a bf16 model's LM
    head does (cuBLAS accumulates each product in float32). Each chunk's grad_weight product is
    rounded to bf16 once (a transient [V, H] in bf16) and summed into the float32 accumulator:
    the chunks' rounding errors add up like independent terms instead of compounding, as they
    would in a bf16 running sum (addmm_ into a bf16 gradient rounds the whole sum at every chunk).
    """

    @staticmethod
    def forward(ctx, fn, side, chunk, matmul, positions, hidden, weight, bias, targets, *aux):
        dtype = torch.promote_types(compute_dtype(hidden), compute_dtype(weight))
        ctx.fn, ctx.chunk, ctx.dtype, ctx.matmul = fn, chunk, dtype, matmul
        ctx.save_for_backward(positions, hidden, weight, bias, targets, *aux)
        out = hidden.new_empty(positions.numel(), dtype=dtype)
        side_out = None if side is None else torch.empty_like(out)
        with torch.no_grad():
            w, b = weight.to(matmul), None if bias is None else bias.to(matmul)
            for s in range(0, positions.numel(), chunk):
                idx = positions[s : s + chunk]
                z = linear(hidden[idx].to(matmul), w, b).to(dtype)
                chunk_aux = [targets[idx]] + [a[idx] for a in aux]
                out[s : s + chunk] = fn(z, *chunk_aux)
                if side is not None:
                    side_out[s : s + chunk] = side(z, *chunk_aux)
                del z
        return _with_side(ctx, out, side_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, *_):
        positions, hidden, weight, bias, targets, *aux = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[5:8]
        dtype, matmul = ctx.dtype, ctx.matmul
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if need_b else None
        if need_h or need_w or need_b:
            w, b = weight.to(matmul), None if bias is None else bias.to(matmul)
            for s in range(0, positions.numel(), ctx.chunk):
                idx = positions[s : s + ctx.chunk]
                h = hidden[idx].to(matmul)
                g = _chunk_grad(ctx.fn, lambda: linear(h, w, b).to(dtype), [targets[idx]] + [a[idx] for a in aux],
                                grad_out[s : s + ctx.chunk].to(dtype))
                if need_b:
                    grad_b += g.sum(dim=0)
                g = g.to(matmul)
                if need_h:
                    grad_h[idx] = (g @ w).to(grad_h.dtype)
                if need_w and matmul == dtype:
                    grad_w.addmm_(g.T, h)
                elif need_w:
                    grad_w += g.T @ h
                del g, h
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return (None, None, None, None, None, grad_h, grad_w, grad_b) + (None,) * (1 + len(aux))


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Losses compute in float32 at least (bf16/fp16 logits are upcast chunk by chunk)."""
    return torch.promote_types(t.dtype, torch.float32)


def per_row(fn: Callable, policy, targets: torch.Tensor, *aux: torch.Tensor,
             chunk_size: int | None = None, side: Callable | None = None):
    """Sum of fn(z, y, *aux) over each row's valid positions -> [B], differentiable in the policy:
    logits [B, T, V], or an `LMHead` (its logits are computed chunk by chunk, never whole).
    With `side` (same arguments as fn): ([B], [B] per-row sums of side, detached), both from one
    pass over the chunks."""
    B, T, V = policy.shape
    if tuple(targets.shape) != (B, T):
        raise ValueError(f"targets must be [B, T]={(B, T)}, got {tuple(targets.shape)}")
    chunk_size = chunk_size or auto_chunk_size(V, policy.device, policy.dtype)
    flat_targets = targets.reshape(-1)
    positions = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
    flat_aux = [a.reshape(B * T, *a.shape[2:]) for a in aux]
    if isinstance(policy, LMHead):
        values = _FusedHeadPositionwise.apply(fn, side, chunk_size, policy.matmul_dtype, positions,
                                              policy.hidden.reshape(B * T, -1), policy.weight, policy.bias,
                                              flat_targets.clamp_min(0), *flat_aux)
    else:
        keep_grad = torch.is_grad_enabled() and policy.requires_grad
        values = _PositionwiseChunked.apply(fn, side, chunk_size, keep_grad, positions, policy.reshape(B * T, V),
                                            flat_targets.clamp_min(0), *flat_aux)
    rows = torch.div(positions, T, rounding_mode="floor")
    row_sums = lambda v: v.new_zeros(B).index_add(0, rows, v)  # noqa: E731
    return row_sums(values) if side is None else tuple(map(row_sums, values))


def reference_values(fn: Callable, ref: "Reference", targets: torch.Tensor,
                      chunk_size: int | None = None) -> torch.Tensor:
    """Sum of fn(z_ref, y) over each row's valid positions -> [B], without gradients (the
    reference side of NPO: only the reference's logits, rebuilt chunk by chunk)."""
    B, T = targets.shape
    first = ref.per_position()[0]
    chunk_size = chunk_size or auto_chunk_size(ref.vocab_size, first.device, first.dtype)
    flat_targets = targets.reshape(-1)
    positions = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
    aux = [a.reshape(B * T, *a.shape[2:]) for a in ref.per_position()]
    out = []
    with torch.no_grad():
        for s in range(0, positions.numel(), chunk_size):
            idx = positions[s : s + chunk_size]
            out.append(fn(ref.logits(*(a[idx] for a in aux)), flat_targets[idx]))
    values = torch.cat(out) if out else targets.new_zeros(0, dtype=torch.float32)
    rows = torch.div(positions, T, rounding_mode="floor")
    return values.new_zeros(B).index_add(0, rows, values)


def token_counts(targets: torch.Tensor) -> torch.Tensor:
    return (targets != IGNORE_INDEX).sum(dim=1).clamp_min(1).float()


def linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return h @ w.T if b is None else torch.addmm(b, h, w.T)


def head_matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor,
                      matmul_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype an LM head's chunk matmul `hidden @ weight.T` runs in (`LMHead`, `HiddenReference`):
    `matmul_dtype` when given; else on the CPU the compute dtype (float32 at least: the weight is
    upcast once per pass, and float32 products are what measured fastest there), elsewhere the
    inputs' own dtype (bf16 on GPUs: no float32 copy of the [V, H] weight, the matmul at bf16
    speed with float32 accumulation, only the [chunk, V] logits upcast)."""
    if matmul_dtype is not None:
        return matmul_dtype
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return torch.promote_types(dtype, torch.float32) if weight.device.type == "cpu" else dtype


class LMHead:
    """The policy as its final hidden states [B, T, H] (the input of its LM head) and that head's
    `weight` [V, H] (+ `bias` [V]), in place of logits: the fused path. Every loss takes it
    wherever it takes policy logits and computes `hidden @ weight.T + bias` chunk by chunk, in the
    forward and again in the backward pass, so neither the [B, T, V] logits nor their gradient
    ever exist. Gradients reach `hidden`, `weight` and `bias` (those that require them).
    `head[rows]` selects rows of the batch, like `logits[rows]`. `matmul_dtype`: the dtype of the
    chunk matmuls (`head_matmul_dtype`: None picks float32 on the CPU, the weight's dtype on GPUs);
    the loss math runs in float32 (at least) either way."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 matmul_dtype: torch.dtype | None = None):
        if hidden.dim() != 3:
            raise ValueError(f"LMHead: hidden must be [B, T, H], got {tuple(hidden.shape)}")
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
            raise ValueError(f"LMHead: weight must be [V, H={hidden.shape[2]}], got {tuple(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"LMHead: bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.matmul_dtype = head_matmul_dtype(hidden, weight, matmul_dtype)
        self.shape = (*hidden.shape[:2], weight.shape[0])
        self.device, self.dtype = hidden.device, torch.promote_types(hidden.dtype, weight.dtype)

    def __getitem__(self, rows) -> "LMHead":
        return LMHead(self.hidden[rows], self.weight, self.bias, self.matmul_dtype)


def target_logprob(z, y, *_):
    """log π(y|s) of each position (further per-position inputs are ignored, so this can ride
    along any loss's chunks as its `side`)."""
    return z.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(z, dim=1)


def sequence_logprob(logits, targets, *, chunk_size=None) -> torch.Tensor:
    """Σ_t log π(y_t|s_t) per row: [B]."""
    return per_row(target_logprob, logits, targets, chunk_size=chunk_size)


def mean_nll(logprob: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Token-mean NLL per row from the rows' Σ_t log π(y_t|s_t) [B], averaged over rows."""
    return (-logprob / token_counts(targets)).mean()


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels aligned with input_ids -> targets aligned with logits (targets[t] = labels[t+1])."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def product_into(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a * b, written into a (a temporary) when a already has the product's dtype."""
    return a.mul_(b) if torch.promote_types(a.dtype, b.dtype) == a.dtype else a * b
