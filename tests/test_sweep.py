"""Ray Tune sweeps: the objective, the Pareto front, config checks, ASHA's decisions, and real sweeps
where each trial is a TorchTrainer with its own DeepSpeed ZeRO-3 worker: a grid under ASHA that stops
a trial, and 3 trials proposed by Optuna."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_unlearn import ECHO_LIMIT, ECHO_TOKENS, echo_eval_dir

from dipo_scale.config import ObjectiveConfig, SweepConfig, load_config
from dipo_scale.errors import UserInputError
from dipo_scale.sweep import INFEASIBLE_PENALTY, _rows, _scheduler, objective_value, pareto_front, run_sweep


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


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small MUSE-layout directory for the settings-only tests (no models needed)."""
    from dipo_scale.data.corpus import generate_corpus

    return generate_corpus(tmp_path_factory.mktemp("corpus") / "muse", num_docs=3, seed=0)


def test_sweep_config_is_checked_in_one_line(corpus):
    base = ["unlearn.eval.every=2", f"unlearn.eval.data_dir={corpus}"]
    with pytest.raises(UserInputError, match=r"space\.dipo\.alfa: .*dipo\.alfa: unknown key"):
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


# --- ASHA's decisions -----------------------------------------------------------------------------
def _sweep_config(corpus, *sets) -> SweepConfig:
    return load_config(None, ["unlearn.eval.every=2", f"unlearn.eval.data_dir={corpus}",
                              "unlearn.train.steps=4", "space.dipo.alpha.grid=[1, 2]", *sets], SweepConfig)


def test_asha_stops_weak_trials_early_but_never_at_their_last_evaluation(corpus):
    """Evaluations at steps 2 and 4, grace period 2: a trial worse than the others at step 2 stops
    there; one that passed step 2 and is the worst at its last evaluation (step 4, which Ray's ASHA
    would make a rung: max_t / grace = 2) still finishes and writes its export."""
    from ray.tune.schedulers import TrialScheduler

    scheduler = _scheduler(_sweep_config(corpus, "scheduler=asha", "asha.grace_period=2"))
    scheduler.set_search_properties("objective", "min")
    trials = {name: SimpleNamespace(trial_id=name) for name in ("a", "b", "c")}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)

    def report(name, step, objective):
        return scheduler.on_trial_result(None, trials[name], {"step": step, "objective": objective})

    assert report("a", 2, 50.0) == TrialScheduler.CONTINUE  # the first at step 2
    assert report("a", 4, 10.0) == TrialScheduler.CONTINUE
    assert report("b", 2, 80.0) == TrialScheduler.STOP  # worse than a at step 2
    assert report("c", 2, 20.0) == TrialScheduler.CONTINUE  # better than a at step 2
    assert report("c", 4, 90.0) == TrialScheduler.CONTINUE  # worse than a at step 4: its last evaluation


def test_asha_needs_an_evaluation_before_the_last(corpus):
    with pytest.raises(UserInputError, match="asha.grace_period: 4 steps, but a trial's last evaluation is at step 4"):
        _scheduler(_sweep_config(corpus, "scheduler=asha", "asha.grace_period=4"))
    with pytest.raises(UserInputError, match="asha.grace_period: 2 steps, .* at step 2"):
        _scheduler(_sweep_config(corpus, "scheduler=asha", "unlearn.train.steps=3"))
    assert type(_scheduler(_sweep_config(corpus, "asha.grace_period=4"))).__name__ == "FIFOScheduler"


