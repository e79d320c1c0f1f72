"""The reference cache: its format on disk and the reader training uses.

Bytes per stored position: `hidden` H·s, `topk` K·(s + 4) + 4, with s = 4 (float32) or 2
(bfloat16, `reference.dtype`); full float32 logits would be 4·V.

Layout of `reference.cache_dir` (the packed blocks of `data.prepared_dir`, shard by shard):

    fingerprints.json                 what the shards are computed for (written first)
    lm_head.safetensors (+ .json)     hidden form: the LM-head weight [V, H] (and bias [V])
    forget/part-00000.safetensors     block_id [R] and the statistics of blocks
    forget/part-00000.json            first_block .. first_block + R - 1, in block order;
    ...                               the .json (the shard's record) is written after it
    retain/...                        when the run's retain term is `kl`
    manifest.json                     written last: form, sizes, bytes_per_token, fingerprints,
                                      every shard's checksums (a cache without it is unfinished)

A shard holds `block_id` [R] (int64) and `hidden` [R, T, H], or `topk_logits` [R, T, K],
`topk_ids` [R, T, K] (int32) and `lse` [R, T] (float32); any safetensors reader reads it (the
writer, `precompute.ShardWriter`, puts the tensors in the file in the order it streams them).
A shard holds as many blocks as fit in `reference.shard_bytes` (at most `reference.rows_per_shard`
when set): `manifest["rows_per_shard"]`. Every position of every block is stored (padding too),
aligned with the block's `input_ids`: position t holds the statistics of the reference logits at t
(which predict token t + 1).

Checksums (format version 2). A shard's bytes are covered by checksums of the parts a reader
reads, never by one checksum of the whole file:
* `index_sha256` over the file's first `index_bytes` bytes: the safetensors header and the
  `block_id` tensor (everything before the statistics);
* `row_sha256[r]`, one per block: the sha256 of row r of every statistics tensor, concatenated in
  file order (e.g. `hidden[r]`; or `topk_logits[r]`, `topk_ids[r]`, `lse[r]`).
A version-1 cache (one sha256 per shard) is refused in one line.

Fingerprints: the reference weights (sha256 of its config and weight files), the tokenizer (of
the packed data), the packed data (the prepared manifest's data fingerprint and block counts)
and the settings that change the statistics (form, k, storage dtype, quantisation, the
reference's compute dtype). Training (`preflight.validate_run`, on the driver, through
`check_cache`) compares them with the run's and refuses a cache that differs, in one line naming
what differs; it also checks, before any worker starts, that every shard the run reads is there
with its size, and its header and block ids match `index_sha256` (a few KB read per shard, not
the statistics).

Training reads only what it needs, and verifies exactly what it reads: each worker, at each micro
step, reads the rows of its own block ids from the shards holding them (`ReferenceCache.read`,
straight into the output tensors) and checks each row against its `row_sha256` (a shard's index
once per process). A truncated shard, or a corrupt header or row, is a one-line error naming the
shard (and the block), raised by the read that meets it; never trusted. The LM head is read whole
by each worker, once, and checked against its whole-file sha256.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from dipo_scale.config import UnlearnConfig
from dipo_scale.errors import UserInputError
from dipo_scale.files import weights_fingerprint

CACHE_VERSION = 2


# ------------------------------------------------------------------------------------------
# What a run needs, and the fingerprints of a cache
# ------------------------------------------------------------------------------------------
def reference_path(cfg: UnlearnConfig) -> str:
    return cfg.model.reference_path or cfg.model.path


def needed_splits(cfg: UnlearnConfig) -> list[str]:
    """Splits whose reference statistics the run uses: forget for DiPO/NPO, retain for `kl`."""
    splits = ["forget"] if cfg.method in ("dipo", "npo") else []
    return splits + (["retain"] if cfg.loss.retain == "kl" else [])


def cache_settings(cfg: UnlearnConfig) -> dict:
    """The settings that change what a cache holds."""
    r = cfg.reference
    return {"form": r.form, "k": r.k if r.form == "topk" else None, "dtype": cfg.reference_dtype,
            "quantize": r.quantize, "reference_dtype": cfg.model_dtype}


def run_fingerprints(cfg: UnlearnConfig) -> dict:
    """The fingerprints a cache must carry to be used by this run (or written by this precompute)."""
    from dipo_scale.prepare import read_manifest

    prepared = read_manifest(cfg.data.prepared_dir)
    data = {"data_fingerprint": prepared["data_fingerprint"], "block_size": prepared["block_size"],
            "blocks": {s: prepared["splits"][s]["blocks"] for s in sorted(prepared["splits"])}}
    return {
        "reference_weights": weights_fingerprint(reference_path(cfg)),
        "tokenizer": prepared["tokenizer_fingerprint"],
        "packed_data": hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16],
        "settings": cache_settings(cfg),
    }


FINGERPRINT_NAMES = {"reference_weights": "reference weights", "tokenizer": "tokenizer",
                     "packed_data": "packed data", "settings": "settings"}


def describe_difference(cached: dict, run: dict) -> str | None:
    """'reference weights, settings (form: hidden vs topk)' or None when they agree."""
    parts = []
    for key, name in FINGERPRINT_NAMES.items():
        a, b = cached.get(key), run.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(set(a) | set(b))
            name += " (" + ", ".join(f"{k}: {a.get(k)} vs {b.get(k)}" for k in keys if a.get(k) != b.get(k)) + ")"
        else:
            name += f" ({str(a)[:8]} vs {str(b)[:8]})"
        parts.append(name)
    return ", ".join(parts) or None


def bytes_per_token(form: str, *, hidden_size: int, k: int, dtype: str) -> int:
    """Bytes stored per position: hidden H·s; topk K·(s + 4) + 4 (logits, int32 ids, float32 lse)."""
    s = 2 if dtype == "bfloat16" else 4
    return hidden_size * s if form == "hidden" else k * (s + 4) + 4


# ------------------------------------------------------------------------------------------
# Reading a cache (training)
# ------------------------------------------------------------------------------------------
def read_cache_manifest(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / "manifest.json"
    if not path.is_file():
        hint = " (unfinished: rerun `dipo-scale reference` to complete it)" if (
            Path(cache_dir) / "fingerprints.json").is_file() else " (run `dipo-scale reference`)"
        raise UserInputError(f"reference.cache_dir {cache_dir}: no manifest.json{hint}")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserInputError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                             "rerun `dipo-scale reference` into a new reference.cache_dir") from None
    except json.JSONDecodeError as e:
        raise UserInputError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    if not isinstance(manifest, dict):
        raise UserInputError(f"{path}: not a reference-cache manifest (a JSON {type(manifest).__name__})")
    if manifest.get("version") != CACHE_VERSION:
        raise UserInputError(f"reference.cache_dir {cache_dir}: cache format version {manifest.get('version')}, "
                             f"this dipo-scale reads version {CACHE_VERSION}; rerun `dipo-scale reference` "
                             "into a new reference.cache_dir")
    problem = _manifest_problem(manifest)
    if problem:
        raise UserInputError(f"{path}: not a reference-cache manifest ({problem}); rerun `dipo-scale reference` "
                             "into a new reference.cache_dir")
    return manifest


def _manifest_problem(manifest: dict) -> str | None:
    """What in a manifest of this version lacks the shape its readers rely on, None if nothing."""
    for key, kind in (("form", str), ("vocab_size", int), ("block_size", int), ("rows_per_shard", int),
                      ("fingerprints", dict), ("splits", dict)):
        if not isinstance(manifest.get(key), kind):
            return f"no {kind.__name__} '{key}'"
    if manifest["rows_per_shard"] < 1:
        return "rows_per_shard < 1"
    shard_keys = {"file": str, "first_block": int, "rows": int, "row_sha256": list}
    for split, info in manifest["splits"].items():
        if not (isinstance(info, dict) and isinstance(info.get("blocks"), int) and isinstance(info.get("shards"), list)
                and all(isinstance(e, dict) and all(isinstance(e.get(k), t) for k, t in shard_keys.items())
                        for e in info["shards"])):
            return f"split '{split}' lacks blocks or shards of {', '.join(shard_keys)}"
    head = manifest.get("lm_head")
    if head is not None and not (isinstance(head, dict) and isinstance(head.get("file"), str)
                                 and isinstance(head.get("bytes"), int)):
        return "lm_head lacks file or bytes"
    return None


def check_cache(cfg: UnlearnConfig) -> dict:
    """Refuse (UserInputError, one line) a cache that does not match the run; returns its manifest.

    Reads the manifest and, of every shard the run uses, its size and index (header and block ids,
    against `index_sha256`): seconds for any cache size. The statistics themselves are verified
    row by row by the workers that read them (`ReferenceCache.read`)."""
    r = cfg.reference
    manifest = read_cache_manifest(r.cache_dir)
    diff = describe_difference(manifest.get("fingerprints", {}), run_fingerprints(cfg))
    if diff:
        raise UserInputError(f"reference.cache_dir {r.cache_dir}: built for a different run — differs in "
                             f"{diff}; rerun `dipo-scale reference` with this config")
    missing = [s for s in needed_splits(cfg) if s not in manifest["splits"]]
    if missing:
        raise UserInputError(f"reference.cache_dir {r.cache_dir}: has no {', '.join(missing)} statistics "
                             "(the retain split is cached when loss.retain=kl); rerun `dipo-scale reference`")
    if r.form == "topk" and cfg.method == "dipo" and cfg.dipo.select == "topk" and cfg.dipo.k > r.k:
        raise UserInputError(f"dipo.k: {cfg.dipo.k} exceeds reference.k ({r.k}), the logits the cache keeps")
    ReferenceCache(r.cache_dir).check_files(needed_splits(cfg))  # every shard the run reads, before workers start
    return manifest


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I32": torch.int32,
           "I64": torch.int64}
STATISTICS = {"hidden": ("hidden",), "topk": ("topk_logits", "topk_ids", "lse")}


def shard_layout(path: Path, index: bytes, rows: int, size: int) -> list[tuple]:
    """[(name, dtype, row shape, file offset of row 0, bytes per row)] of a shard's statistics
    tensors, in file order, from its index (the first `index_bytes` bytes: header and block_id);
    a header that does not describe a shard of `rows` rows and `size` bytes is refused."""
    try:
        n = int.from_bytes(index[:8], "little")
        header = json.loads(index[8:8 + n])
        start = 8 + n
        tensors = sorted(((name, t) for name, t in header.items() if name != "__metadata__"),
                         key=lambda item: item[1]["data_offsets"][0])
        layout = []
        for name, t in tensors:
            begin, end = t["data_offsets"]
            if start + begin < len(index):  # block_id: part of the index
                continue
            shape = t["shape"]
            if shape[0] != rows or (end - begin) % rows:
                raise ValueError(f"{name} has shape {shape}")
            layout.append((name, _DTYPES[t["dtype"]], tuple(shape[1:]), start + begin, (end - begin) // rows))
        if not layout or start + tensors[-1][1]["data_offsets"][1] != size:
            raise ValueError("the tensors do not end at the end of the file")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise UserInputError(f"{path}: not a reference-cache shard of {rows} blocks ({e})") from None
    return layout


def read_exactly(f, view: memoryview, offset: int) -> int:
    """Fill `view` from `offset` of the open file `f`; returns the bytes read (fewer at its end)."""
    f.seek(offset)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


class ReferenceCache:
    """A finished cache, read by block id; every row read is checked against its sha256.

    `bytes_read` counts the bytes this reader has read from shards (and hashed): indexes, rows and
    the LM head."""

    def __init__(self, cache_dir: str | Path):
        self.root = Path(cache_dir)
        self.manifest = read_cache_manifest(self.root)
        self.form = self.manifest["form"]
        self.vocab_size = self.manifest["vocab_size"]
        self._layouts: dict[str, list[tuple]] = {}
        self._head = None
        self.bytes_read = 0

    def _rerun(self) -> str:
        return "rerun `dipo-scale reference` with this config to recompute it"

    def _layout(self, entry: dict) -> list[tuple]:
        """The shard's layout, its size and index checked against the manifest (once per process)."""
        file = entry["file"]
        if file not in self._layouts:
            path = self.root / file
            if not path.is_file():
                raise UserInputError(f"{path}: shard listed in manifest.json is missing; {self._rerun()}")
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise UserInputError(f"{path}: {size} bytes, manifest.json says {entry['bytes']} (truncated or "
                                     f"replaced shard); {self._rerun()}")
            with open(path, "rb") as f:
                index = f.read(entry["index_bytes"])
            self.bytes_read += len(index)
            if hashlib.sha256(index).hexdigest() != entry["index_sha256"]:
                raise UserInputError(f"{path}: header or block ids do not match index_sha256 in manifest.json "
                                     f"(corrupt shard); {self._rerun()}")
            layout = shard_layout(path, index, entry["rows"], size)
            names = tuple(name for name, *_ in layout)
            if names != STATISTICS[self.form] or layout[0][2][0] != self.manifest["block_size"]:
                raise UserInputError(f"{path}: holds {', '.join(names)} of {layout[0][2][0]}-token blocks, "
                                     f"not the {self.form} statistics of {self.manifest['block_size']}-token "
                                     f"blocks manifest.json describes; {self._rerun()}")
            self._layouts[file] = layout
        return self._layouts[file]

    def check_files(self, splits: list[str]) -> None:
        """Check now, without reading any statistics, that the shards of `splits` are the ones the
        manifest lists (blocks covered in order, sizes, indexes) and the LM head is there."""
        per = self.manifest["rows_per_shard"]
        for split in splits:
            info = self.manifest["splits"][split]
            for i, entry in enumerate(info["shards"]):
                rows = min(per, info["blocks"] - i * per)
                if (entry["first_block"], entry["rows"], len(entry["row_sha256"])) != (i * per, rows, rows):
                    raise UserInputError(f"{self.root / 'manifest.json'}: {split} shard {i} ({entry['file']}) does "
                                         f"not hold blocks {i * per}..{i * per + rows - 1}; {self._rerun()}")
                self._layout(entry)
            if len(info["shards"]) != -(-info["blocks"] // per):
                raise UserInputError(f"{self.root / 'manifest.json'}: {split} lists {len(info['shards'])} shards "
                                     f"for {info['blocks']} blocks; {self._rerun()}")
        head = self.manifest.get("lm_head")
        if head:
            path = self.root / head["file"]
            if not path.is_file() or path.stat().st_size != head["bytes"]:
                raise UserInputError(f"{path}: missing or not the size manifest.json says ({head['bytes']} bytes); "
                                     f"{self._rerun()}")

    def read(self, split: str, block_ids) -> dict[str, torch.Tensor]:
        """The statistics of `block_ids` (in that order): tensors [len(block_ids), T, ...]. Only
        these blocks' rows are read (straight into the output), each checked against its sha256."""
        info = self.manifest["splits"].get(split)
        if info is None:
            raise UserInputError(f"{self.root}: no {split} statistics in this cache")
        per = self.manifest["rows_per_shard"]
        block_ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
        if len(block_ids) and (block_ids.min() < 0 or block_ids.max() >= info["blocks"]):
            raise ValueError(f"block ids outside 0..{info['blocks'] - 1}")
        if not info["shards"]:
            return {}
        first_slot: dict[int, int] = {}
        for slot, block in enumerate(block_ids.tolist()):
            first_slot.setdefault(block, slot)
        layout = self._layout(info["shards"][int(block_ids[0]) // per if len(block_ids) else 0])
        out = {name: torch.empty((len(block_ids), *shape), dtype=dtype) for name, dtype, shape, _, _ in layout}
        for shard_index in sorted({b // per for b in first_slot}):
            entry = info["shards"][shard_index]
            path, layout = self.root / entry["file"], self._layout(entry)
            with open(path, "rb", buffering=0) as f:
                for block in sorted(b for b in first_slot if b // per == shard_index):
                    row, h = block - entry["first_block"], hashlib.sha256()
                    for name, _, _, offset, nbytes in layout:
                        view = memoryview(out[name][first_slot[block]].reshape(-1).view(torch.uint8).numpy())
                        got = read_exactly(f, view, offset + row * nbytes)
                        self.bytes_read += got
                        if got != nbytes:
                            raise UserInputError(f"{path}: ends inside block {block} (truncated shard); "
                                                 f"{self._rerun()}")
                        h.update(view)
                    if h.hexdigest() != entry["row_sha256"][row]:
                        raise UserInputError(f"{path}: block {block} (row {row}) does not match its sha256 in "
                                             f"manifest.json (corrupt shard); {self._rerun()}")
        for slot, block in enumerate(block_ids.tolist()):  # a block asked for twice: read once
            if first_slot[block] != slot:
                for t in out.values():
                    t[slot] = t[first_slot[block]]
        return out

    def lm_head(self, device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen LM-head weight [V, H] (and bias) of the hidden form, read (and checked against
        its sha256) once per process, moved once per device."""
        from safetensors.torch import load

        device = torch.device(device or "cpu")
        if self._head is None:
            entry = self.manifest["lm_head"]
            path = self.root / entry["file"]
            if not path.is_file():
                raise UserInputError(f"{path}: LM head listed in manifest.json is missing; {self._rerun()}")
            data = path.read_bytes()
            self.bytes_read += len(data)
            if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise UserInputError(f"{path}: does not match its sha256 in manifest.json (truncated or corrupt); "
                                     f"{self._rerun()}")
            tensors = load(data)
            self._head = (tensors["weight"], tensors.get("bias"))
        if self._head[0].device != device:
            self._head = tuple(None if t is None else t.to(device) for t in self._head)
        return self._head

    def reference(self, split: str, block_ids, device=None):
        """The reference of these blocks as a loss input (HiddenReference / TopKReference)."""
        from dipo_scale.losses import HiddenReference, TopKReference

        t = {k: v.to(device) for k, v in self.read(split, block_ids).items()}
        if self.form == "hidden":
            return HiddenReference(t["hidden"], *self.lm_head(device))
        return TopKReference(t["topk_logits"], t["topk_ids"], t["lse"], self.vocab_size)

    def references(self, device=None, **block_ids) -> dict:
        """{split: reference or None} for split=ids keyword arguments (None: not needed)."""
        return {split: None if ids is None else self.reference(split, ids, device)
                for split, ids in block_ids.items()}
