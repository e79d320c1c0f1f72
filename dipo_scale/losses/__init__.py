"""All unlearning losses (DiPO, NPO, GA, and the retain terms), as pure functions of tensors.

See ../shared/docs/DIPO.md (copied into docs/DIPO.md) for the derivation. Conventions:

* `logits` is [B, T, V] (any float dtype) and `targets` is [B, T] *already shifted*: `targets[b, t]`
  is the token that `logits[b, t]` predicts, and -100 marks a position that contributes nothing.
* Every loss works chunk by chunk over the valid positions: no [B, T, V] float32 intermediate is
  ever held beyond the logits themselves (and their gradient). The backward pass recomputes each
  chunk, so the autograd graph stores only the inputs (see `_PositionwiseChunked`); a loss whose
  gradient has a closed form (DiPO's) writes it into the logits' gradient tensor in the forward
  instead, where that tensor has the compute dtype (float32 logits), and the backward only scales it.
* Per-row quantities are sums over that row's valid positions, so a row's loss does not depend
  on the other rows of the batch or on how much padding it carries.
* The policy is its logits [B, T, V], or an `LMHead` (final hidden states [B, T, H] + the LM-head
  weight [V, H], + bias): the fused path, where the logits are computed chunk by chunk inside the
  loss, forward and backward, so neither they nor their gradient ever exist whole
  (`_FusedHeadPositionwise`). `loss(LMHead(h, W, b), ...)` equals `loss(h @ W.T + b, ...)` in
  value and gradient (tests/losses/test_fused.py). Under DeepSpeed ZeRO-3 the head weight must be
  the gathered one: `dipo_scale.unlearn.FusedHeadModel` computes the loss inside the engine's
  forward for that reason.
* Chunk size (`chunk_size`, positions). A chunk holds a few [chunk, V] temporaries in the compute
  dtype, so its memory grows with V; `None` picks `auto_chunk_size(V, device, dtype)`: on the CPU
  ~16 MiB per temporary (131 positions at V = 32000, 32 at V = 128256: cache-sized, what measured
  best there), elsewhere (GPUs) a memory budget (1046 positions at V = 128256, 4096 at V = 32000:
  the fused [chunk, H] x [H, V] matmul stays compute-bound, the head weight read once per chunk).
* The fused head's matmuls (`LMHead`, and `HiddenReference`'s logits) run on GPUs in the weight's
  dtype (bf16 inputs; cuBLAS accumulates in float32) and only the [chunk, V] logits are upcast to
  float32 for the softmax math; on the CPU in float32 (the weight upcast once per pass). Their
  `matmul_dtype` argument forces either. bf16 logits are what a bf16 model's own LM head gives
  (the unfused path): a DiPO margin, a sum of logit differences over the sequence, carries their
  rounding (tests/losses/test_chunking.py); `matmul_dtype=torch.float32` keeps float32 logits at
  the cost of a float32 copy of the weight and float32 matmuls.
* A per-position function may give its derivative in closed form (`fn.derivative`; DiPO's margin:
  the weight π⁺ − π⁻ is built without gradient, so it is the margin's derivative): on float32
  logits it is computed once, in the forward, into the gradient tensor (the backward multiplies
  each row by its incoming gradient); elsewhere (bf16 logits, the fused head) the backward
  recomputes it per chunk without an autograd graph, and without the policy's logits unless the
  derivative reads them (no policy matmul in the fused head's backward).
* The reference (`ref_logits` of `dipo_loss`, `npo_loss`, `kl_retain_loss`) is full logits
  [B, T, V] (the `online` form), or one of the cached forms of docs/DIPO.md, "Reference
  statistics": `HiddenReference` (exact: the reference's final hidden states + its LM-head
  weight) or `TopKReference` (approximate: top-K logits, their ids and the log-sum-exp). A cached
  form is turned into reference logits chunk by chunk, inside the loss (`Reference.logits`), so
  the reference's [B, T, V] logits never exist whole. References and `LMHead` select rows of the
  batch like logits do: `ref[rows]`.

The `topk` tail. A top-K row stores the K largest reference logits `l_1..l_K`, their ids and
`lse = logsumexp(z_ref)` over the whole vocabulary. The dense row rebuilt from it gives the K
stored ids their stored logits and every other id the same logit

    tail = lse + log((1 − Σ_i exp(l_i − lse)) / (V − K)),

i.e. the probability mass outside the top K, spread uniformly over the V − K other ids. The
rebuilt row has log-sum-exp exactly `lse`, so the K stored ids keep their exact reference
log-probabilities, the total tail mass is exact, and K = V reproduces the reference exactly.
(When rounding makes the stored mass reach 1, the tail mass is clamped to the dtype's smallest
positive number: the tail gets essentially no probability.)
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100
# The loss chunk (`auto_chunk_size`). On the CPU: 2**22 values per [chunk, V] temporary (16 MiB in
# float32), at most 1024 positions (docs/benchmarks.md, "Loss": what measured best there). Elsewhere
# (GPUs): the chunk's temporaries within a memory budget, at most 4096 positions.
CHUNK_ELEMENTS = 2 ** 22
MAX_CHUNK = 1024
ACCELERATOR_CHUNK_BUDGET = 4 << 30  # bytes for a chunk's CHUNK_TEMPORARIES [chunk, V] temporaries
ACCELERATOR_MAX_CHUNK = 4096
# The most [chunk, V] temporaries (in float32 units) alive at once in one chunk of any loss, forward
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


Select = Literal["topk", "label", "topp"]


# --------------------------------------------------------------------------------------------
# The chunking mechanism: a per-position function evaluated over chunks of valid positions.
# --------------------------------------------------------------------------------------------
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
            return _product_into(fn.derivative(z, *aux), grad_out[:, None])
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
                z = _linear(hidden[idx].to(matmul), w, b).to(dtype)
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
                g = _chunk_grad(ctx.fn, lambda: _linear(h, w, b).to(dtype), [targets[idx]] + [a[idx] for a in aux],
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


def _per_row(fn: Callable, policy, targets: torch.Tensor, *aux: torch.Tensor,
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


def _reference_values(fn: Callable, ref: "Reference", targets: torch.Tensor,
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


# --------------------------------------------------------------------------------------------
# The reference: full logits (online) or a cached form, turned into logits chunk by chunk.
# --------------------------------------------------------------------------------------------
def _linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
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


class LogitsReference:
    """The `online` form: reference logits [B, T, V] as they are."""

    def __init__(self, logits: torch.Tensor):
        self.tensor = logits.detach()
        self.shape = tuple(logits.shape)
        self.vocab_size = logits.shape[-1]

    def per_position(self) -> tuple[torch.Tensor, ...]:
        return (self.tensor,)

    def logits(self, z_ref: torch.Tensor) -> torch.Tensor:
        return z_ref

    def __getitem__(self, rows) -> "LogitsReference":
        return LogitsReference(self.tensor[rows])


class HiddenReference:
    """The `hidden` form (exact): the reference's final hidden states [B, T, H] — the input of
    its LM head — and that head's `weight` [V, H] (+ `bias` [V]). Logits of a chunk of positions
    are `hidden @ weight.T + bias`, returned in float32 at least (float64 stays float64); the
    matmul runs in `head_matmul_dtype` (float32 on the CPU, the weight's dtype on GPUs, or
    `matmul_dtype`)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 matmul_dtype: torch.dtype | None = None):
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"HiddenReference: hidden must be [..., H] and weight [V, H]; got "
                             f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
        self.hidden, self.weight = hidden.detach(), weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.dtype = torch.promote_types(compute_dtype(hidden), compute_dtype(weight))
        self.matmul_dtype = head_matmul_dtype(hidden, weight, matmul_dtype)
        self._w = self.weight.to(self.matmul_dtype)  # cast once (if at all), not per chunk
        self._b = None if bias is None else self.bias.to(self.matmul_dtype)
        self.vocab_size = weight.shape[0]
        self.shape = (*hidden.shape[:-1], self.vocab_size)

    def per_position(self) -> tuple[torch.Tensor, ...]:
        return (self.hidden,)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _linear(hidden.to(self.matmul_dtype), self._w, self._b).to(self.dtype)

    def __getitem__(self, rows) -> "HiddenReference":
        ref = copy.copy(self)  # the same weight, and its cast: not cast again per selection
        ref.hidden = self.hidden[rows]
        ref.shape = (*ref.hidden.shape[:-1], self.vocab_size)
        return ref


