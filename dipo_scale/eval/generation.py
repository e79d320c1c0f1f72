"""The model-facing loops of the evaluation: batched greedy generation and batched token
log-probabilities, the prompt encoding they share, and loading a model to evaluate.

Progress: every batched loop prints `eval <criterion> (<loop>): items done/total, rate, ETA` lines
on stdout (`dipo_scale.progress`); `criterion(name)` labels the loops run inside it.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dipo_scale.data.prompts import tofu_prompt
from dipo_scale.errors import UserInputError
from dipo_scale.progress import Progress

_CRITERION: ContextVar[str | None] = ContextVar("criterion", default=None)
_WHERE: ContextVar[str | None] = ContextVar("where", default=None)


@contextmanager
def criterion(name: str):
    """Label the progress lines of the batched loops run inside with the criterion they compute."""
    token = _CRITERION.set(name)
    try:
        yield
    finally:
        _CRITERION.reset(token)


@contextmanager
def where(name: str):
    """Say in the progress lines of the loops run inside where they run (e.g. "rank 1 of 2")."""
    token = _WHERE.set(name)
    try:
        yield
    finally:
        _WHERE.reset(token)


def _progress(loop: str, total: int) -> Progress:
    """The progress of one batched loop over `total` items."""
    place = f", {_WHERE.get()}" if _WHERE.get() else ""
    return Progress(f"eval {_CRITERION.get() or 'items'} ({loop}{place})", total=total, unit="items")


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


def _pad_batch(tokenizer, sequences: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequences` padded to one width on `side` by the tokenizer, with their attention mask (a
    tokenizer without a pad token pads with its EOS id)."""
    if tokenizer.pad_token_id is not None:
        tokenizer.deprecation_warnings["Asking-to-pad-a-fast-tokenizer"] = True  # ids are encoded already
        batch = tokenizer.pad({"input_ids": sequences}, padding=True, padding_side=side,
                              return_attention_mask=True, return_tensors="pt")
        return batch["input_ids"].long(), batch["attention_mask"].long()
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), _pad_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        cols = slice(width - len(ids), width) if side == "left" else slice(0, len(ids))
        input_ids[row, cols] = torch.tensor(ids)
        attention_mask[row, cols] = 1
    return input_ids, attention_mask


