"""Data-parallel MUSE evaluation over Ray actors: each actor loads the model and scores a
contiguous share of every item list (`MuseItems.share`); the per-item results are concatenated in
share order, so the metrics equal those of one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dipo_scale.data.muse import MuseData
from dipo_scale.eval.generation import load_model_and_tokenizer, where
from dipo_scale.eval.muse import MuseItems, merge_item_scores, muse_items, muse_metrics, score_muse_items
from dipo_scale.eval.privacy import MIN_K


class MuseEvalWorker:
    """Loads one model and scores a share of the MUSE items (per-item results, in order)."""

    def __init__(self, model_path: str, device: str | None = None):
        self.model, self.tokenizer = load_model_and_tokenizer(model_path)
        if device is not None:
            self.model.to(device)

    def run(self, share: MuseItems, settings: dict[str, Any], name: str) -> dict[str, dict[str, list]]:
        with where(name):
            return score_muse_items(self.model, self.tokenizer, share, **settings)


def evaluate_muse_items(
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
) -> dict[str, dict[str, list]]:
    """The per-item results of `score_muse_items` over `num_workers` Ray actors (`num_cpus=1`
    each, plus `num_gpus_per_worker`), each scoring a share of every item list. Starts a local Ray
    runtime (and shuts it down after) when none is running."""
    import ray

    from dipo_scale.data.muse import load_muse

    if num_workers < 1:
        raise ValueError(f"evaluate_muse_items: num_workers must be >= 1, got {num_workers}")
    data = data_dir if isinstance(data_dir, MuseData) else load_muse(data_dir)
    items = muse_items(data, limit=limit, mia=mia)
    settings = {"batch_size": batch_size, "verbmem_max_new_tokens": verbmem_max_new_tokens,
                "knowmem_max_new_tokens": knowmem_max_new_tokens, "k": k}
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=True)  # the actors' progress lines
    try:
        worker_cls = ray.remote(num_cpus=1, num_gpus=num_gpus_per_worker)(MuseEvalWorker)
        device = "cuda" if num_gpus_per_worker > 0 else None
        workers = [worker_cls.remote(str(model_path), device) for _ in range(num_workers)]
        results = ray.get([w.run.remote(items.share(i, num_workers), settings, f"worker {i + 1} of {num_workers}")
                           for i, w in enumerate(workers)])
        for w in workers:
            ray.kill(w)
    finally:
        if started:
            ray.shutdown()
    return merge_item_scores(results)


def evaluate_muse_parallel(model_path: str | Path, data_dir: str | Path | MuseData, num_workers: int,
                           **settings) -> dict[str, float]:
    """`evaluate_muse` (with `mia`) split across `num_workers` Ray actors (`evaluate_muse_items`):
    the per-item scores of the shares are concatenated in order and then averaged (AUC over all
    scores), so the result equals the single-process one."""
    return muse_metrics(evaluate_muse_items(model_path, data_dir, num_workers, **settings))
