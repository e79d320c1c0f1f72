"""Prepare: tokenise documents and pack them into fixed-length blocks with loss masks.

Output (one directory, written atomically):

    manifest.json                  block size, counts, tokenizer and data fingerprints, shard hashes
    forget/part-00000.parquet ...  columns block_id, input_ids, labels, attention_mask
    retain/part-00000.parquet ...

Documents are `<bos> text <eos>` sequences (QA pairs, with `with_qa`, are sequences in the KnowMem
format with labels on the answer). Layout `concat` lays them end to end and cuts blocks of
`block_size` tokens; `per_sequence` starts each sequence on a new block. Padding has label -100
and attention 0. Every shard's sha256 is in the
manifest and is checked before a shard is trusted (`read_blocks`, `BlockReader`).

Prepare streams: documents are tokenised a batch at a time (`DOC_BATCH`), packed sequence by
sequence (`iter_rows`) into one shard's buffer (grown as rows come), and each shard is written as
soon as it holds `shard_rows(block_size)` blocks (at most SHARD_BYTES); the data fingerprint hashes the blocks' input_ids as they are written.
So its memory is one shard's, whatever the corpus size (the raw text, `MuseData`, is in memory
as loaded). Readers likewise read only the shards that hold the rows they need (`BlockReader`):
a training worker reads the blocks of its own steps.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dipo_scale.errors import UserInputError
from dipo_scale.files import atomic_dir, atomic_write_json, sha256_file
from dipo_scale.progress import Progress

if TYPE_CHECKING:
    from dipo_scale.data.muse import QA, MuseData

IGNORE_INDEX = -100
ROWS_PER_SHARD = 4096
SHARD_BYTES = 256 << 20  # at most this many bytes of int32 blocks (3 columns) per shard, held while it fills


def shard_rows(block_size: int) -> int:
    """Rows of a shard: ROWS_PER_SHARD, fewer for blocks so long that a shard would pass SHARD_BYTES."""
    return max(1, min(ROWS_PER_SHARD, SHARD_BYTES // (12 * block_size)))
DOC_BATCH = 256  # documents per tokenizer call while streaming (a fast tokenizer's batch)
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
    """Token sequences of each split. `with_qa` adds the split's QA pairs (TOFU-style forget sets).
    (All in memory: prepare streams them instead, `iter_split_sequences`.)"""
    return {split: list(iter_split_sequences(data, tokenizer, split, with_qa=with_qa)) for split in SPLITS}


def iter_split_sequences(data: MuseData, tokenizer, split: str, *, with_qa: bool) -> Iterator[Sequence]:
    """The token sequences of one split, in `split_sequences`' order, tokenised `DOC_BATCH`
    documents (or QA pairs) at a time."""
    docs = data.forget_docs if split == "forget" else data.retain_docs
    for start in range(0, len(docs), DOC_BATCH):
        yield from tokenize_documents(tokenizer, docs[start:start + DOC_BATCH])
    if with_qa:
        pairs, icl = (data.forget_qa, data.forget_qa_icl) if split == "forget" else (data.retain_qa, data.retain_qa_icl)
        for start in range(0, len(pairs), DOC_BATCH):
            yield from tokenize_qa(tokenizer, pairs[start:start + DOC_BATCH], icl)


def _check_layout(layout: str) -> None:
    if layout not in ("concat", "per_sequence"):
        raise UserInputError(f"layout: {layout!r} is not one of concat, per_sequence")


def iter_rows(seqs: Iterable[Sequence], block_size: int, *, layout: str = "concat") -> Iterator[Sequence]:
    """The rows of `pack_blocks`, one at a time, as (input_ids, labels) of at most `block_size`
    tokens (only a sequence's or the stream's last row is shorter), holding at most one
    sequence and one row at a time."""
    _check_layout(layout)
    if layout == "per_sequence":
        for ids, lab in seqs:
            for start in range(0, len(ids), block_size):
                yield ids[start:start + block_size], lab[start:start + block_size]
        return
    buf_ids: list[int] = []
    buf_lab: list[int] = []
    for ids, lab in seqs:
        buf_ids.extend(ids)
        buf_lab.extend(lab)
        if len(buf_ids) >= block_size:
            full = len(buf_ids) // block_size * block_size
            for start in range(0, full, block_size):
                yield buf_ids[start:start + block_size], buf_lab[start:start + block_size]
            del buf_ids[:full], buf_lab[:full]
    if buf_ids:
        yield buf_ids, buf_lab


def pack_blocks(seqs: list[Sequence], block_size: int, pad_id: int, *,
                layout: str = "concat") -> dict[str, np.ndarray]:
    """[N, block_size] blocks of input_ids / labels / attention_mask.

    `concat`: sequences end to end, cut every `block_size` tokens (no padding but the tail).
    `per_sequence`: each sequence starts a new block (long ones continue into the next blocks),
    so a document is always seen from its `<bos>`, as at evaluation; costs padding.
    An empty input gives one padding block.
    """
    rows = list(iter_rows(seqs, block_size, layout=layout))
    buffer = _BlockBuffer(max(1, len(rows)), block_size, pad_id)
    for ids, lab in rows:
        buffer.add(ids, lab)
    if not rows:
        buffer.add([], [])
    return buffer.arrays()


class _BlockBuffer:
    """Up to `capacity` blocks as int32 arrays, filled row by row (padding: pad_id, label -100,
    attention 0). The arrays grow as rows come (doubling), so a few long blocks take what they
    hold, not `capacity` rows of them."""

    def __init__(self, capacity: int, block_size: int, pad_id: int):
        self.pad_id, self.capacity, self.block_size = pad_id, capacity, block_size
        self.input_ids = self.labels = self.attention = np.empty((0, block_size), dtype=np.int32)
        self.n = 0

    def _grow(self) -> None:
        rows = min(self.capacity, max(16, 2 * len(self.input_ids)))
        grown = []
        for old, fill in ((self.input_ids, self.pad_id), (self.labels, IGNORE_INDEX), (self.attention, 0)):
            new = np.full((rows, self.block_size), fill, dtype=np.int32)
            new[:len(old)] = old
            grown.append(new)
        self.input_ids, self.labels, self.attention = grown

    def full(self) -> bool:
        return self.n == self.capacity

    def add(self, ids: list[int], lab: list[int]) -> None:
        i = self.n
        if i == len(self.input_ids):
            self._grow()
        self.input_ids[i, :len(ids)], self.labels[i, :len(lab)], self.attention[i, :len(ids)] = ids, lab, 1
        self.n += 1

    def arrays(self) -> dict[str, np.ndarray]:
        n = self.n
        return {"input_ids": self.input_ids[:n], "labels": self.labels[:n], "attention_mask": self.attention[:n]}

    def clear(self) -> None:
        self.input_ids[:self.n] = self.pad_id
        self.labels[:self.n] = IGNORE_INDEX
        self.attention[:self.n] = 0
        self.n = 0


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def _arrow(values: np.ndarray) -> pa.Array:
    """A 1-D numpy array as an arrow array over its buffer (pa.array would import pandas: ~0.5 s)."""
    values = np.ascontiguousarray(values).reshape(-1)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def _shard_table(blocks: dict[str, np.ndarray], first_block: int) -> pa.Table:
    """One shard's table: block_id (int64) and the three int32 list columns (built from the
    arrays' buffers: the same table, and file bytes, as converting row by row)."""
    n, width = blocks["input_ids"].shape
    offsets = _arrow(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    return pa.table({
        "block_id": _arrow(np.arange(first_block, first_block + n, dtype=np.int64)),
        **{k: pa.ListArray.from_arrays(offsets, _arrow(v)) for k, v in blocks.items()},
    })


class _SplitWriter:
    """Streams one split's rows into `rows_per_shard`-row parquet shards under `out`, each
    written (and hashed) as soon as it is full; `data_hash` gets every block's input_ids bytes
    in block order (the bytes of the [N, block_size] int32 array, row after row)."""

    def __init__(self, out: Path, block_size: int, pad_id: int, data_hash, rows_per_shard: int):
        self.out, self.data_hash = out, data_hash
        self.buffer = _BlockBuffer(rows_per_shard, block_size, pad_id)
        self.blocks = self.tokens = self.loss_tokens = 0
        self.shards: list[dict] = []
        out.mkdir(parents=True)

    def add(self, ids: list[int], lab: list[int]) -> None:
        self.buffer.add(ids, lab)
        if self.buffer.full():
            self._flush()

    def _flush(self) -> None:
        blocks = self.buffer.arrays()
        n = len(blocks["input_ids"])
        self.data_hash.update(blocks["input_ids"].tobytes())
        self.tokens += int(blocks["attention_mask"].sum())
        self.loss_tokens += int((blocks["labels"] != IGNORE_INDEX).sum())
        table = _shard_table(blocks, self.blocks)
        path = self.out / f"part-{len(self.shards):05d}.parquet"
        pq.write_table(table, path)
        del table
        self.shards.append({"file": f"{self.out.name}/{path.name}", "rows": n, "sha256": sha256_file(path)})
        self.blocks += n
        self.buffer.clear()

    def close(self) -> dict:
        if self.buffer.n == 0 and self.blocks == 0:
            self.buffer.add([], [])  # an empty split is one padding block, as pack_blocks gives
        if self.buffer.n:
            self._flush()
        self.buffer = None  # (freed before the next split's buffer is made)
        return {"blocks": self.blocks, "tokens": self.tokens, "loss_tokens": self.loss_tokens, "shards": self.shards}


def prepare(data: MuseData, tokenizer, out_dir: str | Path, *, block_size: int,
            with_qa: bool = False, layout: str = "concat", rows_per_shard: int | None = None) -> dict:
    """Tokenise and pack the forget and retain splits, streaming (module docstring); returns the
    manifest. (`rows_per_shard`: blocks per parquet shard, default `shard_rows`; tests make it small.)"""
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise UserInputError("tokenizer: needs bos and eos tokens to pack documents")
    _check_layout(layout)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    manifest = {"block_size": block_size, "layout": layout, "with_qa": with_qa, "source": str(data.root),
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "splits": {}}
    total = sum(len(d) for d in (data.forget_docs, data.retain_docs)) + (
        len(data.forget_qa) + len(data.retain_qa) if with_qa else 0)
    progress = Progress("prepare", total=total, unit="sequences")
    with atomic_dir(out_dir, "prepare") as tmp:
        data_hash = hashlib.sha256()
        for split in SPLITS:
            writer = _SplitWriter(tmp / split, block_size, pad_id, data_hash,
                                  rows_per_shard or shard_rows(block_size))
            for ids, lab in iter_rows(_counted(iter_split_sequences(data, tokenizer, split, with_qa=with_qa),
                                               progress), block_size, layout=layout):
                writer.add(ids, lab)
            manifest["splits"][split] = writer.close()
        manifest["data_fingerprint"] = data_hash.hexdigest()[:16]
        atomic_write_json(tmp / "manifest.json", manifest)
    progress.close(**{f"{split}_blocks": info["blocks"] for split, info in manifest["splits"].items()})
    return manifest


def _counted(seqs: Iterable[Sequence], progress: Progress) -> Iterator[Sequence]:
    for seq in seqs:
        yield seq
        progress.update()


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


def verified_shard(root: Path, shard: dict, *, verify: bool = True) -> Path:
    """The path of a manifest's shard entry under `root`, refused in one line when it is missing
    or (with `verify`) its sha256 is not the manifest's."""
    path = root / shard["file"]
    if not path.is_file():
        raise UserInputError(f"{path}: shard listed in manifest.json is missing")
    if verify and sha256_file(path) != shard["sha256"]:
        raise UserInputError(f"{path}: checksum does not match manifest.json (corrupt or modified shard)")
    return path


def read_blocks(prepared_dir: str | Path, split: str, *, verify: bool = True) -> dict[str, np.ndarray]:
    """All blocks of a split as int32 arrays [N, block_size] (+ block_id [N]); shards are verified."""
    root = Path(prepared_dir)
    manifest = read_manifest(root)
    tables = []
    for shard in manifest["splits"][split]["shards"]:
        tables.append(pq.read_table(verified_shard(root, shard, verify=verify)))
    table = pa.concat_tables(tables)
    out = {"block_id": table.column("block_id").to_numpy()}
    for key in ("input_ids", "labels", "attention_mask"):
        col = table.column(key).combine_chunks()
        out[key] = col.values.to_numpy().reshape(len(table), -1).astype(np.int64)
    return out


class BlockReader:
    """The blocks of one prepared split by block id, reading only the parquet shards that hold
    them, a batch of rows at a time (never a whole split). Each shard's sha256 is checked against
    manifest.json the first time this reader opens it, before any of its rows is used.
    `shards_opened` lists the shard files read, in order (one entry per read of a shard)."""

    COLUMNS = ("input_ids", "labels", "attention_mask")

    def __init__(self, prepared_dir: str | Path, split: str, *, manifest: dict | None = None,
                 batch_rows: int = 512):
        self.root = Path(prepared_dir)
        manifest = manifest if manifest is not None else read_manifest(self.root)
        info = manifest["splits"][split]
        self.split, self.batch_rows = split, batch_rows
        self.num_blocks, self.block_size = int(info["blocks"]), int(manifest["block_size"])
        self.shards = info["shards"]
        try:
            rows = [int(s["rows"]) for s in self.shards]
        except (KeyError, TypeError, ValueError):
            raise UserInputError(f"{self.root / 'manifest.json'}: {split} shards without row counts; "
                                 "rerun `dipo-scale prepare`") from None
        if sum(rows) != self.num_blocks:
            raise UserInputError(f"{self.root / 'manifest.json'}: {split} shards hold {sum(rows)} rows, "
                                 f"the manifest says {self.num_blocks} blocks; rerun `dipo-scale prepare`")
        self.starts = np.cumsum([0, *rows])  # shard i holds blocks starts[i] .. starts[i + 1] - 1
        self._verified: set[str] = set()
        self.shards_opened: list[str] = []

    def shard_of(self, block_ids) -> np.ndarray:
        """The index of the shard holding each block id."""
        return np.searchsorted(self.starts, np.asarray(block_ids, dtype=np.int64), side="right") - 1

    def _verified_path(self, shard: dict) -> Path:
        path = verified_shard(self.root, shard, verify=shard["file"] not in self._verified)
        self._verified.add(shard["file"])
        return path

    def read(self, block_ids) -> dict[str, np.ndarray]:
        """input_ids / labels / attention_mask of `block_ids` (in that order, repeats allowed) as
        int64 arrays [len(block_ids), block_size], as `read_blocks(...)[key][block_ids]` gives."""
        ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_blocks):
            raise ValueError(f"block ids outside 0..{self.num_blocks - 1} of {self.split}")
        out = {k: np.empty((len(ids), self.block_size), dtype=np.int64) for k in self.COLUMNS}
        shard_of = self.shard_of(ids)
        for s in np.unique(shard_of).tolist():
            where = np.nonzero(shard_of == s)[0]
            local = ids[where] - self.starts[s]
            path = self._verified_path(self.shards[s])
            self.shards_opened.append(self.shards[s]["file"])
            batches = pq.ParquetFile(path).iter_batches(batch_size=self.batch_rows, columns=list(self.COLUMNS))
            last = int(local.max())
            for b, batch in enumerate(batches):
                lo = b * self.batch_rows
                if lo > last:
                    break
                hit = (local >= lo) & (local < lo + batch.num_rows)
                if not hit.any():
                    continue
                rows = batch.take(pa.array(local[hit] - lo))
                for k in self.COLUMNS:
                    out[k][where[hit]] = rows.column(k).flatten().to_numpy().reshape(len(rows), -1)
        return out
