"""Fault tolerance for real: a worker SIGKILLed mid-run is replaced and the run ends like an
uninterrupted one. (A driver killed and re-run: tests/test_sequential.py, where a series is
killed during a request whose run then resumes from its last checkpoint.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 10
# Resume restores weights, optimizer, LR schedule and RNG exactly; on CPU the redone steps are
# bit-identical in practice. The bound allows for float32 reduction-order noise only.
WEIGHT_ATOL = 1e-6


def _args(tiny_assets, out_dir, *extra):
    sets = [f"model.path={tiny_assets['target']}", f"data.prepared_dir={tiny_assets['prepared']}",
            f"out_dir={out_dir}", f"train.steps={STEPS}", "train.global_batch_size=4",
            "train.micro_batch_size=2", "train.lr=2e-3", "train.checkpoint_every=2",
            "logging.wandb=disabled", "method=dipo", *extra]
    return [sys.executable, "-m", "dipo_scale.cli", "unlearn", *(a for s in sets for a in ("--set", s))]


def _start(args, log_path):
    return subprocess.Popen(args, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for_steps(run_dir: Path, n: int, proc, timeout=240):
    deadline = time.time() + timeout
    log = run_dir / "log.jsonl"
    while time.time() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, "run ended before it could be interrupted"
        time.sleep(0.2)
    raise TimeoutError(f"{log} never reached {n} steps")


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _assert_same_run(run_dir, reference_dir):
    log, ref = _log(run_dir), _log(reference_dir)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))  # each step exactly once
    assert [r["forget_block_ids"] for r in log] == [r["forget_block_ids"] for r in ref]
    a = load_file(run_dir / "model" / "model.safetensors")
    b = load_file(reference_dir / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= WEIGHT_ATOL, worst


@pytest.fixture(scope="module")
def uninterrupted(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "reference"
    proc = subprocess.run(_args(tiny_assets, out), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_killed_worker_is_restarted_and_ends_like_an_uninterrupted_run(tiny_assets, uninterrupted, tmp_path):
    out = tmp_path / "killed_worker"
    proc = _start(_args(tiny_assets, out, "train.max_failures=1"), tmp_path / "run.log")
    _wait_for_steps(out, 5, proc)
    victim = json.loads((out / "ranks" / "rank1.json").read_text())["pid"]
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-3000:]
    ranks = json.loads((out / "ranks" / "rank1.json").read_text())
    assert ranks["pid"] != victim and ranks["resumed_from_step"] >= 2  # a new worker, from a checkpoint
    _assert_same_run(out, uninterrupted)


def test_rerun_with_a_different_config_is_refused(tiny_assets, uninterrupted):
    proc = subprocess.run(_args(tiny_assets, uninterrupted, "dipo.alpha=7.0"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "different config" in proc.stderr


def test_sigint_then_same_command_resumes_from_the_newest_checkpoint_on_disk(tiny_assets, uninterrupted, tmp_path):
    """Ctrl-C on the driver, then the same command: the run resumes from the newest complete
    checkpoint the workers wrote (not the last one Ray had registered), each step is logged once,
    the weights are the uninterrupted run's, and the disk keeps `keep_checkpoints` checkpoints."""
    from dipo_scale.config import load_unlearn_config
    from dipo_scale.unlearn import checkpoint_root, complete_checkpoints

    out = tmp_path / "interrupted"
    args = _args(tiny_assets, out, "train.keep_checkpoints=2")
    proc = _start(args, tmp_path / "first.log")
    _wait_for_steps(out, 7, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
    proc.wait(timeout=120)
    sets = [a for a in args[args.index("unlearn") + 1:] if a != "--set"]
    root = checkpoint_root(load_unlearn_config(None, sets))
    on_disk = [step for step, _ in complete_checkpoints(root)]
    assert on_disk and on_disk[-1] >= 6, on_disk  # steps 2, 4, 6 were checkpointed before step 7 ended

    second = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert json.loads((out / "ranks" / "rank0.json").read_text())["resumed_from_step"] == on_disk[-1]
    assert f"resuming after step {on_disk[-1]}" in second.stdout + second.stderr
    assert len(list(root.glob("checkpoint_step*"))) == 2  # keep_checkpoints, orphans of the first driver included
    _assert_same_run(out, uninterrupted)
