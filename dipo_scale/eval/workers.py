"""Where an evaluation runs: in this process, or over Ray actors, each holding the model on the
device it finds (`resolve_device`: CUDA and bfloat16 where its GPU is visible, else the CPU).

The placement (`plan_placement`): `gpus_per_worker` "auto" is one GPU per actor where the Ray
cluster has GPUs, else none; with GPUs asked for (or more than one worker) the models load in Ray
actors, else in this process. A model above `CPU_MAX_PARAMETERS` that would be evaluated on CPUs
is refused unless `device` "cpu" asks for it (`check_cpu_size`: hours in float32, or killed for
memory). Each model's evaluation says in one line where it runs (`placed`).

MUSE splits over actors: each scores a contiguous share of every item list (`MuseItems.share`)
and the per-item results are concatenated in share order, so the metrics equal those of one
process. Anything else (TOFU, a reference model's truth ratios) runs whole in one actor
(`on_model`), which gets the GPU the driver may not have.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Union

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
                 quantize: str | None = None, flag: str = "--model"):
        on, dtype = resolve_device(device)
        self.name = name
        try:
            self.model, self.tokenizer = load_model_and_tokenizer(
                model_path, dtype=dtype, device=on, trust_remote_code=trust_remote_code, quantize=quantize)
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise UserInputError(f"{flag} {model_path}: cannot load the model or its tokenizer "
                                 f"({type(e).__name__}: {first[:200]})") from None
        print(f"evaluate: {model_path}{f' in {quantize}' if quantize else ''} on {describe_device(on, dtype)}"
              + (f", {name}" if name else ""), flush=True)

    def score_muse(self, share: MuseItems, settings: dict[str, Any]) -> dict[str, dict[str, list]]:
        with where(self.name) if self.name else nullcontext():
            return score_muse_items(self.model, self.tokenizer, share, **settings)

    def call(self, fn: Callable, args: tuple, kwargs: dict):
        return fn(self.model, self.tokenizer, *args, **kwargs)


GpusPerWorker = Union[Literal["auto"], float]
CPU_MAX_PARAMETERS = 1e9  # a larger model is evaluated on CPUs only when `device` "cpu" asks for it


@dataclass(frozen=True)
class Placement:
    """Where an evaluation runs, settled (`plan_placement`)."""

    device: str             # "auto", "cpu" or "cuda": what each process resolves (`resolve_device`)
    num_workers: int
    gpus_per_worker: float  # "auto" resolved
    on_cpu: bool            # the models run on CPUs, in float32
    reason: str             # why, for the console line

    @property
    def actors(self) -> bool:
        """The models load in Ray actors (more than one worker, or GPUs asked for: the driver
        need not have one), not in this process."""
        return self.num_workers > 1 or self.gpus_per_worker > 0

    def describe(self) -> str:
        """E.g. "on 1 Ray actor with 1 GPU (--gpus-per-worker auto: the Ray cluster has 8 GPUs)"."""
        if self.actors:
            n, g = self.num_workers, self.gpus_per_worker
            on = f"with {g:g} GPU{'' if g == 1 else 's'}{' each' if n > 1 else ''}" if g > 0 else "on CPUs, float32"
            where_ = f"on {n} Ray actor{'' if n == 1 else 's'} {on}"
        else:
            where_ = f"in this process, on {'the CPU, float32' if self.on_cpu else 'its GPU'}"
        return f"{where_} ({self.reason})"


def _gpus_text(gpus: float) -> str:
    return f"{gpus:g} GPU{'' if gpus == 1 else 's'}" if gpus else "no GPU"


def plan_placement(device: str, num_workers: int, gpus_per_worker: GpusPerWorker, *, cluster_gpus: float,
                   driver_cuda: bool) -> Placement:
    """Where an evaluation with these settings runs on a Ray cluster with `cluster_gpus` GPUs, from a
    driver that sees a CUDA device (`driver_cuda`) or not; one-line errors for settings that cannot
    work. `gpus_per_worker` "auto": one GPU per actor where the cluster has GPUs (and `device` is not
    "cpu"), else none."""
    if device not in DEVICES:
        raise UserInputError(f"--device {device}: choose one of {', '.join(DEVICES)}")
    if num_workers < 1:
        raise UserInputError(f"--num-workers {num_workers}: must be >= 1")
    auto = gpus_per_worker == "auto"
    if not auto and (isinstance(gpus_per_worker, bool) or not isinstance(gpus_per_worker, (int, float))
                     or not gpus_per_worker >= 0):
        raise UserInputError(f"--gpus-per-worker {gpus_per_worker}: must be auto or a number >= 0")
    if device == "cpu":
        gpus, reason = (0.0 if auto else float(gpus_per_worker)), "--device cpu"
    elif auto:
        gpus = 1.0 if cluster_gpus >= 1 else 0.0
        reason = f"--gpus-per-worker auto: the Ray cluster has {_gpus_text(cluster_gpus)}"
    else:
        gpus, reason = float(gpus_per_worker), f"--gpus-per-worker {gpus_per_worker:g}"
    if device == "cpu" and gpus > 0:
        raise UserInputError(f"--gpus-per-worker {gpus:g} with --device cpu: the GPUs would stay idle")
    actors = num_workers > 1 or gpus > 0
    if actors and device == "cuda" and gpus == 0:
        if auto:
            raise UserInputError(f"--device cuda: the Ray cluster has no GPU for its {num_workers} actors")
        raise UserInputError("--device cuda with Ray actors needs --gpus-per-worker > 0 "
                             "(Ray shows an actor a GPU only when it asks for one)")
    if gpus > 0 and num_workers * gpus > cluster_gpus:
        raise UserInputError(f"--num-workers {num_workers} x --gpus-per-worker {gpus:g}: needs {num_workers * gpus:g} "
                             f"GPUs but the Ray cluster has {cluster_gpus:g} (Ray would wait for them without end)")
    on_cpu = device == "cpu" or (gpus == 0 and (actors or not driver_cuda))
    if device == "cuda" and on_cpu:
        raise UserInputError("--device cuda: no CUDA device is visible to this process and the Ray cluster has no "
                             "GPU (use --device auto or cpu)" if auto else
                             "--device cuda: no CUDA device is visible to this process (use --device auto or cpu, "
                             "or Ray actors with --gpus-per-worker > 0)")
    if gpus == 0 and not actors and not on_cpu:
        reason += ", a CUDA device is visible here"
    return Placement(device, num_workers, gpus, on_cpu, reason)


def cluster_gpus() -> float:
    """The GPUs of the Ray cluster the actors would run on: the initialised one's, the one
    RAY_ADDRESS names (joined here, and kept for the actors), else those visible to this process
    (a local cluster started for the actors gets exactly those)."""
    import ray

    if not ray.is_initialized() and os.environ.get("RAY_ADDRESS"):
        init_ray(uses_train=False, log_to_driver=True)  # as `_Ray`: the actors' progress lines
    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0))
    import torch

    return float(torch.cuda.device_count())


def find_placement(device: str, num_workers: int, gpus_per_worker: GpusPerWorker) -> Placement:
    """`plan_placement` on this Ray cluster, from this process (the cluster is asked only where
    the answer depends on its GPUs)."""
    import torch

    asks = device != "cpu" and (gpus_per_worker == "auto" or
                                (isinstance(gpus_per_worker, (int, float)) and gpus_per_worker > 0))
    return plan_placement(device, num_workers, gpus_per_worker, cluster_gpus=cluster_gpus() if asks else 0.0,
                          driver_cuda=torch.cuda.is_available())


def count_parameters(model_path: str | Path, *, flag: str = "--model", trust_remote_code: bool = False) -> int:
    """The parameters of the model at `model_path`, from its config alone: the model built on the
    meta device (no weights read, nothing allocated)."""
    from dipo_scale.preflight import meta_model

    _, model = meta_model(str(model_path), flag, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def check_cpu_size(model_path: str | Path, place: Placement, *, flag: str = "--model",
                   trust_remote_code: bool = False) -> None:
    """A model above `CPU_MAX_PARAMETERS` parameters that `place` would evaluate on CPUs without
    `device` "cpu" asking for it is a one-line error (float32 on CPUs: hours, or killed for memory)."""
    if not place.on_cpu or place.device == "cpu":
        return
    count = count_parameters(model_path, flag=flag, trust_remote_code=trust_remote_code)
    if count > CPU_MAX_PARAMETERS:
        raise UserInputError(
            f"{flag} {model_path}: {count / 1e9:.1f}B parameters would be evaluated on CPUs in float32 "
            f"({count * 4 / 2**30:.0f} GiB per copy, hours; {place.reason}); run on a Ray cluster with GPUs, "
            f"or give --device cpu (eval.device=cpu) to evaluate it on CPUs anyway")


def placed(model_path: str | Path, device: str, num_workers: int, gpus_per_worker: GpusPerWorker, *,
           flag: str = "--model", trust_remote_code: bool = False) -> Placement:
    """Where the evaluation of the model at `model_path` runs (`find_placement`, `check_cpu_size`),
    said in one line on stdout."""
    place = find_placement(device, num_workers, gpus_per_worker)
    check_cpu_size(model_path, place, flag=flag, trust_remote_code=trust_remote_code)
    print(f"evaluate: {model_path} {place.describe()}", flush=True)
    return place


def _actors(model_path: str, place: Placement, trust_remote_code: bool, quantize: str | None, flag: str):
    import ray

    cls = ray.remote(num_cpus=1, num_gpus=place.gpus_per_worker)(ModelWorker)
    return [cls.remote(str(model_path), place.device, trust_remote_code, f"worker {i + 1} of {place.num_workers}",
                       quantize, flag) for i in range(place.num_workers)]


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
            init_ray(uses_train=False, log_to_driver=True)  # the actors' progress lines
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
    gpus_per_worker: GpusPerWorker = "auto",
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
    flag: str = "--model",
) -> dict[str, dict[str, list]]:
    """The per-item results of `score_muse_items` for the model at `model_path`, where `placed`
    says: in this process (one worker, no GPUs), else over `num_workers` Ray actors (`num_cpus=1`
    and `gpus_per_worker` GPUs each; "auto": 1 where the Ray cluster has GPUs), each scoring a share
    of every item list. `mia_only`: the attack scores only (a retrain model's, for PrivLeak).
    `quantize`: "8bit" / "4bit" (bitsandbytes). `flag` names the model in errors."""
    from dipo_scale.data.muse import load_muse

    place = placed(model_path, device, num_workers, gpus_per_worker, flag=flag, trust_remote_code=trust_remote_code)
    data = data if isinstance(data, MuseData) else load_muse(data)
    items = muse_items(data, limit=limit, mia=mia, mia_only=mia_only)
    settings = {"batch_size": batch_size, "verbmem_max_new_tokens": verbmem_max_new_tokens,
                "knowmem_max_new_tokens": knowmem_max_new_tokens, "k": k}
    if not place.actors:
        return ModelWorker(str(model_path), device, trust_remote_code, quantize=quantize,
                           flag=flag).score_muse(items, settings)
    import ray

    with _Ray():
        workers = _actors(str(model_path), place, trust_remote_code, quantize, flag)
        try:
            results = _get([w.score_muse.remote(items.share(i, num_workers), settings)
                            for i, w in enumerate(workers)])
        finally:
            for w in workers:
                ray.kill(w)
    return merge_item_scores(results)


def on_model(model_path: str | Path, fn: Callable, *args, gpus_per_worker: GpusPerWorker = "auto",
             device: str = "auto", trust_remote_code: bool = False, quantize: str | None = None,
             flag: str = "--model", **kwargs):
    """`fn(model, tokenizer, *args, **kwargs)` with the model at `model_path` (in `quantize`, if
    given) loaded where `placed` says: in this process, or, with GPUs (`gpus_per_worker` > 0, or
    "auto" on a Ray cluster with GPUs), in one Ray actor with that many GPUs."""
    place = placed(model_path, device, 1, gpus_per_worker, flag=flag, trust_remote_code=trust_remote_code)
    if not place.actors:
        worker = ModelWorker(str(model_path), device, trust_remote_code, quantize=quantize, flag=flag)
        return worker.call(fn, args, kwargs)
    import ray

    with _Ray():
        [worker] = _actors(str(model_path), place, trust_remote_code, quantize, flag)
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
                        *, num_gpus_per_worker: GpusPerWorker = "auto", **settings) -> dict[str, dict[str, list]]:
    """`muse_item_scores` over `num_workers` Ray actors."""
    return muse_item_scores(model_path, data_dir, num_workers=num_workers, gpus_per_worker=num_gpus_per_worker,
                            **settings)


def evaluate_muse_parallel(model_path: str | Path, data_dir: str | Path | MuseData, num_workers: int,
                           **settings) -> dict[str, float]:
    """`evaluate_muse` (with `mia`) split across `num_workers` Ray actors (`muse_item_scores`):
    the per-item scores of the shares are concatenated in order and then averaged (AUC over all
    scores), so the result equals the single-process one."""
    return muse_metrics(evaluate_muse_items(model_path, data_dir, num_workers, **settings))
