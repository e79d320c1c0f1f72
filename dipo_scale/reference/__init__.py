"""Reference statistics: precompute the reference model's statistics once, read them while training.

DiPO (and NPO, and the `kl` retain term) need the reference model's logits at every position of
a batch. The `online` form runs a frozen reference engine every step (`dipo_scale.unlearn`);
this package writes a cache once (`dipo-scale reference`, `ray_jobs/precompute_reference.py`) in
one of two forms (docs/DIPO.md, "Reference statistics"):

* `hidden` (exact): the reference's final hidden state at every position — the input of its LM
  head — plus one copy of the frozen LM-head weight (`lm_head.safetensors`, float32). The losses
  rebuild the logits chunk by chunk (`dipo_scale.losses.HiddenReference`).
* `topk` (approximate; K = `reference.k`): the K largest logits, their ids (int32) and the
  log-sum-exp over the whole vocabulary (float32). The rest of the row is rebuilt with the
  left-over probability mass spread uniformly over the other V − K ids, so the stored ids keep
  their exact log-probabilities and K = V is exact (`dipo_scale.losses.TopKReference`).

Two halves, which meet at the cache format:

* `dipo_scale.reference.cache`: the format (layout of `reference.cache_dir`, fingerprints,
  manifest, a sha256 per block) and the reader training uses (`ReferenceCache`, which verifies
  exactly the rows it reads; `check_cache`, the driver's check of fingerprints, manifest and
  shard headers; `needed_splits`). It imports nothing of training or of the precompute.
* `dipo_scale.reference.precompute`: the distributed job that writes a cache
  (`precompute_reference`: Ray Data actor pool or ZeRO-3 workers). It uses `dipo_scale.unlearn`'s
  engine set-up; training never imports it.

The public names of both are importable from `dipo_scale.reference`; the precompute's are loaded
on first use, so `import dipo_scale.reference` (as training does) does not load the precompute.
"""

from __future__ import annotations

from dipo_scale.reference.cache import (CACHE_VERSION, FINGERPRINT_NAMES, ReferenceCache, bytes_per_token,
                                        cache_settings, check_cache, describe_difference, needed_splits,
                                        read_cache_manifest, reference_path, run_fingerprints)

_PRECOMPUTE = ("SLOW_ENV", "ReferenceForward", "ShardActor", "ShardWriter", "compute_shard", "load_reference_model",
               "plan_shards", "pool_size", "precompute_reference", "read_block_range", "shard_rows", "zero3_ds_config",
               "zero3_worker")

__all__ = ["CACHE_VERSION", "FINGERPRINT_NAMES", "ReferenceCache", "bytes_per_token", "cache_settings", "check_cache",
           "describe_difference", "needed_splits", "read_cache_manifest", "reference_path", "run_fingerprints",
           *_PRECOMPUTE]


def __getattr__(name: str):
    if name in _PRECOMPUTE:
        from dipo_scale.reference import precompute

        return getattr(precompute, name)
    raise AttributeError(f"module 'dipo_scale.reference' has no attribute {name!r}")