def test_asha_stopped_trial_is_logged_stopped_even_after_it_exported(corpus, tmp_path):
    """Tune stops a trial on its step-2 evaluation, but the trial's workers may run on until they
    are ended, even through their export: the row is the stopped trial's (step 2, no model)."""
    cfg = _sweep_config(corpus, "scheduler=asha")
    for trial_id in ("t_done", "t_stopped", "t_killed"):
        (tmp_path / "trials" / trial_id / ("model" if trial_id != "t_killed" else "ray")).mkdir(parents=True)

    def result(trial_id, step, error=None):
        metrics = {"trial_id": trial_id, "step": step, "config": {"dipo.alpha": 1}, "knowmem_f": 1.0,
                   "knowmem_r": 2.0, "verbmem_f": 3.0, "objective": float(step), "feasible": True}
        return SimpleNamespace(metrics=metrics, path=str(tmp_path / trial_id), error=error)

    rows = {r["trial_id"]: r for r in _rows([result("t_done", 4), result("t_stopped", 2), result("t_killed", 2),
                                             result("t_err", 2, RuntimeError("boom\nmore"))], cfg, tmp_path)}
    assert {k: (r["status"], r["step"], bool(r["model"])) for k, r in rows.items()} == {
        "t_done": ("completed", 4, True), "t_stopped": ("stopped", 2, False), "t_killed": ("stopped", 2, False),
        "t_err": ("error", 2, False)}
    assert rows["t_err"]["error"] == "RuntimeError: boom"  # the type and first line of the root error
    # A sweep over the steps: each trial's own last evaluation.
    cfg = _sweep_config(corpus, "scheduler=asha", "space.train.steps.grid=[2, 4]")
    short = result("t_stopped", 2)
    short.metrics["config"] = {"train.steps": 2}
    assert _rows([short], cfg, tmp_path)[0]["status"] == "completed"