def num_batches(count: int, batch_size: int) -> int:
    return -(-count // batch_size)


def greedy_generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    max_prompt_tokens: int | None = None,
    batches: int | None = None,
    synced: bool = False,
) -> list[str]:
    """Greedy continuations of `prompts` (new text only, special tokens dropped).

    Prompts are sorted by length, batched with left padding (by the tokenizer) and an attention
    mask, and the outputs are returned in input order; the result equals generating each prompt
    alone. Prompts longer than ``config.max_position_embeddings - max_new_tokens`` (or
    `max_prompt_tokens`, whichever is smaller) keep their BOS and their last tokens.

    Sharded models (ZeRO-3 engines evaluating shares of the prompts, `dipo_scale.eval.in_training`):
    every rank must run the same forwards, each of which gathers the parameters from all ranks.
    `batches` makes this call run exactly that many `generate` calls (the ones beyond its own
    prompts on a one-token dummy prompt, output dropped), and `synced` is HF's `synced_gpus`: a
    rank whose sequences are done keeps running forwards until every rank's are.
    """
    prompt_limit = max_prompt_tokens
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None:
        context_limit = max(1, max_positions - max_new_tokens)
        prompt_limit = context_limit if prompt_limit is None else min(prompt_limit, context_limit)
    total = num_batches(len(prompts), batch_size)
    if batches is not None and batches < total:
        raise ValueError(f"greedy_generate: {len(prompts)} prompts need {total} batches, {batches} given")
    if not prompts and not batches:
        return []

    bos = tokenizer.bos_token_id
    encoded = []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt)
        if prompt_limit is not None and len(ids) > prompt_limit:
            keep_bos = bos is not None and ids[0] == bos and prompt_limit > 1
            ids = [bos] + ids[-(prompt_limit - 1):] if keep_bos else ids[-prompt_limit:]
        encoded.append(ids)

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    groups = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    groups += [[] for _ in range((batches or total) - len(groups))]  # dummies, to keep ranks in step
    dummy = [[bos if bos is not None else _pad_id(tokenizer)]]
    outputs: list[str] = [""] * len(prompts)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # (not inference_mode: ZeRO-3 keeps gathered parameters for training)
            progress = _progress("generate", len(prompts))
            for batch in groups:
                input_ids, attention_mask = _pad_batch(tokenizer, [encoded[i] for i in batch] or dummy, "left")
                generated = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=_pad_id(tokenizer),
                    use_cache=True,
                    synced_gpus=synced,
                )
                texts = tokenizer.batch_decode(generated[:, input_ids.shape[1]:], skip_special_tokens=True)
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
    batches: int | None = None,
) -> list[torch.Tensor]:
    """log P(ids[t] | ids[:t]) for t = starts[i] .. len(ids)-1 of each sequence (float64, CPU).

    Sequences are sorted by length and batched with right padding and an attention mask; padded
    positions come after every real token, so (causal attention) they change nothing and are
    never read. `starts[i]` must be >= 1 (the first token has no prediction). `batches`: run
    exactly that many forwards (the extra ones on a dummy sequence), as `greedy_generate`.
    """
    if len(sequences) != len(starts):
        raise ValueError("token_logprobs: one start per sequence")
    for i, (ids, start) in enumerate(zip(sequences, starts)):
        if not 1 <= start < len(ids):
            raise ValueError(f"token_logprobs: sequence {i} has no token to score (start {start}, length {len(ids)})")
    total = num_batches(len(sequences), batch_size)
    if batches is not None and batches < total:
        raise ValueError(f"token_logprobs: {len(sequences)} sequences need {total} batches, {batches} given")
    if not sequences and not batches:
        return []
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
    groups = [order[begin : begin + batch_size] for begin in range(0, len(order), batch_size)]
    groups += [[] for _ in range((batches or total) - len(groups))]  # dummies, to keep ranks in step
    out: list[torch.Tensor] = [torch.empty(0)] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # (not inference_mode: ZeRO-3 keeps gathered parameters for training)
            progress = _progress("log-probs", len(sequences))
            for batch in groups:
                rows = [sequences[i] for i in batch] or [[pad_id, pad_id]]
                width = max(len(ids) for ids in rows)
                input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
                for row, ids in enumerate(rows):
                    input_ids[row, : len(ids)] = torch.tensor(ids)
                    attention_mask[row, : len(ids)] = 1
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
                        max_tokens: int | None = None, batches: int | None = None) -> list[torch.Tensor]:
    """Per-token log-probs of each text (BOS first, every later token scored), cut to the
    model's context (or `max_tokens`) from the right."""
    limit = _context_limit(model)
    if max_tokens is not None:
        limit = max_tokens if limit is None else min(limit, max_tokens)
    seqs = [encode_prompt(tokenizer, t) for t in texts]
    seqs = [ids[:limit] if limit is not None else ids for ids in seqs]
    return token_logprobs(model, seqs, [1] * len(seqs), batch_size=batch_size, pad_id=_pad_id(tokenizer),
                          batches=batches)

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


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto") -> tuple[str, torch.dtype]:
    """(device, dtype) of an evaluation in this process: `auto` is CUDA with bfloat16 where a GPU is
    visible here, else the CPU with float32; `cuda` where none is visible is an error."""
    if device not in DEVICES:
        raise UserInputError(f"--device {device}: choose one of {', '.join(DEVICES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA device is visible to this process "
                             "(use --device auto or cpu, or Ray actors with --gpus-per-worker)")
    return device, torch.bfloat16 if device == "cuda" else torch.float32


def describe_device(device: str, dtype: torch.dtype) -> str:
    """E.g. "cuda (NVIDIA H100 80GB HBM3, bfloat16)" or "cpu (float32)"."""
    name = f"{torch.cuda.get_device_name()}, " if device == "cuda" else ""
    return f"{device} ({name}{str(dtype).removeprefix('torch.')})"


def quantization_config(bits: str, compute_dtype: torch.dtype):
    """transformers' bitsandbytes config for `bits` "8bit" (LLM.int8) or "4bit" (NF4, computing
    in `compute_dtype`); a one-line error where bitsandbytes is not installed."""
    try:
        import importlib

        from transformers import BitsAndBytesConfig

        importlib.import_module("bitsandbytes")
    except ImportError as e:
        raise UserInputError(f"{bits} quantization: bitsandbytes is not available ({e})") from None
    if bits == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def load_model_and_tokenizer(path: str, *, dtype: torch.dtype | None = None, device: str = "cpu",
                             trust_remote_code: bool = False, quantize: str | None = None):
    """A causal LM (in eval mode) and its tokenizer from a local dir or hub name, on `device` ("cpu"
    or "cuda": loaded straight onto the GPU) in `dtype` (default: bfloat16 on CUDA, float32 on the
    CPU). `quantize` "8bit" / "4bit": its linear layers in bitsandbytes' 8-bit / 4-bit NF4 (the
    quantization attack); a backend that cannot load them here is a one-line error."""
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    placement = {"device_map": device} if device.startswith("cuda") else {}
    if quantize is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **placement)
    else:
        # bitsandbytes' 8-bit matmul casts float32 inputs to float16, and says so at every call
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code,
                quantization_config=quantization_config(quantize, dtype), **placement)
        except (RuntimeError, ValueError, NotImplementedError, ImportError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserInputError(f"{path}: bitsandbytes cannot load it in {quantize} on {device} here "
                                 f"({first[:200]})") from None
    model.eval()
    return model, tokenizer
