"""The cluster paths for real: `ray job submit` (of a scalability series) to a head started with
`ray start`, and two ZeRO-3 workers placed on two different Ray nodes (simulated on this machine)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dipo_scale.cluster import local_dashboard

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env() -> dict:
    env = dict(os.environ)  # PATH starts with this venv's bin (conftest): the job's `python` is this venv
    env.pop("RAY_ADDRESS", None)  # every command below names its cluster
    env.pop("RAY_API_SERVER_ADDRESS", None)  # (the test process's own cluster's, `local_dashboard`)
    if (Path.home() / ".ray" / "auth_token").exists():
        env["RAY_AUTH_MODE"] = "token"  # the CLI client must authenticate like the cluster
    return env


def _unlearn_sets(tiny_assets, out_dir, *extra):
    sets = [f"model.path={tiny_assets['target']}", f"data.prepared_dir={tiny_assets['prepared']}",
            f"out_dir={out_dir}", "train.steps=4", "train.global_batch_size=4",
            "train.micro_batch_size=2", "train.lr=2e-3", "logging.wandb=disabled", *extra]
    return [a for s in sets for a in ("--set", s)]


def _wait_for(what: str, check, deadline_s: float, pause_s: float = 1.0):
    """Poll `check()` until it returns something truthy; fail naming `what` after `deadline_s`."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {deadline_s:.0f} s")
        time.sleep(pause_s)


class _Head:
    """A Ray head of this test's own: `ray start --head --block` in a session of its own, with its
    own temp dir and every port chosen here (the defaults are fixed numbers, such as the dashboard
    agent's 52365 that job submission goes through, shared with any other Ray on the machine).
    `stop()` ends the processes of that session, and any other naming the temp dir or `marks` (the
    job's own driver), by pid: never `ray stop`, which stops every Ray instance of the user."""

    PORTS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
             "node-manager-port", "object-manager-port")

    def __init__(self, temp: Path, env: dict, marks: tuple[str, ...] = ()):
        self.temp, self.env, self.marks = temp, env, (str(temp), *marks)
        self.ports = {name: _free_port() for name in self.PORTS}
        self.address = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        args = [BIN / "ray", "start", "--head", "--block", "--num-cpus", "2", "--dashboard-host", "127.0.0.1",
                "--temp-dir", str(temp), "--disable-usage-stats",
                *(a for name, port in self.ports.items() for a in (f"--{name}", str(port)))]
        temp.mkdir(parents=True, exist_ok=True)
        self.log = temp.parent / f"{temp.name}.head.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def ray(self, *args, timeout: float = 120) -> subprocess.CompletedProcess:
        """A `ray` CLI command against this head."""
        return subprocess.run([BIN / "ray", *args], capture_output=True, text=True, env=self.env, timeout=timeout,
                              cwd=REPO)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _processes(self) -> list[int]:
        own = []
        for proc in Path("/proc").glob("[0-9]*"):
            pid = int(proc.name)
            try:
                if pid == os.getpid() or (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if os.getsid(pid) == self.proc.pid or any(mark in cmdline for mark in self.marks):
                    own.append(pid)
            except (OSError, IndexError):  # gone meanwhile
                continue
        return own

    def stop(self) -> None:
        import signal

        try:  # `ray start --block` ends the processes it started when it is terminated
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass

        def nothing_left():
            left = self._processes()
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return not left

        _wait_for("the test's Ray head and its processes ended", nothing_left, 120, pause_s=0.5)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)


def _job_state(status_output: str, job_id: str) -> str | None:
    """The terminal state `ray job status` reports, None while the job runs."""
    phrases = {f"Job '{job_id}' succeeded": "SUCCEEDED", f"Job '{job_id}' failed": "FAILED",
               f"Job '{job_id}' was stopped": "STOPPED"}
    return next((state for phrase, state in phrases.items() if phrase in status_output), None)


