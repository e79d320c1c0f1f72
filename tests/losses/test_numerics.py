"""DiPO's numerics at every α and dtype (docs/DIPO.md, "Numerics"): the pair weight π⁺ − π⁻, the
high-confidence set S, the margin, the loss and its gradient, in float32 and bfloat16 (and
float64), against the definition (two softmaxes of shifted logits, the prefix of sorted
probabilities) evaluated independently in arbitrary precision with mpmath, on the extremes a sweep
reaches: α up to the configured maximum, near-one-hot rows, |z| up to 1e4, every `select`. Also
the forget NLL taken from the losses' own chunks (`with_nll`) and the config bounds of α and p."""

import math
import re

import mpmath
import pytest
import torch

from dipo_scale.config import load_config
from dipo_scale.errors import UserInputError
from dipo_scale.losses import (IGNORE_INDEX, HiddenReference, LMHead, dipo_loss, dipo_margin, ga_loss,
                               high_confidence_mask, kl_retain_loss, nll_loss, npo_loss, preference_weight)

mpmath.mp.dps = 340  # the reference resolves differences 1e-340 below its O(1) terms (float64: 1e-300)

ALPHAS = [0.1, 1, 5, 50, 88, 100, 200, 500, 1000]  # 1000: the largest `dipo.alpha` the config accepts
SELECTS = {"topk1": dict(select="topk", k=1), "topk3": dict(select="topk", k=3), "label": dict(select="label"),
           "topp0.9": dict(select="topp", p=0.9), "topp1": dict(select="topp", p=1.0)}
# Compute precision (bf16 logits are upcast to float32 chunk by chunk): relative tolerance, and the
# magnitude below which values only need to be that small (float32: ~8·tiny; the exact weights of
# these rows go down to 1e-4000).
TOL = {torch.float32: (1e-4, 1e-37), torch.bfloat16: (1e-4, 1e-37), torch.float64: (1e-11, 1e-300)}
V = 12


def _rows() -> tuple[torch.Tensor, torch.Tensor]:
    """[R, V] float64 logits exactly representable in bfloat16, with no tie at any top-3 boundary,
    and [R] labels: the top-1 token for even rows, a far less probable one for odd rows."""
    g = torch.Generator().manual_seed(13)
    noise = lambda scale: torch.randn(V, generator=g, dtype=torch.float64) * scale  # noqa: E731
    rows = []
    for gap in (20.0, 40.0, 100.0, 1000.0):          # near one-hot: top-1 above the rest by `gap`
        r = noise(1.0)
        r[3] = r.max() + gap
        rows.append(r)
    rows += [noise(3.0), noise(300.0), torch.rand(V, generator=g, dtype=torch.float64) * 2e4 - 1e4,
             torch.linspace(-1e4, 1e4, V, dtype=torch.float64)[torch.randperm(V, generator=g)]]
    rows.append(torch.cat([torch.zeros(1), -300.0 - 2.0 * torch.arange(V - 1)]).double())  # issue 13, item 1
    rows.append(torch.cat([torch.full((1,), 20.0), -0.25 * torch.arange(V - 1)]).double())  # item 2
    z = torch.stack(rows).bfloat16().double()
    top = z.argmax(dim=1)
    labels = torch.where(torch.arange(len(z)) % 2 == 0, top, (top + 5) % V)
    return z, labels


def _exact_set(z: list[float], label: int, select: str, k: int = 1, p: float = 0.9) -> set[int]:
    """S by its definition, in exact arithmetic (ids by decreasing logit)."""
    order = sorted(range(V), key=lambda i: -z[i])
    if select == "label":
        return {label}
    if select == "topk":
        assert z[order[k - 1]] > z[order[k]], "a tie at the top-k boundary: S is ambiguous"
        return set(order[:k])
    probs = _softmax([mpmath.mpf(v) for v in z])
    chosen = set()
    for i in order:  # the smallest prefix whose mass reaches p: the mass left out is ≤ 1 − p
        if sum(probs[j] for j in range(V) if j not in chosen) <= 1 - mpmath.mpf(p):
            break
        chosen.add(i)
    return chosen


def _softmax(x):
    m = max(x)
    e = [mpmath.exp(v - m) for v in x]
    total = sum(e)
    return [v / total for v in e]


def _exact_weight(z: list[float], s: set[int], alpha: float) -> list:
    """π⁺ − π⁻ as the definition writes it: softmax(z − α·1[S]) − softmax(z + α·1[S])."""
    a = mpmath.mpf(alpha)
    shift = [a if i in s else 0 for i in range(V)]
    plus = _softmax([mpmath.mpf(v) - d for v, d in zip(z, shift)])
    minus = _softmax([mpmath.mpf(v) + d for v, d in zip(z, shift)])
    return [u - v for u, v in zip(plus, minus)]


