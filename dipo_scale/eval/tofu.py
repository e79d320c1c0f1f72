"""TOFU (Maini et al. 2024; the formulas of `locuslab/tofu` `evaluate_util.py` and
`aggregate_eval_stat.py`), on the prompt ``"Question: {q}\\nAnswer: "`` (TOFU's tags for non-chat
models, `dipo_scale.data.prompts.tofu_prompt`). P(a|q) is length-normalised: exp(mean log-prob of
a's tokens).

- truth ratio R = (prod_i P(perturbed_i|q))^(1/m) / P(paraphrased|q) over the m perturbed answers
  (real authors / world facts: the answer itself instead of a paraphrase);
- forget quality = p-value of `scipy.stats.ks_2samp` between the forget-set truth ratios of the
  unlearned model and of a retain model (TOFU tests 1/R; the KS test is invariant to that
  monotone map);
- model utility = `scipy.stats.hmean` of nine scores, {probability, ROUGE-L recall, truth-ratio
  score} x {retain, real authors, world facts}: probability = mean P(answer|q) on retain, and
  mean P(answer|q) / (P(answer|q) + sum_i P(perturbed_i|q)) on real authors / world facts;
  ROUGE-L recall (stemmed, as TOFU) of the greedy answer; truth-ratio score = mean(max(0, 1 - R)).
  On the forget set the reported truth ratio is mean(min(R, 1/R)).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from rouge_score import rouge_scorer

from dipo_scale.data.prompts import tofu_prompt
from dipo_scale.eval.generation import criterion, greedy_generate, limited, qa_logprobs, qa_token_logprobs
from dipo_scale.eval.privacy import (CI, MIN_K, auc_from_scores, bootstrap_interval, mia_auc_metrics,
                                     min_k_from_lists)

_TOFU_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)  # as locuslab/tofu


@dataclass
class TofuSplitStats:
    """Per-question statistics of one TOFU split under one model."""

    answer_logprob: np.ndarray  # length-normalised log P(answer | q)
    base_logprob: np.ndarray  # of the paraphrased answer (forget/retain) or the answer (real/world)
    perturbed_logprob: list[np.ndarray]  # per question, of each perturbed answer
    rouge_recall: np.ndarray | None  # ROUGE-L recall of the greedy answer (None: not generated)

    @property
    def truth_ratios(self) -> np.ndarray:
        return truth_ratios(self.base_logprob, self.perturbed_logprob)


def truth_ratios(base_logprob: Sequence[float], perturbed_logprob: Sequence[Sequence[float]]) -> np.ndarray:
    """TOFU's truth ratio per question from length-normalised log-probs: the geometric mean over
    the perturbed answers of P(perturbed|q)^(1/len), over P(paraphrased|q)^(1/len)."""
    base = np.asarray(base_logprob, dtype=np.float64)
    pert = np.array([np.mean(np.asarray(p, dtype=np.float64)) for p in perturbed_logprob])
    return np.exp(pert - base)


def tofu_probability(answer_logprob: Sequence[float], perturbed_logprob: Sequence[Sequence[float]] | None = None) -> float:
    """TOFU's "Prob.": mean P(answer|q)^(1/len) (retain); with `perturbed_logprob` (real authors /
    world facts) the mean of P(answer) / (P(answer) + sum P(perturbed)), all length-normalised."""
    p_true = np.exp(np.asarray(answer_logprob, dtype=np.float64))
    if perturbed_logprob is None:
        return float(np.mean(p_true))
    p_false = np.array([np.exp(np.asarray(p, dtype=np.float64)).sum() for p in perturbed_logprob])
    return float(np.mean(p_true / (p_true + p_false)))


def truth_ratio_score(ratios: Sequence[float], *, forget: bool = False) -> float:
    """TOFU's "Truth Ratio" statistic: mean(max(0, 1 - R)) on retain / real authors / world facts,
    mean(min(R, 1/R)) on the forget set (locuslab/tofu aggregate_eval_stat.py)."""
    r = np.asarray(ratios, dtype=np.float64)
    if forget:
        return float(np.mean(np.minimum(r, 1.0 / r)))
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


def forget_quality(unlearned_ratios: Sequence[float], retain_ratios: Sequence[float]) -> float:
    """TOFU's forget quality: the p-value of the two-sample KS test between the forget-set truth
    ratios of the unlearned model and those of the retain model."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(np.asarray(unlearned_ratios, dtype=np.float64),
                          np.asarray(retain_ratios, dtype=np.float64)).pvalue)