class TopKReference:
    """The `topk` form (approximate unless K = V): top-K reference logits [B, T, K], their ids
    [B, T, K] and the log-sum-exp over the whole vocabulary [B, T]. The dense row rebuilt per
    chunk spreads the mass outside the top K uniformly (module docstring, "The `topk` tail")."""

    def __init__(self, topk_logits: torch.Tensor, topk_ids: torch.Tensor, lse: torch.Tensor,
                 vocab_size: int):
        if topk_logits.shape != topk_ids.shape or topk_logits.shape[:2] != lse.shape:
            raise ValueError(f"TopKReference: logits and ids must be [B, T, K] and lse [B, T]; got "
                             f"{tuple(topk_logits.shape)}, {tuple(topk_ids.shape)}, {tuple(lse.shape)}")
        if topk_logits.shape[-1] > vocab_size:
            raise ValueError(f"TopKReference: K={topk_logits.shape[-1]} exceeds the vocabulary ({vocab_size})")
        self.topk_logits, self.topk_ids, self.lse = topk_logits.detach(), topk_ids.detach(), lse.detach()
        self.vocab_size = int(vocab_size)
        self.shape = (*lse.shape, self.vocab_size)

    def per_position(self) -> tuple[torch.Tensor, ...]:
        return (self.topk_logits, self.topk_ids, self.lse)

    def logits(self, topk_logits: torch.Tensor, topk_ids: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return topk_dense_logits(topk_logits, topk_ids, lse, self.vocab_size)

    def __getitem__(self, rows) -> "TopKReference":
        return TopKReference(self.topk_logits[rows], self.topk_ids[rows], self.lse[rows], self.vocab_size)


Reference = LogitsReference | HiddenReference | TopKReference


def topk_dense_logits(topk_logits: torch.Tensor, topk_ids: torch.Tensor, lse: torch.Tensor,
                      vocab_size: int) -> torch.Tensor:
    """[C, V] reference logits from [C, K] top-K logits, ids and [C] log-sum-exp: the stored ids
    get their logits, every other id `lse + log((1 − Σ_topk softmax) / (V − K))`."""
    dtype = compute_dtype(topk_logits)
    top, lse = topk_logits.to(dtype), lse.to(dtype)
    K = top.shape[1]
    if K == vocab_size:
        tail = torch.full_like(lse, float("-inf"))  # every id is stored; nothing is left over
    else:
        left_over = (1.0 - torch.exp(top - lse[:, None]).sum(dim=1)).clamp_min(torch.finfo(dtype).tiny)
        tail = lse + torch.log(left_over / (vocab_size - K))
    out = tail[:, None].expand(len(tail), vocab_size).clone()
    return out.scatter_(1, topk_ids.long(), top)


TOPK_CHUNK_ELEMENTS = 1 << 16  # logits per CPU top-K chunk: it and its scratch stay in cache (256 KiB float32)
TOPK_BLOCK_ELEMENTS = 1 << 22  # logits per block of the grouped CPU top-K (bounds its temporaries)


def topk_group(vocab_size: int, k: int) -> int:
    """The group size of the grouped CPU top-K for this vocabulary (64), or 0 for numpy's
    introselect over whole rows: grouping pays where the K groups keep at most a quarter of a row
    (torch reduces groups of 64 fast; groups of 8 at V = 1024 were as fast as introselect with two
    threads, slower with one). `benchmarks/topk_statistics.py` measures each."""
    return 64 if vocab_size % 64 == 0 and vocab_size // 64 >= 4 * k else 0


def topk_statistics(logits: torch.Tensor, k: int, group: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-K logits in descending order, their ids, log-sum-exp) of logits [..., V]: what the
    `topk` cache stores. Logits and log-sum-exp are computed in float32 at least.

    On the CPU without grad, the top K (the values of `torch.topk`; which of tied values is kept
    may differ) come from one of two exact selections (`group`: the size of the groups, 0 for
    the first; unset, `topk_group` picks):
    * numpy's introselect over whole rows, one cache-sized chunk of rows at a time, the K then
      sorted (one thread; torch's CPU top-k is ~2x slower on whole rows);
    * grouped, all in torch ops (its threads): the maxima of groups of `group` consecutive
      logits, the K groups with the largest maxima, then the top K of their K x group logits.
      Exact: each of the K largest logits lies in a group whose maximum is at least that logit;
      were that group not among the K kept, their K maxima would be K other logits at least as
      large. 1.7-3.5x faster than introselect at V = 32k-128k (one thread or two), and unlike it
      uses every thread torch has.
    Then the log-sum-exp from the row's max (the first of the top K), in cache-sized chunks of a
    reused scratch buffer. Elsewhere `torch.topk` and `torch.logsumexp`."""
    z = logits.to(compute_dtype(logits))
    if z.device.type != "cpu" or z.requires_grad or not 0 < k < z.shape[-1]:
        top = z.topk(k, dim=-1)
        return top.values, top.indices, torch.logsumexp(z, dim=-1)
    flat = z.reshape(-1, z.shape[-1])
    group = topk_group(flat.shape[1], k) if group is None else group
    if group and (flat.shape[1] % group or flat.shape[1] // group < k):
        raise ValueError(f"topk_statistics: group={group} must divide the vocabulary ({flat.shape[1]}) into "
                         f"at least k={k} groups")
    values, ids = _grouped_topk(flat, k, group) if group else _introselect_topk(flat, k)
    sums = torch.empty(len(flat), dtype=z.dtype)
    step = max(1, TOPK_CHUNK_ELEMENTS // flat.shape[1])
    scratch = torch.empty(min(step, len(flat)), flat.shape[1], dtype=z.dtype)
    for s in range(0, len(flat), step):
        e = scratch[:len(flat[s:s + step])]
        torch.sub(flat[s:s + step], values[s:s + step, :1], out=e)
        torch.sum(e.exp_(), dim=-1, out=sums[s:s + step])
    lse = values[:, 0] + sums.log()
    shape = (*z.shape[:-1], k)
    return values.reshape(shape), ids.reshape(shape), lse.reshape(z.shape[:-1])


def _introselect_topk(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    a, n = flat.numpy(), flat.shape[0]
    step = max(1, TOPK_CHUNK_ELEMENTS // a.shape[1])
    values, ids = np.empty((n, k), dtype=a.dtype), np.empty((n, k), dtype=np.int64)
    for s in range(0, n, step):
        rows = a[s:s + step]
        part = np.argpartition(rows, -k, axis=-1)[:, -k:]
        part_values = np.take_along_axis(rows, part, axis=-1)
        order = np.argsort(-part_values, axis=-1, kind="stable")
        values[s:s + step] = np.take_along_axis(part_values, order, axis=-1)
        ids[s:s + step] = np.take_along_axis(part, order, axis=-1)
    return torch.from_numpy(values), torch.from_numpy(ids)


def _grouped_topk(flat: torch.Tensor, k: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, vocab = flat.shape
    values, ids = torch.empty(n, k, dtype=flat.dtype), torch.empty(n, k, dtype=torch.long)
    offsets = torch.arange(group)
    rows = max(1, TOPK_BLOCK_ELEMENTS // vocab)
    for s in range(0, n, rows):
        x = flat[s:s + rows]
        maxima = x.view(len(x), vocab // group, group).amax(dim=-1)
        kept = maxima.topk(k, dim=-1, sorted=False).indices
        members = (kept.unsqueeze(-1) * group + offsets).view(len(x), k * group)
        top = x.gather(1, members).topk(k, dim=-1)
        values[s:s + rows], ids[s:s + rows] = top.values, members.gather(1, top.indices)
    return values, ids


def as_reference(ref) -> Reference:
    """A reference argument of the losses as a `Reference`: tensors are full logits."""
    if isinstance(ref, (LogitsReference, HiddenReference, TopKReference)):
        return ref
    if isinstance(ref, torch.Tensor):
        return LogitsReference(ref)
    raise TypeError(f"reference must be logits [B, T, V] or a HiddenReference/TopKReference, got {type(ref).__name__}")


def _check_reference(ref: Reference, logits: torch.Tensor) -> None:
    if tuple(ref.shape) != tuple(logits.shape):
        raise ValueError(f"reference is {tuple(ref.shape)} but the policy logits are {tuple(logits.shape)}")


# --------------------------------------------------------------------------------------------
# Per-position functions (z: [C, V] float32 policy logits; y: [C] target ids; z_ref: [C, V]).
# --------------------------------------------------------------------------------------------
def _target_logprob(z, y, *_):
    """log π(y|s) of each position (further per-position inputs are ignored, so this can ride
    along any loss's chunks as its `side`)."""
    return z.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(z, dim=1)


def _kl_ref_policy(z, y, z_ref):
    log_ref = torch.log_softmax(z_ref.to(z.dtype), dim=1)
    return (log_ref.exp() * (log_ref - torch.log_softmax(z, dim=1))).sum(dim=1)


def _sparse_mask_ids(z_src: torch.Tensor, y: torch.Tensor, *, select: Select, k: int) -> torch.Tensor:
    """[C, k] ids of S for the sparse selections: the top-k of z_src, or the label ([C, 1])."""
    if select not in ("topk", "label"):
        raise ValueError(f"unknown dipo select {select!r}")
    return z_src.topk(k, dim=1).indices if select == "topk" else y[:, None]


def high_confidence_mask(z_src: torch.Tensor, y: torch.Tensor, *, select: Select, k: int = 1,
                         p: float = 0.9) -> torch.Tensor:
    """1[S_t] as a [C, V] float mask: top-k of z_src, the label, or the top-p nucleus of z_src.

    `topp`: S is the smallest set of most probable tokens whose mass reaches p. A token is in S
    iff the mass of the more probable ones is < p, i.e. iff the mass from it down (itself and
    every less probable token) is > 1 − p: a tail sum, accumulated from the smallest
    probabilities up, so it does not round to 1 − (the mass above) the way a running sum from the
    top does. p = 1 is the whole vocabulary (every proper subset has mass < 1)."""
    mask = torch.zeros_like(z_src, dtype=compute_dtype(z_src))
    if select != "topp":
        return mask.scatter_(1, _sparse_mask_ids(z_src, y, select=select, k=k), 1.0)
    if p >= 1:
        return mask.fill_(1.0)
    probs, order = torch.softmax(z_src.to(mask.dtype), dim=1).sort(dim=1)  # ascending
    return mask.scatter_(1, order, (probs.cumsum(dim=1) > 1.0 - p).to(mask.dtype))


def preference_distributions(z_src, y, *, alpha, select, k=1, p=0.9):
    """(pi_plus, pi_minus): suppressed (preferred) and amplified (dispreferred) distributions,
    as two softmaxes, the definition (`preference_weight` is their difference, computed stably)."""
    z_src = z_src.to(compute_dtype(z_src))
    s = high_confidence_mask(z_src, y, select=select, k=k, p=p)
    return torch.softmax(z_src - alpha * s, dim=1), torch.softmax(z_src + alpha * s, dim=1)


def _exp_from_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e, m, total) of logits x [C, n] where −inf marks the entries outside a set, x consumed
    (e is x, overwritten): m the row max (0 where the set is empty), e = exp(x − m) (0 outside
    the set), total = Σ e, ≥ 1 for a nonempty set, 0 for an empty one. The set's softmax is
    e / total, its log-sum-exp m + log(total)."""
    m = x.amax(dim=1, keepdim=True)
    m = m.masked_fill(m == -math.inf, 0.0)
    e = x.sub_(m).exp_()
    return e, m, e.sum(dim=1, keepdim=True)


def preference_weight(z_src, y, *, alpha, select, k=1, p=0.9) -> torch.Tensor:
    """π⁺ − π⁻ ([C, V]), the weight DiPO puts on z − z_ref at each position.

    Shifting the logits of S by ∓α keeps the proportions inside S and inside its complement U:
    with q_S, q_U the softmaxes of z_src restricted to S and to U, and δ = lse_S − lse_U (the
    log-odds of the mass on S), π⁺ = σ(δ − α)·q_S on S and σ(α − δ)·q_U on U (π⁻: the same
    with −α), so

        π⁺ − π⁻ = g·(q_U − q_S),   g = σ(δ + α) − σ(δ − α) = −expm1(−2α)·σ(α + δ)·σ(α − δ).

    Every factor is computed without cancellation: q_S and q_U from each set's own max, δ from
    the two maxes' difference plus two log-sums of at most log V. No exp(±α) is formed, nothing
    overflows or underflows to a wrong value at any α or |z|, the weights keep their relative
    accuracy when 1 − p_S (or p_S) is far below the dtype's epsilon, and they sum to zero to
    rounding. One exp pass over the row (in place, on a copy with S's logits at −inf); for
    `topk`/`label` the k (or 1) logits of S are gathered."""
    z = z_src.to(compute_dtype(z_src))
    if select == "topp":
        s = high_confidence_mask(z, y, select=select, p=p).bool()
        z_s, z_u = z.masked_fill(~s, -math.inf), z.masked_fill(s, -math.inf)
    else:
        idx = _sparse_mask_ids(z, y, select=select, k=k)
        z_s, z_u = z.gather(1, idx), z.scatter(1, idx, -math.inf)
    e_s, m_s, total_s = _exp_from_max(z_s)
    e_u, m_u, total_u = _exp_from_max(z_u)
    delta = (m_s - m_u) + (total_s.log() - total_u.log())  # ±inf when U (or S) is empty: g = 0
    g = -math.expm1(-2.0 * float(alpha)) * torch.sigmoid(alpha + delta) * torch.sigmoid(alpha - delta)
    weight = e_u.mul_(g / total_u.clamp_min(1.0))  # clamp: an empty set has e = 0 and g = 0
    on_s = e_s.mul_(-g / total_s.clamp_min(1.0))
    return weight.add_(on_s) if select == "topp" else weight.scatter_(1, idx, on_s)


class _DipoMargin:
    """DiPO's per-position margin ⟨π⁺ − π⁻, z − z_ref⟩ (a per-position function of the chunked
    losses: `margin(z, y, *ref_inputs)`, z_ref rebuilt by `ref.logits`), with its derivative in
    closed form. The weight π⁺ − π⁻ is built without gradient (from the reference, or from the
    detached policy logits with `source=policy`), so ∂margin/∂z is the weight itself: autograd
    through the margin gives grad_out · weight, the same products. The chunked functions use it
    (`_PositionwiseChunked`, `_chunk_grad`): computed with the margin in the forward, or rebuilt
    in the backward from the reference alone (unless `source=policy`: then from the policy's
    logits too)."""

    def __init__(self, ref: "Reference", *, alpha, select, k, p, source):
        self.ref, self.source = ref, source
        self.weight_kw = dict(alpha=alpha, select=select, k=k, p=p)
        self.derivative_reads_policy = source == "policy"

    def _weight(self, z, y, z_ref):
        return preference_weight(z if self.source == "policy" else z_ref, y, **self.weight_kw)

    def __call__(self, z, y, *ref_inputs):
        return self.value_and_derivative(z, y, *ref_inputs)[0]

    def value_and_derivative(self, z, y, *ref_inputs):
        """(margin [C], ∂margin/∂z = π⁺ − π⁻ [C, V]) from one weight."""
        with torch.no_grad():
            z_ref = self.ref.logits(*ref_inputs)
            weight = self._weight(z, y, z_ref)
            return _product_into(z - z_ref.to(z.dtype), weight).sum(dim=1), weight

    def derivative(self, z, y, *ref_inputs):
        """∂margin/∂z = π⁺ − π⁻; z is only read with `source=policy` (None otherwise)."""
        return self._weight(z, y, self.ref.logits(*ref_inputs))


def _product_into(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a * b, written into a (a temporary) when a already has the product's dtype."""
    return a.mul_(b) if torch.promote_types(a.dtype, b.dtype) == a.dtype else a * b


# --------------------------------------------------------------------------------------------
# Public losses.
# --------------------------------------------------------------------------------------------
def sequence_logprob(logits, targets, *, chunk_size=None) -> torch.Tensor:
    """Σ_t log π(y_t|s_t) per row: [B]."""
    return _per_row(_target_logprob, logits, targets, chunk_size=chunk_size)


def _mean_nll(logprob: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Token-mean NLL per row from the rows' Σ_t log π(y_t|s_t) [B], averaged over rows."""
    return (-logprob / token_counts(targets)).mean()


def nll_loss(logits, targets, *, chunk_size=None) -> torch.Tensor:
    """Token-mean negative log-likelihood per row, averaged over rows (the `gd` retain term)."""
    return _mean_nll(sequence_logprob(logits, targets, chunk_size=chunk_size), targets)


# `with_nll=True` (ga_loss, npo_loss, dipo_loss, kl_retain_loss): the loss also returns, last,
# `nll_loss(logits, targets)` of the same inputs as a detached scalar, taken from the loss's own
# pass over the chunks (no second pass over the logits, no second LM-head matmul when fused).

def ga_loss(logits, targets, *, chunk_size=None, with_nll=False):
    """Gradient ascent: −NLL(forget). Returns loss, or (loss, nll) with `with_nll`."""
    loss = -nll_loss(logits, targets, chunk_size=chunk_size)
    return (loss, -loss.detach()) if with_nll else loss


def npo_loss(logits, ref_logits, targets, *, beta, chunk_size=None, with_nll=False):
    """NPO on log-probs: −(2/β)·mean log σ(−β·Σ_t m_t[log π_θ − log π_ref]). Returns (loss, log-ratio[B]),
    or (loss, log-ratio, nll) with `with_nll`.
    `ref_logits`: logits [B, T, V] or a cached form (`HiddenReference`, `TopKReference`)."""
    ref = as_reference(ref_logits)
    _check_reference(ref, logits)
    logprob = sequence_logprob(logits, targets, chunk_size=chunk_size)
    log_ratio = logprob - _reference_values(_target_logprob, ref, targets, chunk_size).to(logprob.dtype)
    loss = -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()
    return (loss, log_ratio, _mean_nll(logprob.detach(), targets)) if with_nll else (loss, log_ratio)


def dipo_margin(logits, ref_logits, targets, *, alpha, select: Select = "topk", k=1, p=0.9,
                reduction: Literal["sum", "mean"] = "sum", source="reference",
                chunk_size=None, with_logprob=False):
    """margin(y) = Σ_t m_t ⟨π⁺_t − π⁻_t, z_t − z_ref_t⟩ per row ([B]); divided by Σ m_t for `mean`.
    With `with_logprob`: (margin, Σ_t m_t log π_θ(y_t|s_t) per row, detached), from the same chunks.
    `ref_logits`: logits [B, T, V] or a cached form (`HiddenReference`, `TopKReference`)."""
    ref = as_reference(ref_logits)
    _check_reference(ref, logits)
    fn = _DipoMargin(ref, alpha=alpha, select=select, k=k, p=p, source=source)
    out = _per_row(fn, logits, targets, *ref.per_position(), chunk_size=chunk_size,
                   side=_target_logprob if with_logprob else None)
    margin, logprob = out if with_logprob else (out, None)
    if reduction == "mean":
        margin = margin / token_counts(targets)
    return (margin, logprob) if with_logprob else margin


def dipo_loss(logits, ref_logits, targets, *, alpha, beta, select: Select = "topk", k=1, p=0.9,
              reduction: Literal["sum", "mean"] = "sum", source="reference",
              chunk_size=None, with_nll=False):
    """L_DiPO = −(2/β)·mean_batch log σ(β·margin). Returns (loss, margin[B]), or
    (loss, margin, nll) with `with_nll`."""
    out = dipo_margin(logits, ref_logits, targets, alpha=alpha, select=select, k=k, p=p,
                      reduction=reduction, source=source, chunk_size=chunk_size, with_logprob=with_nll)
    margin = out[0] if with_nll else out
    loss = -(2.0 / beta) * F.logsigmoid(beta * margin).mean()
    return (loss, margin, _mean_nll(out[1], targets)) if with_nll else (loss, margin)


def kl_retain_loss(logits, ref_logits, targets, *, chunk_size=None, with_nll=False):
    """Token-mean KL(π_ref‖π_θ) per row, averaged over rows (the `kl` retain term). Returns loss,
    or (loss, nll) with `with_nll`.
    `ref_logits`: logits [B, T, V] or a cached form (`HiddenReference`, `TopKReference`)."""
    ref = as_reference(ref_logits)
    _check_reference(ref, logits)
    fn = lambda z, y, *r: _kl_ref_policy(z, y, ref.logits(*r))  # noqa: E731
    out = _per_row(fn, logits, targets, *ref.per_position(), chunk_size=chunk_size,
                   side=_target_logprob if with_nll else None)
    kl, logprob = out if with_nll else (out, None)
    loss = (kl / token_counts(targets)).mean()
    return (loss, _mean_nll(logprob, targets)) if with_nll else loss


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels aligned with input_ids -> targets aligned with logits (targets[t] = labels[t+1])."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


# --------------------------------------------------------------------------------------------
# Plain unchunked DiPO (the SeqKL form), for tests and the chunked-vs-naive benchmark.
# --------------------------------------------------------------------------------------------
def dipo_loss_naive(logits, ref_logits, targets, *, alpha, beta, select: Select = "topk", k=1,
                    p=0.9, reduction="sum", source="reference"):
    """Same value as `dipo_loss`, written the obvious way with full [B, T, V] float32 tensors."""
    B, T, V = logits.shape
    mask = (targets != IGNORE_INDEX).float()
    z, z_ref = logits.to(compute_dtype(logits)), ref_logits.to(compute_dtype(ref_logits))
    z_src = z.detach() if source == "policy" else z_ref
    s = high_confidence_mask(z_src.reshape(-1, V), targets.clamp_min(0).reshape(-1),
                             select=select, k=k, p=p).reshape(B, T, V)
    pi_plus, pi_minus = torch.softmax(z_src - alpha * s, -1), torch.softmax(z_src + alpha * s, -1)
    log_pol, log_ref = torch.log_softmax(z, -1), torch.log_softmax(z_ref, -1)

    def seq_kl(q, log_p):  # Σ_t m_t KL(q_t ‖ p_t)
        return ((q * (torch.log(q.clamp_min(1e-38)) - log_p)).sum(-1) * mask).sum(-1)

    margin = (seq_kl(pi_plus, log_ref) - seq_kl(pi_plus, log_pol)) - (
        seq_kl(pi_minus, log_ref) - seq_kl(pi_minus, log_pol))
    if reduction == "mean":
        margin = margin / token_counts(targets)
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean(), margin
