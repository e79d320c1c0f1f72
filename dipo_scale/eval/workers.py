"""Where an evaluation runs: in this process, or over Ray actors, each holding the model on the
device it finds (`resolve_device`: CUDA and bfloat16 where its GPU is visible, else the CPU).

MUSE splits over actors: each scores a contiguous share of every item list (`MuseItems.share`)
and the per-item results are concatenated in share order, so the metrics equal those of one
process. Anything else (TOFU, a reference model's truth ratios) runs whole in one actor
(`on_model`), which gets the GPU the driver may not have.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

from dipo_scale.cluster import init_ray
from dipo_scale.data.muse import MuseData
from dipo_scale.errors import UserInputError, user_error_behind
from dipo_scale.eval.generation import DEVICES, describe_device, load_model_and_tokenizer, resolve_device, where
from dipo_scale.eval.muse import MuseItems, merge_item_scores, muse_items, muse_metrics, score_muse_items
from dipo_scale.eval.privacy import MIN_K


class ModelWorker:
    """One model on this process's device (a Ray actor's, or the driver's): scores shares of MUSE
    items, or runs a function of (model, tokenizer)."""

    def __init__(self, model_path: str, device: str = "auto", trust_remote_code: bool = False, name: str = "",
                 quantize: str | None = None):
        on, dtype = resolve_device(device)
        self.name = name
        self.model, self.tokenizer = load_model_and_tokenizer(model_path, dtype=dtype, device=on,
                                                              trust_remote_code=trust_remote_code, quantize=quantize)
        print(f"evaluate: {model_path}{f' in {quantize}' if quantize else ''} on {describe_device(on, dtype)}"
              + (f", {name}" if name else ""), flush=True)

    def score_muse(self, share: MuseItems, settings: dict[str, Any]) -> dict[str, dict[str, list]]:
        with where(self.name) if self.name else nullcontext():
            return score_muse_items(self.model, self.tokenizer, share, **settings)

    def call(self, fn: Callable, args: tuple, kwargs: dict):
        return fn(self.model, self.tokenizer, *args, **kwargs)


def check_placement(device: str, num_workers: int, gpus_per_worker: float) -> bool:
    """One-line errors for settings that cannot work; True when the evaluation runs on Ray actors
    (more than one worker, or GPUs asked for: the driver need not have one)."""
    if device not in DEVICES:
        raise UserInputError(f"--device {device}: choose one of {', '.join(DEVICES)}")
    if num_workers < 1:
        raise UserInputError(f"--num-workers {num_workers}: must be >= 1")
    if not gpus_per_worker >= 0:
        raise UserInputError(f"--gpus-per-worker {gpus_per_worker}: must be >= 0")
    if device == "cpu" and gpus_per_worker > 0:
        raise UserInputError(f"--gpus-per-worker {gpus_per_worker:g} with --device cpu: the GPUs would stay idle")
    actors = num_workers > 1 or gpus_per_worker > 0
    if actors and device == "cuda" and gpus_per_worker == 0:
        raise UserInputError("--device cuda with Ray actors needs --gpus-per-worker > 0 "
                             "(Ray shows an actor a GPU only when it asks for one)")
    return actors


def _actors(model_path: str, num_workers: int, gpus_per_worker: float, device: str, trust_remote_code: bool,
            quantize: str | None):
    import ray

    cls = ray.remote(num_cpus=1, num_gpus=gpus_per_worker)(ModelWorker)
    return [cls.remote(str(model_path), device, trust_remote_code, f"worker {i + 1} of {num_workers}", quantize)
            for i in range(num_workers)]


def _get(refs):
    """`ray.get`, with an actor's one-line input error (e.g. a quantization its backend cannot
    run) raised as itself rather than inside a remote traceback."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayError as e:
        if (user_error := user_error_behind(e)) is None:
            raise
        raise UserInputError(str(user_error)) from None


class _Ray:
    """A local Ray runtime for the duration (shut down after) when none is running."""

    def __enter__(self):
        import ray

        self.started = not ray.is_initialized()
        if self.started:
            init_ray(include_dashboard=False, log_to_driver=True)  # the actors' progress lines
        return self

    def __exit__(self, *exc):
        import ray

        if self.started:
            ray.shutdown()


