"""The model-facing loops of the evaluation: batched greedy generation and batched token
log-probabilities, the prompt encoding they share, and loading a model to evaluate.

Progress: every batched loop prints `eval <criterion> (<loop>): items done/total, rate, ETA` lines
on stdout (`dipo_scale.progress`); `criterion(name)` labels the loops run inside it.

Memory. A batch holds at most `batch_size` rows and at most a token budget of rows x padded length
(`token_budget`: on a GPU from its free memory and the bytes a token costs, `scoring_token_bytes`
or `generation_token_bytes`; on a CPU a constant). Scoring forwards keep no KV cache, and the
log-probs of the labels are taken chunk by chunk from the logits (`label_logprobs`): no float32
[B, T, V] tensor exists. Generation keeps the KV cache it needs (prompt + new tokens) and, through
HF's `logits_to_keep`, the logits of the last position only.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dipo_scale.data.prompts import tofu_prompt
from dipo_scale.errors import UserInputError
from dipo_scale.losses import auto_chunk_size, compute_dtype, target_logprob
from dipo_scale.progress import Progress

CPU_TOKEN_BUDGET = 16384  # rows x padded length of one batch on a CPU (16 rows of 1024 tokens)
GPU_MEMORY_FRACTION = 0.5  # of a GPU's free memory, for one batch's activations, logits and KV cache

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


def _config_sizes(model) -> tuple[int, int, int, int, int, int]:
    """(vocab, hidden, intermediate, layers, KV heads, head dim) of the model's (text) config."""
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden, heads = c.hidden_size, c.num_attention_heads
    return (c.vocab_size, hidden, getattr(c, "intermediate_size", None) or 4 * hidden, c.num_hidden_layers,
            getattr(c, "num_key_value_heads", None) or heads, getattr(c, "head_dim", None) or hidden // heads)


def _dtype_bytes(model) -> int:
    return torch.empty(0, dtype=model.dtype).element_size()


def scoring_token_bytes(model) -> int:
    """GPU bytes one token of a scoring forward (no KV cache) costs at its peak: its logits in the
    model's dtype and one layer's activations (residual stream, attention projections, MLP). The
    chunked log-softmax's float32 temporaries do not grow with the batch."""
    vocab, hidden, inter, *_ = _config_sizes(model)
    return _dtype_bytes(model) * (vocab + 6 * hidden + 3 * inter)


def generation_token_bytes(model) -> int:
    """GPU bytes one token (prompt or generated) of a generation batch costs: its keys and values
    in every layer (the KV cache) and the prefill's activations; logits only at the last position."""
    _, hidden, inter, layers, kv_heads, head_dim = _config_sizes(model)
    return _dtype_bytes(model) * (2 * layers * kv_heads * head_dim + 6 * hidden + 3 * inter)


def token_budget(model, token_bytes: Callable) -> int:
    """Rows x padded length of one batch: on a GPU, `GPU_MEMORY_FRACTION` of its free memory (with
    what PyTorch's allocator holds unused) over `token_bytes(model)`; on a CPU, `CPU_TOKEN_BUDGET`."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return CPU_TOKEN_BUDGET
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(1, int(free * GPU_MEMORY_FRACTION) // token_bytes(model))


def token_batches(order: list[int], lengths: Sequence[int], batch_size: int, budget: int,
                  extra: int = 0) -> list[list[int]]:
    """`order` (longest first) cut into batches of at most `batch_size` items whose rows x padded
    length (the first item's length + `extra`, e.g. the new tokens) stay within `budget` tokens; an
    item longer than the budget goes alone."""
    batches, begin = [], 0
    while begin < len(order):
        rows = max(1, min(batch_size, budget // (lengths[order[begin]] + extra)))
        batches.append(order[begin : begin + rows])
        begin += rows
    return batches


def _in_step(count: int, batches: int | None, device) -> int:
    """How many batches this rank runs: its own `count`, or with `batches` (ranks of a sharded model
    in step, each forward gathering the parameters from all) at least `batches`, and the most any
    rank has where the token budget cut more on some rank (a collective over the ranks)."""
    if batches is None:
        return count
    from dipo_scale.collectives import max_over_ranks

    return max_over_ranks(max(count, batches), device)


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits[n])[labels[n]] for logits [N, V] (any float dtype) and labels [N]: [N] in
    float32 at least, computed `auto_chunk_size(V, device, dtype)` positions at a time (the losses'
    per-position log-prob), so no float32 [N, V] copy exists."""
    chunk = auto_chunk_size(logits.shape[-1], logits.device, logits.dtype)
    dtype = compute_dtype(logits)
    return torch.cat([target_logprob(logits[s : s + chunk].to(dtype), labels[s : s + chunk])
                      for s in range(0, labels.shape[0], chunk)])


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
    mask (at most `batch_size` rows and `token_budget(model, generation_token_bytes)` tokens of
    prompt and new tokens a batch), and the outputs are returned in input order; the result equals
    generating each prompt alone. Prompts longer than ``config.max_position_embeddings -
    max_new_tokens`` (or `max_prompt_tokens`, whichever is smaller) keep their BOS and their last
    tokens.

    Sharded models (ZeRO-3 engines evaluating shares of the prompts, `dipo_scale.eval.in_training`):
    every rank must run the same forwards, each of which gathers the parameters from all ranks.
    `batches` makes this call run that many `generate` calls (the ones beyond its own prompts on a
    one-token dummy prompt, output dropped), or the most any rank needs where the token budget cut
    more (`_in_step`), and `synced` is HF's `synced_gpus`: a rank whose sequences are done keeps
    running forwards until every rank's are.
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
    groups = token_batches(order, [len(ids) for ids in encoded], batch_size,
                           token_budget(model, generation_token_bytes), extra=max_new_tokens)
    groups += [[] for _ in range(_in_step(len(groups), batches, device) - len(groups))]  # dummies: ranks in step
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
                del generated
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
    never read. A batch holds at most `batch_size` rows and `token_budget(model,
    scoring_token_bytes)` tokens; its forward keeps no KV cache, and each row's log-probs come
    from its logits chunk by chunk (`label_logprobs`). `starts[i]` must be >= 1 (the first
    token has no prediction). `batches`: run that many forwards (the extra ones on a dummy
    sequence), or more, as `greedy_generate`.
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
    groups = token_batches(order, [len(ids) for ids in sequences], batch_size,
                           token_budget(model, scoring_token_bytes))
    groups += [[] for _ in range(_in_step(len(groups), batches, device) - len(groups))]  # dummies: ranks in step
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
                logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                for row, i in enumerate(batch):  # position t predicts token t + 1
                    scored = slice(starts[i] - 1, len(sequences[i]) - 1)
                    out[i] = label_logprobs(logits[row, scored], input_ids[row, 1:][scored]).double().cpu()
                del logits
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