def _close(got: float, want, scale, dtype) -> bool:
    rtol, atol = TOL[dtype]
    return abs(mpmath.mpf(got) - want) <= rtol * scale + atol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", SELECTS)
def test_weight_and_set_match_the_definition_in_arbitrary_precision(name, dtype):
    """Every α, every row: S is the exact set, each weight has its exact value to the dtype's
    relative accuracy (also when 1 − p_S, or p_S, is far below epsilon), the weights sum to zero
    (π⁺ and π⁻ are both distributions), are ≤ 0 on S and ≥ 0 off S (property 4's direction), and
    are all zero when S is the whole vocabulary (topp with p = 1)."""
    kw = SELECTS[name]
    z64, labels = _rows()
    z = z64.to(dtype)
    mask = high_confidence_mask(z, labels, **kw).bool()
    sets = [_exact_set(row, int(y), **kw) for row, y in zip(z64.tolist(), labels)]
    for r, s in enumerate(sets):
        assert set(mask[r].nonzero().flatten().tolist()) == s, (r, s)
        if name == "topp1":
            assert len(s) == V
    for alpha in ALPHAS:
        w = preference_weight(z, labels, alpha=alpha, **kw).double()
        assert w.dtype == torch.float64 and torch.isfinite(w).all()
        for r, (row, s) in enumerate(zip(z64.tolist(), sets)):
            exact = _exact_weight(row, s, alpha)
            for i in range(V):
                assert _close(w[r, i].item(), exact[i], abs(exact[i]), dtype), (alpha, r, i, w[r, i].item(), exact[i])
            on_s = torch.tensor([i in s for i in range(V)])
            assert (w[r][on_s] <= 0).all() and (w[r][~on_s] >= 0).all(), (alpha, r)
            assert _close(w[r].sum().item(), 0, w[r].abs().sum().item(), dtype), (alpha, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", SELECTS)
def test_margin_loss_and_gradient_match_arbitrary_precision(name, dtype):
    """dipo_loss over the same rows (one position each, plus a masked one), with a perturbed
    policy: margin, loss and ∂L/∂z = −2·σ(−β·margin)·(π⁺ − π⁻)/B (property 2) against the
    definition; at θ = ref the margin is exactly 0 and the loss (2/β)·log 2 (property 1)."""
    kw, beta = SELECTS[name], 0.5
    z64, labels = _rows()
    B = len(z64)
    g = torch.Generator().manual_seed(1)
    ref = torch.stack([z64, torch.randn(B, V, generator=g, dtype=torch.float64)], dim=1).to(dtype)
    policy = (ref.double() + torch.randn(B, 2, V, generator=g, dtype=torch.float64)).to(dtype)
    targets = torch.stack([labels, torch.full((B,), IGNORE_INDEX)], dim=1)
    sets = [_exact_set(row, int(y), **kw) for row, y in zip(z64.tolist(), labels)]
    diff = (policy[:, 0].double() - ref[:, 0].double()).tolist()  # exact: both are representable
    for alpha in ALPHAS:
        pol = policy.clone().requires_grad_(True)
        loss, margin = dipo_loss(pol, ref, targets, alpha=alpha, beta=beta, chunk_size=5, **kw)
        (grad,) = torch.autograd.grad(loss, pol)
        assert (grad[:, 1] == 0).all()
        exact_loss = 0
        for r, s in enumerate(sets):
            w = _exact_weight(z64[r].tolist(), s, alpha)
            terms = [wi * d for wi, d in zip(w, diff[r])]
            m = sum(terms)
            assert _close(margin[r].item(), m, sum(abs(t) for t in terms), torch.float32), (alpha, r)
            exact_loss += -2 / beta * mpmath.log(1 / (1 + mpmath.exp(-beta * m))) / B
            coef = -2 / (1 + mpmath.exp(beta * m)) / B
            for i in range(V):  # the gradient comes back in the logits' dtype
                want = coef * w[i]
                tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
                assert abs(mpmath.mpf(grad[r, 0, i].item()) - want) <= tol * abs(want) + 1e-37, (alpha, r, i)
        assert _close(loss.item(), exact_loss, abs(exact_loss), torch.float32), alpha
        at_ref, margin0 = dipo_loss(ref.clone(), ref, targets, alpha=alpha, beta=beta, **kw)
        assert (margin0 == 0).all()
        assert at_ref.item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_issue_13_reproducers():
    """The three defects as the issue states them (float32)."""
    # 1. α ≳ 88 in float32: exp(−α) underflowed and the weight of a near-impossible S became ±1.
    zr = torch.tensor([[0.0, -300.0, -300.0]])
    for select, y in (("topk", 0), ("label", 2)):
        w = preference_weight(zr, torch.tensor([y]), alpha=200.0, select=select)
        assert w.abs().max().item() < 1e-37
        loss, _ = dipo_loss((zr + torch.tensor([1.0, 0, 0]))[None], zr[None], torch.tensor([[y]]),
                            alpha=200.0, beta=1.0, select=select)
        assert loss.item() == pytest.approx(2 * math.log(2), rel=1e-6)  # 1.386 (was 2.63 / 0.63)
    # 2. cancellation once 1 − p_top1 < ~1e-8: the top-1 weight was lost.
    w = preference_weight(torch.tensor([[20.0, 0, 0]]), torch.tensor([0]), alpha=1.0, select="topk")
    exact = [float(v) for v in _exact_weight_small([20, 0, 0], {0}, 1.0)]
    assert torch.allclose(w.double(), torch.tensor([exact], dtype=torch.float64), rtol=1e-5, atol=0)
    # ... and with `label` and p_label ≈ 1e-9 the off-S weights came out 0.
    w = preference_weight(torch.tensor([[0.0, 20.7, 0.0]]), torch.tensor([0]), alpha=1.0, select="label")
    assert (w[0, 1:] > 0).all() and w[0, 0] < 0 and abs(w.sum().item()) < 1e-6 * w.abs().sum().item()
    # 3. topp with p = 1: the cumulative sum dropped tail tokens (loss 0.0, margin 40).
    z_ref = torch.tensor([[[40.0, 0, 0, 0, 0]]], dtype=torch.float64)
    targets = torch.tensor([[0]])
    kw = dict(alpha=100.0, beta=1.0, select="topp", p=1.0)
    online, margin = dipo_loss(torch.zeros_like(z_ref), z_ref, targets, **kw)
    hidden, margin_h = dipo_loss(torch.zeros(1, 1, 5), HiddenReference(z_ref.float(), torch.eye(5)), targets, **kw)
    assert margin.item() == 0 and margin_h.item() == 0
    assert online.item() == pytest.approx(2 * math.log(2), rel=1e-12)
    assert hidden.item() == pytest.approx(online.item(), rel=1e-6)


def _exact_weight_small(z, s, alpha):
    a = mpmath.mpf(alpha)
    plus = _softmax([mpmath.mpf(v) - (a if i in s else 0) for i, v in enumerate(z)])
    minus = _softmax([mpmath.mpf(v) + (a if i in s else 0) for i, v in enumerate(z)])
    return [u - v for u, v in zip(plus, minus)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_empty_complement_and_impossible_tokens(dtype):
    """S the whole vocabulary (top-k with k = V) gives zero weights; logits of −inf (tokens a model
    rules out) get weight 0 and leave the others as if they were absent; a label of probability 0
    gives zero weights (π⁺ = π⁻)."""
    z = torch.tensor([[3.0, -1.0, 0.5, 2.0]], dtype=dtype)
    assert (preference_weight(z, torch.tensor([0]), alpha=5.0, select="topk", k=4) == 0).all()
    z_inf = torch.tensor([[3.0, -math.inf, -1.0, 0.5, -math.inf, 2.0]], dtype=dtype)
    kept = torch.tensor([0, 2, 3, 5])
    for kw in (dict(select="topk", k=2), dict(select="label"), dict(select="topp", p=0.95),
               dict(select="topp", p=1.0)):
        w = preference_weight(z_inf, torch.tensor([3]), alpha=5.0, **kw)
        assert torch.isfinite(w).all() and (w[0, [1, 4]] == 0).all()
        alone = preference_weight(z_inf[:, kept], torch.tensor([2]), alpha=5.0, **kw)
        assert torch.allclose(w[:, kept], alone, rtol=1e-6, atol=0)
    w = preference_weight(z_inf, torch.tensor([1]), alpha=5.0, select="label")
    assert (w == 0).all()


# --------------------------------------------------------------------------------------------
# The forget NLL from the loss's own chunks (`with_nll`).
# --------------------------------------------------------------------------------------------
def _nll_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T, H = 3, 6, 5
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    ref_hidden = hidden.detach() + 0.3 * torch.randn(B, T, H, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, -2:] = IGNORE_INDEX
    targets[2, 0] = IGNORE_INDEX
    return hidden, weight, ref_hidden, targets


LOSSES = {
    "dipo": lambda pol, ref, t, **kw: dipo_loss(pol, ref, t, alpha=2.0, beta=0.5, select="topk", k=2, **kw),
    "dipo_topp_mean": lambda pol, ref, t, **kw: dipo_loss(pol, ref, t, alpha=2.0, beta=0.5, select="topp",
                                                          p=0.8, reduction="mean", **kw),
    "npo": lambda pol, ref, t, **kw: npo_loss(pol, ref, t, beta=0.5, **kw),
    "ga": lambda pol, ref, t, **kw: ga_loss(pol, t, **kw),
    "kl": lambda pol, ref, t, **kw: kl_retain_loss(pol, ref, t, **kw),
}


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "lm_head"])
@pytest.mark.parametrize("chunk_size", [1, 4, None])
@pytest.mark.parametrize("name", LOSSES)
def test_with_nll_equals_nll_loss_and_leaves_the_loss_unchanged(name, chunk_size, fused):
    """`with_nll=True` appends nll_loss(policy, targets) (detached) to what the loss returns, on
    the logits and on the fused LM head, and changes neither the loss, its statistic nor its
    gradient."""
    hidden, weight, ref_hidden, targets = _nll_inputs()
    ref = HiddenReference(ref_hidden, weight.detach())
    policy = LMHead(hidden, weight) if fused else hidden @ weight.T
    run = LOSSES[name]
    plain = run(policy, ref, targets, chunk_size=chunk_size)
    *out, nll = run(policy, ref, targets, chunk_size=chunk_size, with_nll=True)
    plain = plain if isinstance(plain, tuple) else (plain,)
    assert len(out) == len(plain)
    assert not nll.requires_grad and nll.dim() == 0
    assert nll.item() == pytest.approx(nll_loss(hidden @ weight.T, targets).item(), rel=1e-12)
    for a, b in zip(out, plain):
        assert torch.equal(a, b)
    grads = torch.autograd.grad(out[0], [hidden, weight], retain_graph=True)  # the logits are shared
    for a, b in zip(grads, torch.autograd.grad(plain[0], [hidden, weight])):
        assert torch.equal(a, b)


