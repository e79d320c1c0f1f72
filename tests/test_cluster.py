"""The cluster paths for real: `ray job submit` (of a scalability series) to a head started with
`ray start`, and two ZeRO-3 workers placed on two different Ray nodes (simulated on this machine)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env() -> dict:
    env = dict(os.environ)  # PATH starts with this venv's bin (conftest): the job's `python` is this venv
    if (Path.home() / ".ray" / "auth_token").exists():
        env["RAY_AUTH_MODE"] = "token"  # the CLI client must authenticate like the cluster
    return env


def _unlearn_sets(tiny_assets, out_dir, *extra):
    sets = [f"model.path={tiny_assets['target']}", f"data.prepared_dir={tiny_assets['prepared']}",
            f"out_dir={out_dir}", "train.steps=4", "train.global_batch_size=4",
            "train.micro_batch_size=2", "train.lr=2e-3", "logging.wandb=disabled", *extra]
    return [a for s in sets for a in ("--set", s)]


def test_ray_job_submit_runs_a_scalability_series(tiny_assets, tmp_path):
    """`ray job submit` of ray_jobs/scalability.py: two unlearning runs over nested forget sets of
    growing size, each from the same model, on a head started with `ray start`."""
    port, dash = _free_port(), _free_port()
    temp = Path("/tmp") / f"dipo_job_{os.getpid()}"
    env = _ray_env()
    start = subprocess.run([BIN / "ray", "start", "--head", "--port", str(port), "--num-cpus", "2",
                            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                            "--temp-dir", str(temp), "--disable-usage-stats"],
                           capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stderr[-2000:]
    out = tmp_path / "scal"
    sets = [f"data_dir={tiny_assets['corpus']}", f"unlearn.model.path={tiny_assets['target']}",
            f"out_dir={out}", "folds=2", "epochs=0.25", "unlearn.train.num_workers=1",
            "unlearn.train.global_batch_size=2", "unlearn.train.micro_batch_size=2", "unlearn.train.lr=2e-3",
            "unlearn.logging.wandb=disabled", "unlearn.data.block_size=64", "unlearn.eval.limit=2",
            "unlearn.eval.verbmem_max_new_tokens=8", "unlearn.eval.knowmem_max_new_tokens=8"]
    try:
        for _ in range(30):  # the head's job agent needs a few seconds after `ray start`
            submit = subprocess.run(
                [BIN / "ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                 "--working-dir", str(REPO), "--runtime-env", str(REPO / "ray_jobs" / "runtime_env.yaml"),
                 "--", "python", "ray_jobs/scalability.py", *(a for s in sets for a in ("--set", s))],
                capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
            if "No available agent" not in submit.stderr:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        job_id = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)
        status = subprocess.run([BIN / "ray", "job", "status", "--address", f"http://127.0.0.1:{dash}", job_id],
                                capture_output=True, text=True, env=env, timeout=120)
        assert "succeeded" in (status.stdout + status.stderr).lower()  # JobStatus.SUCCEEDED
    finally:
        subprocess.run([BIN / "ray", "stop", "--force"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
    first, second = json.loads((out / "lineage.json").read_text())["requests"]
    assert first["input_model"] == second["input_model"] == str(tiny_assets["target"])
    assert first["forget_tokens"] < second["forget_tokens"] and first["steps"] <= second["steps"]
    assert (Path(second["output_model"]) / "model.safetensors").is_file()
    assert (out / "scalability.png").is_file() and "## Scalability" in (out / "report.md").read_text()


@pytest.fixture(scope="module")
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


# Same global batch and seed, 1 worker vs 2 workers on two nodes: DeepSpeed averages gradients over
# ranks and gradient accumulation makes up the rest, so the curves agree up to float32 summation order.
ONE_VS_TWO_RTOL = 1e-4


def test_one_worker_and_two_workers_on_two_nodes_give_the_same_loss_curve(tiny_assets, two_node_cluster,
                                                                          tmp_path):
    import ray

    from dipo_scale.config import load_unlearn_config
    from dipo_scale.unlearn import run_unlearning

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    logs, nodes = {}, {}
    for name, workers, strategy in (("one_worker", 1, "PACK"), ("two_nodes", 2, "STRICT_SPREAD")):
        out = tmp_path / name
        sets = _unlearn_sets(tiny_assets, out, f"train.num_workers={workers}",
                             f"train.placement_strategy={strategy}", "method=dipo", "loss.retain=gd")
        run_unlearning(load_unlearn_config(None, sets[1::2]))
        logs[name] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        nodes[name] = {json.loads((out / "ranks" / f"rank{r}.json").read_text())["node_id"]
                       for r in range(workers)}
    assert len(nodes["two_nodes"]) == 2  # each rank on its own node
    assert [r["forget_block_ids"] for r in logs["one_worker"]] == [r["forget_block_ids"] for r in logs["two_nodes"]]
    for a, b in zip(logs["one_worker"], logs["two_nodes"]):
        for key in ("loss", "forget_nll", "retain_nll", "dipo_margin"):
            assert b[key] == pytest.approx(a[key], rel=ONE_VS_TWO_RTOL, abs=1e-6), (key, a["step"])
