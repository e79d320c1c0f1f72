"""Privacy: the Min-K% Prob membership attack (Shi et al. 2024, "Detecting Pretraining Data from
Large Language Models"; MUSE uses K = 40%, its `privleak_auc_key = "forget_holdout_Min-40%"`),
its ROC AUC and MUSE's PrivLeak.

The Min-K% score of a text is the mean of the lowest ``floor(K * n)`` (at least one) token
log-probabilities of its n scored tokens; higher means "more likely a member". `mia_auc` is the
ROC AUC (Mann-Whitney, as `sklearn.metrics.roc_auc_score`) of telling forget texts (label 1) from holdout texts
(label 0) by that score, and ``privleak = (auc - retrain_auc) / retrain_auc * 100`` as in MUSE's
`eval.py` (0 is ideal).

Each of these set-level numbers comes with a percentile bootstrap 95 % interval (`<name>_ci`,
`bootstrap_interval`): forget and holdout texts are resampled separately, and where two models are
compared (PrivLeak: the model against the retrain model) both are scored on the same resample.
"""

from __future__ import annotations

import math

import torch

from dipo_scale.eval.generation import text_token_logprobs
from dipo_scale.report import CI  # metrics: `<name>_ci` is [low, high], the bootstrap 95 % interval of <name>

MIN_K = 0.4  # MUSE's privleak key "forget_holdout_Min-40%"
BOOTSTRAP_RESAMPLES = 1000
CONFIDENCE_LEVEL = 0.95


