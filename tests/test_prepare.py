"""Packing layouts, loss masks, and shard verification."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dipo_scale.errors import UserInputError
from dipo_scale.prepare import IGNORE_INDEX, pack_blocks, read_blocks, read_manifest


def test_concat_layout_cuts_the_stream_and_pads_the_tail():
    seqs = [([1, 2, 3], [1, 2, 3]), ([4, 5], [-100, 5])]
    b = pack_blocks(seqs, 2, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2], [3, 4], [5, 0]]
    assert b["labels"].tolist() == [[1, 2], [3, IGNORE_INDEX], [5, IGNORE_INDEX]]
    assert b["attention_mask"].tolist() == [[1, 1], [1, 1], [1, 0]]


def test_per_sequence_layout_starts_each_sequence_on_a_block():
    seqs = [([1, 2, 3], [1, 2, 3]), ([4], [4])]
    b = pack_blocks(seqs, 2, pad_id=9, layout="per_sequence")
    assert b["input_ids"].tolist() == [[1, 2], [3, 9], [4, 9]]
    assert b["labels"].tolist() == [[1, 2], [3, IGNORE_INDEX], [4, IGNORE_INDEX]]


def test_unknown_layout_is_refused():
    with pytest.raises(UserInputError, match="layout"):
        pack_blocks([([1], [1])], 2, 0, layout="zigzag")


def test_prepared_qa_blocks_label_only_the_answers(tiny_assets):
    manifest = read_manifest(tiny_assets["prepared"])
    forget = read_blocks(tiny_assets["prepared"], "forget")
    assert forget["input_ids"].shape == (manifest["splits"]["forget"]["blocks"], manifest["block_size"])
    assert manifest["splits"]["forget"]["loss_tokens"] < manifest["splits"]["forget"]["tokens"]
    assert (forget["block_id"] == np.arange(len(forget["block_id"]))).all()


def test_corrupt_or_missing_shard_is_detected(tiny_assets, tmp_path):
    import shutil

    prepared = tmp_path / "prepared"
    shutil.copytree(tiny_assets["prepared"], prepared)
    shard = prepared / json.loads((prepared / "manifest.json").read_text())["splits"]["forget"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserInputError, match="checksum"):
        read_blocks(prepared, "forget")
    shard.unlink()
    with pytest.raises(UserInputError, match="missing"):
        read_blocks(prepared, "forget")


# --- streaming prepare, and reading only the blocks a worker needs ---------------------------------
BLOCK = 32


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """A generated corpus (documents and QA) and a BPE tokenizer trained on it: seconds."""
    from dipo_scale.data.corpus import generate_corpus
    from dipo_scale.data.muse import load_muse_dir
    from dipo_scale.models import train_tokenizer

    data = load_muse_dir(generate_corpus(tmp_path_factory.mktemp("small") / "corpus", num_docs=30, seed=0))
    return data, train_tokenizer(data.forget_docs + data.retain_docs, 300)


def _in_memory_prepare(data, tokenizer, out, *, block_size, layout, with_qa, rows_per_shard):
    """The former prepare, kept as the reference: every split tokenised and packed in memory
    (the whole stream flattened for `concat`), then cut into shards."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dipo_scale.files import sha256_file
    from dipo_scale.prepare import split_sequences, tokenizer_fingerprint

    pad_id = tokenizer.pad_token_id
    manifest = {"block_size": block_size, "layout": layout, "with_qa": with_qa, "source": str(data.root),
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "splits": {}}
    data_hash = hashlib.sha256()
    for split, seqs in split_sequences(data, tokenizer, with_qa=with_qa).items():
        if layout == "concat":
            seqs = [([t for ids, _ in seqs for t in ids], [t for _, lab in seqs for t in lab])]
        rows = [(ids[s:s + block_size], lab[s:s + block_size]) for ids, lab in seqs
                for s in range(0, len(ids), block_size)]
        n = max(1, len(rows))
        blocks = {"input_ids": np.full((n, block_size), pad_id, dtype=np.int32),
                  "labels": np.full((n, block_size), IGNORE_INDEX, dtype=np.int32),
                  "attention_mask": np.zeros((n, block_size), dtype=np.int32)}
        for i, (ids, lab) in enumerate(rows):
            blocks["input_ids"][i, :len(ids)], blocks["labels"][i, :len(lab)] = ids, lab
            blocks["attention_mask"][i, :len(ids)] = 1
        data_hash.update(blocks["input_ids"].tobytes())
        (out / split).mkdir(parents=True)
        shards = []
        for i, start in enumerate(range(0, n, rows_per_shard)):
            sl = slice(start, start + rows_per_shard)
            table = pa.table({"block_id": pa.array(np.arange(n, dtype=np.int64)[sl]),
                              **{k: pa.array(list(v[sl]), type=pa.list_(pa.int32())) for k, v in blocks.items()}})
            path = out / split / f"part-{i:05d}.parquet"
            pq.write_table(table, path)
            shards.append({"file": f"{split}/{path.name}", "rows": table.num_rows, "sha256": sha256_file(path)})
        manifest["splits"][split] = {"blocks": n, "tokens": int(blocks["attention_mask"].sum()),
                                     "loss_tokens": int((blocks["labels"] != IGNORE_INDEX).sum()), "shards": shards}
    manifest["data_fingerprint"] = data_hash.hexdigest()[:16]
    return manifest


