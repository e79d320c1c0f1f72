"""The loss chunk: its size by device (`auto_chunk_size`), what one chunk holds at once
(`CHUNK_TEMPORARIES`, counted from the allocations of every loss), the fused head's matmul dtype
(bf16 on GPUs, forced here on the CPU) against float32, and DiPO's closed-form backward (no policy
logits rebuilt in the fused backward)."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dipo_scale.losses import (ACCELERATOR_MAX_CHUNK, CHUNK_TEMPORARIES, IGNORE_INDEX, HiddenReference, LMHead,
                               auto_chunk_size, dipo_loss, ga_loss, head_matmul_dtype, kl_retain_loss,
                               loss_chunk_bytes, nll_loss, npo_loss)

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# The rule.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_auto_chunk_size_on_cpu_is_the_cpu_rule(device, dtype):
    """2**22 values per temporary, at most 1024 positions, whatever the dtype (docs/benchmarks.md)."""
    got = [auto_chunk_size(v, device, dtype) for v in (11, 32000, 128256, 10 ** 9)]
    assert got == [1024, 131, 32, 1]
    assert auto_chunk_size(32000) == 131  # the default device is the CPU


@pytest.mark.parametrize("device", ["cuda", torch.device("cuda", 1)])
def test_auto_chunk_size_elsewhere_is_a_memory_budget(device):
    """On a GPU: CHUNK_TEMPORARIES [chunk, V] temporaries in the compute dtype within 4 GiB, at
    most 4096 positions. A pure function of its arguments: no GPU needed."""
    assert auto_chunk_size(128256, device, torch.bfloat16) == 1046  # float32 temporaries: 8 x 4 B x V each
    assert auto_chunk_size(128256, device, torch.float32) == 1046
    assert auto_chunk_size(128256, device, torch.float64) == 523  # float64 temporaries are twice as large
    assert auto_chunk_size(32000, device) == ACCELERATOR_MAX_CHUNK == 4096  # 4194 by the budget
    assert auto_chunk_size(10 ** 9, device) == 1
    for vocab in (32000, 128256, 151936, 256000):
        chunk = auto_chunk_size(vocab, device)
        assert loss_chunk_bytes(chunk, vocab) <= 4 << 30
        assert chunk == ACCELERATOR_MAX_CHUNK or loss_chunk_bytes(chunk + 1, vocab) > 4 << 30


def test_auto_chunk_size_with_a_budget_of_ones_own():
    """A planner's budget (bytes for the chunk's temporaries) applies on any device."""
    budget = 1 << 30
    for device in ("cuda", "cpu"):
        chunk = auto_chunk_size(128256, device, torch.bfloat16, budget_bytes=budget)
        assert chunk == 261
        assert loss_chunk_bytes(chunk, 128256, torch.bfloat16) <= budget < loss_chunk_bytes(chunk + 1, 128256)
    assert auto_chunk_size(128256, "cuda", budget_bytes=1) == 1


def test_head_matmul_dtype():
    """float32 on the CPU, the inputs' own dtype elsewhere (meta tensors stand in for a GPU's), or
    the dtype asked for."""
    cpu_h, cpu_w = torch.zeros(2, 3, 4, dtype=torch.bfloat16), torch.zeros(5, 4, dtype=torch.bfloat16)
    meta_h, meta_w = cpu_h.to("meta"), cpu_w.to("meta")
    assert head_matmul_dtype(cpu_h, cpu_w) == torch.float32
    assert head_matmul_dtype(cpu_h.double(), cpu_w) == torch.float64
    assert head_matmul_dtype(meta_h, meta_w) == torch.bfloat16
    assert head_matmul_dtype(meta_h.float(), meta_w) == torch.float32  # float32 hidden states: no rounding
    assert head_matmul_dtype(cpu_h, cpu_w, torch.bfloat16) == torch.bfloat16
    assert LMHead(meta_h, meta_w).matmul_dtype == torch.bfloat16
    assert LMHead(cpu_h, cpu_w)[1:].matmul_dtype == torch.float32
    assert HiddenReference(meta_h, meta_w).matmul_dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------
# The fused head's matmuls in bf16 (the GPU default), forced on the CPU, against float32.
# --------------------------------------------------------------------------------------------
B, T, H, V = 2, 24, 32, 300


def _bf16_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ref_hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5 * 3
    hidden = ref_hidden + 0.3 * torch.randn(B, T, H, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, -3:] = IGNORE_INDEX
    return hidden.bfloat16(), weight.bfloat16(), ref_hidden.bfloat16(), targets


LOSSES = {
    "dipo": lambda pol, ref, t, c: dipo_loss(pol, ref, t, alpha=2.0, beta=0.5, chunk_size=c)[0],
    "dipo_policy_topp": lambda pol, ref, t, c: dipo_loss(pol, ref, t, alpha=1.0, beta=0.5, select="topp", p=0.8,
                                                         source="policy", chunk_size=c)[0],
    "npo": lambda pol, ref, t, c: npo_loss(pol, ref, t, beta=0.5, chunk_size=c)[0],
    "nll": lambda pol, ref, t, c: nll_loss(pol, t, chunk_size=c),
    "kl": lambda pol, ref, t, c: kl_retain_loss(pol, ref, t, chunk_size=c),
}


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _bf16_rounded_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden @ weight.T in float32, rounded to bf16 as a bf16 matmul outputs it; its gradient is
    the float32 product's."""
    z = hidden.float() @ weight.float().T
    return z + (z.bfloat16().float() - z).detach()