# --- real sweeps: each trial a TorchTrainer with its own ZeRO-3 worker ---------------------------------
@pytest.fixture(scope="module")
def ray_with_state_api():
    """A local Ray with its dashboard: when ASHA stops a trial, Ray Train's placement-group cleaner
    asks the state API whether the trial's controller died before it frees the workers' CPUs."""
    import os
    from pathlib import Path

    import ray

    if ray.is_initialized():
        ray.shutdown()
    from dipo_scale.cluster import local_dashboard

    ray.init(address="local", num_cpus=2, **local_dashboard(), _temp_dir=str(Path("/tmp") / f"dipo_tune_{os.getpid()}"),
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def echo_eval(tiny_assets, tmp_path_factory):
    """Evaluation data on which the target scores 100 (tests/test_unlearn.py, echo_eval_dir)."""
    return echo_eval_dir(tiny_assets, tmp_path_factory.mktemp("echo") / "eval")


def _trial_sets(tiny_assets, echo_eval, out, steps):
    return [f"out_dir={out}", f"unlearn.model.path={tiny_assets['target']}",
            f"unlearn.data.prepared_dir={tiny_assets['prepared']}", "unlearn.method=dipo",
            "unlearn.train.num_workers=1", f"unlearn.train.steps={steps}", "unlearn.train.global_batch_size=4",
            "unlearn.train.micro_batch_size=2", "unlearn.logging.wandb=disabled", "unlearn.eval.every=2",
            f"unlearn.eval.data_dir={echo_eval}", f"unlearn.eval.limit={ECHO_LIMIT}",
            f"unlearn.eval.verbmem_max_new_tokens={ECHO_TOKENS}", f"unlearn.eval.knowmem_max_new_tokens={ECHO_TOKENS}",
            "max_concurrent_trials=1"]


def _evals(out, trial_id) -> list[dict]:
    return [json.loads(x) for x in (out / "trials" / trial_id / "eval.jsonl").read_text().splitlines()]


def test_asha_sweep_stops_the_trial_that_loses_utility(tiny_assets, ray_with_state_api, echo_eval, tmp_path):
    """Two trials one after the other, evaluated at steps 2 and 4, ASHA with grace period 2. The
    target scores knowmem_r 100 on the echo data (floor 90). lr=1e-7 keeps the target's answers
    (objective 100, feasible) and runs to the end; lr=2e-3 loses them by step 2 (infeasible:
    objective above 1000), worse than the first trial at step 2, and ASHA stops it there."""
    out = tmp_path / "sweep"
    cfg = load_config(None, _trial_sets(tiny_assets, echo_eval, out, steps=4) + [
        "space.train.lr.grid=[1e-7, 2e-3]", "scheduler=asha", "asha.grace_period=2"], SweepConfig)
    best = run_sweep(cfg)

    target = json.loads((out / "target_metrics.json").read_text())
    assert target["knowmem_r"] == 100.0 and best["target_value"] == 100.0
    rows = {float(r["train.lr"]): r for r in csv.DictReader((out / "sweep.csv").open())}
    assert sorted(rows) == [1e-7, 2e-3]
    kept, stopped = rows[1e-7], rows[2e-3]
    assert (kept["status"], kept["step"], kept["feasible"]) == ("completed", "4", "True"), kept
    assert float(kept["objective"]) == float(kept["knowmem_f"]) == 100.0
    assert (Path(kept["model"]) / "model.safetensors").is_file()
    assert (stopped["status"], stopped["step"], stopped["feasible"], stopped["model"]) == ("stopped", "2", "False", ""), stopped
    assert float(stopped["objective"]) > INFEASIBLE_PENALTY
    for r in rows.values():  # each row: the trial's own evaluation at its last reported step
        record = next(e for e in _evals(out, r["trial_id"]) if e["step"] == int(r["step"]))
        assert (float(r["knowmem_f"]), float(r["knowmem_r"])) == (record["knowmem_f"], record["knowmem_r"])
    kept_at_2 = _evals(out, kept["trial_id"])[0]
    assert kept_at_2["step"] == 2 and float(stopped["objective"]) > objective_value(kept_at_2, cfg.objective, 100.0)[0]

    assert best["trial_id"] == kept["trial_id"] and best["status"] == "completed" and best["feasible"]
    assert best["params"]["train.lr"] == 1e-7 and best["config"]["train"]["lr"] == 1e-7
    assert best["model"] == kept["model"]
    assert (out / "pareto.png").stat().st_size > 0
    with pytest.raises(UserInputError, match="holds a finished sweep already"):
        run_sweep(cfg)


def _optuna_study(experiment_dir: Path):
    """The Optuna study of the sweep's searcher, from the state Tune saved (OptunaSearch pickles its
    attributes; Tune may wrap it in a ConcurrencyLimiter)."""
    import pickle

    import optuna

    states = sorted(experiment_dir.glob("searcher-state-*.pkl"))
    assert states, sorted(p.name for p in experiment_dir.iterdir())
    todo, seen = [pickle.loads(states[-1].read_bytes())], set()
    while todo:
        obj = todo.pop()
        if isinstance(obj, optuna.Study):
            return obj
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            todo.extend(obj.values())
        elif hasattr(obj, "__dict__"):
            todo.extend(vars(obj).values())
    raise AssertionError("no Optuna study in the searcher state")


def test_optuna_sweep_of_three_trials(tiny_assets, ray_with_state_api, echo_eval, tmp_path):
    """search=optuna, 3 short trials: Optuna proposes each trial's lr and alpha (continuous values in
    their ranges), each trial runs with them, and the study is told each trial's objective."""
    import optuna

    out = tmp_path / "optuna"
    cfg = load_config(None, _trial_sets(tiny_assets, echo_eval, out, steps=2) + [
        "search=optuna", "num_samples=3", "space.train.lr.loguniform=[1e-4, 3e-3]",
        "space.dipo.alpha.uniform=[1, 8]"], SweepConfig)
    best = run_sweep(cfg)

    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == 3 and len({r["trial_id"] for r in rows}) == 3
    assert all(r["status"] == "completed" and r["step"] == "2" for r in rows), rows
    lrs, alphas = [float(r["train.lr"]) for r in rows], [float(r["dipo.alpha"]) for r in rows]
    assert all(1e-4 <= lr <= 3e-3 for lr in lrs) and all(1 <= a <= 8 for a in alphas)
    assert len(set(lrs)) == len(set(alphas)) == 3  # sampled, not a grid
    for r in rows:  # the trial ran with the values Optuna proposed
        trial_cfg = json.loads((out / "trials" / r["trial_id"] / "config.json").read_text())
        assert (trial_cfg["train"]["lr"], trial_cfg["dipo"]["alpha"]) == (float(r["train.lr"]), float(r["dipo.alpha"]))
        assert float(r["knowmem_f"]) == _evals(out, r["trial_id"])[-1]["knowmem_f"]

    study = _optuna_study(out / "tune" / "sweep")
    told = sorted((t.params["train.lr"], t.params["dipo.alpha"], t.value) for t in study.trials
                  if t.state == optuna.trial.TrialState.COMPLETE)
    logged = sorted((float(r["train.lr"]), float(r["dipo.alpha"]), float(r["objective"])) for r in rows)
    assert len(told) == 3
    for t, r in zip(told, logged):
        assert t == pytest.approx(r)
    lowest = min(float(r["objective"]) for r in rows)  # the best: a trial of the lowest objective
    chosen = next(r for r in rows if r["trial_id"] == best["trial_id"])
    assert float(chosen["objective"]) == best["objective"] == lowest
    assert best["params"] == pytest.approx({"train.lr": float(chosen["train.lr"]), "dipo.alpha": float(chosen["dipo.alpha"])})
    assert best["config"]["train"]["lr"] == best["params"]["train.lr"]


# --- objectives: TOFU's, MUSE's with a PrivLeak bound, after an attack -------------------------------
# A hand-made results table: (name, metrics). The target model has knowmem_r 100 and model_utility 0.8.
TRIALS = [
    ("a", {"knowmem_f": 5.0, "knowmem_r": 95.0, "privleak": -40.0, "forget_quality": 0.30, "model_utility": 0.74,
           "knowmem_f@quantize4": 30.0, "forget_quality@quantize4": 0.010}),
    ("b", {"knowmem_f": 9.0, "knowmem_r": 92.0, "privleak": 8.0, "forget_quality": 0.05, "model_utility": 0.79,
           "knowmem_f@quantize4": 11.0, "forget_quality@quantize4": 0.040}),
    ("c", {"knowmem_f": 2.0, "knowmem_r": 70.0, "privleak": 2.0, "forget_quality": 0.90, "model_utility": 0.60,
           "knowmem_f@quantize4": 3.0, "forget_quality@quantize4": 0.800}),
    ("d", {"knowmem_f": 12.0, "knowmem_r": 99.0, "privleak": -3.0, "forget_quality": 0.02, "model_utility": 0.78,
           "knowmem_f@quantize4": 14.0, "forget_quality@quantize4": 0.030}),
]
TARGET = {"knowmem_r": 100.0, "model_utility": 0.8}


def _best(*sets) -> str:
    o = load_config(None, ["space.dipo.alpha.grid=[1]", "objective.data_dir=/d", "objective.reference_model=/m",
                           *sets], SweepConfig).objective
    target = TARGET.get(o.constraint) if o.constraint else None
    return min(TRIALS, key=lambda t: objective_value(t[1], o, target)[0])[0]


def test_objectives_pick_the_right_trial_on_a_hand_made_table():
    # MUSE's: lowest knowmem_f with knowmem_r >= 90 (a; c loses too much utility)
    assert _best() == "a"
    # ... with |privleak| <= 10: a leaks (-40), so b
    assert _best("objective.max_abs_privleak=10") == "b"
    # ... judged after 4-bit quantization: a's forgetting comes back (30), b holds (11)
    assert _best("objective.after=quantize4") == "b"
    # TOFU's: highest forget_quality with model_utility >= 0.95 x 0.8 = 0.76 (c, a fall short: b)
    assert _best("objective.kind=tofu") == "b"
    # ... after quantize4: d's 0.03 < b's 0.04, still b; with a floor of 0.9 (0.72), a qualifies but
    # its forget quality after the attack (0.01) is the lowest of the feasible ones
    assert _best("objective.kind=tofu", "objective.after=quantize4", "objective.min_fraction=0.9") == "b"
    assert _best("objective.kind=tofu", "objective.min_fraction=0.9") == "a"
    # no feasible trial: -forget_quality + 1000 + shortfall ranks them (c: -0.90 + 0.36; b: -0.05 + 0.17)
    assert _best("objective.kind=tofu", "objective.min_fraction=1.2") == "c"
    o = load_config(None, ["space.dipo.alpha.grid=[1]", "objective.kind=tofu", "objective.data_dir=/d",
                           "objective.reference_model=/m"], SweepConfig).objective
    assert (o.metric, o.mode, o.constraint, o.min_fraction) == ("forget_quality", "max", "model_utility", 0.95)
    assert objective_value(TRIALS[1][1], o, 0.8) == (-0.05, True)


def test_objective_config_is_checked(corpus):
    base = ["space.dipo.alpha.grid=[1]", "unlearn.eval.every=2", f"unlearn.eval.data_dir={corpus}"]
    for sets, message in ((["objective.kind=tofu"], "objective.data_dir: kind=tofu ranks trials"),
                          (["objective.after=quantize4"], "objective.data_dir: after=quantize4"),
                          (["objective.kind=tofu", "objective.data_dir=/d"], "objective.reference_model: forget quality"),
                          (["objective.max_abs_privleak=5", "objective.data_dir=/d"], "privleak needs the retrain"),
                          (["objective.after=quantise", "objective.data_dir=/d"], "objective.after"),
                          (["objective.data_dir=/d", "scheduler=asha"], "scheduler: asha stops trials")):
        with pytest.raises(UserInputError, match=message):
            load_config(None, base + sets, SweepConfig)
    # a final evaluation needs no evaluation during unlearning
    cfg = load_config(None, ["space.dipo.alpha.grid=[1]", "objective.data_dir=/d"], SweepConfig)
    assert cfg.objective.final_evaluation and cfg.objective.metric_key == "knowmem_f"


def test_sweep_ranked_by_a_final_evaluation_after_quantization(tiny_assets, ray_with_state_api, echo_eval, tmp_path):
    """objective.data_dir + after=quantize4: each finished trial's model is evaluated once (in 4-bit
    too), the row and the objective come from that evaluation, and the best is its lowest objective."""
    out = tmp_path / "final"
    sets = [s for s in _trial_sets(tiny_assets, echo_eval, out, steps=2)
            if not s.startswith(("unlearn.eval.every", "unlearn.eval.data_dir"))]
    cfg = load_config(None, sets + ["space.dipo.alpha.grid=[1, 8]", f"objective.data_dir={echo_eval}",
                                    f"objective.reference_model={tiny_assets['retrain']}",
                                    "objective.after=quantize4", "objective.max_abs_privleak=1000"], SweepConfig)
    best = run_sweep(cfg)
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == 2 and all(r["status"] == "completed" and r["step"] == "2" for r in rows), rows
    target = json.loads((out / "target_metrics.json").read_text())["knowmem_r"]
    for r in rows:
        metrics = json.loads((out / "trials" / r["trial_id"] / "eval" / "metrics.json").read_text())
        assert float(r["knowmem_f@quantize4"]) == pytest.approx(metrics["knowmem_f@quantize4"])
        assert float(r["objective"]) == pytest.approx(objective_value(metrics, cfg.objective, target)[0])
        assert "privleak" in metrics and not (out / "trials" / r["trial_id"] / "eval.jsonl").exists()
    assert best["objective"] == min(float(r["objective"]) for r in rows)
    assert set(best["metrics"]) >= {"knowmem_f@quantize4", "knowmem_r", "privleak"}


def test_a_cluster_without_state_api_is_refused_before_ray_train_runs():
    """A Ray someone started without its dashboard: Ray Train's placement-group cleaner cannot tell
    a live run's controller from a dead one (it ended live trials so); every command that runs Ray
    Train on it says so before any run (`init_ray` checks the state API)."""
    import os
    import subprocess
    import sys

    code = ("import ray, sys; ray.init(address='local', include_dashboard=False, num_cpus=1)\n"
            "from dipo_scale.errors import UserInputError\nfrom dipo_scale.cluster import check_state_api\n"
            "try:\n    check_state_api(wait_s=1)\nexcept UserInputError as e:\n    print('refused:', e); sys.exit(3)\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_API_SERVER_ADDRESS"}  # (this process's cluster's)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "no working state API" in done.stdout and "start that cluster with its dashboard" in done.stdout
