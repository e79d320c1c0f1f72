"""The Ray cluster every command runs on: `init_ray`."""

from __future__ import annotations

import os


def init_ray(**kwargs) -> None:
    """Join the cluster RAY_ADDRESS names (`ray job submit` sets it for its entrypoint;
    RAY_ADDRESS=auto joins one started with `ray start` on this machine), else start a local one
    for this process; nothing when Ray is already initialised. A cluster that `ray start` left
    on the machine (another user's, a test's) is never joined unasked. `kwargs` go to `ray.init`."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", **kwargs)
