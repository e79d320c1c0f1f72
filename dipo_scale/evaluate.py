"""Evaluation: MUSE's criteria (VerbMem, KnowMem, PrivLeak) and TOFU's two numbers.

* **VerbMem** (forget set): greedy continuation of each verbatim prompt for
  `max_new_tokens` tokens, scored with ROUGE-L **F1** against the ground truth
  cut to its first `max_new_tokens` tokens. Mean over items, x100.
* **KnowMem** (forget and retain QA): a few-shot prompt
  ``"Question: {q}\\nAnswer: {a}\\n\\n"`` per in-context example, then
  ``"Question: {q}\\nAnswer: "``; greedy for `max_new_tokens` (32) tokens; the
  output is cut at the first blank line or "Question" and scored with ROUGE-L
  **recall** of the reference answer. Mean over items, x100.
* **PrivLeak** (MUSE): the Min-K% Prob membership score (Shi et al. 2024, "Detecting
  Pretraining Data from Large Language Models"; MUSE uses K = 40%, its
  `privleak_auc_key = "forget_holdout_Min-40%"`): the mean of the lowest
  ``floor(K * n)`` (at least one) token log-probabilities of a text's n scored tokens; higher
  means "more likely a member". `mia_auc` is the ROC AUC (`sklearn.metrics.roc_auc_score`) of
  telling forget texts (label 1) from holdout texts (label 0) by that score, and
  ``privleak = (auc - retrain_auc) / retrain_auc * 100`` as in MUSE's `eval.py` (0 is ideal).
* **TOFU** (Maini et al. 2024; the formulas of `locuslab/tofu` `evaluate_util.py` and
  `aggregate_eval_stat.py`), on the prompt ``"Question: {q}\\nAnswer: "`` (TOFU's tags for
  non-chat models). P(a|q) is length-normalised: exp(mean log-prob of a's tokens).

  - truth ratio R = (prod_i P(perturbed_i|q))^(1/m) / P(paraphrased|q) over the m perturbed
    answers (real authors / world facts: the answer itself instead of a paraphrase);
  - forget quality = p-value of `scipy.stats.ks_2samp` between the forget-set truth ratios of
    the unlearned model and of a retain model (TOFU tests 1/R; the KS test is invariant to that
    monotone map);
  - model utility = `scipy.stats.hmean` of nine scores, {probability, ROUGE-L recall, truth-ratio
    score} x {retain, real authors, world facts}: probability = mean P(answer|q) on retain, and
    mean P(answer|q) / (P(answer|q) + sum_i P(perturbed_i|q)) on real authors / world facts;
    ROUGE-L recall (stemmed, as TOFU) of the greedy answer; truth-ratio score =
    mean(max(0, 1 - R)). On the forget set the reported truth ratio is mean(min(R, 1/R)).

VerbMem uses F1 and KnowMem uses recall, as MUSE does. ROUGE comes from
`rouge_score` (``RougeScorer(["rougeL"])``, no stemming, for MUSE; stemming for TOFU).

Progress: every batched loop (generation, log-probs) prints `eval <criterion> (<loop>): items
done/total, rate, ETA` lines on stdout (`dipo_scale.progress`) and a final line per criterion.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from rouge_score import rouge_scorer
from transformers import AutoModelForCausalLM, AutoTokenizer

from dipo_scale.data.muse import QA, MuseData, VerbMemItem
from dipo_scale.errors import UserInputError
from dipo_scale.progress import Progress

_SCORER = rouge_scorer.RougeScorer(["rougeL"])
_TOFU_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)  # as locuslab/tofu
MIN_K = 0.4  # MUSE's privleak key "forget_holdout_Min-40%"


_CRITERION: ContextVar[str | None] = ContextVar("criterion", default=None)


@contextmanager
def _criterion(name: str):
    """Label the progress lines of the batched loops run inside with the criterion they compute."""
    token = _CRITERION.set(name)
    try:
        yield
    finally:
        _CRITERION.reset(token)


def _progress(loop: str, total: int) -> Progress:
    """The progress of one batched loop over `total` items."""
    return Progress(f"eval {_CRITERION.get() or 'items'} ({loop})", total=total, unit="items")


def rouge_l(prediction: str, reference: str) -> tuple[float, float]:
    """ROUGE-L of `prediction` against `reference`, as (recall, f1) in [0, 1]."""
    score = _SCORER.score(target=reference, prediction=prediction)["rougeL"]
    return score.recall, score.fmeasure


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, with the BOS id first when the tokenizer has one.

    The BOS is prepended explicitly because tokenizers built from a bare BPE
    (e.g. `PreTrainedTokenizerFast(tokenizer_object=...)`) add no special tokens.
    """
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def greedy_generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    max_prompt_tokens: int | None = None,
) -> list[str]:
    """Greedy continuations of `prompts` (new text only, special tokens dropped).

    Prompts are sorted by length, batched with left padding and an attention
    mask, and the outputs are returned in input order; the result equals
    generating each prompt alone. Prompts longer than
    ``config.max_position_embeddings - max_new_tokens`` (or `max_prompt_tokens`,
    whichever is smaller) keep their BOS and their last tokens.
    """
    if not prompts:
        return []
    prompt_limit = max_prompt_tokens
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None:
        context_limit = max(1, max_positions - max_new_tokens)
        prompt_limit = context_limit if prompt_limit is None else min(prompt_limit, context_limit)

    bos = tokenizer.bos_token_id
    encoded = []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt)
        if prompt_limit is not None and len(ids) > prompt_limit:
            keep_bos = bos is not None and ids[0] == bos and prompt_limit > 1
            ids = [bos] + ids[-(prompt_limit - 1):] if keep_bos else ids[-prompt_limit:]
        encoded.append(ids)

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    outputs: list[str] = [""] * len(prompts)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            progress = _progress("generate", len(prompts))
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                width = max(len(encoded[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    ids = encoded[i]
                    input_ids[row, width - len(ids) :] = torch.tensor(ids)
                    attention_mask[row, width - len(ids) :] = 1
                generated = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id,
                    use_cache=True,
                )
                texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
                for i, text in zip(batch, texts):
                    outputs[i] = text
                progress.update(len(batch))
            progress.close()
    finally:
        model.train(was_training)
    return outputs


def knowmem_prompt(icl: list[QA], question: str) -> str:
    """The MUSE few-shot QA prompt: the in-context examples, then `question`."""
    shots = "".join(f"Question: {ex.question}\nAnswer: {ex.answer}\n\n" for ex in icl)
    return shots + f"Question: {question}\nAnswer: "


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


def _limited(items: Sequence, limit: int | None) -> list:
    return list(items[:limit] if limit is not None else items)


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
    items = _limited(items, limit)
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
    qa = _limited(qa, limit)
    if not qa:
        raise ValueError("knowmem: no questions to evaluate")
    return _mean_percent(knowmem_scores(model, tokenizer, qa, icl, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size))


# --- token log-probabilities ------------------------------------------------------------------
def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def _context_limit(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def token_logprobs(
    model,
    sequences: list[list[int]],
    starts: list[int],
    *,
    batch_size: int = 16,
    pad_id: int = 0,
) -> list[torch.Tensor]:
    """log P(ids[t] | ids[:t]) for t = starts[i] .. len(ids)-1 of each sequence (float64, CPU).

    Sequences are sorted by length and batched with right padding and an attention mask; padded
    positions come after every real token, so (causal attention) they change nothing and are
    never read. `starts[i]` must be >= 1 (the first token has no prediction).
    """
    if len(sequences) != len(starts):
        raise ValueError("token_logprobs: one start per sequence")
    for i, (ids, start) in enumerate(zip(sequences, starts)):
        if not 1 <= start < len(ids):
            raise ValueError(f"token_logprobs: sequence {i} has no token to score (start {start}, length {len(ids)})")
    if not sequences:
        return []
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
    out: list[torch.Tensor] = [torch.empty(0)] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            progress = _progress("log-probs", len(sequences))
            for begin in range(0, len(order), batch_size):
                batch = order[begin : begin + batch_size]
                width = max(len(sequences[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    input_ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                    attention_mask[row, : len(sequences[i])] = 1
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
                targets = input_ids[:, 1:].unsqueeze(-1)
                logp = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)
                logp = logp.double().cpu()
                for row, i in enumerate(batch):
                    out[i] = logp[row, starts[i] - 1 : len(sequences[i]) - 1].clone()
                progress.update(len(batch))
            progress.close()
    finally:
        model.train(was_training)
    return out


def text_token_logprobs(model, tokenizer, texts: list[str], *, batch_size: int = 16,
                        max_tokens: int | None = None) -> list[torch.Tensor]:
    """Per-token log-probs of each text (BOS first, every later token scored), cut to the
    model's context (or `max_tokens`) from the right."""
    limit = _context_limit(model)
    if max_tokens is not None:
        limit = max_tokens if limit is None else min(limit, max_tokens)
    seqs = [encode_prompt(tokenizer, t) for t in texts]
    seqs = [ids[:limit] if limit is not None else ids for ids in seqs]
    return token_logprobs(model, seqs, [1] * len(seqs), batch_size=batch_size, pad_id=_pad_id(tokenizer))


def tofu_prompt(question: str) -> str:
    """TOFU's question format for non-chat models: "Question: {q}\\nAnswer: "."""
    return knowmem_prompt([], question)


def qa_token_logprobs(model, tokenizer, pairs: list[tuple[str, str]], *,
                      batch_size: int = 16) -> list[torch.Tensor]:
    """Log-probs of each answer's tokens given `tofu_prompt(question)` (prompt and answer tokenised
    apart, as `prepare.tokenize_qa` trains). Over-long pairs keep the answer start and the
    prompt's end."""
    limit = _context_limit(model)
    seqs, starts = [], []
    for i, (question, answer) in enumerate(pairs):
        prompt = encode_prompt(tokenizer, tofu_prompt(question))
        ans = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ans:
            raise ValueError(f"qa_token_logprobs: answer {i} is empty")
        if limit is not None and len(prompt) + len(ans) > limit:
            ans = ans[: max(1, limit - len(prompt))]
            prompt = prompt[-(limit - len(ans)) :]
        seqs.append(prompt + ans)
        starts.append(len(prompt))
    return token_logprobs(model, seqs, starts, batch_size=batch_size, pad_id=_pad_id(tokenizer))


def qa_logprobs(model, tokenizer, pairs: list[tuple[str, str]], *, batch_size: int = 16) -> list[float]:
    """Length-normalised log P(answer | question): the mean log-prob of the answer's tokens
    (TOFU's `-avg_gt_loss`; exp of it is P(a|q)^(1/|a|))."""
    return [float(lp.mean()) for lp in qa_token_logprobs(model, tokenizer, pairs, batch_size=batch_size)]


# --- PrivLeak: Min-K% Prob membership attack --------------------------------------------------------
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
                 max_tokens: int | None = None) -> list[float]:
    """Min-K% Prob of each text under `model` (batched; padding masked)."""
    return min_k_from_lists(text_token_logprobs(model, tokenizer, texts, batch_size=batch_size,
                                                max_tokens=max_tokens), k)


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
    with _criterion("verbmem_f"):
        scores["verbmem_f"] = verbmem(model, tokenizer, data.verbmem, max_new_tokens=verbmem_max_new_tokens,
                                      batch_size=batch_size, limit=limit)
    for key, qa, icl in (("knowmem_f", data.forget_qa, data.forget_qa_icl),
                         ("knowmem_r", data.retain_qa, data.retain_qa_icl)):
        with _criterion(key):
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
    with _criterion("mia_auc"):
        return mia_auc(model, tokenizer, _limited(forget_texts, limit), _limited(holdout_texts, limit),
                       k=k, batch_size=batch_size)


# --- data-parallel MUSE evaluation (Ray actors) ----------------------------------------------------
def _shard(items: Sequence, num_shards: int) -> list[list]:
    """`items` cut into `num_shards` contiguous parts of near-equal size (in order)."""
    bounds = np.linspace(0, len(items), num_shards + 1).round().astype(int)
    return [list(items[bounds[i] : bounds[i + 1]]) for i in range(num_shards)]


class MuseEvalWorker:
    """Loads one model and scores a share of the MUSE items (per-item scores, in order)."""

    def __init__(self, model_path: str, device: str | None = None):
        self.model, self.tokenizer = load_model_and_tokenizer(model_path)
        if device is not None:
            self.model.to(device)

    def run(self, shard: dict[str, list], settings: dict[str, Any]) -> dict[str, list[float]]:
        m, tok, bs = self.model, self.tokenizer, settings["batch_size"]
        out = {}
        with _criterion("verbmem_f"):
            out["verbmem_f"] = verbmem_scores(m, tok, shard["verbmem"],
                                              max_new_tokens=settings["verbmem_max_new_tokens"], batch_size=bs)
        for key, split in (("knowmem_f", "forget"), ("knowmem_r", "retain")):
            with _criterion(key):
                out[key] = knowmem_scores(m, tok, shard[f"{split}_qa"], settings[f"{split}_qa_icl"],
                                          max_new_tokens=settings["knowmem_max_new_tokens"], batch_size=bs)
        with _criterion("mia_auc"):
            for key in ("mia_forget", "mia_holdout"):
                out[key] = (min_k_scores(m, tok, shard[key], k=settings["k"], batch_size=bs)
                            if shard[key] else [])
        return out


def evaluate_muse_parallel(
    model_path: str | Path,
    data_dir: str | Path | MuseData,
    num_workers: int,
    *,
    verbmem_max_new_tokens: int = 128,
    knowmem_max_new_tokens: int = 32,
    batch_size: int = 16,
    limit: int | None = None,
    mia: bool = True,
    k: float = MIN_K,
    num_gpus_per_worker: float = 0.0,
) -> dict[str, float]:
    """`evaluate_muse` (with `mia`) split across `num_workers` Ray actors (`num_cpus=1` each, plus
    `num_gpus_per_worker`): each loads the model from `model_path` and scores a contiguous share
    of every item list; the per-item scores are concatenated in order and then averaged (AUC over
    all scores), so the result equals the single-process one. Starts a local Ray runtime (and
    shuts it down after) when none is running."""
    import ray

    from dipo_scale.data.muse import load_muse

    if num_workers < 1:
        raise ValueError(f"evaluate_muse_parallel: num_workers must be >= 1, got {num_workers}")
    data = data_dir if isinstance(data_dir, MuseData) else load_muse(data_dir)
    forget_texts, holdout_texts = muse_mia_texts(data)
    lists = {
        "verbmem": _limited(data.verbmem, limit),
        "forget_qa": _limited(data.forget_qa, limit),
        "retain_qa": _limited(data.retain_qa, limit),
        "mia_forget": _limited(forget_texts, limit) if mia and holdout_texts else [],
        "mia_holdout": _limited(holdout_texts, limit) if mia and forget_texts else [],
    }
    for key in ("verbmem", "forget_qa", "retain_qa"):
        if not lists[key]:
            raise ValueError(f"evaluate_muse_parallel: no {key} items to evaluate")
    settings = {"batch_size": batch_size, "verbmem_max_new_tokens": verbmem_max_new_tokens,
                "knowmem_max_new_tokens": knowmem_max_new_tokens, "k": k,
                "forget_qa_icl": data.forget_qa_icl, "retain_qa_icl": data.retain_qa_icl}
    shards = {key: _shard(items, num_workers) for key, items in lists.items()}

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=True)  # the actors' progress lines
    try:
        worker_cls = ray.remote(num_cpus=1, num_gpus=num_gpus_per_worker)(MuseEvalWorker)
        device = "cuda" if num_gpus_per_worker > 0 else None
        workers = [worker_cls.remote(str(model_path), device) for _ in range(num_workers)]
        results = ray.get([w.run.remote({key: shards[key][i] for key in shards}, settings)
                           for i, w in enumerate(workers)])
        for w in workers:
            ray.kill(w)
    finally:
        if started:
            ray.shutdown()
    merged = {key: [v for r in results for v in r[key]] for key in results[0]}
    metrics = {key: _mean_percent(merged[key]) for key in ("verbmem_f", "knowmem_f", "knowmem_r")}
    if merged["mia_forget"] and merged["mia_holdout"]:
        metrics["mia_auc"] = auc_from_scores(merged["mia_forget"], merged["mia_holdout"])
    return metrics


# --- TOFU ----------------------------------------------------------------------------------------------
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


def model_utility(scores: Sequence[float]) -> float:
    """TOFU's model utility: the harmonic mean of its (nine) component scores."""
    from scipy.stats import hmean

    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0 or (values < 0).any():
        raise ValueError("model_utility: needs non-negative scores")
    return float(hmean(values))


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
    with _criterion("forget_truth_ratio"):
        stats = tofu_split_stats(model, tokenizer, _limited(data.forget, limit), base="paraphrased",
                                 batch_size=batch_size, max_new_tokens=None)
    return stats.truth_ratios.tolist()


UTILITY_SPLITS = (("retain", "paraphrased"), ("real_authors", "answer"), ("world_facts", "answer"))


@dataclass
class TofuResult:
    metrics: dict[str, float]
    forget_truth_ratios: list[float]


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
    (prob_*, rouge_*, truth_ratio_* on a 0..1 scale) and model_utility. `limit` caps each split
    (TOFU's `ds_size` is 300).
    """
    metrics: dict[str, float] = {}
    with _criterion("forget"):
        forget = tofu_split_stats(model, tokenizer, _limited(data.forget, limit), base="paraphrased",
                                  batch_size=batch_size, max_new_tokens=max_new_tokens)
    ratios = forget.truth_ratios
    metrics["knowmem_f"] = 100.0 * float(np.mean(forget.rouge_recall))
    metrics["forget_prob"] = tofu_probability(forget.answer_logprob)
    metrics["forget_truth_ratio"] = truth_ratio_score(ratios, forget=True)
    if retain_truth_ratios is not None:
        metrics["forget_quality"] = forget_quality(ratios, retain_truth_ratios)

    components: dict[str, float] = {}
    for name, base in UTILITY_SPLITS:
        items = getattr(data, name)
        if items is None:
            continue
        with _criterion(name):
            stats = tofu_split_stats(model, tokenizer, _limited(items, limit), base=base,
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

    if data.holdout:
        metrics["mia_auc"] = tofu_mia_auc(model, tokenizer, data, k=k, batch_size=batch_size, limit=limit)
    return TofuResult(metrics, ratios.tolist())


def tofu_mia_auc(model, tokenizer, data, *, k: float = MIN_K, batch_size: int = 16,
                 limit: int | None = None) -> float | None:
    """Min-K% Prob AUC on the answer tokens (given the question): forget vs holdoutXX."""
    if not data.holdout:
        return None
    forget = [(it.question, it.answer) for it in _limited(data.forget, limit)]
    holdout = [(it.question, it.answer) for it in _limited(data.holdout, limit)]
    with _criterion("mia_auc"):
        scores = min_k_from_lists(qa_token_logprobs(model, tokenizer, forget + holdout, batch_size=batch_size), k)
    return auc_from_scores(scores[: len(forget)], scores[len(forget) :])


def load_model_and_tokenizer(
    path: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
):
    """A causal LM (in eval mode) and its tokenizer from a local dir or hub name."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code
    )
    model.eval()
    return model, tokenizer


# --- `dipo-scale evaluate` ---------------------------------------------------------------------
METRIC_ORDER = ("verbmem_f", "knowmem_f", "knowmem_r", "mia_auc", "privleak", "forget_quality",
                "model_utility", "forget_truth_ratio", "forget_prob")
VERBMEM_MAX_NEW_TOKENS, KNOWMEM_MAX_NEW_TOKENS, TOFU_MAX_NEW_TOKENS = 128, 32, 128


def detect_layout(source: str | Path) -> str:
    """The layout of `source`, "muse" or "tofu": from the directory's files, or a hub name."""
    from dipo_scale.data.muse import is_hub_name
    from dipo_scale.data.tofu import is_tofu_dir

    path = Path(source)
    if path.is_dir():
        if any((path / sub).is_dir() for sub in ("raw", "knowmem", "verbmem")):
            return "muse"
        if is_tofu_dir(path):
            return "tofu"
        raise UserInputError(f"{path}: unknown data layout (MUSE: raw/, knowmem/, verbmem/; "
                             "TOFU: files named like the locuslab/TOFU configs, e.g. forget10_perturbed.json)")
    if path.exists():
        raise UserInputError(f"{path}: not a directory")
    if is_hub_name(str(source)):
        name = str(source).lower()
        if "tofu" in name:
            return "tofu"
        if "muse" in name:
            return "muse"
        raise UserInputError(f"{source}: unknown data layout (hub datasets: locuslab/TOFU, muse-bench/MUSE-News, "
                             "muse-bench/MUSE-Books)")
    raise UserInputError(f"{source}: data directory does not exist")


def read_truth_ratios(path: str | Path) -> list[float]:
    """Stored forget-set truth ratios: a JSON list of numbers, this command's truth_ratios.json
    ({"forget_truth_ratios": [...]}), or TOFU's eval_log_forget.json ({"truth_ratio": {i: r}})."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserInputError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserInputError(f"{path}: malformed JSON ({' '.join(str(e).split())})") from None
    if isinstance(obj, dict):
        for key in ("forget_truth_ratios", "truth_ratio", "truth_ratios"):
            if key in obj:
                obj = obj[key]
                break
        else:
            raise UserInputError(f"{path} is missing key 'forget_truth_ratios' (or give a JSON list of numbers)")
        if isinstance(obj, dict):
            obj = list(obj.values())
    if not isinstance(obj, list) or not obj:
        raise UserInputError(f"{path}: truth ratios must be a non-empty JSON list of numbers")
    for i, value in enumerate(obj):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
            raise UserInputError(f"{path}: entry {i} is not a positive number ({value!r})")
    return [float(v) for v in obj]


def _load_checked(path: str, flag: str):
    try:
        return load_model_and_tokenizer(path)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserInputError(f"{flag} {path}: cannot load the model or its tokenizer "
                             f"({type(e).__name__}: {first[:200]})") from None


def _ordered(metrics: dict[str, float]) -> dict[str, float]:
    head = [k for k in METRIC_ORDER if k in metrics]
    return {k: float(metrics[k]) for k in head + [k for k in metrics if k not in head]}


def _model_name(path: str) -> str:
    return Path(path).name or str(path)


def run_evaluation(
    model: str,
    data: str,
    out: str | Path,
    *,
    retrain_model: str | None = None,
    retrain_auc: float | None = None,
    retain_model: str | None = None,
    retain_truth_ratios: str | None = None,
    forget: str = "forget10",
    retain: str | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    num_workers: int = 1,
    max_new_tokens: int | None = None,
) -> dict[str, float]:
    """What `dipo-scale evaluate` does: evaluate `model` on the MUSE or TOFU data `data`, write
    OUT/metrics.json, OUT/report.md (+ plots) and, for TOFU, OUT/truth_ratios.json (the forget-set
    truth ratios, reusable as another run's --retain-truth-ratios). Returns the metrics.

    Every input is checked before a model is loaded; nothing is written unless all succeeds.
    """
    from dipo_scale.files import atomic_write_json, check_output_dir, mark_output_dir
    from dipo_scale.preflight import check_model
    from dipo_scale.report import write_report

    if retrain_model is not None and retrain_auc is not None:
        raise UserInputError("give --retrain-model or --retrain-auc, not both")
    if retrain_auc is not None and not 0.0 < retrain_auc <= 1.0:
        raise UserInputError(f"--retrain-auc {retrain_auc}: must be in (0, 1]")
    if retain_model is not None and retain_truth_ratios is not None:
        raise UserInputError("give --retain-model or --retain-truth-ratios, not both")
    for flag, value in (("--limit", limit), ("--batch-size", batch_size), ("--num-workers", num_workers),
                        ("--max-new-tokens", max_new_tokens)):
        if value is not None and value < 1:
            raise UserInputError(f"{flag} {value}: must be >= 1")
    layout = detect_layout(data)
    if layout == "muse" and (retain_model is not None or retain_truth_ratios is not None):
        raise UserInputError("--retain-model / --retain-truth-ratios are for TOFU data (MUSE: --retrain-model)")
    models = [(path, flag) for path, flag in ((model, "--model"), (retrain_model, "--retrain-model"),
                                              (retain_model, "--retain-model")) if path is not None]
    out = check_output_dir(out, "evaluate", inputs=[("--data", data), *((f, p) for p, f in models)])
    for path, flag in models:  # complete, loadable models before any is loaded
        check_model(path, flag)

    def cap(default: int) -> int:
        return default if max_new_tokens is None else min(default, max_new_tokens)

    notes: list[str] = []
    if layout == "muse":
        from dipo_scale.data.muse import load_muse

        dataset = load_muse(data, need_raw=False)
        reference_ratios = None
    else:
        from dipo_scale.data.tofu import load_tofu

        dataset = load_tofu(data, forget=forget, retain=retain)
        notes += dataset.notes
        reference_ratios = read_truth_ratios(retain_truth_ratios) if retain_truth_ratios else None

    references: dict[str, dict[str, float]] = {}
    reference_auc = retrain_auc
    if retrain_model is not None:
        ref, ref_tok = _load_checked(retrain_model, "--retrain-model")
        mia = (muse_mia_auc if layout == "muse" else tofu_mia_auc)(
            ref, ref_tok, dataset, batch_size=batch_size, limit=limit)
        del ref
        if mia is not None:
            references[f"{_model_name(retrain_model)} (retrain)"] = {"mia_auc": mia}
            reference_auc = mia
    if retain_model is not None:
        ref, ref_tok = _load_checked(retain_model, "--retain-model")
        reference_ratios = tofu_forget_truth_ratios(ref, ref_tok, dataset, batch_size=batch_size, limit=limit)
        row = {"forget_truth_ratio": truth_ratio_score(reference_ratios, forget=True)}
        if retrain_model is None and retrain_auc is None:  # the retain model is TOFU's retrained model
            mia = tofu_mia_auc(ref, ref_tok, dataset, batch_size=batch_size, limit=limit)
            if mia is not None:
                row["mia_auc"] = reference_auc = mia
        references[f"{_model_name(retain_model)} (retain)"] = row
        del ref

    if layout == "muse":
        settings = dict(verbmem_max_new_tokens=cap(VERBMEM_MAX_NEW_TOKENS),
                        knowmem_max_new_tokens=cap(KNOWMEM_MAX_NEW_TOKENS), batch_size=batch_size, limit=limit)
        if num_workers > 1:
            metrics = evaluate_muse_parallel(model, dataset, num_workers, mia=True, **settings)
        else:
            m, tok = _load_checked(model, "--model")
            metrics = evaluate_muse(m, tok, dataset, mia=True, **settings)
        if "mia_auc" not in metrics:
            notes.append("no holdout texts (privleak/holdout.json or raw/holdout.*): no mia_auc / privleak")
    else:
        if num_workers > 1:
            notes.append("--num-workers applies to MUSE data; TOFU was evaluated in one process")
        m, tok = _load_checked(model, "--model")
        result = evaluate_tofu(m, tok, dataset, retain_truth_ratios=reference_ratios, batch_size=batch_size,
                               limit=limit, max_new_tokens=cap(TOFU_MAX_NEW_TOKENS))
        metrics = result.metrics
        notes.append("TOFU has no verbatim-memorisation prompts: no verbmem_f; knowmem_f / knowmem_r are "
                     "TOFU's ROUGE-L recall (x100) on forget / retain; utility components are on 0..1")
        if reference_ratios is None:
            notes.append("forget_quality needs --retain-model or --retain-truth-ratios")
        if "mia_auc" not in metrics:
            notes.append(f"no holdout split for {forget}: no mia_auc / privleak")

    if "mia_auc" in metrics:
        if reference_auc is None:
            notes.append("privleak needs --retrain-model or --retrain-auc")
        elif reference_auc > 0:
            metrics["privleak"] = privleak(metrics["mia_auc"], reference_auc)
        else:
            notes.append("the retrain model's AUC is 0: privleak is undefined")
    metrics = _ordered(metrics)

    mark_output_dir(out, "evaluate")
    if layout == "tofu":
        atomic_write_json(out / "truth_ratios.json", {"forget": forget, "forget_truth_ratios": result.forget_truth_ratios})
    atomic_write_json(out / "metrics.json", metrics)
    write_report(out, {_model_name(model): metrics, **references},
                 title=f"dipo-scale evaluation: {_model_name(model)} on {data}", notes=notes)
    return metrics
