"""Tokenizer and tiny models for the demo and the tests: the MUSE protocol in miniature.

* a byte-level BPE trained on the corpus,
* a *target* Llama trained on forget + retain until it has memorised them,
* a *retrain* Llama trained on retain only (what perfect unlearning would give).

These are built with a plain single-process PyTorch loop (they are the demo's inputs, not the
product); the unlearning itself runs under Ray Train + DeepSpeed (`dipo_scale.unlearn`).
Models are saved in HF format (safetensors) and reused when a build with the same settings
and corpus is already on disk and its files verify.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from dipo_scale.files import atomic_dir, atomic_write_json
from dipo_scale.progress import Progress

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]


class TinyModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    block_size: int = 256
    batch_size: int = 8
    lr: float = 3e-3
    epochs: int = 40
    seed: int = 0


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with <s>, </s>, <pad>, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", clean_up_tokenization_spaces=False)


def tiny_llama(vocab_size: int, s: TinyModelSettings):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(s.seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_heads, max_position_embeddings=max(512, 2 * s.block_size),
        bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _length_grouped_batches(lengths: torch.Tensor, batch_size: int, g: torch.Generator,
                            group: int = 16) -> list[torch.Tensor]:
    """One epoch's batches of row indices, in random order: the rows shuffled, each run of `group`
    batches' worth sorted by length and cut into batches, so rows of similar length share a batch
    (short QA pairs together, documents together) and cutting the padding saves the most."""
    order = torch.randperm(len(lengths), generator=g)
    batches = []
    for start in range(0, len(order), batch_size * group):
        chunk = order[start : start + batch_size * group]
        chunk = chunk[torch.argsort(lengths[chunk], descending=True, stable=True)]
        batches += list(chunk.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=g)]


def train_causal_lm(model, blocks: dict[str, np.ndarray], s: TinyModelSettings, desc: str) -> list[float]:
    """Plain AdamW on packed blocks for `s.epochs` epochs, cosine schedule; returns epoch losses.
    Progress (steps, rate, ETA, epoch, loss) on stdout under the label `desc`."""
    g = torch.Generator().manual_seed(s.seed)
    ids = torch.as_tensor(blocks["input_ids"])
    labels = torch.as_tensor(blocks["labels"])
    mask = torch.as_tensor(blocks["attention_mask"])
    steps_per_epoch = math.ceil(len(ids) / s.batch_size)
    total = steps_per_epoch * s.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0)
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
    model.train()
    history = []
    progress = Progress(desc, total=total, unit="steps")
    # One intra-op thread: a tiny model's matmuls gain little from a second one, and on a shared
    # machine a second thread spin-waits for a core (measured here under load: 1 thread 8x faster).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_epochs(model, ids, labels, mask, s, g, opt, sched, progress, history)
    finally:
        torch.set_num_threads(threads)
    progress.close(loss=history[-1])
    model.eval()
    return history


def _train_epochs(model, ids, labels, mask, s: TinyModelSettings, g, opt, sched, progress, history) -> None:
    from dipo_scale.losses import nll_loss, shift_targets

    lengths = mask.sum(1)
    for epoch in range(1, s.epochs + 1):
        epoch_loss = 0.0
        for rows in _length_grouped_batches(lengths, s.batch_size, g):
            # Cut the columns that are padding in every row of the batch (per-sequence blocks are
            # right-padded, and a QA pair is a tenth of a block): the same loss, a fraction of the work.
            width = int(mask[rows].any(0).nonzero().max()) + 1
            logits = model(input_ids=ids[rows, :width], attention_mask=mask[rows, :width]).logits
            loss = nll_loss(logits, shift_targets(labels[rows, :width]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step_loss = loss.item()
            epoch_loss += step_loss * len(rows)
            progress.update(epoch=f"{epoch}/{s.epochs}", loss=step_loss)
        history.append(epoch_loss / len(ids))


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _files_hash(model_dir: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(model_dir.glob("*")):
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def build_models(data, out_dir: str | Path, settings: TinyModelSettings | None = None) -> dict[str, Path]:
    """Tokenizer + target + retrain models under out_dir; reused when built before and verified.

    Returns {"tokenizer": dir, "target": dir, "retrain": dir}.
    """
    from dipo_scale.prepare import pack_blocks, split_sequences

    s = settings or TinyModelSettings()
    out_dir = Path(out_dir)
    texts = {"forget": data.forget_docs, "retain": data.retain_docs,
             "qa": [[q.question, q.answer] for q in data.forget_qa + data.retain_qa
                    + data.forget_qa_icl + data.retain_qa_icl]}
    key = _fingerprint({"settings": s.model_dump(), "texts": texts})
    paths = {"tokenizer": out_dir / "tokenizer", "target": out_dir / "target", "retrain": out_dir / "retrain"}
    manifest_path = out_dir / "build.json"
    if manifest_path.is_file():
        built = json.loads(manifest_path.read_text())
        if built.get("key") == key and all(
            paths[n].is_dir() and _files_hash(paths[n]) == built["files"].get(n) for n in paths
        ):
            return paths
    t0 = time.time()
    qa_texts = [f"Question: {q}\nAnswer: {a}" for q, a in texts["qa"]]
    tokenizer = train_tokenizer(texts["forget"] + texts["retain"] + qa_texts, s.vocab_size)
    seqs = split_sequences(data, tokenizer, with_qa=True)
    forget = pack_blocks(seqs["forget"], s.block_size, tokenizer.pad_token_id, layout="per_sequence")
    retain = pack_blocks(seqs["retain"], s.block_size, tokenizer.pad_token_id, layout="per_sequence")
    both = {k: np.concatenate([forget[k], retain[k]]) for k in forget}
    history = {}
    with atomic_dir(paths["tokenizer"], "demo") as tmp:
        tokenizer.save_pretrained(tmp)
    for name, blocks in (("target", both), ("retrain", retain)):
        model = tiny_llama(len(tokenizer), s)
        history[name] = train_causal_lm(model, blocks, s, desc=f"train {name} model")
        with atomic_dir(paths[name], "demo") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    atomic_write_json(manifest_path, {
        "key": key, "settings": s.model_dump(), "seconds": round(time.time() - t0, 1),
        "final_train_loss": {n: h[-1] for n, h in history.items()},
        "files": {n: _files_hash(p) for n, p in paths.items()},
    })
    return paths
