"""Privacy: the Min-K% Prob membership attack (Shi et al. 2024, "Detecting Pretraining Data from
Large Language Models"; MUSE uses K = 40%, its `privleak_auc_key = "forget_holdout_Min-40%"`),
its ROC AUC and MUSE's PrivLeak.

The Min-K% score of a text is the mean of the lowest ``floor(K * n)`` (at least one) token
log-probabilities of its n scored tokens; higher means "more likely a member". `mia_auc` is the
ROC AUC (`sklearn.metrics.roc_auc_score`) of telling forget texts (label 1) from holdout texts
(label 0) by that score, and ``privleak = (auc - retrain_auc) / retrain_auc * 100`` as in MUSE's
`eval.py` (0 is ideal).
"""

from __future__ import annotations

import math

import torch

from dipo_scale.eval.generation import text_token_logprobs

MIN_K = 0.4  # MUSE's privleak key "forget_holdout_Min-40%"


def min_k_percent(token_logprobs: torch.Tensor, mask: torch.Tensor, k: float = MIN_K) -> torch.Tensor:
    """Min-K% Prob score of each row of `token_logprobs` [B, T] (valid where `mask` [B, T]):
    the mean of its lowest floor(k * n) log-probs (at least one), n = its valid tokens.
    Higher means more likely a member (MUSE negates it and flips the labels: same AUC)."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"min_k_percent: k must be in (0, 1], got {k}")
    mask = mask.bool()
    counts = mask.sum(dim=-1)
    if (counts == 0).any():
        raise ValueError("min_k_percent: a row has no valid token")
    take = torch.floor(counts.double() * k).long().clamp(min=1)
    values = token_logprobs.double().masked_fill(~mask, math.inf).sort(dim=-1).values
    keep = torch.arange(values.shape[-1], device=values.device).unsqueeze(0) < take.unsqueeze(-1)
    return values.masked_fill(~keep, 0.0).sum(dim=-1) / take


def min_k_from_lists(logprobs: list[torch.Tensor], k: float = MIN_K) -> list[float]:
    """`min_k_percent` of ragged per-text log-prob vectors."""
    if not logprobs:
        return []
    padded = torch.nn.utils.rnn.pad_sequence([lp.double() for lp in logprobs], batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence(
        [torch.ones(len(lp), dtype=torch.bool) for lp in logprobs], batch_first=True)
    return min_k_percent(padded, mask, k).tolist()


def min_k_scores(model, tokenizer, texts: list[str], *, k: float = MIN_K, batch_size: int = 16,
                 max_tokens: int | None = None, batches: int | None = None) -> list[float]:
    """Min-K% Prob of each text under `model` (batched; padding masked). `batches`: see
    `token_logprobs`."""
    return min_k_from_lists(text_token_logprobs(model, tokenizer, texts, batch_size=batch_size,
                                                max_tokens=max_tokens, batches=batches), k)


def auc_from_scores(member_scores: list[float], nonmember_scores: list[float]) -> float:
    """ROC AUC of telling members (label 1) from non-members (label 0) by score."""
    from sklearn.metrics import roc_auc_score

    if not member_scores or not nonmember_scores:
        raise ValueError("auc_from_scores: need at least one member and one non-member score")
    labels = [1] * len(member_scores) + [0] * len(nonmember_scores)
    return float(roc_auc_score(labels, list(member_scores) + list(nonmember_scores)))


def mia_auc(model, tokenizer, forget_texts: list[str], holdout_texts: list[str], *, k: float = MIN_K,
            batch_size: int = 16, max_tokens: int | None = None) -> float:
    """AUC of the Min-K% Prob attack separating forget (members) from holdout texts."""
    scores = min_k_scores(model, tokenizer, list(forget_texts) + list(holdout_texts), k=k,
                          batch_size=batch_size, max_tokens=max_tokens)
    return auc_from_scores(scores[: len(forget_texts)], scores[len(forget_texts) :])


def privleak(auc: float, retrain_auc: float) -> float:
    """MUSE's PrivLeak: (auc - retrain_auc) / retrain_auc * 100; 0 is ideal, > 0 leaks."""
    if not retrain_auc > 0:
        raise ValueError(f"privleak: retrain AUC must be > 0, got {retrain_auc}")
    return (auc - retrain_auc) / retrain_auc * 100.0
