"""Training checkpoints that any number of workers can load, found and verified on disk.

Layout of one checkpoint (`<storage>/<run_name>-<identity>/checkpoint_step<N>/`, the folder of
`unlearn.checkpoint_root`, merged by Ray Train from the directories every rank reports through
`ray.train.report`):

    portable/rank<r>.safetensors   rank r's ZeRO-3 partition of every parameter: its fp32 weights
                                   and AdamW moments (`<i>.weight`, `<i>.exp_avg`, `<i>.exp_avg_sq`
                                   for parameter i, padded as DeepSpeed pads partitions)
    state.json                     (rank 0) step, Adam's step count, LR schedule, RNG states
    rank<r>.json                   what rank r wrote: step, world size, format, parameter names
                                   and sizes, every file's size and sha256

A partition is a contiguous range of a parameter's flattened values, so workers of another world
size read exactly the ranges they own from the old files (safetensors slices: no gather, no full
copy anywhere) and write them into their own partitions; every rank writes and reads in parallel.
With `train.optimizer=adamw_8bit` the optimizer's states are blockwise-quantised per partition
and cannot be cut at other boundaries: those checkpoints use DeepSpeed's own per-rank format
(`format: deepspeed`) and load only with the world size that wrote them.

Complete: every rank's record is there and every file has its recorded size. The driver checks
the sha256 of every file of the checkpoint a run will resume from before any worker starts
(`verify_checkpoint`), and a rank again of every file it reads before trusting it. Resume starts from the newest complete
checkpoint on disk (not the last one Ray registered: a driver stopped by Ctrl-C registers less
than its workers wrote); the driver keeps `train.keep_checkpoints` of them.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from dipo_scale.collectives import broadcast_object
from dipo_scale.errors import UserInputError
from dipo_scale.files import atomic_write_json, sha256_file

CHECKPOINT_PREFIX = "checkpoint_step"
ADAM_STATES = ("exp_avg", "exp_avg_sq")


# --- finding checkpoints (driver and rank 0) ------------------------------------------------------
def _records(ckpt_dir: Path) -> list[dict]:
    records = []
    for path in sorted(ckpt_dir.glob("rank*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            return []
    return records


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint under `root`, oldest first."""
    found = []
    for ckpt_dir in Path(root).glob(f"{CHECKPOINT_PREFIX}*"):
        records = _records(ckpt_dir)
        if not records or sorted(r.get("rank") for r in records) != list(range(records[0].get("world_size", 0))):
            continue
        files = {name: size for r in records for name, (size, _) in r["files"].items()}
        if all((ckpt_dir / name).is_file() and (ckpt_dir / name).stat().st_size == size
               for name, size in files.items()):
            found.append((int(records[0]["step"]), ckpt_dir))
    return sorted(found)


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and incomplete leftovers
    (all of them this run's own). Ray's record of the checkpoints it registered goes too: resume
    reads the disk, and the record would name removed directories."""
    root = Path(root)
    kept = {path for _, path in complete_checkpoints(root)[-keep:]}
    for ckpt_dir in root.glob(f"{CHECKPOINT_PREFIX}*"):
        if ckpt_dir not in kept:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    (root / "checkpoint_manager_snapshot.json").unlink(missing_ok=True)


def verify_checkpoint(ckpt_dir: Path) -> None:
    """(The driver, before any worker starts) every file of a checkpoint against the sha256 its
    rank record holds, read in parallel (hashlib releases the GIL): a damaged checkpoint is one
    line now, not a worker traceback after the cluster started."""
    from concurrent.futures import ThreadPoolExecutor

    expected = {name: sha for r in _records(ckpt_dir) for name, (_, sha) in r["files"].items()}
    with ThreadPoolExecutor(max_workers=min(16, len(expected) or 1)) as pool:
        actual = dict(zip(expected, pool.map(lambda name: sha256_file(ckpt_dir / name), expected)))
    for name, sha in expected.items():
        if actual[name] != sha:
            raise UserInputError(_corrupt(ckpt_dir, name))


def _corrupt(ckpt_dir: Path, name: str) -> str:
    return (f"{ckpt_dir / name}: checksum does not match its rank record (corrupt checkpoint); move {ckpt_dir} "
            "aside to resume from the one before")


def newest_checkpoint(root: str | Path) -> Path | None:
    """(In the workers) rank 0 picks the newest complete checkpoint; every rank gets its choice."""
    import torch.distributed as dist

    found = complete_checkpoints(root) if dist.get_rank() == 0 else None
    choice = broadcast_object(str(found[-1][1]) if found else None, dist.get_world_size())
    return Path(choice) if choice else None


# --- state that is not a tensor partition -----------------------------------------------------------
def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _adam_states(engine) -> list[dict]:
    """The inner (torch AdamW) optimizer's state of each flat ZeRO-3 partition it updates,
    created as AdamW creates it at its first step when that has not happened yet (a fresh engine
    being loaded), so that a checkpoint's moments can be written into it."""
    inner = engine.optimizer.optimizer
    # ZeRO-3 hands the inner optimizer one flat fp32 partition per sub-group, only while it steps
    flats = engine.optimizer.fp32_partitioned_groups_flat
    for flat in flats:
        state = inner.state[flat]
        if not state:
            state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
    return [inner.state[flat] for flat in flats]


# --- saving and loading (every rank) ----------------------------------------------------------------
def save(engine, ckpt_dir: Path, step: int, *, portable: bool) -> None:
    """Write this rank's part of checkpoint `step` into `ckpt_dir` (a directory of its own that
    Ray merges with the other ranks'), then its record."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state
    from safetensors.torch import save_file

    rank, world = dist.get_rank(), dist.get_world_size()
    params = list(engine.module.named_parameters())
    if portable:
        tensors = {}
        for i, (_, param) in enumerate(params):
            tensors[f"{i}.weight"] = safe_get_local_fp32_param(param).detach().float().cpu()
            for key in ADAM_STATES:
                tensors[f"{i}.{key}"] = safe_get_local_optimizer_state(param, key).detach().float().cpu()
        (ckpt_dir / "portable").mkdir()
        save_file(tensors, ckpt_dir / "portable" / f"rank{rank}.safetensors")
        if rank == 0:
            schedule = {k: v for k, v in engine.lr_scheduler.state_dict().items() if k != "lr_lambdas"}
            atomic_write_json(ckpt_dir / "state.json", {
                "step": step, "adam_step": float(_adam_states(engine)[0]["step"]),
                "lr_scheduler": schedule, "rng": _rng_state()})
    else:
        engine.save_checkpoint(str(ckpt_dir), tag=f"step{step:07d}", client_state={"step": step, "rng": _rng_state()})
    files = {str(p.relative_to(ckpt_dir)): (p.stat().st_size, sha256_file(p))
             for p in sorted(ckpt_dir.rglob("*")) if p.is_file()}
    atomic_write_json(ckpt_dir / f"rank{rank}.json", {
        "step": step, "rank": rank, "world_size": world, "format": "portable" if portable else "deepspeed",
        "params": [[name, param.ds_numel, param.ds_tensor.numel()] for name, param in params], "files": files})


class _VerifiedFiles:
    """Files of a checkpoint, each checked against its rank record the first time it is used."""

    def __init__(self, ckpt_dir: Path, records: list[dict]):
        self.dir, self.checked = ckpt_dir, set()
        self.expected = {name: sha for r in records for name, (_, sha) in r["files"].items()}

    def __call__(self, name: str) -> Path:
        if name not in self.checked:
            if sha256_file(self.dir / name) != self.expected[name]:
                raise UserInputError(_corrupt(self.dir, name))
            self.checked.add(name)
        return self.dir / name


def load(engine, ckpt_dir: Path) -> tuple[int, int]:
    """Load checkpoint `ckpt_dir` into this rank's engine, whatever world size wrote it.
    Returns (finished steps, the world size that wrote it)."""
    import torch.distributed as dist
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state
    from safetensors import safe_open

    rank, world = dist.get_rank(), dist.get_world_size()
    records = _records(ckpt_dir)
    saved_world, file = records[0]["world_size"], _VerifiedFiles(ckpt_dir, records)
    if records[0].get("format") != "portable":
        if saved_world != world:
            raise UserInputError(f"{ckpt_dir}: written by {saved_world} workers with train.optimizer=adamw_8bit, "
                                 f"whose checkpoints load only with as many (not {world}); set train.num_workers="
                                 f"{saved_world}")
        for name in records[rank]["files"]:
            file(name)
        load_path, client_state = engine.load_checkpoint(str(ckpt_dir), load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"checkpoint {ckpt_dir} could not be loaded by DeepSpeed")
        _set_rng_state(client_state["rng"])
        return int(client_state["step"]), saved_world

    params = list(engine.module.named_parameters())
    if [name for name, _ in params] != [entry[0] for entry in records[0]["params"]]:
        raise UserInputError(f"{ckpt_dir}: written for other parameters than this model's")
    adam_states = _adam_states(engine)  # before the moments are written into them
    sources = {}  # old rank -> open safetensors file, opened (and verified) when first needed

    def source(k: int):
        if k not in sources:
            sources[k] = safe_open(file(f"portable/rank{k}.safetensors"), framework="pt")
        return sources[k]

    for i, ((_, param), (_, _, old_part)) in enumerate(zip(params, records[0]["params"])):
        numel, part = param.ds_numel, param.ds_tensor.numel()
        start, stop = min(rank * part, numel), min((rank + 1) * part, numel)  # the values this rank owns
        for what in ("weight", *ADAM_STATES):
            local = torch.zeros(part, dtype=torch.float32)
            for k in range(start // old_part, math.ceil(stop / old_part)):
                lo, hi = max(start, k * old_part), min(stop, (k + 1) * old_part)
                local[lo - start:hi - start] = source(k).get_slice(f"{i}.{what}")[lo - k * old_part:hi - k * old_part]
            local = local.to(param.ds_tensor.device)
            if what == "weight":
                safe_set_local_fp32_param(param, local)
                param.ds_tensor.data.copy_(local)  # the model's own (possibly bf16) partition
            else:
                safe_set_local_optimizer_state(param, local, what)
    state = json.loads(file("state.json").read_text())
    for adam in adam_states:
        adam["step"] = torch.full_like(adam["step"], state["adam_step"]) if torch.is_tensor(adam["step"]) \
            else state["adam_step"]
    engine.lr_scheduler.load_state_dict({**engine.lr_scheduler.state_dict(), **state["lr_scheduler"]})
    for group, lr in zip(engine.optimizer.param_groups, state["lr_scheduler"]["_last_lr"]):
        group["lr"] = lr
    _set_rng_state(state["rng"])
    return int(state["step"]), saved_world
