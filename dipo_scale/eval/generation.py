"""The model-facing loops of the evaluation: batched greedy generation and batched token
log-probabilities, the prompt encoding they share, and loading a model to evaluate.

Progress: every batched loop prints `eval <criterion> (<loop>): items done/total, rate, ETA` lines
on stdout (`dipo_scale.progress`); `criterion(name)` labels the loops run inside it.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dipo_scale.data.prompts import tofu_prompt
from dipo_scale.progress import Progress

_CRITERION: ContextVar[str | None] = ContextVar("criterion", default=None)


@contextmanager
def criterion(name: str):
    """Label the progress lines of the batched loops run inside with the criterion they compute."""
    token = _CRITERION.set(name)
    try:
        yield
    finally:
        _CRITERION.reset(token)


def _progress(loop: str, total: int) -> Progress:
    """The progress of one batched loop over `total` items."""
    return Progress(f"eval {_CRITERION.get() or 'items'} ({loop})", total=total, unit="items")


def limited(items: Sequence, limit: int | None) -> list:
    """The first `limit` items (all of them when `limit` is None)."""
    return list(items[:limit] if limit is not None else items)


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