def test_dipo_margin_with_logprob_is_the_sequence_logprob():
    hidden, weight, ref_hidden, targets = _nll_inputs(seed=1)
    logits = hidden @ weight.T
    margin, logprob = dipo_margin(logits, ref_hidden @ weight.T, targets, alpha=1.0, with_logprob=True)
    valid = targets != IGNORE_INDEX
    want = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
    assert torch.allclose(logprob, (want * valid).sum(1), atol=1e-12)
    assert torch.equal(margin, dipo_margin(logits, ref_hidden @ weight.T, targets, alpha=1.0))


# --------------------------------------------------------------------------------------------
# Config bounds of α and p.
# --------------------------------------------------------------------------------------------
NOT_FINITE = "Input should be a finite number"  # the config refuses inf and nan in every float field


@pytest.mark.parametrize("override, message", [
    ("dipo.alpha=0", "dipo.alpha: must be in (0, 1000]"),
    ("dipo.alpha=-1", "dipo.alpha: must be in (0, 1000]"),
    ("dipo.alpha=1000.5", "dipo.alpha: must be in (0, 1000]"),
    ("dipo.alpha=.inf", ("dipo.alpha: must be in (0, 1000]", f"dipo.alpha: {NOT_FINITE}")),
    ("dipo.alpha=.nan", ("dipo.alpha: must be in (0, 1000]", f"dipo.alpha: {NOT_FINITE}")),
    ("dipo.p=0", "dipo.p: must be in (0, 1]"),
    ("dipo.p=1.01", "dipo.p: must be in (0, 1]"),
    ("dipo.p=.nan", ("dipo.p: must be in (0, 1]", f"dipo.p: {NOT_FINITE}")),
])
def test_config_refuses_alpha_and_p_out_of_range(override, message):
    """Refused in the first line, naming the key (a non-finite value by the range check or by the
    config's refusal of inf/nan)."""
    messages = (message,) if isinstance(message, str) else message
    pattern = "|".join(re.escape(m) for m in messages)
    with pytest.raises(UserInputError, match=rf"(?s)^[^\n]*(?:{pattern})"):
        load_config(overrides=[override])


def test_config_accepts_the_ends_of_the_ranges():
    cfg = load_config(overrides=["dipo.alpha=1000", "dipo.p=1.0"])
    assert cfg.dipo.alpha == 1000 and cfg.dipo.p == 1.0
    cfg = load_config(overrides=["dipo.alpha=0.001", "dipo.p=0.001"])
    assert cfg.dipo.alpha == 0.001 and cfg.dipo.p == 0.001