@pytest.mark.parametrize("chunk_size", [1, 7, None])
@pytest.mark.parametrize("name", LOSSES)
def test_bf16_matmul_matches_float32_to_bf16_tolerance(name, chunk_size):
    """The head's and the reference's matmuls in bf16 (the GPU default, forced here): float32
    accumulation, logits rounded to bf16 and upcast, the chunk's gradient rounded to bf16 for its
    two products, grad_weight summed over the chunks in float32. Against the same loss in float32
    on the logits rounded to bf16 (the bf16 path changes the losses exactly as bf16 logits do: a
    DiPO margin sums logit differences over the sequence, so it moves by up to a bf16 ulp of |z|
    per position, here 2.36 -> 1.08 for the loss): the values agree to float32 rounding and the
    gradients to bf16's (2**-9 = 0.2 %), at one chunk or 47 (grad_weight's float32 sum keeps the
    error of one rounding). And the float32 path (matmul_dtype=float32) did not round."""
    hidden, weight, ref_hidden, targets = _bf16_inputs()
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref = HiddenReference(ref_hidden, weight, matmul_dtype=torch.bfloat16)
    loss = LOSSES[name](LMHead(h, w, matmul_dtype=torch.bfloat16), ref, targets, chunk_size)
    grads = torch.autograd.grad(loss, [h, w])
    assert loss.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)

    h32, w32 = hidden.float().requires_grad_(True), weight.float().requires_grad_(True)
    want = LOSSES[name](_bf16_rounded_logits(h32, w32), _bf16_rounded_logits(ref_hidden, weight), targets, None)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    for got, expected in zip(grads, torch.autograd.grad(want, [h32, w32])):
        assert _relative_error(got, expected) < 5e-3

    exact = LOSSES[name](hidden.float() @ weight.float().T, ref_hidden.float() @ weight.float().T, targets, None)
    float32_head = LOSSES[name](LMHead(hidden, weight, matmul_dtype=torch.float32),
                                HiddenReference(ref_hidden, weight, matmul_dtype=torch.float32), targets, chunk_size)
    assert float32_head.item() == pytest.approx(exact.item(), rel=1e-5)
    assert float32_head.item() != loss.item()


def test_bf16_reference_logits_match_float32():
    _, weight, ref_hidden, _ = _bf16_inputs(seed=1)
    flat = ref_hidden.reshape(-1, H)
    z16 = HiddenReference(ref_hidden, weight, matmul_dtype=torch.bfloat16).logits(flat)
    z32 = HiddenReference(ref_hidden, weight).logits(flat)
    assert z16.dtype == z32.dtype == torch.float32
    assert torch.allclose(z16, z32, rtol=2 ** -8, atol=2 ** -8 * z32.abs().max().item())


# --------------------------------------------------------------------------------------------
# What one chunk computes and holds.
# --------------------------------------------------------------------------------------------
class _Tracked(TorchDispatchMode):
    """Every op run inside: the peak bytes of [chunk, V]-sized tensors alive at once (storages of
    chunk x V elements of 2 or 4 bytes allocated inside; views counted once), and the number of
    matrix products with V columns."""

    def __init__(self, chunk: int):
        super().__init__()
        self.chunk, self.refs, self.sizes = chunk, {}, {}
        self.live = self.peak = self.vocab_products = 0

    def _release(self, key):
        self.refs[key] -= 1
        if not self.refs[key]:
            self.live -= self.sizes.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and out.shape[-1] == V:
            self.vocab_products += 1
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            nbytes, key = storage.nbytes(), storage.data_ptr()
            if nbytes not in (2 * self.chunk * V, 4 * self.chunk * V):
                continue
            if key not in self.refs:
                self.refs[key], self.sizes[key] = 0, nbytes
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out


