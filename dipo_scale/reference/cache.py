"""The reference cache: its format on disk and the reader training uses.

Bytes per stored position: `hidden` H·s, `topk` K·(s + 4) + 4, with s = 4 (float32) or 2
(bfloat16, `reference.dtype`); full float32 logits would be 4·V.

Layout of `reference.cache_dir` (the packed blocks of `data.prepared_dir`, shard by shard):

    fingerprints.json                 what the shards are computed for (written first)
    lm_head.safetensors (+ .json)     hidden form: the LM-head weight [V, H] (and bias [V])
    forget/part-00000.safetensors     block_id [R] and the statistics of blocks
    forget/part-00000.json            first_block .. first_block + R - 1, in block order;
    ...                               the .json holds the shard's sha256, written after it
    retain/...                        when the run's retain term is `kl`
    manifest.json                     written last: form, sizes, bytes_per_token, fingerprints,
                                      every shard's sha256 (a cache without it is unfinished)

A shard holds `block_id` [R] (int64) and `hidden` [R, T, H], or `topk_logits` [R, T, K],
`topk_ids` [R, T, K] (int32) and `lse` [R, T] (float32); any safetensors reader reads it (the
writer, `precompute.ShardWriter`, puts the tensors in the file in the order it streams them).
Every position of every block is stored (padding too), aligned with the block's `input_ids`:
position t holds the statistics of the reference logits at t (which predict token t + 1).

Fingerprints: the reference weights (sha256 of its config and weight files), the tokenizer (of
the packed data), the packed data (the prepared manifest's data fingerprint and block counts)
and the settings that change the statistics (form, k, storage dtype, quantisation, the
reference's compute dtype). Training (`unlearn.validate_run`, on the driver, through
`check_cache`) compares them with the run's and refuses a cache that differs, in one line naming
what differs, and checks every shard the run reads before any worker starts.

Training reads only what it needs: each worker, at each micro step, reads the rows of its own
block ids from the shards holding them (`ReferenceCache.reference`): the shard file is
memory-mapped and only those rows are copied. The first time a worker touches a shard it checks
the file's sha256 against manifest.json; a truncated or corrupt shard is an error, never trusted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from dipo_scale.config import UnlearnConfig
from dipo_scale.errors import UserInputError
from dipo_scale.files import sha256_file, weights_fingerprint

CACHE_VERSION = 1


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
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserInputError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None


def check_cache(cfg: UnlearnConfig) -> dict:
    """Refuse (UserInputError, one line) a cache that does not match the run; returns its manifest."""
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
    ReferenceCache(r.cache_dir).verify(needed_splits(cfg))  # every shard the run reads, before workers start
    return manifest


class ReferenceCache:
    """A finished cache, read by block id. Shards are verified (sha256) the first time they are read."""

    def __init__(self, cache_dir: str | Path):
        self.root = Path(cache_dir)
        self.manifest = read_cache_manifest(self.root)
        self.form = self.manifest["form"]
        self.vocab_size = self.manifest["vocab_size"]
        self._verified: set[str] = set()
        self._head = None

    def _verified_path(self, entry: dict) -> Path:
        path = self.root / entry["file"]
        if entry["file"] not in self._verified:
            if not path.is_file():
                raise UserInputError(f"{path}: shard listed in manifest.json is missing")
            if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                raise UserInputError(f"{path}: checksum does not match manifest.json (truncated or corrupt "
                                     "shard); rerun `dipo-scale reference` to recompute it")
            self._verified.add(entry["file"])
        return path

    def verify(self, splits: list[str]) -> None:
        """Check every shard of `splits` (and the LM head) against the manifest now."""
        for split in splits:
            for entry in self.manifest["splits"][split]["shards"]:
                self._verified_path(entry)
        if self.manifest.get("lm_head"):
            self._verified_path(self.manifest["lm_head"])

    def read(self, split: str, block_ids) -> dict[str, torch.Tensor]:
        """The statistics of `block_ids` (in that order): tensors [len(block_ids), T, ...]."""
        from safetensors import safe_open

        info = self.manifest["splits"].get(split)
        if info is None:
            raise UserInputError(f"{self.root}: no {split} statistics in this cache")
        per_shard = self.manifest["rows_per_shard"]
        block_ids = np.asarray(block_ids, dtype=np.int64)
        if len(block_ids) and (block_ids.min() < 0 or block_ids.max() >= info["blocks"]):
            raise ValueError(f"block ids outside 0..{info['blocks'] - 1}")
        parts: dict[str, list] = {}
        order = []
        for shard_index in sorted(set((block_ids // per_shard).tolist())):
            entry = info["shards"][shard_index]
            wanted = block_ids[block_ids // per_shard == shard_index]
            with safe_open(self._verified_path(entry), framework="pt") as f:
                for name in f.keys():
                    if name == "block_id":
                        continue
                    sl = f.get_slice(name)
                    rows = [sl[i - entry["first_block"]:i - entry["first_block"] + 1] for i in wanted.tolist()]
                    parts.setdefault(name, []).append(torch.cat(rows))
            order.append(wanted)
        out = {name: torch.cat(chunks) for name, chunks in parts.items()}
        # back to the order asked for
        position = {b: i for i, b in enumerate(np.concatenate(order).tolist())} if order else {}
        index = torch.as_tensor([position[b] for b in block_ids.tolist()], dtype=torch.long)
        return {name: t[index] for name, t in out.items()}

    def lm_head(self, device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen LM-head weight [V, H] (and bias) of the hidden form, loaded once per device."""
        from safetensors.torch import load_file

        device = torch.device(device or "cpu")
        if self._head is None or self._head[0].device != device:
            tensors = load_file(self._verified_path(self.manifest["lm_head"]))
            self._head = (tensors["weight"].to(device), None if "bias" not in tensors else tensors["bias"].to(device))
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
