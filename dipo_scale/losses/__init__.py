"""All unlearning losses (DiPO, NPO, GA, and the retain terms), as pure functions of tensors.

One module per concern, every public name importable from here:

    chunking.py    the chunked evaluation every loss runs on (`per_row`), the fused LM head
                   (`LMHead`), the chunk size, the shared log-likelihood (`target_logprob`)
    references.py  the reference: full logits or a cached form (`HiddenReference`, `TopKReference`)
    dipo.py        DiPO: high-confidence sets, preference distributions, margin, loss
    likelihood.py  NLL, gradient ascent (GA), NPO
    retain.py      the `kl` retain term

(The `topk` cache's statistics are computed in dipo_scale/reference/topk.py; the unchunked DiPO
oracle the tests compare against is tests/losses/naive.py.)

See docs/DIPO.md for the derivation. Conventions:

* `logits` is [B, T, V] (any float dtype) and `targets` is [B, T] *already shifted*: `targets[b, t]`
  is the token that `logits[b, t]` predicts, and -100 marks a position that contributes nothing.
* Every loss works chunk by chunk over the valid positions: no [B, T, V] float32 intermediate is
  ever held beyond the logits themselves (and their gradient). The backward pass recomputes each
  chunk, so the autograd graph stores only the inputs (see `chunking._PositionwiseChunked`); a loss whose
  gradient has a closed form (DiPO's) writes it into the logits' gradient tensor in the forward
  instead, where that tensor has the compute dtype (float32 logits), and the backward only scales it.
* Per-row quantities are sums over that row's valid positions, so a row's loss does not depend
  on the other rows of the batch or on how much padding it carries.
* The policy is its logits [B, T, V], or an `LMHead` (final hidden states [B, T, H] + the LM-head
  weight [V, H], + bias): the fused path, where the logits are computed chunk by chunk inside the
  loss, forward and backward, so neither they nor their gradient ever exist whole
  (`chunking._FusedHeadPositionwise`). `loss(LMHead(h, W, b), ...)` equals `loss(h @ W.T + b, ...)` in
  value and gradient (tests/losses/test_fused.py). Under DeepSpeed ZeRO-3 the head weight must be
  the gathered one: `dipo_scale.engine.FusedHeadModel` computes the loss inside the engine's
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

from dipo_scale.losses.chunking import (ACCELERATOR_CHUNK_BUDGET, ACCELERATOR_MAX_CHUNK, CHUNK_ELEMENTS,
                                        CHUNK_TEMPORARIES, IGNORE_INDEX, MAX_CHUNK, LMHead, auto_chunk_size,
                                        compute_dtype, head_matmul_dtype, loss_chunk_bytes, mean_nll, per_row,
                                        reference_values, sequence_logprob, shift_targets, target_logprob,
                                        token_counts)
from dipo_scale.losses.dipo import (Select, dipo_loss, dipo_margin, high_confidence_mask, preference_distributions,
                                    preference_weight)
from dipo_scale.losses.likelihood import ga_loss, nll_loss, npo_loss
from dipo_scale.losses.references import (HiddenReference, LogitsReference, Reference, TopKReference, as_reference,
                                          check_reference, topk_dense_logits)
from dipo_scale.losses.retain import kl_retain_loss

__all__ = ["ACCELERATOR_CHUNK_BUDGET", "ACCELERATOR_MAX_CHUNK", "CHUNK_ELEMENTS", "CHUNK_TEMPORARIES", "IGNORE_INDEX",
           "MAX_CHUNK", "LMHead", "auto_chunk_size", "compute_dtype", "head_matmul_dtype", "loss_chunk_bytes",
           "mean_nll", "per_row", "reference_values", "sequence_logprob", "shift_targets", "target_logprob",
           "token_counts", "Select", "dipo_loss", "dipo_margin", "high_confidence_mask", "preference_distributions",
           "preference_weight", "ga_loss", "nll_loss", "npo_loss", "HiddenReference", "LogitsReference", "Reference",
           "TopKReference", "as_reference", "check_reference", "topk_dense_logits", "kl_retain_loss"]
