"""MUSE-style generation metrics: VerbMem and KnowMem.

* **VerbMem** (forget set): greedy continuation of each verbatim prompt for
  `max_new_tokens` tokens, scored with ROUGE-L **F1** against the ground truth
  cut to its first `max_new_tokens` tokens. Mean over items, x100.
* **KnowMem** (forget and retain QA): a few-shot prompt
  ``"Question: {q}\\nAnswer: {a}\\n\\n"`` per in-context example, then
  ``"Question: {q}\\nAnswer: "``; greedy for `max_new_tokens` (32) tokens; the
  output is cut at the first blank line or "Question" and scored with ROUGE-L
  **recall** of the reference answer. Mean over items, x100.

VerbMem uses F1 and KnowMem uses recall, as MUSE does. ROUGE comes from
`rouge_score` (``RougeScorer(["rougeL"])``, no stemming).
"""

from __future__ import annotations

import torch
from rouge_score import rouge_scorer
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from dipo_scale.data.muse import QA, MuseData, VerbMemItem

_SCORER = rouge_scorer.RougeScorer(["rougeL"])


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
            starts = range(0, len(order), batch_size)
            for start in tqdm(starts, desc="generate", disable=None, leave=False):
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
    items = items[:limit] if limit is not None else items
    if not items:
        raise ValueError("verbmem: no items to evaluate")
    outputs = greedy_generate(
        model, tokenizer, [it.prompt for it in items],
        max_new_tokens=max_new_tokens, batch_size=batch_size,
    )
    scores = []
    for item, output in zip(items, outputs):
        gt_ids = tokenizer(item.gt, add_special_tokens=False)["input_ids"][:max_new_tokens]
        gt = tokenizer.decode(gt_ids, skip_special_tokens=True)
        scores.append(rouge_l(output, gt)[1])
    return _mean_percent(scores)


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
    qa = qa[:limit] if limit is not None else qa
    if not qa:
        raise ValueError("knowmem: no questions to evaluate")
    outputs = greedy_generate(
        model, tokenizer, [knowmem_prompt(icl, ex.question) for ex in qa],
        max_new_tokens=max_new_tokens, batch_size=batch_size,
    )
    return _mean_percent([rouge_l(cut_answer(out), ex.answer)[0] for ex, out in zip(qa, outputs)])


def evaluate_muse(
    model,
    tokenizer,
    data: MuseData,
    *,
    verbmem_max_new_tokens: int = 128,
    knowmem_max_new_tokens: int = 32,
    batch_size: int = 16,
    limit: int | None = None,
) -> dict[str, float]:
    """VerbMem on forget and KnowMem on forget/retain, each on a 0..100 scale."""
    return {
        "verbmem_f": verbmem(
            model, tokenizer, data.verbmem,
            max_new_tokens=verbmem_max_new_tokens, batch_size=batch_size, limit=limit,
        ),
        "knowmem_f": knowmem(
            model, tokenizer, data.forget_qa, data.forget_qa_icl,
            max_new_tokens=knowmem_max_new_tokens, batch_size=batch_size, limit=limit,
        ),
        "knowmem_r": knowmem(
            model, tokenizer, data.retain_qa, data.retain_qa_icl,
            max_new_tokens=knowmem_max_new_tokens, batch_size=batch_size, limit=limit,
        ),
    }


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