@pytest.mark.parametrize("layout,with_qa", [("concat", False), ("concat", True), ("per_sequence", True)])
def test_streaming_prepare_writes_the_bytes_of_the_in_memory_one(small_corpus, tmp_path, layout, with_qa):
    from dipo_scale.prepare import prepare

    data, tokenizer = small_corpus
    expected = _in_memory_prepare(data, tokenizer, tmp_path / "ref", block_size=BLOCK, layout=layout,
                                  with_qa=with_qa, rows_per_shard=16)
    manifest = prepare(data, tokenizer, tmp_path / "out", block_size=BLOCK, layout=layout, with_qa=with_qa,
                       rows_per_shard=16)
    assert manifest == expected  # counts, every shard's sha256 and the data fingerprint
    assert len(manifest["splits"]["forget"]["shards"]) > 2
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == expected
    for split in ("forget", "retain"):
        for shard in expected["splits"][split]["shards"]:
            assert (tmp_path / "out" / shard["file"]).read_bytes() == (tmp_path / "ref" / shard["file"]).read_bytes()


def test_prepare_writes_each_shard_as_soon_as_it_is_full(small_corpus, tmp_path, monkeypatch):
    """Shards are written while documents are still being tokenised, and the packing buffer
    holds one shard's rows, not the split's."""
    import dipo_scale.prepare as prep

    data, tokenizer = small_corpus
    tokenised, written = [0], []
    tokenize = prep.tokenize_documents

    def counting_tokenize(tok, texts):
        tokenised[0] += len(texts)
        return tokenize(tok, texts)

    write = prep.pq.write_table

    def recording_write(table, path, *a, **kw):
        written.append((path.parent.name, table.num_rows, tokenised[0]))
        return write(table, path, *a, **kw)

    monkeypatch.setattr(prep, "DOC_BATCH", 1)
    monkeypatch.setattr(prep, "tokenize_documents", counting_tokenize)
    monkeypatch.setattr(prep.pq, "write_table", recording_write)
    buffers = []
    init = prep._BlockBuffer.__init__
    monkeypatch.setattr(prep._BlockBuffer, "__init__",
                        lambda self, capacity, *a: (buffers.append(capacity), init(self, capacity, *a))[1])
    manifest = prep.prepare(data, tokenizer, tmp_path / "out", block_size=BLOCK, rows_per_shard=8)
    forget = [w for w in written if w[0] == "forget"]
    assert len(forget) == len(manifest["splits"]["forget"]["shards"]) > 2
    assert forget[0][2] < len(data.forget_docs)  # the first shard went out before the last document was read
    assert [w[2] for w in forget] == sorted(w[2] for w in forget)
    assert buffers == [8, 8]  # one buffer of at most a shard per split


def test_prepare_memory_does_not_grow_with_the_corpus(small_corpus, tmp_path, monkeypatch):
    """Peak Python-heap allocation of prepare (tracemalloc, numpy's buffers included) for 4x the
    documents stays within 1.2x: bounded by a shard and a document batch, not by the corpus."""
    import dataclasses
    import tracemalloc

    import dipo_scale.prepare as prep
    from dipo_scale.prepare import prepare

    data, tokenizer = small_corpus
    monkeypatch.setattr(prep, "DOC_BATCH", 8)
    peaks = []
    for copies in (1, 8, 32):  # (the first, a warm-up)
        more = dataclasses.replace(data, forget_docs=data.forget_docs * copies, retain_docs=data.retain_docs * copies)
        tracemalloc.start()
        prepare(more, tokenizer, tmp_path / f"x{copies}", block_size=BLOCK, rows_per_shard=64)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[2] < 1.2 * peaks[1], peaks


