"""The cached reference forms (`hidden`, `topk`) against the online form (full reference logits)."""

import math

import pytest
import torch

from dipo_scale.losses import (IGNORE_INDEX, HiddenReference, TopKReference, dipo_loss,
                               kl_retain_loss, npo_loss, topk_dense_logits)
from dipo_scale.reference import topk
from dipo_scale.reference.topk import topk_statistics

pytestmark = pytest.mark.usefixtures("one_thread")

B, T, H, V = 3, 6, 5, 13


def _inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ref_hidden = torch.randn(B, T, H, generator=g).to(dtype)
    ref_weight = torch.randn(V, H, generator=g).to(dtype)
    ref_bias = 0.3 * torch.randn(V, generator=g).to(dtype)
    logits = (ref_hidden @ ref_weight.T + ref_bias + 0.5 * torch.randn(B, T, V, generator=g)).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, -2:] = IGNORE_INDEX
    targets[2, 0] = IGNORE_INDEX
    return logits.requires_grad_(True), ref_hidden, ref_weight, ref_bias, targets


LOSSES = {
    "dipo_topk": lambda z, ref, y: dipo_loss(z, ref, y, alpha=2.0, beta=0.5, select="topk", k=2, chunk_size=4)[0],
    "dipo_label_mean": lambda z, ref, y: dipo_loss(z, ref, y, alpha=1.0, beta=0.3, select="label",
                                                   reduction="mean", chunk_size=5)[0],
    "dipo_topp": lambda z, ref, y: dipo_loss(z, ref, y, alpha=1.5, beta=0.2, select="topp", p=0.6)[0],
    "npo": lambda z, ref, y: npo_loss(z, ref, y, beta=0.4, chunk_size=3)[0],
    "kl_retain": lambda z, ref, y: kl_retain_loss(z, ref, y, chunk_size=7),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_hidden_form_equals_online_loss_and_gradients(name):
    logits, ref_hidden, ref_weight, ref_bias, targets = _inputs()
    online_ref = ref_hidden @ ref_weight.T + ref_bias
    loss = LOSSES[name](logits, online_ref, targets)
    (grad,) = torch.autograd.grad(loss, logits)
    cached = LOSSES[name](logits, HiddenReference(ref_hidden, ref_weight, ref_bias), targets)
    (cached_grad,) = torch.autograd.grad(cached, logits)
    assert torch.allclose(cached, loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(cached_grad, grad, rtol=1e-5, atol=1e-6)
    assert grad.abs().sum() > 0  # the comparison is not between two zeros


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_topk_with_k_equal_vocab_is_exact(name):
    logits, ref_hidden, ref_weight, ref_bias, targets = _inputs(seed=1, dtype=torch.float64)
    online_ref = ref_hidden @ ref_weight.T + ref_bias
    top, ids, lse = topk_statistics(online_ref, V)
    loss = LOSSES[name](logits, online_ref, targets)
    (grad,) = torch.autograd.grad(loss, logits)
    cached = LOSSES[name](logits, TopKReference(top, ids, lse, V), targets)
    (cached_grad,) = torch.autograd.grad(cached, logits)
    assert torch.allclose(cached, loss, rtol=1e-10, atol=1e-12)
    assert torch.allclose(cached_grad, grad, rtol=1e-10, atol=1e-12)


def test_topk_tail_spreads_the_left_over_mass_uniformly():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, V, generator=g, dtype=torch.float64) * 3
    K = 4
    top, ids, lse = topk_statistics(z, K)
    dense = topk_dense_logits(top, ids, lse, V)
    log_p, log_q = torch.log_softmax(z, 1), torch.log_softmax(dense, 1)
    # the normaliser is exact, so the stored ids keep their exact log-probabilities
    assert torch.allclose(torch.logsumexp(dense, 1), lse, atol=1e-12)
    assert torch.allclose(log_q.gather(1, ids), log_p.gather(1, ids), atol=1e-12)
    # every other id gets the same share of the left-over mass
    tail = torch.ones_like(z, dtype=torch.bool).scatter_(1, ids, False)
    left_over = 1 - log_p.gather(1, ids).exp().sum(1)
    expected = torch.log(left_over / (V - K))
    for row in range(4):
        assert torch.allclose(log_q[row][tail[row]], expected[row].expand(V - K), atol=1e-12)


def test_topk_error_shrinks_as_k_grows():
    logits, ref_hidden, ref_weight, ref_bias, targets = _inputs(seed=2, dtype=torch.float64)
    online_ref = ref_hidden @ ref_weight.T + ref_bias
    exact = LOSSES["dipo_topk"](logits, online_ref, targets).item()
    errors = []
    for k in (2, 6, V):
        approx = LOSSES["dipo_topk"](logits, TopKReference(*topk_statistics(online_ref, k), V), targets)
        errors.append(abs(approx.item() - exact) / abs(exact))
    assert errors[0] > 1e-6 and errors[-1] < 1e-12  # K < V approximates, K = V is exact
    assert errors[1] < errors[0]


def test_reference_shape_must_match_the_policy():
    logits, ref_hidden, ref_weight, _, targets = _inputs()
    with pytest.raises(ValueError, match="reference is"):
        dipo_loss(logits, HiddenReference(ref_hidden[:, :-1], ref_weight), targets, alpha=1, beta=1)
    assert not math.isnan(dipo_loss(logits, HiddenReference(ref_hidden, ref_weight), targets,
                                    alpha=1, beta=1)[0].item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_topk_statistics_on_the_cpu_match_torch_topk(monkeypatch, dtype):
    """The CPU path (numpy's introselect, one chunk of rows at a time, then sorted) gives
    torch.topk's values and ids in its order, and the log-sum-exp, in float32 at least."""
    monkeypatch.setattr(topk, "TOPK_CHUNK_ELEMENTS", 3 * 50)  # chunks of 3 rows: boundaries inside
    g = torch.Generator().manual_seed(5)
    z = (torch.randn(2, 7, 50, generator=g, dtype=torch.float64) * 4).to(dtype)
    top, ids, lse = topk_statistics(z, 6)
    reference = z.to(torch.promote_types(dtype, torch.float32)).topk(6, dim=-1)
    assert top.dtype == reference.values.dtype and top.shape == ids.shape == (2, 7, 6)
    assert torch.equal(top, reference.values)
    if dtype != torch.bfloat16:  # (bfloat16 logits tie often: the tied ids may come in another order)
        assert torch.equal(ids, reference.indices)
    assert torch.equal(z.to(top.dtype).gather(-1, ids), top)
    assert torch.allclose(lse, torch.logsumexp(z.to(top.dtype), dim=-1))


@pytest.mark.parametrize("group", [8, 64])
def test_grouped_topk_statistics_equal_introselect_wherever_the_top_k_lie(group):
    """The grouped CPU top-K (group maxima, the K best groups, their members) is exact: the same
    values, ids and log-sum-exp as introselect over whole rows, whether the K largest logits lie
    in K different groups, all in one group, or anywhere."""
    g = torch.Generator().manual_seed(7)
    V, k = 1024, 8
    z = torch.randn(3, 5, V, generator=g)
    z[0, 0, 64:72] += 20.0  # the K largest together in one group (of 8: exactly; of 64: inside)
    z[0, 1, torch.arange(k) * 128] += 20.0  # each in a group of its own
    z[1, 2, :] = 0.0  # one row all tied: values (all 0) and lse still exact
    grouped, flat = topk_statistics(z, k, group=group), topk_statistics(z, k, group=0)
    assert torch.equal(grouped[0], flat[0]) and torch.allclose(grouped[2], flat[2])
    untied = torch.ones(3, 5, dtype=torch.bool)
    untied[1, 2] = False
    assert torch.equal(grouped[1][untied], flat[1][untied])
    assert torch.equal(z.gather(-1, grouped[1]), grouped[0])
    assert torch.equal(grouped[1][0, 0].sort().values, torch.arange(64, 72))
    with pytest.raises(ValueError, match="group=48 must divide"):
        topk_statistics(z, k, group=48)


def test_topk_group_groups_only_where_it_pays():

    assert [topk.topk_group(v, 32) for v in (1024, 32000, 128256, 50257, 8192, 4096)] == [0, 64, 64, 0, 64, 0]
    assert topk.topk_group(32000, 128) == 0  # 125 groups of 64 would keep all but a sliver
