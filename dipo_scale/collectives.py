"""The collectives of worker code, in one place, each tensor on the device its process group serves.

On GPUs Ray Train forms an `nccl` process group, which has no CPU backend: a CPU tensor handed to
`all_reduce` fails at the end of the first step ("No backend type associated with device type
cpu"). So worker code never calls `torch.distributed` directly: tensors are built on the engine's
device and checked against the group's backends before they are handed over
(`check_collective_device`); objects go through the `*_object*` collectives, which put their
buffers on the current CUDA device themselves (Ray Train sets it per worker).
tests/test_engine.py checks that no other module of the package calls a collective.
"""

from __future__ import annotations

import torch


def backend_device_types() -> set[str]:
    """The device types the default process group has a backend for ("cuda:nccl" -> {"cuda"};
    "cpu:gloo,cuda:gloo" -> {"cpu", "cuda"})."""
    import torch.distributed as dist

    config = str(dist.get_backend_config())
    return {item.split(":", 1)[0] for item in config.split(",") if ":" in item} or {"cpu", "cuda"}


def check_collective_device(tensor: torch.Tensor, device: torch.device | str) -> None:
    """Raise, naming both, when `tensor` is not on `device` (the engine's) or the process group
    has no backend for its device type: the error a GPU run would otherwise meet inside NCCL."""
    device = torch.device(device)
    served = backend_device_types()
    on_device = tensor.device.type == device.type and (device.index is None or tensor.device == device)
    if not on_device or tensor.device.type not in served:
        raise RuntimeError(f"collective on a {tensor.device} tensor: the engine's device is {device} and the "
                           f"process group serves {sorted(served)}; build the tensor on the engine's device")


def sum_over_ranks(values: dict[str, float], device: torch.device | str) -> dict[str, float]:
    """`values` summed over the ranks (float64, on `device`: the engine's)."""
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized():
        check_collective_device(t, device)
        dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def gather_objects(obj, world: int) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    import torch.distributed as dist

    if world == 1:
        return [obj]
    parts = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def broadcast_object(obj, world: int):
    """Rank 0's `obj` on every rank."""
    import torch.distributed as dist

    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def max_over_ranks(value: int, device: torch.device | str) -> int:
    """The largest `value` of any rank (on `device`: the engine's, or the model's)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    check_collective_device(t, device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
