"""Shared fixtures: a tiny corpus, tokenizer and memorised models, and a local Ray cluster."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dipo_scale.cluster import local_dashboard

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller polls its workers every 2 s by default; at the test runs' size (a few
# seconds of training) that polling is a large share of each run. Every Ray cluster the tests
# start (in process, `ray start`, CLI subprocesses) inherits this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# The venv's bin first on PATH for every process the tests start (the `ray` CLI and the `python`
# of `ray job submit` entrypoints need it). It also keeps one `ninja` for DeepSpeed's JIT build of
# its CPU shared-memory op: the venv's ninja (1.13) and a system one (1.11 here) read each other's
# build log as stale, so alternating between them recompiled the op (~70 s) at every switch.
_venv_bin = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _venv_bin:
    os.environ["PATH"] = _venv_bin + os.pathsep + os.environ.get("PATH", "")

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
            block_size=64, batch_size=8, lr=3e-3, epochs=15, seed=0)


@contextlib.contextmanager
def cpu_stress(processes: int = 2):
    """Busy processes beside the block (every core of this box busy): a run must survive a loaded
    machine (Ray Train's placement-group cleaner once removed a live run's workers under load)."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for p in busy:
            p.kill()
            p.wait()


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """{"corpus", "tokenizer", "target", "retrain", "prepared"}: built once per test session."""
    from transformers import AutoTokenizer

    from dipo_scale.data.corpus import generate_corpus
    from dipo_scale.data.muse import load_muse_dir
    from dipo_scale.models import TinyModelSettings, build_models
    from dipo_scale.prepare import prepare

    root = tmp_path_factory.mktemp("tiny")
    corpus = generate_corpus(root / "corpus", num_docs=12, seed=0)
    data = load_muse_dir(corpus)
    paths = build_models(data, root / "models", TinyModelSettings(**TINY))
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    prepare(data, tokenizer, root / "prepared", block_size=TINY["block_size"], with_qa=True,
            layout="per_sequence")
    return {"corpus": Path(corpus), **paths, "prepared": root / "prepared", "root": root}


@pytest.fixture
def workdir(tiny_assets, tmp_path):
    """A working directory with copies of the inputs a user has: corpus, tokenizer, model, prepared."""
    import shutil

    for name, src in (("corpus", tiny_assets["corpus"]), ("tokenizer", tiny_assets["tokenizer"]),
                      ("model", tiny_assets["target"]), ("prepared", tiny_assets["prepared"])):
        shutil.copytree(src, tmp_path / name)
    (tmp_path / "home").mkdir()
    return tmp_path


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for one test module (modules that build their own clusters stay apart)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    temp = Path("/tmp") / f"dipo_ray_{os.getpid()}"  # short: Ray's socket paths have a length limit
    # address="local": a cluster of its own, never one that `ray start` left on the machine.
    # its dashboard (on a port of its own): Ray Train's placement-group cleaner needs its state API
    ray.init(address="local", num_cpus=2, _temp_dir=str(temp), log_to_driver=True, **local_dashboard(),
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}})
    yield
    ray.shutdown()


@pytest.fixture
def one_thread():
    """Tests on tiny tensors run single-threaded: intra-op threads would only add wake-up latency
    (large on a busy 2-core box)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
