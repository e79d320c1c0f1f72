"""The fused path (`LMHead`: hidden states + LM-head weight in place of logits) against the same
losses on the logits, in value and gradient."""

import math

import pytest
import torch

from dipo_scale.losses import (IGNORE_INDEX, HiddenReference, LMHead, TopKReference, auto_chunk_size,
                               dipo_loss, ga_loss, kl_retain_loss, nll_loss, npo_loss)
from dipo_scale.reference.topk import topk_statistics

pytestmark = pytest.mark.usefixtures("one_thread")

B, T, H, V = 3, 7, 5, 11


def _inputs(seed=0, dtype=torch.float64, bias=False):
    g = torch.Generator().manual_seed(seed)
    ref_hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    ref_weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    hidden = ref_hidden + 0.3 * torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = ref_weight + 0.3 * torch.randn(V, H, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, -2:] = IGNORE_INDEX  # padding at the end of one row
    targets[-1, 0] = IGNORE_INDEX   # and a masked position at the start of another
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_(True)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), ref_hidden.to(dtype), ref_weight.to(dtype), targets


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


SETTINGS = [
    dict(select="topk", k=1), dict(select="topk", k=3), dict(select="label"),
    dict(select="topp", p=0.7), dict(select="topk", k=2, source="policy"),
    dict(select="topk", k=1, reduction="mean"),
]


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
@pytest.mark.parametrize("kw", SETTINGS)
@pytest.mark.parametrize("ref_form", ["logits", "hidden"])
def test_fused_dipo_matches_dipo_loss_on_logits(kw, chunk_size, ref_form):
    hidden, weight, _, ref_hidden, ref_weight, targets = _inputs()
    ref_logits = ref_hidden @ ref_weight.T
    ref = ref_logits if ref_form == "logits" else HiddenReference(ref_hidden, ref_weight)
    loss, margin = dipo_loss(LMHead(hidden, weight), ref, targets, alpha=1.5, beta=0.7,
                             chunk_size=chunk_size, **kw)
    expected, expected_margin = dipo_loss(hidden @ weight.T, ref_logits, targets, alpha=1.5,
                                          beta=0.7, **kw)
    assert torch.allclose(loss, expected, atol=1e-12, rtol=1e-10)
    assert torch.allclose(margin, expected_margin, atol=1e-12, rtol=1e-10)
    for got, want in zip(_grads(loss, hidden, weight), _grads(expected, hidden, weight)):
        assert torch.allclose(got, want, atol=1e-12, rtol=1e-10)


def test_fused_dipo_with_bias_and_masked_positions_have_zero_grad():
    hidden, weight, bias, ref_hidden, ref_weight, targets = _inputs(seed=1, bias=True)
    ref_bias = torch.randn(V, dtype=torch.float64)
    loss, _ = dipo_loss(LMHead(hidden, weight, bias), HiddenReference(ref_hidden, ref_weight, ref_bias),
                        targets, alpha=2.0, beta=1.0, chunk_size=2)
    expected, _ = dipo_loss(hidden @ weight.T + bias, ref_hidden @ ref_weight.T + ref_bias,
                            targets, alpha=2.0, beta=1.0)
    got, want = _grads(loss, hidden, weight, bias), _grads(expected, hidden, weight, bias)
    assert torch.allclose(loss, expected, atol=1e-12)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-12)
    assert (got[0][targets == IGNORE_INDEX] == 0).all()  # masked positions get no gradient


def test_fused_dipo_at_reference_is_2_over_beta_log2():
    _, _, _, ref_hidden, ref_weight, targets = _inputs()
    loss, margin = dipo_loss(LMHead(ref_hidden.clone(), ref_weight.clone()),
                             HiddenReference(ref_hidden, ref_weight), targets, alpha=1.0, beta=2.0)
    assert torch.allclose(margin, torch.zeros_like(margin), atol=1e-12)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_fused_nll_matches_nll_loss(chunk_size):
    hidden, weight, bias, _, _, targets = _inputs(seed=2, bias=True)
    loss = nll_loss(LMHead(hidden, weight, bias), targets, chunk_size=chunk_size)
    expected = nll_loss(hidden @ weight.T + bias, targets)
    assert torch.allclose(loss, expected, atol=1e-12)
    for a, b in zip(_grads(loss, hidden, weight, bias), _grads(expected, hidden, weight, bias)):
        assert torch.allclose(a, b, atol=1e-12)


