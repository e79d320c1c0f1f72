"""Prepare: tokenise documents and pack them into fixed-length blocks with loss masks.

Output (one directory, written atomically):

    manifest.json                  block size, counts, tokenizer and data fingerprints, shard hashes
    forget/part-00000.parquet ...  columns block_id, input_ids, labels, attention_mask
    retain/part-00000.parquet ...

Documents are laid end to end as `<bos> text <eos>`, cut into blocks of `block_size` tokens;
the tail of the last block is padding (label -100, attention 0). Every shard's sha256 is in the
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
from dipo_scale.files import atomic_dir, atomic_write_json

if TYPE_CHECKING:
    from dipo_scale.data.muse import QA, MuseData

IGNORE_INDEX = -100
ROWS_PER_SHARD = 4096
SPLITS = ("forget", "retain")


def qa_text(qa: QA) -> str:
    """A QA pair in the KnowMem evaluation format (the few-shot prompt repeats this)."""
    return f"Question: {qa.question}\nAnswer: {qa.answer}\n\n"


def split_texts(data: MuseData, *, with_qa: bool) -> dict[str, list[str]]:
    """Texts of each split. `with_qa` adds the split's QA pairs (TOFU-style forget sets)."""
    texts = {"forget": list(data.forget_docs), "retain": list(data.retain_docs)}
    if with_qa:
        texts["forget"].append("".join(qa_text(q) for q in data.forget_qa))
        texts["retain"].append("".join(qa_text(q) for q in data.retain_qa))
    return texts


def tokenize_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[tokenizer.bos_token_id, *doc, tokenizer.eos_token_id] for doc in ids]


def pack_blocks(docs: list[list[int]], block_size: int, pad_id: int) -> dict[str, np.ndarray]:
    """Concatenate token lists and cut into [N, block_size] blocks; pad the tail."""
    stream = np.fromiter((t for d in docs for t in d), dtype=np.int32)
    n_blocks = max(1, -(-len(stream) // block_size))
    input_ids = np.full(n_blocks * block_size, pad_id, dtype=np.int32)
    input_ids[: len(stream)] = stream
    attention = np.zeros(n_blocks * block_size, dtype=np.int32)
    attention[: len(stream)] = 1
    labels = np.where(attention == 1, input_ids, IGNORE_INDEX).astype(np.int32)
    shape = (n_blocks, block_size)
    return {"input_ids": input_ids.reshape(shape), "labels": labels.reshape(shape),
            "attention_mask": attention.reshape(shape)}


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        shards.append({"file": f"{out.name}/{path.name}", "rows": table.num_rows, "sha256": _sha256(path)})
    return shards


def prepare(data: MuseData, tokenizer, out_dir: str | Path, *, block_size: int,
            with_qa: bool = False) -> dict:
    """Tokenise and pack the forget and retain splits; returns the manifest."""
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise UserInputError("tokenizer: needs bos and eos tokens to pack documents")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    manifest = {"block_size": block_size, "with_qa": with_qa, "source": str(data.root),
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "splits": {}}
    with atomic_dir(out_dir) as tmp:
        data_hash = hashlib.sha256()
        for split, texts in split_texts(data, with_qa=with_qa).items():
            blocks = pack_blocks(tokenize_documents(tokenizer, texts), block_size, pad_id)
            data_hash.update(blocks["input_ids"].tobytes())
            manifest["splits"][split] = {
                "blocks": int(len(blocks["input_ids"])),
                "tokens": int(blocks["attention_mask"].sum()),
                "shards": _write_split(blocks, tmp / split),
            }
        manifest["data_fingerprint"] = data_hash.hexdigest()[:16]
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


def read_manifest(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / "manifest.json"
    if not path.is_file():
        raise UserInputError(f"{prepared_dir}: not a prepared directory (no manifest.json; run `dipo-scale prepare`)")
    return json.loads(path.read_text())


def read_blocks(prepared_dir: str | Path, split: str, *, verify: bool = True) -> dict[str, np.ndarray]:
    """All blocks of a split as int32 arrays [N, block_size] (+ block_id [N]); shards are verified."""
    root = Path(prepared_dir)
    manifest = read_manifest(root)
    tables = []
    for shard in manifest["splits"][split]["shards"]:
        path = root / shard["file"]
        if not path.is_file():
            raise UserInputError(f"{path}: shard listed in manifest.json is missing")
        if verify and _sha256(path) != shard["sha256"]:
            raise UserInputError(f"{path}: checksum does not match manifest.json (corrupt or modified shard)")
        tables.append(pq.read_table(path))
    table = pa.concat_tables(tables)
    out = {"block_id": table.column("block_id").to_numpy()}
    for key in ("input_ids", "labels", "attention_mask"):
        col = table.column(key).combine_chunks()
        out[key] = col.values.to_numpy().reshape(len(table), -1).astype(np.int64)
    return out