def _run_tracked(name, fused, dtype, chunk):
    hidden, weight, ref_hidden, targets = _bf16_inputs(seed=2)
    targets = targets.clone()
    targets[:, -1] = IGNORE_INDEX  # 46 positions: chunks of 23 or 2 x 23 = all of them
    h, w = hidden.to(dtype).requires_grad_(True), weight.to(dtype).requires_grad_(True)
    ref = HiddenReference(ref_hidden.to(dtype), weight.to(dtype), matmul_dtype=dtype)
    if fused:
        policy = LMHead(h, w, matmul_dtype=dtype)
    else:
        with torch.no_grad():
            policy = (h @ w.T).requires_grad_(True)
    with _Tracked(chunk) as forward:
        loss = LOSSES[name](policy, ref, targets, chunk)
    with _Tracked(chunk) as backward:
        loss.backward()
    return forward, backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fused", [False, True], ids=["logits", "lm_head"])
@pytest.mark.parametrize("name", LOSSES)
def test_a_chunk_holds_at_most_chunk_temporaries(name, fused, dtype):
    """CHUNK_TEMPORARIES (what auto_chunk_size and a memory plan count on) bounds the [chunk, V]
    tensors alive at once in any loss, forward or backward, in float32 units."""
    chunk = 23
    forward, backward = _run_tracked(name, fused, dtype, chunk)
    assert 0 < forward.peak <= CHUNK_TEMPORARIES * 4 * chunk * V
    assert backward.peak <= CHUNK_TEMPORARIES * 4 * chunk * V


def test_dipo_on_float32_logits_computes_its_chunks_once():
    """On float32 logits DiPO's derivative (π⁺ − π⁻) goes into the gradient in the forward: the
    backward rebuilds no chunk (no [chunk, V] temporary, no reference matmul), and its gradient is
    the one a recomputing backward gives, bit for bit (a second backward through the same graph
    recomputes)."""
    chunk = 23
    hidden, weight, ref_hidden, targets = _bf16_inputs(seed=4)
    logits = (hidden.float() @ weight.float().T).requires_grad_(True)
    ref = HiddenReference(ref_hidden.float(), weight.float())
    loss = dipo_loss(logits, ref, targets, alpha=1.0, beta=0.5, chunk_size=chunk)[0]
    with _Tracked(chunk) as backward:
        (once,) = torch.autograd.grad(loss, logits, retain_graph=True)
    assert backward.peak == 0 and backward.vocab_products == 0
    with _Tracked(chunk) as backward:
        (again,) = torch.autograd.grad(loss, logits)
    assert backward.peak > 0 and backward.vocab_products > 0  # recomputed
    assert torch.equal(once, again)
    with torch.no_grad():  # no gradient wanted: nothing kept
        margin = dipo_loss(logits, ref, targets, alpha=1.0, beta=0.5, chunk_size=chunk)[1]
    assert torch.equal(margin, dipo_loss(logits.detach(), ref, targets, alpha=1.0, beta=0.5, chunk_size=chunk)[1])


@pytest.mark.parametrize("source, policy_products", [("reference", 0), ("policy", 1)])
def test_fused_dipo_backward_rebuilds_no_policy_logits(source, policy_products):
    """DiPO's gradient in z is its weight π⁺ − π⁻ (closed form): the fused backward rebuilds the
    reference's logits for it, and the policy's only when the weight is built from them."""
    hidden, weight, ref_hidden, targets = _bf16_inputs(seed=3)
    h, w = hidden.float().requires_grad_(True), weight.float().requires_grad_(True)
    chunk = 10
    chunks = -(-int((targets != IGNORE_INDEX).sum()) // chunk)
    loss, _ = dipo_loss(LMHead(h, w), HiddenReference(ref_hidden.float(), weight.float()), targets, alpha=1.0,
                        beta=0.5, source=source, chunk_size=chunk)
    with _Tracked(chunk) as backward:
        loss.backward()
    assert backward.vocab_products == chunks * (1 + policy_products)
    nll = ga_loss(LMHead(h, w), targets, chunk_size=chunk)  # the autograd path: the policy's logits
    with _Tracked(chunk) as backward:
        nll.backward()
    assert backward.vocab_products == chunks