def forget_quality_interval(unlearned_ratios: Sequence[float], retain_ratios: Sequence[float]) -> list[float] | None:
    """The bootstrap 95 % interval of `forget_quality`: the forget items resampled, the same items
    for both models when both have one ratio per item (else each side on its own)."""
    a, b = np.asarray(unlearned_ratios, dtype=np.float64), np.asarray(retain_ratios, dtype=np.float64)
    from scipy.stats import ks_2samp

    if len(a) == len(b):
        return bootstrap_interval(lambda i: ks_2samp(a[i], b[i], axis=-1).pvalue, len(a))
    return bootstrap_interval(lambda i, j: ks_2samp(a[i], b[j], axis=-1).pvalue, len(a), len(b))


def model_utility(scores: Sequence[float]) -> float:
    """TOFU's model utility: the harmonic mean of its (nine) component scores."""
    from scipy.stats import hmean

    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0 or (values < 0).any():
        raise ValueError("model_utility: needs non-negative scores")
    return float(hmean(values))


TOFU_SPLITS = ("forget", "retain", "real_authors", "world_facts", "holdout")


def has_references(item) -> bool:
    """A TOFU item can be scored: its answer, its paraphrased answer (where the split has them) and
    every perturbed answer hold text (an empty answer has no token to score, and ROUGE against
    nothing is 0, which reads as perfect forgetting)."""
    paraphrased = item.paraphrased_answer
    return (bool(item.answer.strip()) and (paraphrased is None or bool(paraphrased.strip()))
            and all(p.strip() for p in item.perturbed_answers))


def without_blank_references(data) -> tuple[object, list[tuple[str, str, int, int]], list[int]]:
    """`data` (a `TofuData`) less the items `has_references` refuses; per split that held such items
    (split, its TofuData field, left out, of); and the indices of the forget items kept."""
    changes, dropped = {}, []
    kept_forget = list(range(len(data.forget)))
    for name in TOFU_SPLITS:
        items = getattr(data, name)
        if not items:
            continue
        keep = [i for i, it in enumerate(items) if has_references(it)]
        if len(keep) < len(items):
            changes[name] = [items[i] for i in keep]
            dropped.append((data.forget_name if name == "forget" else name, name, len(items) - len(keep), len(items)))
            if name == "forget":
                kept_forget = keep
    return (replace(data, **changes) if changes else data), dropped, kept_forget


def tofu_split_stats(model, tokenizer, items, *, base: str = "paraphrased", batch_size: int = 16,
                     max_new_tokens: int | None = 128) -> TofuSplitStats:
    """Log-probs (one batched pass over every answer variant) and, unless `max_new_tokens` is
    None, ROUGE-L recall of the greedy zero-shot answers. `base`: "paraphrased" or "answer"."""
    if base not in ("paraphrased", "answer"):
        raise ValueError(f"tofu_split_stats: base must be 'paraphrased' or 'answer', got {base!r}")
    pairs = [(it.question, it.answer) for it in items]
    if base == "paraphrased":
        pairs += [(it.question, it.paraphrased_answer) for it in items]
    pert_counts = [len(it.perturbed_answers) for it in items]
    pairs += [(it.question, p) for it in items for p in it.perturbed_answers]
    lps = np.asarray(qa_logprobs(model, tokenizer, pairs, batch_size=batch_size), dtype=np.float64)
    n = len(items)
    answer_lp = lps[:n]
    base_lp = lps[n : 2 * n] if base == "paraphrased" else answer_lp
    rest = lps[2 * n :] if base == "paraphrased" else lps[n:]
    bounds = np.cumsum([0] + pert_counts)
    perturbed = [rest[bounds[i] : bounds[i + 1]] for i in range(n)]
    rouge = None
    if max_new_tokens is not None:
        outputs = greedy_generate(model, tokenizer, [tofu_prompt(it.question) for it in items],
                                  max_new_tokens=max_new_tokens, batch_size=batch_size)
        rouge = np.array([_TOFU_SCORER.score(target=it.answer, prediction=out.strip())["rougeL"].recall
                          for it, out in zip(items, outputs)])
    return TofuSplitStats(answer_lp, base_lp, perturbed, rouge)


def tofu_forget_truth_ratios(model, tokenizer, data, *, batch_size: int = 16,
                             limit: int | None = None) -> list[float]:
    """The forget-set truth ratios of `model` (e.g. the retain model, for forget quality)."""
    with criterion("forget_truth_ratio"):
        stats = tofu_split_stats(model, tokenizer, limited(data.forget, limit), base="paraphrased",
                                 batch_size=batch_size, max_new_tokens=None)
    return stats.truth_ratios.tolist()


