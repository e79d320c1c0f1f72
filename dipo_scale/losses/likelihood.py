"""The likelihood losses: NLL (the `gd` retain term, and the relearn attack), gradient ascent
(GA) and NPO.

`with_nll=True` (here, and in dipo_loss and kl_retain_loss): the loss also returns, last,
`nll_loss(logits, targets)` of the same inputs as a detached scalar, taken from the loss's own
pass over the chunks (no second pass over the logits, no second LM-head matmul when fused)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dipo_scale.losses.chunking import mean_nll, reference_values, sequence_logprob, target_logprob
from dipo_scale.losses.references import as_reference, check_reference


def nll_loss(logits, targets, *, chunk_size=None) -> torch.Tensor:
    """Token-mean negative log-likelihood per row, averaged over rows (the `gd` retain term)."""
    return mean_nll(sequence_logprob(logits, targets, chunk_size=chunk_size), targets)


def ga_loss(logits, targets, *, chunk_size=None, with_nll=False):
    """Gradient ascent: −NLL(forget). Returns loss, or (loss, nll) with `with_nll`."""
    loss = -nll_loss(logits, targets, chunk_size=chunk_size)
    return (loss, -loss.detach()) if with_nll else loss


def npo_loss(logits, ref_logits, targets, *, beta, chunk_size=None, with_nll=False):
    """NPO on log-probs: −(2/β)·mean log σ(−β·Σ_t m_t[log π_θ − log π_ref]). Returns (loss, log-ratio[B]),
    or (loss, log-ratio, nll) with `with_nll`.
    `ref_logits`: logits [B, T, V] or a cached form (`HiddenReference`, `TopKReference`)."""
    ref = as_reference(ref_logits)
    check_reference(ref, logits)
    logprob = sequence_logprob(logits, targets, chunk_size=chunk_size)
    log_ratio = logprob - reference_values(target_logprob, ref, targets, chunk_size).to(logprob.dtype)
    loss = -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()
    return (loss, log_ratio, mean_nll(logprob.detach(), targets)) if with_nll else (loss, log_ratio)