def bootstrap_interval(statistic, *sizes: int, n_resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> list[float] | None:
    """[low, high]: percentile bootstrap interval (CONFIDENCE_LEVEL) of `statistic(*indices)`, where
    each index array is a resample with replacement of range(size) of its group of items, drawn
    independently per group (`scipy.stats.bootstrap`); None when a group has fewer than two items.
    The statistic indexes every model's per-item scores with the same arrays, so a comparison of
    two models is paired. It is vectorised: each index array has the resamples on its leading axes
    and the items on the last. Resamples where the statistic is undefined (NaN: PrivLeak against a
    retrain AUC of 0) are left out; None when that is more than half of them."""
    import warnings

    import numpy as np
    from scipy.stats import DegenerateDataWarning, bootstrap

    if min(sizes) < 2:
        return None
    with warnings.catch_warnings():  # scipy's own interval (not used) warns on NaN resamples
        warnings.simplefilter("ignore", DegenerateDataWarning)
        result = bootstrap(tuple(np.arange(n) for n in sizes),
                           lambda *idx, axis=-1: statistic(*(np.asarray(i).astype(int) for i in idx)),
                           n_resamples=n_resamples, vectorized=True, paired=False, method="percentile",
                           confidence_level=CONFIDENCE_LEVEL, random_state=np.random.default_rng(seed))
    values = np.asarray(result.bootstrap_distribution, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) * 2 < n_resamples:
        return None
    tail = (1 - CONFIDENCE_LEVEL) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


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


def auc_from_scores(member_scores, nonmember_scores):
    """ROC AUC of telling members (label 1) from non-members (label 0) by score: the Mann-Whitney
    U statistic over n1 * n0 (midranks for ties, so a tie counts one half, as in
    `sklearn.metrics.roc_auc_score`). Along the last axis, so a batch of resamples is one call;
    a float for 1-D inputs."""
    import numpy as np
    from scipy.stats import rankdata

    member, nonmember = np.asarray(member_scores, dtype=np.float64), np.asarray(nonmember_scores, dtype=np.float64)
    n1, n0 = member.shape[-1], nonmember.shape[-1]
    if n1 == 0 or n0 == 0:
        raise ValueError("auc_from_scores: need at least one member and one non-member score")
    ranks = rankdata(np.concatenate([member, nonmember], axis=-1), axis=-1)
    auc = (ranks[..., :n1].sum(axis=-1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    return float(auc) if auc.ndim == 0 else auc


def mia_auc(model, tokenizer, forget_texts: list[str], holdout_texts: list[str], *, k: float = MIN_K,
            batch_size: int = 16, max_tokens: int | None = None) -> float:
    """AUC of the Min-K% Prob attack separating forget (members) from holdout texts."""
    scores = min_k_scores(model, tokenizer, list(forget_texts) + list(holdout_texts), k=k,
                          batch_size=batch_size, max_tokens=max_tokens)
    return auc_from_scores(scores[: len(forget_texts)], scores[len(forget_texts) :])


def auc_interval(member_scores: list[float], nonmember_scores: list[float]) -> list[float] | None:
    """The bootstrap interval of `auc_from_scores` (members and non-members resampled separately)."""
    import numpy as np

    member, nonmember = np.asarray(member_scores), np.asarray(nonmember_scores)
    return bootstrap_interval(lambda f, h: auc_from_scores(member[f], nonmember[h]), len(member), len(nonmember))


def mia_auc_metrics(member_scores: list[float], nonmember_scores: list[float]) -> dict:
    """{"mia_auc": the AUC, "mia_auc_ci": its bootstrap interval (with two or more of each)}."""
    metrics: dict = {"mia_auc": auc_from_scores(member_scores, nonmember_scores)}
    if (interval := auc_interval(member_scores, nonmember_scores)) is not None:
        metrics[f"mia_auc{CI}"] = interval
    return metrics


def privleak_interval(scores: tuple[list[float], list[float]],
                      retrain_scores: tuple[list[float], list[float]]) -> list[float] | None:
    """The bootstrap interval of PrivLeak from both models' Min-K% scores (forget, holdout) of the
    same texts: each resample scores the model and the retrain model on the same texts."""
    import numpy as np

    (f, h), (rf, rh) = (tuple(np.asarray(x) for x in pair) for pair in (scores, retrain_scores))
    if (len(f), len(h)) != (len(rf), len(rh)):
        raise ValueError(f"privleak_interval: the models were scored on different texts "
                         f"({len(f)}/{len(h)} vs {len(rf)}/{len(rh)})")

    def leak(fi, hi):
        reference = np.asarray(auc_from_scores(rf[fi], rh[hi]))
        auc = np.asarray(auc_from_scores(f[fi], h[hi]))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(reference > 0, (auc - reference) / reference * 100.0, np.nan)

    return bootstrap_interval(leak, len(f), len(h))


def privleak(auc: float, retrain_auc: float) -> float:
    """MUSE's PrivLeak: (auc - retrain_auc) / retrain_auc * 100; 0 is ideal, > 0 leaks."""
    if not retrain_auc > 0:
        raise ValueError(f"privleak: retrain AUC must be > 0, got {retrain_auc}")
    return (auc - retrain_auc) / retrain_auc * 100.0


def add_privleak(metrics: dict, retrain_auc: float | None, scores: tuple[list[float], list[float]] | None = None,
                 retrain_scores: tuple[list[float], list[float]] | None = None) -> list[str]:
    """Add `privleak` (and `privleak_ci`) to the `metrics` of a model that has a `mia_auc`, relative
    to the retrain model's AUC. The interval is paired (`privleak_interval`) when both models'
    Min-K% scores (forget, holdout) are given; else, from `mia_auc_ci` against the given AUC, it
    covers the model's own sampling error only. Returns the notes the report should carry."""
    if "mia_auc" not in metrics or retrain_auc is None:
        return []
    if not retrain_auc > 0:
        return ["the retrain model's MIA AUC is 0: privleak is undefined"]
    metrics["privleak"] = privleak(metrics["mia_auc"], retrain_auc)
    notes, interval = [], None
    if scores is not None and retrain_scores is not None:
        interval = privleak_interval(scores, retrain_scores)
    elif f"mia_auc{CI}" in metrics:
        interval = [privleak(a, retrain_auc) for a in metrics[f"mia_auc{CI}"]]
        notes.append(f"privleak{CI}: from mia_auc{CI} against the given retrain AUC (its own uncertainty "
                     "is not included)")
    if interval is not None:
        metrics[f"privleak{CI}"] = interval
    return notes