def test_only_requested_gradients_frozen_head():
    hidden, weight, _, ref_hidden, ref_weight, targets = _inputs()
    frozen = weight.detach()
    loss = nll_loss(LMHead(hidden, frozen), targets, chunk_size=2)
    (g,) = torch.autograd.grad(loss, hidden)
    (want,) = torch.autograd.grad(nll_loss(hidden @ frozen.T, targets), hidden)
    assert torch.allclose(g, want, atol=1e-12)


def test_bf16_inputs_run_and_give_finite_grads():
    hidden, weight, _, ref_hidden, ref_weight, targets = _inputs(dtype=torch.bfloat16)
    loss, margin = dipo_loss(LMHead(hidden, weight), HiddenReference(ref_hidden, ref_weight), targets,
                             alpha=1.0, beta=0.5, chunk_size=4)
    assert loss.dtype == torch.float32 and margin.dtype == torch.float32
    gh, gw = torch.autograd.grad(loss, [hidden, weight])
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    assert torch.isfinite(gh.float()).all() and torch.isfinite(gw.float()).all()
    # close to the float32 computation on the same (bf16-rounded) values
    h32, w32 = hidden.detach().float().requires_grad_(True), weight.detach().float().requires_grad_(True)
    ref32, _ = dipo_loss(h32 @ w32.T, ref_hidden.float() @ ref_weight.float().T, targets,
                         alpha=1.0, beta=0.5)
    assert loss.item() == pytest.approx(ref32.item(), rel=1e-4, abs=1e-5)
    nll = nll_loss(LMHead(hidden, weight), targets)
    assert all(torch.isfinite(g.float()).all() for g in torch.autograd.grad(nll, [hidden, weight]))


def test_all_positions_masked_gives_zero_margin_and_zero_grads():
    hidden, weight, _, ref_hidden, ref_weight, _ = _inputs()
    targets = torch.full((B, T), IGNORE_INDEX)
    loss, margin = dipo_loss(LMHead(hidden, weight), HiddenReference(ref_hidden, ref_weight), targets,
                             alpha=1.0, beta=1.0)
    assert (margin == 0).all()
    gh, gw = torch.autograd.grad(loss, [hidden, weight])
    assert (gh == 0).all() and (gw == 0).all()


def test_argument_errors():
    hidden, weight, _, ref_hidden, ref_weight, targets = _inputs()
    with pytest.raises(ValueError, match="weight must be"):
        LMHead(hidden, weight[:, :2])
    with pytest.raises(ValueError, match="hidden must be"):
        LMHead(hidden[0], weight)
    with pytest.raises(ValueError, match="targets must be"):
        nll_loss(LMHead(hidden, weight), targets[:, :-1])
    with pytest.raises(ValueError, match="reference is"):
        dipo_loss(LMHead(hidden, weight), HiddenReference(ref_hidden[:2], ref_weight), targets,
                  alpha=1.0, beta=1.0)


@pytest.mark.parametrize("method", ["npo", "ga", "kl", "dipo_topk_ref"])
def test_other_losses_and_references_match_on_lm_head(method):
    """NPO, GA, the KL retain term and a top-K reference take an LMHead like logits, and the
    head's row selection (`head[rows]`) is the logits' one."""
    hidden, weight, bias, ref_hidden, ref_weight, targets = _inputs(seed=3, bias=True)
    ref_logits = ref_hidden @ ref_weight.T
    rows = slice(1, None)

    def run(policy):
        if method == "npo":
            return npo_loss(policy[rows], ref_logits[rows], targets[rows], beta=0.3, chunk_size=2)[0]
        if method == "ga":
            return ga_loss(policy[rows], targets[rows], chunk_size=2)
        if method == "kl":
            return kl_retain_loss(policy[rows], HiddenReference(ref_hidden[rows], ref_weight), targets[rows],
                                  chunk_size=2)
        ref = TopKReference(*topk_statistics(ref_logits[rows], 4), vocab_size=V)
        return dipo_loss(policy[rows], ref, targets[rows], alpha=1.0, beta=0.5, chunk_size=2)[0]

    loss, expected = run(LMHead(hidden, weight, bias)), run(hidden @ weight.T + bias)
    assert torch.allclose(loss, expected, atol=1e-12)
    for a, b in zip(_grads(loss, hidden, weight, bias), _grads(expected, hidden, weight, bias)):
        assert torch.allclose(a, b, atol=1e-12)


def test_auto_chunk_size_scales_with_vocab():
    assert auto_chunk_size(32000) == 131 and auto_chunk_size(128256) == 32
    assert auto_chunk_size(11) == 1024 and auto_chunk_size(10 ** 9) == 1
