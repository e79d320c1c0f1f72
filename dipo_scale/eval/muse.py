"""MUSE's criteria: VerbMem and KnowMem (and the data's Min-K% attack texts).

* **VerbMem** (forget set): greedy continuation of each verbatim prompt for `max_new_tokens`
  tokens, scored with ROUGE-L **F1** against the ground truth cut to its first `max_new_tokens`
  tokens. Mean over items, x100.
* **KnowMem** (forget and retain QA): the few-shot prompt of `dipo_scale.data.prompts.knowmem_prompt`;
  greedy for `max_new_tokens` (32) tokens; the output is cut at the first blank line or "Question"
  and scored with ROUGE-L **recall** of the reference answer. Mean over items, x100.

VerbMem uses F1 and KnowMem uses recall, as MUSE does. ROUGE comes from `rouge_score`
(``RougeScorer(["rougeL"])``, no stemming).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Sequence

import numpy as np
from rouge_score import rouge_scorer

from dipo_scale.data.muse import QA, MuseData, VerbMemItem
from dipo_scale.data.prompts import knowmem_prompt
from dipo_scale.eval.generation import criterion, greedy_generate, limited, num_batches
from dipo_scale.eval.privacy import MIN_K, mia_auc, mia_auc_metrics, min_k_scores

_SCORER = rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(prediction: str, reference: str) -> tuple[float, float]:
    """ROUGE-L of `prediction` against `reference`, as (recall, f1) in [0, 1]."""
    score = _SCORER.score(target=reference, prediction=prediction)["rougeL"]
    return score.recall, score.fmeasure


def cut_answer(text: str) -> str:
    """The generated answer up to the first blank line or "Question", stripped."""
    end = len(text)
    for marker in ("\n\n", "Question"):
        at = text.find(marker)
        if at != -1:
            end = min(end, at)
    return text[:end].strip()


def _mean_percent(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values)


# --- VerbMem and KnowMem: per item ---------------------------------------------------------------
def verbmem_items(model, tokenizer, items: list[VerbMemItem], *, max_new_tokens: int = 128, batch_size: int = 16,
                  batches: int | None = None, synced: bool = False) -> dict[str, list]:
    """{"outputs": the greedy continuations, "scores": their ROUGE-L F1 (0..1) vs the truth cut to
    `max_new_tokens` tokens}, per item. `batches`, `synced`: see `greedy_generate`."""
    outputs = greedy_generate(model, tokenizer, [it.prompt for it in items], max_new_tokens=max_new_tokens,
                              batch_size=batch_size, batches=batches, synced=synced)
    scores = []
    for item, output in zip(items, outputs):
        gt_ids = tokenizer(item.gt, add_special_tokens=False)["input_ids"][:max_new_tokens]
        gt = tokenizer.decode(gt_ids, skip_special_tokens=True)
        scores.append(rouge_l(output, gt)[1])
    return {"outputs": outputs, "scores": scores}


def knowmem_items(model, tokenizer, qa: list[QA], icl: list[QA], *, max_new_tokens: int = 32,
                  batch_size: int = 16, batches: int | None = None, synced: bool = False) -> dict[str, list]:
    """{"outputs": the generated answers (before cutting), "scores": ROUGE-L recall (0..1) of the
    cut answer vs the reference}, per question."""
    outputs = greedy_generate(model, tokenizer, [knowmem_prompt(icl, ex.question) for ex in qa],
                              max_new_tokens=max_new_tokens, batch_size=batch_size, batches=batches, synced=synced)
    return {"outputs": outputs, "scores": [rouge_l(cut_answer(out), ex.answer)[0] for ex, out in zip(qa, outputs)]}


def verbmem_scores(model, tokenizer, items: list[VerbMemItem], *, max_new_tokens: int = 128,
                   batch_size: int = 16) -> list[float]:
    """Per-item ROUGE-L F1 (0..1) of the greedy continuation vs the truth cut to `max_new_tokens`."""
    return verbmem_items(model, tokenizer, items, max_new_tokens=max_new_tokens, batch_size=batch_size)["scores"]


def knowmem_scores(model, tokenizer, qa: list[QA], icl: list[QA], *, max_new_tokens: int = 32,
                   batch_size: int = 16) -> list[float]:
    """Per-question ROUGE-L recall (0..1) of the cut few-shot answer vs the reference."""
    return knowmem_items(model, tokenizer, qa, icl, max_new_tokens=max_new_tokens, batch_size=batch_size)["scores"]


def verbmem(
    model,
    tokenizer,
    items: list[VerbMemItem],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    limit: int | None = None,
) -> float:
    """VerbMem: mean ROUGE-L F1 (x100) of greedy continuations vs the truncated truth."""
    items = limited(items, limit)
    if not items:
        raise ValueError("verbmem: no items to evaluate")
    return _mean_percent(verbmem_scores(model, tokenizer, items, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size))


def knowmem(
    model,
    tokenizer,
    qa: list[QA],
    icl: list[QA],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    limit: int | None = None,
) -> float:
    """KnowMem: mean ROUGE-L recall (x100) of the few-shot answers vs the references."""
    qa = limited(qa, limit)
    if not qa:
        raise ValueError("knowmem: no questions to evaluate")
    return _mean_percent(knowmem_scores(model, tokenizer, qa, icl, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size))


# --- items without a reference -------------------------------------------------------------------
# (metric, MuseData list, the item's reference field; None: the item is the text itself)
REFERENCED_LISTS = (("verbmem_f", "verbmem", "gt"), ("knowmem_f", "forget_qa", "answer"),
                    ("knowmem_r", "retain_qa", "answer"), ("mia_auc", "privleak_forget", None),
                    ("mia_auc", "privleak_holdout", None))


def without_blank_references(data: MuseData) -> tuple[MuseData, list[tuple[str, str, int, int]]]:
    """`data` less the items whose reference is empty or whitespace: a VerbMem `gt` or a QA `answer`
    (ROUGE against nothing is 0, which reads as perfect forgetting), a privleak text (no token to
    score). Returns it and, per list that held such items, (metric, list, left out, of)."""
    changes, dropped = {}, []
    for metric, name, field in REFERENCED_LISTS:
        items = getattr(data, name)
        kept = [it for it in items if (getattr(it, field) if field else it).strip()]
        if len(kept) < len(items):
            changes[name] = kept
            dropped.append((metric, name, len(items) - len(kept), len(items)))
    return (replace(data, **changes) if changes else data), dropped


def muse_mia_texts(data: MuseData) -> tuple[list[str], list[str]]:
    """The forget / holdout texts of the attack: privleak/*.json, else the raw documents."""
    return (data.privleak_forget or data.forget_docs, data.privleak_holdout or data.holdout_docs)


def mia_pair(item_scores: dict) -> tuple[list[float], list[float]] | None:
    """The (forget, holdout) Min-K% scores of `score_muse_items`'s results; None without both."""
    forget, holdout = item_scores["mia"]["forget"], item_scores["mia"]["holdout"]
    return (forget, holdout) if forget and holdout else None


# --- a MUSE evaluation as items: shares, per-item scores, metrics ---------------------------------
@dataclass
class MuseItems:
    """What one MUSE evaluation scores. The evaluation of a share of it (a rank's, an actor's)
    gives per-item results that, concatenated in share order, are those of the whole."""

    verbmem: list[VerbMemItem]
    forget_qa: list[QA]
    retain_qa: list[QA]
    forget_qa_icl: list[QA]
    retain_qa_icl: list[QA]
    mia_forget: list[str]
    mia_holdout: list[str]

    SHARDED: ClassVar[tuple[str, ...]] = ("verbmem", "forget_qa", "retain_qa", "mia_forget", "mia_holdout")

    def share(self, index: int, count: int) -> MuseItems:
        """Share `index` of `count`: a contiguous part of each item list (the few-shot examples whole)."""
        return replace(self, **{key: shard(getattr(self, key), count)[index] for key in self.SHARDED})

    def batches(self, count: int, batch_size: int) -> dict[str, int]:
        """Batches per criterion that the largest of `count` shares needs: what every share runs
        when the shares are evaluated in step (the ranks of a sharded model)."""
        shares = [self.share(i, count) for i in range(count)]
        return {"verbmem_f": max(num_batches(len(s.verbmem), batch_size) for s in shares),
                "knowmem_f": max(num_batches(len(s.forget_qa), batch_size) for s in shares),
                "knowmem_r": max(num_batches(len(s.retain_qa), batch_size) for s in shares),
                "mia": max(num_batches(len(s.mia_forget) + len(s.mia_holdout), batch_size) for s in shares)}


def shard(items: Sequence, num_shards: int) -> list[list]:
    """`items` cut into `num_shards` contiguous parts of near-equal size (in order)."""
    bounds = np.linspace(0, len(items), num_shards + 1).round().astype(int)
    return [list(items[bounds[i] : bounds[i + 1]]) for i in range(num_shards)]


def muse_items(data: MuseData, *, limit: int | None = None, mia: bool = True, mia_only: bool = False) -> MuseItems:
    """The items of `data` an evaluation scores: the first `limit` of each list; the attack texts
    (with `mia`, when the data has both forget and holdout texts). `mia_only`: the attack texts
    alone."""
    forget_texts, holdout_texts = muse_mia_texts(data) if mia or mia_only else ([], [])
    if not forget_texts or not holdout_texts:
        forget_texts = holdout_texts = []
    items = MuseItems(limited(data.verbmem, limit), limited(data.forget_qa, limit), limited(data.retain_qa, limit),
                      list(data.forget_qa_icl), list(data.retain_qa_icl), limited(forget_texts, limit),
                      limited(holdout_texts, limit))
    if mia_only:
        return replace(items, verbmem=[], forget_qa=[], retain_qa=[])
    if not items.verbmem:
        raise ValueError("verbmem: no items to evaluate")
    if not items.forget_qa or not items.retain_qa:
        raise ValueError("knowmem: no questions to evaluate")
    return items


def score_muse_items(model, tokenizer, items: MuseItems, *, verbmem_max_new_tokens: int = 128,
                     knowmem_max_new_tokens: int = 32, batch_size: int = 16, k: float = MIN_K,
                     batches: dict[str, int] | None = None, synced: bool = False) -> dict[str, dict[str, list]]:
    """Per-item results of `items`: {"verbmem_f" / "knowmem_f" / "knowmem_r": {"outputs", "scores"},
    "mia": {"forget", "holdout"} (Min-K% scores)}. `batches` (from `MuseItems.batches`) and
    `synced`: the shares of a sharded model, evaluated in step."""
    batches = batches or {}
    out = {}
    with criterion("verbmem_f"):
        out["verbmem_f"] = verbmem_items(model, tokenizer, items.verbmem, max_new_tokens=verbmem_max_new_tokens,
                                         batch_size=batch_size, batches=batches.get("verbmem_f"), synced=synced)
    for key, qa, icl in (("knowmem_f", items.forget_qa, items.forget_qa_icl),
                         ("knowmem_r", items.retain_qa, items.retain_qa_icl)):
        with criterion(key):
            out[key] = knowmem_items(model, tokenizer, qa, icl, max_new_tokens=knowmem_max_new_tokens,
                                     batch_size=batch_size, batches=batches.get(key), synced=synced)
    with criterion("mia_auc"):
        texts = items.mia_forget + items.mia_holdout
        scores = min_k_scores(model, tokenizer, texts, k=k, batch_size=batch_size,
                              batches=batches.get("mia")) if texts or batches.get("mia") else []
    out["mia"] = {"forget": scores[: len(items.mia_forget)], "holdout": scores[len(items.mia_forget):]}
    return out


def merge_item_scores(parts: list[dict]) -> dict[str, dict[str, list]]:
    """The per-item results of consecutive shares, concatenated: those of the whole."""
    return {key: {field: [v for part in parts for v in part[key][field]] for field in parts[0][key]}
            for key in parts[0]}


def muse_metrics(scores: dict[str, dict[str, list]]) -> dict[str, float | list[float]]:
    """verbmem_f, knowmem_f, knowmem_r (mean x100) and, with attack scores, mia_auc and its bootstrap
    95 % interval mia_auc_ci ([low, high]; with at least two texts on each side)."""
    metrics: dict = {key: _mean_percent(scores[key]["scores"]) for key in ("verbmem_f", "knowmem_f", "knowmem_r")}
    if (pair := mia_pair(scores)) is not None:
        metrics.update(mia_auc_metrics(*pair))
    return metrics


def evaluate_muse(
    model,
    tokenizer,
    data: MuseData,
    *,
    verbmem_max_new_tokens: int = 128,
    knowmem_max_new_tokens: int = 32,
    batch_size: int = 16,
    limit: int | None = None,
    mia: bool = False,
    k: float = MIN_K,
) -> dict[str, float]:
    """VerbMem on forget and KnowMem on forget/retain, each on a 0..100 scale; with `mia`, also
    `mia_auc` (when the data has holdout texts). `limit` caps every item list."""
    scores = score_muse_items(model, tokenizer, muse_items(data, limit=limit, mia=mia), k=k, batch_size=batch_size,
                              verbmem_max_new_tokens=verbmem_max_new_tokens,
                              knowmem_max_new_tokens=knowmem_max_new_tokens)
    return muse_metrics(scores)


def muse_mia_auc(model, tokenizer, data: MuseData, *, k: float = MIN_K, batch_size: int = 16,
                 limit: int | None = None) -> float | None:
    """`mia_auc` on the data's forget / holdout texts; None without holdout texts."""
    forget_texts, holdout_texts = muse_mia_texts(data)
    if not forget_texts or not holdout_texts:
        return None
    with criterion("mia_auc"):
        return mia_auc(model, tokenizer, limited(forget_texts, limit), limited(holdout_texts, limit),
                       k=k, batch_size=batch_size)