def test_ray_job_submit_runs_a_scalability_series(tiny_assets, tmp_path):
    """`ray job submit` of ray_jobs/scalability.py: two unlearning runs over nested forget sets of
    growing size, each from the same model, on a head started with `ray start`. Every wait polls a
    condition against a generous deadline (a loaded machine starts the head's job agent slowly);
    only this head's processes are stopped."""
    out = tmp_path / "scal"
    head = _Head(Path("/tmp") / f"dipo_job_{os.getpid()}", _ray_env(), marks=(str(out),))
    sets = [f"data_dir={tiny_assets['corpus']}", f"unlearn.model.path={tiny_assets['target']}",
            f"out_dir={out}", "forget_sets=folds", "folds=2", "epochs=0.25", "unlearn.train.num_workers=1",
            "unlearn.train.global_batch_size=2", "unlearn.train.micro_batch_size=2", "unlearn.train.lr=2e-3",
            "unlearn.logging.wandb=disabled", "unlearn.data.block_size=64", "unlearn.eval.limit=2",
            "unlearn.eval.verbmem_max_new_tokens=8", "unlearn.eval.knowmem_max_new_tokens=8"]
    job_id = f"dipo_scal_{os.getpid()}"
    state = None
    try:
        def submitted():  # the head's job agent needs a while after `ray start` (minutes under load)
            assert head.alive(), head.log.read_text()[-3000:]
            r = head.ray("job", "submit", "--address", head.address, "--submission-id", job_id, "--no-wait",
                         "--working-dir", str(REPO), "--runtime-env", str(REPO / "ray_jobs" / "runtime_env.yaml"),
                         "--", "python", "ray_jobs/scalability.py", *(a for s in sets for a in ("--set", s)))
            return r.returncode == 0 or "already exists" in r.stderr + r.stdout  # (a retry of an accepted one)

        _wait_for("the job submitted", submitted, 600, pause_s=2)

        def finished():
            r = head.ray("job", "status", "--address", head.address, job_id)
            return _job_state(r.stdout + r.stderr, job_id)

        state = _wait_for("the job finished", finished, 1500, pause_s=2)
        logs = head.ray("job", "logs", "--address", head.address, job_id).stdout
        assert state == "SUCCEEDED", logs[-4000:]
    finally:
        if state is None and head.alive():
            head.ray("job", "stop", "--address", head.address, job_id)
        head.stop()
        shutil.rmtree(head.temp, ignore_errors=True)
        head.log.unlink(missing_ok=True)
    assert not head._processes()  # nothing of this head runs on
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
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, **local_dashboard()})
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


def test_a_cluster_a_command_starts_beside_another_answers_its_own_state_api():
    """Another Ray on the machine (`ray start`, holding Ray's default ports): the cluster a command
    starts gets its dashboard on a port of its own, and a process of that cluster (as Ray Train's
    placement-group cleaner, an actor) asking the state API about one of its actors gets it, alive.
    Before, that lookup found "multiple active Ray instances": the sweep was refused ("start Ray
    with the dashboard"), and a cleaner asking the other cluster would see its run's controller dead."""
    head = _Head(Path("/tmp") / f"dipo_other_{os.getpid()}", _ray_env())
    code = ("import ray\nfrom dipo_scale.cluster import init_ray\ninit_ray()\n"
            "@ray.remote\nclass Probe:\n    pass\n"
            "@ray.remote\ndef ask(actor_id):\n    from ray.util.state import get_actor\n"
            "    return get_actor(actor_id, timeout=30).state\n"
            "probe = Probe.remote()\nray.get(probe.__ray_ready__.remote())\n"
            "print('dashboard', ray.worker.get_dashboard_url())\n"
            "print('probe', ray.get(ask.remote(probe._actor_id.hex())))\n")
    try:
        _wait_for("the other Ray head up", lambda: head.alive() and head.ray(
            "status", "--address", f"127.0.0.1:{head.ports['port']}").returncode == 0, 300, pause_s=1)
        env = {**_ray_env(), "RAY_ADDRESS": "local", "RAY_TMPDIR": str(Path("/tmp") / f"dipo_own_{os.getpid()}")}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                              cwd=REPO)
    finally:
        head.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("dashboard", "probe")))
    assert lines["dashboard"] != f"127.0.0.1:{head.ports['dashboard-port']}", lines
    assert lines["probe"] == "ALIVE", lines
