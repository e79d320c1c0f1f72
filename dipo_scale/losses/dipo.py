"""DiPO (docs/DIPO.md): the high-confidence set S of each position, the preference distributions
π⁺ (S suppressed) and π⁻ (S amplified) of the source logits, the margin Σ_t ⟨π⁺_t − π⁻_t, z_t −
z_ref_t⟩ with its closed-form derivative, and the loss −(2/β)·log σ(β·margin)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from dipo_scale.losses.chunking import compute_dtype, mean_nll, per_row, product_into, target_logprob, token_counts
from dipo_scale.losses.references import as_reference, check_reference

if TYPE_CHECKING:
    from dipo_scale.losses.references import Reference


Select = Literal["topk", "label", "topp"]


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
            return product_into(z - z_ref.to(z.dtype), weight).sum(dim=1), weight

    def derivative(self, z, y, *ref_inputs):
        """∂margin/∂z = π⁺ − π⁻; z is only read with `source=policy` (None otherwise)."""
        return self._weight(z, y, self.ref.logits(*ref_inputs))


def dipo_margin(logits, ref_logits, targets, *, alpha, select: Select = "topk", k=1, p=0.9,
                reduction: Literal["sum", "mean"] = "sum", source="reference",
                chunk_size=None, with_logprob=False):
    """margin(y) = Σ_t m_t ⟨π⁺_t − π⁻_t, z_t − z_ref_t⟩ per row ([B]); divided by Σ m_t for `mean`.
    With `with_logprob`: (margin, Σ_t m_t log π_θ(y_t|s_t) per row, detached), from the same chunks.
    `ref_logits`: logits [B, T, V] or a cached form (`HiddenReference`, `TopKReference`)."""
    ref = as_reference(ref_logits)
    check_reference(ref, logits)
    fn = _DipoMargin(ref, alpha=alpha, select=select, k=k, p=p, source=source)
    out = per_row(fn, logits, targets, *ref.per_position(), chunk_size=chunk_size,
                   side=target_logprob if with_logprob else None)
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
    return (loss, margin, mean_nll(out[1], targets)) if with_nll else (loss, margin)