def test_long_blocks_take_the_memory_of_what_they_hold(small_corpus, tmp_path):
    """`--block-size 65536` on a small corpus took 2.4 GB (a shard's buffer: 4096 rows of 64k
    tokens, allocated whole): the buffer grows with the rows it holds and a shard is capped at
    SHARD_BYTES, so the peak is a few blocks' bytes; the blocks are those of a smaller block size
    cut longer (same tokens)."""
    import tracemalloc

    from dipo_scale.prepare import SHARD_BYTES, prepare, shard_rows

    data, tokenizer = small_corpus
    tracemalloc.start()
    manifest = prepare(data, tokenizer, tmp_path / "long", block_size=65536, layout="per_sequence")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    blocks = manifest["splits"]["forget"]["blocks"] + manifest["splits"]["retain"]["blocks"]
    assert peak < 2 * 16 * 12 * 65536 + (64 << 20), (peak, blocks)  # 16 rows (the first growth) x 3 int32 columns
    assert shard_rows(65536) * 12 * 65536 <= SHARD_BYTES < (shard_rows(65536) + 1) * 12 * 65536
    assert shard_rows(2048) == 4096  # usual block sizes: shards as before
    short = prepare(data, tokenizer, tmp_path / "short", block_size=BLOCK, layout="per_sequence")
    assert manifest["splits"]["forget"]["tokens"] == short["splits"]["forget"]["tokens"]


@pytest.fixture
def sharded(small_corpus, tmp_path):
    """A prepared directory with many small shards (8 blocks each)."""
    from dipo_scale.prepare import prepare

    data, tokenizer = small_corpus
    prepare(data, tokenizer, tmp_path / "prepared", block_size=BLOCK, rows_per_shard=8)
    return tmp_path / "prepared"


def _corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_block_reader_reads_only_the_shards_of_the_asked_blocks(sharded):
    from dipo_scale.prepare import BlockReader

    whole = read_blocks(sharded, "forget")
    reader = BlockReader(sharded, "forget")
    assert reader.num_blocks == len(whole["input_ids"]) > 24
    ids = np.array([17, 3, 17, 9, 3])  # shards 2, 0, 1; repeats and any order
    rows = reader.read(ids)
    for k in ("input_ids", "labels", "attention_mask"):
        assert rows[k].dtype == np.int64 and (rows[k] == whole[k][ids]).all()
    assert sorted(reader.shards_opened) == ["forget/part-00000.parquet", "forget/part-00001.parquet",
                                            "forget/part-00002.parquet"]
    # a corrupt shard is never trusted, and one not asked for is not even read
    manifest = read_manifest(sharded)
    _corrupt(sharded / manifest["splits"]["forget"]["shards"][3]["file"])
    fresh = BlockReader(sharded, "forget")
    assert (fresh.read([1, 20])["input_ids"] == whole["input_ids"][[1, 20]]).all()
    with pytest.raises(UserInputError, match="part-00003.parquet: checksum"):
        fresh.read([25])
    with pytest.raises(ValueError, match="outside"):
        fresh.read([fresh.num_blocks])


def test_a_worker_reads_only_the_blocks_of_its_steps(sharded):
    """StepBlocks (what each training worker reads): the global batch's ids of each step as
    batch_schedule gives them and this rank's rows of them, read from the shards that hold those
    rows only; a corrupt shard none of its steps needs does not stop it."""
    from dipo_scale.prepare import BlockReader
    from dipo_scale.unlearn import StepBlocks, batch_schedule

    whole = read_blocks(sharded, "forget")
    n, G, steps, seed = len(whole["input_ids"]), 4, 3, 0
    for rank in (0, 1):
        mine = slice(rank * 2, rank * 2 + 2)
        needed = {int(b) for s in range(steps) for b in batch_schedule(n, G, s, seed)[mine]}
        reader = BlockReader(sharded, "forget")
        shards_needed = {reader.shards[i]["file"] for i in reader.shard_of(sorted(needed))}
        assert len(shards_needed) < len(reader.shards)
        idle = next(s for s in reader.shards if s["file"] not in shards_needed)["file"]
        backup = (sharded / idle).read_bytes()
        _corrupt(sharded / idle)
        try:
            blocks = StepBlocks(reader, G, seed, mine, last_step=steps, window_rows=2)  # a window per step
            for step in range(steps):
                ids, rows = blocks.get(step)
                assert (ids == batch_schedule(n, G, step, seed)).all()
                for k in ("input_ids", "labels", "attention_mask"):
                    assert (rows[k] == whole[k][ids[mine]]).all()
        finally:
            (sharded / idle).write_bytes(backup)
        assert set(reader.shards_opened) == shards_needed
        # one window for all steps: each shard read once
        reader = BlockReader(sharded, "forget")
        blocks = StepBlocks(reader, G, seed, mine, last_step=steps)
        assert [(blocks.get(s)[1]["input_ids"] == whole["input_ids"][batch_schedule(n, G, s, seed)[mine]]).all()
                for s in range(steps)] == [True] * steps
        assert sorted(reader.shards_opened) == sorted(shards_needed)
