"""Ray Tune sweeps: the objective, the Pareto front, config checks, and a real 2-trial sweep where each
trial is a TorchTrainer with its own DeepSpeed ZeRO-3 worker, under ASHA."""

from __future__ import annotations

import csv
import json

import pytest

from dipo_scale.config import ObjectiveConfig, SweepConfig, load_config
from dipo_scale.errors import UserInputError
from dipo_scale.sweep import INFEASIBLE_PENALTY, objective_value, pareto_front, run_sweep


def test_objective_ranks_feasible_trials_first():
    o = ObjectiveConfig()  # lowest knowmem_f with knowmem_r >= 0.9 × target
    assert objective_value({"knowmem_f": 30.0, "knowmem_r": 90.0}, o, 100.0) == (30.0, True)
    value, feasible = objective_value({"knowmem_f": 5.0, "knowmem_r": 80.0}, o, 100.0)
    assert not feasible and value == 5.0 + INFEASIBLE_PENALTY + 10.0
    assert objective_value({"knowmem_f": 99.0, "knowmem_r": 90.0}, o, 100.0)[0] < value
    # closer to the floor ranks higher among infeasible ones
    assert objective_value({"knowmem_f": 5.0, "knowmem_r": 85.0}, o, 100.0)[0] < value
    maximise = ObjectiveConfig(metric="knowmem_r", mode="max", constraint=None)
    assert objective_value({"knowmem_r": 70.0}, maximise, None) == (-70.0, True)


def test_pareto_front():
    # x: forget metric (lower better), y: utility (higher better)
    points = [(10, 50), (20, 80), (15, 40), (30, 80), (5, 10)]
    assert pareto_front(points) == [4, 0, 1]


def test_sweep_config_is_checked_in_one_line(tiny_assets):
    base = ["unlearn.eval.every=2", f"unlearn.eval.data_dir={tiny_assets['corpus']}"]
    with pytest.raises(UserInputError, match="space.dipo.alfa: not a setting of the unlearning config"):
        load_config(None, base + ["space.dipo.alfa.grid=[1, 2]"], SweepConfig)
    with pytest.raises(UserInputError, match="search=grid needs a grid list"):
        load_config(None, base + ["space.train.lr.loguniform=[1e-4, 1e-2]"], SweepConfig)
    with pytest.raises(UserInputError, match="low must be below high"):
        load_config(None, base + ["search=random", "space.train.lr.uniform=[0.1, 0.01]"], SweepConfig)
    with pytest.raises(UserInputError, match="unlearn.eval.every and unlearn.eval.data_dir"):
        load_config(None, ["space.dipo.alpha.grid=[1]"], SweepConfig)
    cfg = load_config(None, base + ["search=optuna", "space.dipo.alpha.uniform=[1, 8]",
                                    "space.dipo.select.choice=[topk, label]"], SweepConfig)
    assert set(cfg.space) == {"dipo.alpha", "dipo.select"}


@pytest.fixture(scope="module")
def ray_with_state_api():
    """A local Ray with its dashboard: when ASHA stops a trial, Ray Train's placement-group cleaner
    asks the state API whether the trial's controller died before it frees the workers' CPUs."""
    import os
    from pathlib import Path

    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=True, _temp_dir=str(Path("/tmp") / f"dipo_tune_{os.getpid()}"),
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}})
    yield
    ray.shutdown()


def test_two_trial_sweep_names_the_best_trial(tiny_assets, ray_with_state_api, tmp_path):
    out = tmp_path / "sweep"
    cfg = load_config(None, [
        f"out_dir={out}", f"unlearn.model.path={tiny_assets['target']}",
        f"unlearn.data.prepared_dir={tiny_assets['prepared']}", "unlearn.method=dipo",
        "unlearn.train.num_workers=1", "unlearn.train.steps=2", "unlearn.train.global_batch_size=4",
        "unlearn.train.micro_batch_size=2", "unlearn.train.lr=2e-3", "unlearn.logging.wandb=disabled",
        "unlearn.eval.every=2", f"unlearn.eval.data_dir={tiny_assets['corpus']}", "unlearn.eval.limit=2",
        "unlearn.eval.verbmem_max_new_tokens=8", "unlearn.eval.knowmem_max_new_tokens=8",
        "space.dipo.alpha.grid=[1.0, 8.0]", "scheduler=asha", "asha.grace_period=2",
    ], SweepConfig)
    best = run_sweep(cfg)

    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert sorted(float(r["dipo.alpha"]) for r in rows) == [1.0, 8.0]
    assert all(r["status"] in ("completed", "stopped") for r in rows), rows
    assert any(r["status"] == "completed" for r in rows)
    for r in rows:  # each trial ran its own unlearning run, with evaluations during it
        evals = [json.loads(x) for x in (out / "trials" / r["trial_id"] / "eval.jsonl").read_text().splitlines()]
        assert evals and int(r["step"]) == evals[-1]["step"]
        assert float(r["knowmem_f"]) == pytest.approx(evals[-1]["knowmem_f"])
    ranked = sorted(rows, key=lambda r: float(r["objective"]))
    assert best["trial_id"] == ranked[0]["trial_id"]
    assert best["params"]["dipo.alpha"] == float(ranked[0]["dipo.alpha"])
    assert best["config"]["dipo"]["alpha"] == best["params"]["dipo.alpha"]
    target = json.loads((out / "target_metrics.json").read_text())
    assert best["target_value"] == target["knowmem_r"]
    if best["status"] == "completed":
        assert (out / "trials" / best["trial_id"] / "model" / "model.safetensors").is_file()
    assert (out / "pareto.png").stat().st_size > 0
    with pytest.raises(UserInputError, match="holds a sweep already"):
        run_sweep(cfg)
