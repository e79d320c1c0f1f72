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

from rouge_score import rouge_scorer

from dipo_scale.data.muse import QA, MuseData, VerbMemItem
from dipo_scale.data.prompts import knowmem_prompt
from dipo_scale.eval.generation import criterion, greedy_generate, limited
from dipo_scale.eval.privacy import MIN_K, mia_auc

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


# --- MUSE: VerbMem and KnowMem ----------------------------------------------------------------
def verbmem_scores(model, tokenizer, items: list[VerbMemItem], *, max_new_tokens: int = 128,
                   batch_size: int = 16) -> list[float]:
    """Per-item ROUGE-L F1 (0..1) of the greedy continuation vs the truth cut to `max_new_tokens`."""
    if not items:
        return []
    outputs = greedy_generate(
        model, tokenizer, [it.prompt for it in items],
        max_new_tokens=max_new_tokens, batch_size=batch_size,
    )
    scores = []
    for item, output in zip(items, outputs):
        gt_ids = tokenizer(item.gt, add_special_tokens=False)["input_ids"][:max_new_tokens]
        gt = tokenizer.decode(gt_ids, skip_special_tokens=True)
        scores.append(rouge_l(output, gt)[1])
    return scores


def knowmem_scores(model, tokenizer, qa: list[QA], icl: list[QA], *, max_new_tokens: int = 32,
                   batch_size: int = 16) -> list[float]:
    """Per-question ROUGE-L recall (0..1) of the cut few-shot answer vs the reference."""
    if not qa:
        return []
    outputs = greedy_generate(
        model, tokenizer, [knowmem_prompt(icl, ex.question) for ex in qa],
        max_new_tokens=max_new_tokens, batch_size=batch_size,
    )
    return [rouge_l(cut_answer(out), ex.answer)[0] for ex, out in zip(qa, outputs)]


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

def muse_mia_texts(data: MuseData) -> tuple[list[str], list[str]]:
    """The forget / holdout texts of the attack: privleak/*.json, else the raw documents."""
    return (data.privleak_forget or data.forget_docs, data.privleak_holdout or data.holdout_docs)


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
    scores = {}
    with criterion("verbmem_f"):
        scores["verbmem_f"] = verbmem(model, tokenizer, data.verbmem, max_new_tokens=verbmem_max_new_tokens,
                                      batch_size=batch_size, limit=limit)
    for key, qa, icl in (("knowmem_f", data.forget_qa, data.forget_qa_icl),
                         ("knowmem_r", data.retain_qa, data.retain_qa_icl)):
        with criterion(key):
            scores[key] = knowmem(model, tokenizer, qa, icl, max_new_tokens=knowmem_max_new_tokens,
                                  batch_size=batch_size, limit=limit)
    if mia:
        auc = muse_mia_auc(model, tokenizer, data, k=k, batch_size=batch_size, limit=limit)
        if auc is not None:
            scores["mia_auc"] = auc
    return scores


def muse_mia_auc(model, tokenizer, data: MuseData, *, k: float = MIN_K, batch_size: int = 16,
                 limit: int | None = None) -> float | None:
    """`mia_auc` on the data's forget / holdout texts; None without holdout texts."""
    forget_texts, holdout_texts = muse_mia_texts(data)
    if not forget_texts or not holdout_texts:
        return None
    with criterion("mia_auc"):
        return mia_auc(model, tokenizer, limited(forget_texts, limit), limited(holdout_texts, limit),
                       k=k, batch_size=batch_size)