def muse_item_scores(
    model_path: str | Path,
    data: str | Path | MuseData,
    *,
    num_workers: int = 1,
    gpus_per_worker: float = 0.0,
    device: str = "auto",
    trust_remote_code: bool = False,
    verbmem_max_new_tokens: int = 128,
    knowmem_max_new_tokens: int = 32,
    batch_size: int = 16,
    limit: int | None = None,
    mia: bool = True,
    mia_only: bool = False,
    k: float = MIN_K,
    quantize: str | None = None,
) -> dict[str, dict[str, list]]:
    """The per-item results of `score_muse_items` for the model at `model_path`: in this process
    (one worker, no GPUs asked for), else over `num_workers` Ray actors (`num_cpus=1` and
    `gpus_per_worker` GPUs each), each scoring a share of every item list. `mia_only`: the attack
    scores only (a retrain model's, for PrivLeak). `quantize`: "8bit" / "4bit" (bitsandbytes)."""
    from dipo_scale.data.muse import load_muse

    actors = check_placement(device, num_workers, gpus_per_worker)
    data = data if isinstance(data, MuseData) else load_muse(data)
    items = muse_items(data, limit=limit, mia=mia, mia_only=mia_only)
    settings = {"batch_size": batch_size, "verbmem_max_new_tokens": verbmem_max_new_tokens,
                "knowmem_max_new_tokens": knowmem_max_new_tokens, "k": k}
    if not actors:
        return ModelWorker(str(model_path), device, trust_remote_code, quantize=quantize).score_muse(items, settings)
    import ray

    with _Ray():
        workers = _actors(str(model_path), num_workers, gpus_per_worker, device, trust_remote_code, quantize)
        try:
            results = _get([w.score_muse.remote(items.share(i, num_workers), settings)
                            for i, w in enumerate(workers)])
        finally:
            for w in workers:
                ray.kill(w)
    return merge_item_scores(results)


def on_model(model_path: str | Path, fn: Callable, *args, gpus_per_worker: float = 0.0, device: str = "auto",
             trust_remote_code: bool = False, quantize: str | None = None, **kwargs):
    """`fn(model, tokenizer, *args, **kwargs)` with the model at `model_path` (in `quantize`, if
    given) loaded in this process, or, with `gpus_per_worker` > 0, in one Ray actor with that many GPUs."""
    actors = check_placement(device, 1, gpus_per_worker)
    if not actors:
        return ModelWorker(str(model_path), device, trust_remote_code, quantize=quantize).call(fn, args, kwargs)
    import ray

    with _Ray():
        [worker] = _actors(str(model_path), 1, gpus_per_worker, device, trust_remote_code, quantize)
        try:
            return _get(worker.call.remote(fn, args, kwargs))
        finally:
            ray.kill(worker)


def on_gpus(fn: Callable, *args, gpus: float):
    """`fn(*args)` in a Ray task with `gpus` GPUs (the driver may have none), e.g. a check that
    must run on the device the actors will see; an input error it raises is raised here as itself."""
    import ray

    with _Ray():
        return _get(ray.remote(num_gpus=gpus, max_retries=0)(fn).remote(*args))


def evaluate_muse_items(model_path: str | Path, data_dir: str | Path | MuseData, num_workers: int,
                        *, num_gpus_per_worker: float = 0.0, **settings) -> dict[str, dict[str, list]]:
    """`muse_item_scores` over `num_workers` Ray actors."""
    return muse_item_scores(model_path, data_dir, num_workers=num_workers, gpus_per_worker=num_gpus_per_worker,
                            **settings)


def evaluate_muse_parallel(model_path: str | Path, data_dir: str | Path | MuseData, num_workers: int,
                           **settings) -> dict[str, float]:
    """`evaluate_muse` (with `mia`) split across `num_workers` Ray actors (`muse_item_scores`):
    the per-item scores of the shares are concatenated in order and then averaged (AUC over all
    scores), so the result equals the single-process one."""
    return muse_metrics(evaluate_muse_items(model_path, data_dir, num_workers, **settings))
