"""Prepare: tokenise documents and pack them into fixed-length blocks with loss masks.

Output (one directory, written atomically):

    manifest.json                  block size, counts, tokenizer and data fingerprints, shard hashes
    forget/part-00000.parquet ...  columns block_id, input_ids, labels, attention_mask
    retain/part-00000.parquet ...

Documents are `<bos> text <eos>` sequences (QA pairs, with `with_qa`, are sequences in the KnowMem
format with labels on the answer). Layout `concat` lays them end to end and cuts blocks of
`block_size` tokens; `per_sequence` starts each sequence on a new block. Padding has label -100
and attention 0. Every shard's sha256 is in the
manifest and is checked before a shard is trusted (`read_blocks`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dipo_scale.errors import UserInputError
from dipo_scale.files import atomic_dir, atomic_write_json, sha256_file

if TYPE_CHECKING:
    from dipo_scale.data.muse import QA, MuseData

IGNORE_INDEX = -100
ROWS_PER_SHARD = 4096
SPLITS = ("forget", "retain")


Sequence = tuple[list[int], list[int]]  # (input_ids, labels); label -100 = no loss


def tokenize_documents(tokenizer, texts: list[str]) -> list[Sequence]:
    """Each document as `<bos> text <eos>`, every token a label."""
    if not texts:  # QA-only data (TOFU) has no documents; a tokenizer fails on an empty batch
        return []
    out = []
    for doc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids = [tokenizer.bos_token_id, *doc, tokenizer.eos_token_id]
        out.append((ids, ids))
    return out


def tokenize_qa(tokenizer, pairs: list[QA], icl: list[QA]) -> list[Sequence]:
    """Each QA pair in the KnowMem evaluation format (the few-shot `icl` prompt, then the
    answer), with labels on the answer only, as TOFU trains.

    Prompt and answer are tokenised separately, so the tokens a model learns after "Answer: "
    are the ones it must produce after the evaluation prompt, which ends in a space (a byte-level
    BPE would otherwise glue that space to the answer's first word).
    """
    from dipo_scale.data.prompts import knowmem_prompt

    out = []
    for qa in pairs:
        prompt = [tokenizer.bos_token_id] + tokenizer(knowmem_prompt(icl, qa.question),
                                                      add_special_tokens=False)["input_ids"]
        answer = tokenizer(f"{qa.answer}\n\n", add_special_tokens=False)["input_ids"]
        answer = answer + [tokenizer.eos_token_id]
        out.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return out


def split_sequences(data: MuseData, tokenizer, *, with_qa: bool) -> dict[str, list[Sequence]]:
    """Token sequences of each split. `with_qa` adds the split's QA pairs (TOFU-style forget sets)."""
    seqs = {"forget": tokenize_documents(tokenizer, data.forget_docs),
            "retain": tokenize_documents(tokenizer, data.retain_docs)}
    if with_qa:
        seqs["forget"] += tokenize_qa(tokenizer, data.forget_qa, data.forget_qa_icl)
        seqs["retain"] += tokenize_qa(tokenizer, data.retain_qa, data.retain_qa_icl)
    return seqs


def pack_blocks(seqs: list[Sequence], block_size: int, pad_id: int, *,
                layout: str = "concat") -> dict[str, np.ndarray]:
    """[N, block_size] blocks of input_ids / labels / attention_mask.

    `concat`: sequences end to end, cut every `block_size` tokens (no padding but the tail).
    `per_sequence`: each sequence starts a new block (long ones continue into the next blocks),
    so a document is always seen from its `<bos>`, as at evaluation; costs padding.
    """
    if layout not in ("concat", "per_sequence"):
        raise UserInputError(f"layout: {layout!r} is not one of concat, per_sequence")
    if layout == "concat":
        seqs = [([t for ids, _ in seqs for t in ids], [t for _, lab in seqs for t in lab])]
    rows_ids, rows_lab = [], []
    for ids, lab in seqs:
        for start in range(0, len(ids), block_size):
            rows_ids.append(ids[start:start + block_size])
            rows_lab.append(lab[start:start + block_size])
    n = max(1, len(rows_ids))
    input_ids = np.full((n, block_size), pad_id, dtype=np.int32)
    labels = np.full((n, block_size), IGNORE_INDEX, dtype=np.int32)
    attention = np.zeros((n, block_size), dtype=np.int32)
    for i, (ids, lab) in enumerate(zip(rows_ids, rows_lab)):
        input_ids[i, :len(ids)], labels[i, :len(lab)], attention[i, :len(ids)] = ids, lab, 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def _write_split(blocks: dict[str, np.ndarray], out: Path) -> list[dict]:
    out.mkdir(parents=True)
    shards = []
    n = len(blocks["input_ids"])
    for i, start in enumerate(range(0, n, ROWS_PER_SHARD)):
        rows = slice(start, start + ROWS_PER_SHARD)
        table = pa.table({
            "block_id": pa.array(np.arange(n, dtype=np.int64)[rows]),
            **{k: pa.array(list(v[rows]), type=pa.list_(pa.int32())) for k, v in blocks.items()},
        })
        path = out / f"part-{i:05d}.parquet"
        pq.write_table(table, path)
        shards.append({"file": f"{out.name}/{path.name}", "rows": table.num_rows, "sha256": sha256_file(path)})
    return shards


def prepare(data: MuseData, tokenizer, out_dir: str | Path, *, block_size: int,
            with_qa: bool = False, layout: str = "concat") -> dict:
    """Tokenise and pack the forget and retain splits; returns the manifest."""
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise UserInputError("tokenizer: needs bos and eos tokens to pack documents")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    manifest = {"block_size": block_size, "layout": layout, "with_qa": with_qa, "source": str(data.root),
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "splits": {}}
    with atomic_dir(out_dir, "prepare") as tmp:
        data_hash = hashlib.sha256()
        for split, seqs in split_sequences(data, tokenizer, with_qa=with_qa).items():
            blocks = pack_blocks(seqs, block_size, pad_id, layout=layout)
            data_hash.update(blocks["input_ids"].tobytes())
            manifest["splits"][split] = {
                "blocks": int(len(blocks["input_ids"])),
                "tokens": int(blocks["attention_mask"].sum()),
                "loss_tokens": int((blocks["labels"] != IGNORE_INDEX).sum()),
                "shards": _write_split(blocks, tmp / split),
            }
        manifest["data_fingerprint"] = data_hash.hexdigest()[:16]
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


def read_manifest(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / "manifest.json"
    if not path.is_file():
        raise UserInputError(f"{prepared_dir}: not a prepared directory (no manifest.json; run `dipo-scale prepare`)")
    try:
        manifest = json.loads(path.read_text())
        for split in SPLITS:  # the structure every reader relies on
            info = manifest["splits"][split]
            int(info["blocks"]), int(info["tokens"])
            [(s["file"], s["sha256"]) for s in info["shards"]]
        int(manifest["block_size"]), manifest["tokenizer_fingerprint"], manifest["data_fingerprint"]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserInputError(f"{path}: malformed JSON ({' '.join(str(e).split())}); rerun `dipo-scale prepare`") from None
    except (KeyError, TypeError, ValueError) as e:
        raise UserInputError(f"{path}: not a manifest written by `dipo-scale prepare` (bad or missing {e}); "
                             "rerun `dipo-scale prepare`") from None
    return manifest


def read_blocks(prepared_dir: str | Path, split: str, *, verify: bool = True) -> dict[str, np.ndarray]:
    """All blocks of a split as int32 arrays [N, block_size] (+ block_id [N]); shards are verified."""
    root = Path(prepared_dir)
    manifest = read_manifest(root)
    tables = []
    for shard in manifest["splits"][split]["shards"]:
        path = root / shard["file"]
        if not path.is_file():
            raise UserInputError(f"{path}: shard listed in manifest.json is missing")
        if verify and sha256_file(path) != shard["sha256"]:
            raise UserInputError(f"{path}: checksum does not match manifest.json (corrupt or modified shard)")
        tables.append(pq.read_table(path))
    table = pa.concat_tables(tables)
    out = {"block_id": table.column("block_id").to_numpy()}
    for key in ("input_ids", "labels", "attention_mask"):
        col = table.column(key).combine_chunks()
        out[key] = col.values.to_numpy().reshape(len(table), -1).astype(np.int64)
    return out
