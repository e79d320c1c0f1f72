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
