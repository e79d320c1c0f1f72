"""DiPO written the obvious way (full [B, T, V] float32 tensors, the SeqKL form of docs/DIPO.md):
the oracle the chunked losses are tested against, and the `naive` row of benchmarks/loss.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dipo_scale.losses.chunking import IGNORE_INDEX, compute_dtype, token_counts
from dipo_scale.losses.dipo import Select, high_confidence_mask


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