UTILITY_SPLITS = (("retain", "paraphrased"), ("real_authors", "answer"), ("world_facts", "answer"))


@dataclass
class TofuResult:
    metrics: dict[str, float | list[float]]  # `<name>_ci`: [low, high] bootstrap 95 % intervals
    forget_truth_ratios: list[float]
    mia_scores: tuple[list[float], list[float]] | None = None  # Min-K% of forget / holdout (with holdout)


def evaluate_tofu(
    model,
    tokenizer,
    data,
    *,
    retain_truth_ratios: Sequence[float] | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    max_new_tokens: int = 128,
    k: float = MIN_K,
) -> TofuResult:
    """TOFU metrics of `model` on `data` (a `dipo_scale.data.tofu.TofuData`).

    metrics: knowmem_f / knowmem_r (ROUGE-L recall x100 of the greedy answers on forget / retain),
    forget_prob, forget_truth_ratio (mean min(R, 1/R)), forget_quality (with
    `retain_truth_ratios`), mia_auc (Min-K% on the answer tokens, forget vs holdoutXX, when
    present), and with retain + real authors + world facts the nine utility components
    (prob_*, rouge_*, truth_ratio_* on a 0..1 scale) and model_utility. forget_quality and mia_auc
    come with bootstrap 95 % intervals (forget_quality_ci, mia_auc_ci). `limit` caps each split
    (TOFU's `ds_size` is 300).
    """
    metrics: dict = {}
    with criterion("forget"):
        forget = tofu_split_stats(model, tokenizer, limited(data.forget, limit), base="paraphrased",
                                  batch_size=batch_size, max_new_tokens=max_new_tokens)
    ratios = forget.truth_ratios
    metrics["knowmem_f"] = 100.0 * float(np.mean(forget.rouge_recall))
    metrics["forget_prob"] = tofu_probability(forget.answer_logprob)
    metrics["forget_truth_ratio"] = truth_ratio_score(ratios, forget=True)
    if retain_truth_ratios is not None:
        metrics["forget_quality"] = forget_quality(ratios, retain_truth_ratios)
        if (interval := forget_quality_interval(ratios, retain_truth_ratios)) is not None:
            metrics[f"forget_quality{CI}"] = interval

    components: dict[str, float] = {}
    for name, base in UTILITY_SPLITS:
        items = getattr(data, name)
        if items is None:
            continue
        with criterion(name):
            stats = tofu_split_stats(model, tokenizer, limited(items, limit), base=base,
                                     batch_size=batch_size, max_new_tokens=max_new_tokens)
        components[f"prob_{name}"] = tofu_probability(
            stats.answer_logprob, None if name == "retain" else stats.perturbed_logprob)
        components[f"rouge_{name}"] = float(np.mean(stats.rouge_recall))
        components[f"truth_ratio_{name}"] = truth_ratio_score(stats.truth_ratios)
        if name == "retain":
            metrics["knowmem_r"] = 100.0 * components["rouge_retain"]
    if len(components) == 3 * len(UTILITY_SPLITS):
        metrics["model_utility"] = model_utility(list(components.values()))
    metrics.update(components)

    mia_scores = tofu_mia_scores(model, tokenizer, data, k=k, batch_size=batch_size, limit=limit)
    if mia_scores is not None:
        metrics.update(mia_auc_metrics(*mia_scores))
    return TofuResult(metrics, ratios.tolist(), mia_scores)


def tofu_mia_scores(model, tokenizer, data, *, k: float = MIN_K, batch_size: int = 16,
                    limit: int | None = None) -> tuple[list[float], list[float]] | None:
    """Min-K% Prob of the answer tokens (given the question) of the forget and the holdoutXX pairs;
    None without a holdout split."""
    if not data.holdout:
        return None
    forget = [(it.question, it.answer) for it in limited(data.forget, limit)]
    holdout = [(it.question, it.answer) for it in limited(data.holdout, limit)]
    with criterion("mia_auc"):
        scores = min_k_from_lists(qa_token_logprobs(model, tokenizer, forget + holdout, batch_size=batch_size), k)
    return scores[: len(forget)], scores[len(forget) :]


def tofu_mia_auc(model, tokenizer, data, *, k: float = MIN_K, batch_size: int = 16,
                 limit: int | None = None) -> float | None:
    """Min-K% Prob AUC on the answer tokens (given the question): forget vs holdoutXX."""
    scores = tofu_mia_scores(model, tokenizer, data, k=k, batch_size=batch_size, limit=limit)
    return None if scores is None else auc_from_scores(*scores)
