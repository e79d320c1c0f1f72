"""Data-parallel MUSE evaluation over Ray actors: each loads the model and scores a contiguous
share of every item list; the per-item scores are concatenated in order and then averaged."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dipo_scale.data.muse import MuseData
from dipo_scale.eval.generation import criterion, limited, load_model_and_tokenizer
from dipo_scale.eval.muse import _mean_percent, knowmem_scores, muse_mia_texts, verbmem_scores
from dipo_scale.eval.privacy import MIN_K, auc_from_scores, min_k_scores


def _shard(items: Sequence, num_shards: int) -> list[list]:
    """`items` cut into `num_shards` contiguous parts of near-equal size (in order)."""
    bounds = np.linspace(0, len(items), num_shards + 1).round().astype(int)
    return [list(items[bounds[i] : bounds[i + 1]]) for i in range(num_shards)]


class MuseEvalWorker:
    """Loads one model and scores a share of the MUSE items (per-item scores, in order)."""

    def __init__(self, model_path: str, device: str | None = None):
        self.model, self.tokenizer = load_model_and_tokenizer(model_path)
        if device is not None:
            self.model.to(device)

    def run(self, shard: dict[str, list], settings: dict[str, Any]) -> dict[str, list[float]]:
        m, tok, bs = self.model, self.tokenizer, settings["batch_size"]
        out = {}
        with criterion("verbmem_f"):
            out["verbmem_f"] = verbmem_scores(m, tok, shard["verbmem"],
                                              max_new_tokens=settings["verbmem_max_new_tokens"], batch_size=bs)
        for key, split in (("knowmem_f", "forget"), ("knowmem_r", "retain")):
            with criterion(key):
                out[key] = knowmem_scores(m, tok, shard[f"{split}_qa"], settings[f"{split}_qa_icl"],
                                          max_new_tokens=settings["knowmem_max_new_tokens"], batch_size=bs)
        with criterion("mia_auc"):
            for key in ("mia_forget", "mia_holdout"):
                out[key] = (min_k_scores(m, tok, shard[key], k=settings["k"], batch_size=bs)
                            if shard[key] else [])
        return out


def evaluate_muse_parallel(
    model_path: str | Path,
    data_dir: str | Path | MuseData,
    num_workers: int,
    *,
    verbmem_max_new_tokens: int = 128,
    knowmem_max_new_tokens: int = 32,
    batch_size: int = 16,
    limit: int | None = None,
    mia: bool = True,
    k: float = MIN_K,
    num_gpus_per_worker: float = 0.0,
) -> dict[str, float]:
    """`evaluate_muse` (with `mia`) split across `num_workers` Ray actors (`num_cpus=1` each, plus
    `num_gpus_per_worker`): each loads the model from `model_path` and scores a contiguous share
    of every item list; the per-item scores are concatenated in order and then averaged (AUC over
    all scores), so the result equals the single-process one. Starts a local Ray runtime (and
    shuts it down after) when none is running."""
    import ray

    from dipo_scale.data.muse import load_muse

    if num_workers < 1:
        raise ValueError(f"evaluate_muse_parallel: num_workers must be >= 1, got {num_workers}")
    data = data_dir if isinstance(data_dir, MuseData) else load_muse(data_dir)
    forget_texts, holdout_texts = muse_mia_texts(data)
    lists = {
        "verbmem": limited(data.verbmem, limit),
        "forget_qa": limited(data.forget_qa, limit),
        "retain_qa": limited(data.retain_qa, limit),
        "mia_forget": limited(forget_texts, limit) if mia and holdout_texts else [],
        "mia_holdout": limited(holdout_texts, limit) if mia and forget_texts else [],
    }
    for key in ("verbmem", "forget_qa", "retain_qa"):
        if not lists[key]:
            raise ValueError(f"evaluate_muse_parallel: no {key} items to evaluate")
    settings = {"batch_size": batch_size, "verbmem_max_new_tokens": verbmem_max_new_tokens,
                "knowmem_max_new_tokens": knowmem_max_new_tokens, "k": k,
                "forget_qa_icl": data.forget_qa_icl, "retain_qa_icl": data.retain_qa_icl}
    shards = {key: _shard(items, num_workers) for key, items in lists.items()}

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=True)  # the actors' progress lines
    try:
        worker_cls = ray.remote(num_cpus=1, num_gpus=num_gpus_per_worker)(MuseEvalWorker)
        device = "cuda" if num_gpus_per_worker > 0 else None
        workers = [worker_cls.remote(str(model_path), device) for _ in range(num_workers)]
        results = ray.get([w.run.remote({key: shards[key][i] for key in shards}, settings)
                           for i, w in enumerate(workers)])
        for w in workers:
            ray.kill(w)
    finally:
        if started:
            ray.shutdown()
    merged = {key: [v for r in results for v in r[key]] for key in results[0]}
    metrics = {key: _mean_percent(merged[key]) for key in ("verbmem_f", "knowmem_f", "knowmem_r")}
    if merged["mia_forget"] and merged["mia_holdout"]:
        metrics["mia_auc"] = auc_from_scores(merged["mia_forget"], merged["mia_holdout"])
    return metrics
