"""The `kl` retain term: token-mean KL(π_ref ‖ π_θ) over the retain set."""

from __future__ import annotations

import torch

from dipo_scale.losses.chunking import mean_nll, per_row, target_logprob, token_counts
from dipo_scale.losses.references import as_reference, check_reference


def _kl_ref_policy(z, y, z_ref):
    log_ref = torch.log_softmax(z_ref.to(z.dtype), dim=1)
    return (log_ref.exp() * (log_ref - torch.log_softmax(z, dim=1))).sum(dim=1)


def kl_retain_loss(logits, ref_logits, targets, *, chunk_size=None, with_nll=False):
    """Token-mean KL(π_ref‖π_θ) per row, averaged over rows (the `kl` retain term). Returns loss,
    or (loss, nll) with `with_nll`.
    `ref_logits`: logits [B, T, V] or a cached form (`HiddenReference`, `TopKReference`)."""
    ref = as_reference(ref_logits)
    check_reference(ref, logits)
    fn = lambda z, y, *r: _kl_ref_policy(z, y, ref.logits(*r))  # noqa: E731
    out = per_row(fn, logits, targets, *ref.per_position(), chunk_size=chunk_size,
                   side=target_logprob if with_nll else None)
    kl, logprob = out if with_nll else (out, None)
    loss = (kl / token_counts(targets)).mean()
    return (loss, mean_nll(logprob, targets)) if with_nll else loss

