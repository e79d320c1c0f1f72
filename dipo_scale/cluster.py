"""The Ray cluster every command runs on: `init_ray`, and the state API Ray Train needs."""

from __future__ import annotations

import os
import socket
import time

from dipo_scale.errors import UserInputError


def local_dashboard() -> dict:
    """`ray.init`'s settings for a local cluster's dashboard: on, on a free port of its own
    (another cluster on the machine may hold Ray's default 8265), and named to every process of
    the cluster as its state API (RAY_API_SERVER_ADDRESS, inherited from this process by the
    raylet and its workers). Without the name, a process that asks the state API looks for "the"
    Ray of the machine: beside another cluster it finds several and fails, or finds the one `ray
    start` recorded and asks it about this cluster's actors."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    return {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}


def init_ray(*, uses_train: bool = True, **kwargs) -> None:
    """Join the cluster RAY_ADDRESS names (`ray job submit` sets it for its entrypoint;
    RAY_ADDRESS=auto joins one started with `ray start` on this machine), else start a local one
    for this process; nothing when Ray is already initialised. A cluster that `ray start` left
    on the machine (another user's, a test's) is never joined unasked. `kwargs` go to `ray.init`.

    A local cluster always starts with its dashboard (`local_dashboard`): Ray Train's
    placement-group cleaner asks the dashboard's state API whether a run's controller is alive,
    and without it removed the placement groups of live runs under load ("Destroying worker since
    its placement group was removed"). `uses_train`: the caller runs Ray Train, so the state API is checked (`check_state_api`)
    on whichever cluster this is."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "local"
        if "include_dashboard" in kwargs:
            raise ValueError("init_ray starts every local cluster with its dashboard")
        if address == "local":
            kwargs.update(local_dashboard())
        ray.init(address=address, **kwargs)
    if uses_train:
        check_state_api()


def check_state_api(wait_s: float = 30.0) -> None:
    """The Ray cluster (initialised) answers its state API (the dashboard's). Ray Train's
    placement-group cleaner asks it whether a run's controller is alive; on a cluster without
    it, the cleaner ended live runs (the first two trials of a FIFO sweep here, the demo under
    load). Retried for `wait_s` seconds (a just-started dashboard), then a one-line error."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + wait_s
    while True:
        try:
            list_actors(limit=1, timeout=10, raise_on_missing_output=False)
            return
        except Exception as e:  # noqa: BLE001  (ServerUnavailable, connection errors)
            if time.monotonic() > deadline:
                address = os.environ.get("RAY_ADDRESS")
                where = (f"the Ray cluster at RAY_ADDRESS={address}" if address and address != "local"
                         else "this process's Ray cluster")
                raise UserInputError(
                    f"{where} has no working state API (its dashboard; {type(e).__name__}): Ray Train's "
                    "placement-group cleaner ends live runs without it; start that cluster with its dashboard "
                    "(`ray start --head` does unless given --include-dashboard=false; the dashboard needs "
                    "`ray[default]`)") from None
            time.sleep(0.5)
