"""Sweep: Ray Tune over DiPO's amplification strength α, β, the learning rate (and k, select, ...).

    dipo-scale sweep --config configs/sweep.yaml [--set unlearn.train.steps=40 ...]

Each trial is one unlearning run. Tune runs `_trial` (a light driver: `trial_cpus`, 0 by default,
and 256 MiB)
which turns the sampled values into an `UnlearnConfig` and calls `run_unlearning`: a TorchTrainer
with its own Ray Train workers, each a DeepSpeed ZeRO-3 engine (the Train V2 way of tuning). The
workers evaluate during unlearning (`unlearn.eval.every`); `_EvalToTune`, a Ray Train callback,
forwards each evaluation to Tune with the trial's `objective`, on which ASHA stops weak trials early
and Optuna proposes the next values.

Objective (`objective:` in the config, `config.ObjectiveConfig`; default MUSE's reading of a good
unlearning run: the lowest knowmem_f among runs that keep knowmem_r >= 90% of the target model's;
`objective.kind=tofu`: the highest forget_quality among runs that keep model_utility >= 95%):

    objective = ±metric                       (+ for mode=min, - for mode=max)   if the bounds hold
              = ±metric + 1000 + misses       otherwise (misses = floor - constraint metric, plus
                                              |privleak| - max_abs_privleak; the positive ones)

so every trial that keeps the bounds ranks above every trial that does not. `metric` is read after
an attack with `objective.after` (e.g. knowmem_f@quantize4). The target model's constraint value is
`objective.target_value`, or is measured first with the same settings.

Trials are ranked by the evaluations made during unlearning (`unlearn.eval`, MUSE data), or, with
`objective.data_dir` (needed by kind=tofu, `after` and `max_abs_privleak`), by one evaluation of
each finished model on that MUSE or TOFU data (`final_metrics`: `dipo-scale evaluate`'s code, into
trials/<id>/eval/), reported to Tune at the trial's end.

Outputs in `out_dir`:
    sweep.csv         one row per trial: its values, status (completed / stopped / error), the last
                      evaluation's metrics, objective, feasible, model path
    best.json         the best trial: values, metrics, model path, and its whole unlearning config
    pareto.png        forget (metric) against utility (constraint) for every trial, Pareto front marked
    target_metrics.json, config.json, trials/<trial_id>/ (each trial's run dir), tune/ (Tune's state)
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
from pathlib import Path

from dipo_scale.cluster import init_ray
from dipo_scale.config import ObjectiveConfig, SweepConfig, UnlearnConfig, _set_dotted
from dipo_scale.errors import UserInputError
from dipo_scale.files import (absolute_if_local, atomic_write_json, atomic_write_text, check_output_dir,
                              mark_output_dir)
from dipo_scale.preflight import check_resources
from dipo_scale.report import CI

INFEASIBLE_PENALTY = 1000.0  # above any MUSE/TOFU metric range, so feasible trials always rank first
METRICS = ("verbmem_f", "knowmem_f", "knowmem_r")
# What a trial's driver reserves besides `trial_cpus` (Tune needs a non-empty request; the driver
# only waits on its TorchTrainer, whose workers reserve their own CPUs/GPUs).
TRIAL_DRIVER_MEMORY = 256 * 2**20


def objective_value(metrics: dict, objective: ObjectiveConfig, target_value: float | None) -> tuple[float, bool]:
    """(objective, feasible) of one evaluation; lower objective is better (see the module docstring)."""
    value = metrics[objective.metric_key] * (1.0 if objective.mode == "min" else -1.0)
    excess = []  # how far each violated bound is missed
    if objective.constraint is not None:
        excess.append(objective.min_fraction * target_value - metrics[objective.constraint])
    if objective.max_abs_privleak is not None:
        excess.append(abs(metrics["privleak"]) - objective.max_abs_privleak)
    missed = [e for e in excess if e > 0]
    if not missed:
        return value, True
    return value + INFEASIBLE_PENALTY + sum(missed), False


def metric_columns(objective: ObjectiveConfig) -> list[str]:
    """The metrics sweep.csv and best.json record: MUSE's criteria and those the objective reads."""
    keys = [*METRICS, objective.metric_key, objective.constraint,
            "privleak" if objective.max_abs_privleak is not None else None]
    return list(dict.fromkeys(k for k in keys if k))


def final_metrics(model: str | Path, objective: ObjectiveConfig, ev, out: Path) -> dict:
    """The evaluation of a finished model on `objective.data_dir` (`dipo-scale evaluate`'s code,
    into `out`), with the attack `objective.after`; where `ev` (the unlearning config's `eval`) says."""
    from dipo_scale.eval.run import detect_layout, run_evaluation

    tofu = detect_layout(objective.data_dir) == "tofu"
    reference = {"retain_model" if tofu else "retrain_model": objective.reference_model}
    return run_evaluation(str(model), objective.data_dir, out, forget=objective.forget, batch_size=ev.batch_size,
                          limit=ev.limit, device=ev.device,
                          max_new_tokens=ev.knowmem_max_new_tokens if tofu else ev.verbmem_max_new_tokens,
                          num_workers=ev.num_workers, gpus_per_worker=ev.gpus_per_worker,
                          attacks=[objective.after] if objective.after != "none" else [],
                          relearn=objective.relearn, **reference)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, for (x lower is better, y higher is better),
    in increasing x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(x2 <= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i])


def _make_callback(objective: ObjectiveConfig, target_value: float | None):
    """A Ray Train callback that forwards rank 0's evaluation reports to Ray Tune, with the objective.
    (Checkpoint reports carry no evaluation and are not forwarded.)"""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _EvalToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            record = metrics[0]
            if not record.get("eval"):
                return
            value, feasible = objective_value(record, objective, target_value)
            super().after_report(run_context, [{**record, "objective": value, "feasible": feasible}], None)

    return _EvalToTune()


def _trial(params: dict, *, base: dict, out_dir: str, objective: dict, target_value: float | None) -> None:
    """One Tune trial: the base unlearning config with this trial's values, run to the end."""
    from ray import tune

    from dipo_scale.unlearn import run_unlearning

    tree = copy.deepcopy(base)
    for key, value in params.items():
        _set_dotted(tree, key, value)
    tree["out_dir"] = str(Path(out_dir) / "trials" / tune.get_context().get_trial_id())
    cfg, objective = UnlearnConfig.model_validate(tree), ObjectiveConfig(**objective)
    if not objective.final_evaluation:
        run_unlearning(cfg, callbacks=[_make_callback(objective, target_value)])
        return
    model = run_unlearning(cfg)
    metrics = final_metrics(model, objective, cfg.eval, Path(cfg.out_dir) / "eval")
    value, feasible = objective_value(metrics, objective, target_value)
    tune.report({"step": cfg.train.steps, **{k: v for k, v in metrics.items() if isinstance(v, float)},
                 "objective": value, "feasible": feasible})


def _typed(cfg: SweepConfig, key: str, values: list) -> list:
    """Grid/choice values as the unlearning config types them: YAML (and so `--set`) reads 1e-5,
    without a dot, as a string, which would otherwise reach sweep.csv and best.json as one."""
    typed = []
    for value in values:
        tree = cfg.unlearn.model_dump(by_alias=True)
        _set_dotted(tree, key, value)
        node = UnlearnConfig.model_validate(tree).model_dump(by_alias=True)
        for part in key.split("."):
            node = node[part]
        typed.append(node)
    return typed


def _param_space(cfg: SweepConfig) -> dict:
    from ray import tune

    space = {}
    for key, s in cfg.space.items():
        if s.grid is not None:  # Optuna samples; a grid becomes a categorical choice there
            grid = _typed(cfg, key, s.grid)
            space[key] = tune.choice(grid) if cfg.search == "optuna" else tune.grid_search(grid)
        elif s.choice is not None:
            space[key] = tune.choice(_typed(cfg, key, s.choice))
        elif s.uniform is not None:
            space[key] = tune.uniform(*s.uniform)
        else:
            space[key] = tune.loguniform(*s.loguniform)
    return space


def _target_value(cfg: SweepConfig, out: Path) -> float | None:
    """The target model's constraint metric: given, or measured on the evaluation data."""
    o = cfg.objective
    if o.constraint is None or o.target_value is not None:
        return o.target_value
    if o.final_evaluation:
        u = cfg.unlearn
        metrics = final_metrics(u.model.path, o.model_copy(update={"after": "none"}), u.eval, out / "target_eval")
        if o.constraint not in metrics:
            raise UserInputError(f"objective.constraint: {o.constraint!r} is not a metric of the evaluation on "
                                 f"{o.data_dir} ({', '.join(k for k in metrics if not k.endswith(CI))})")
        atomic_write_json(out / "target_metrics.json", {"model": u.model.path, **metrics})
        return metrics[o.constraint]
    from dipo_scale.data.muse import load_muse_dir
    from dipo_scale.eval.muse import muse_metrics
    from dipo_scale.eval.workers import muse_item_scores

    u = cfg.unlearn  # where: unlearn.eval.device, num_workers, gpus_per_worker
    metrics = muse_metrics(muse_item_scores(u.model.path, load_muse_dir(u.eval.data_dir), mia=False,
                                            trust_remote_code=u.model.trust_remote_code, **u.eval.muse_settings(),
                                            **u.eval.placement()))
    if o.constraint not in metrics:
        raise UserInputError(f"objective.constraint: {o.constraint!r} is not an evaluation metric "
                             f"({', '.join(metrics)})")
    atomic_write_json(out / "target_metrics.json", {"model": u.model.path, **metrics})
    return metrics[o.constraint]


def last_eval_step(cfg: SweepConfig, params: dict | None = None) -> int:
    """The step of a trial's last evaluation during unlearning, or its last step with
    `objective.data_dir` (`params`: the trial's values)."""
    params = params or {}
    steps = params.get("train.steps", cfg.unlearn.train.steps)
    if cfg.objective.final_evaluation:
        return steps
    every = params.get("eval.every", cfg.unlearn.eval.every)
    return steps // every * every


def _scheduler(cfg: SweepConfig):
    """FIFO, or ASHA on the trials' evaluations. ASHA's rungs all lie before the last evaluation
    (max_t = that step - 1): Ray's ASHA also places a rung at max_t when max_t / grace_period is a
    power of the reduction factor, and a trial stopped there, at its last evaluation, would lose
    the export it is about to write. So a trial that reports its last evaluation always completes,
    and one whose last reported step is earlier was stopped (`_rows`)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.scheduler != "asha":
        return FIFOScheduler()
    grace, last = cfg.asha.grace_period or cfg.unlearn.eval.every, last_eval_step(cfg)
    if grace >= last:
        raise UserInputError(
            f"asha.grace_period: {grace} steps, but a trial's last evaluation is at step {last} "
            f"(unlearn.train.steps={cfg.unlearn.train.steps}, unlearn.eval.every={cfg.unlearn.eval.every}): "
            "ASHA could never stop a trial; choose a grace period below it, or scheduler=fifo")
    return ASHAScheduler(time_attr="step", max_t=last - 1, grace_period=grace,
                         reduction_factor=cfg.asha.reduction_factor, stop_last_trials=False)


def _rows(results, cfg: SweepConfig, out: Path) -> list[dict]:
    """One row per trial from Tune's results (the last evaluation each trial reported). A trial
    whose last reported evaluation is not its last one was stopped (ASHA): Tune ignores what it
    reports after the decision, though it may run on until its workers are ended, even to its
    export; its row keeps the evaluation it was stopped on and names no model."""
    rows = []
    for result in results:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or Path(result.path).name
        run_dir = out / "trials" / trial_id
        finished = m.get("step") == last_eval_step(cfg, m.get("config")) and (run_dir / "model").is_dir()
        status = "error" if result.error else ("completed" if finished else "stopped")
        row = {"trial_id": trial_id, "status": status}
        row.update({key: (m.get("config") or {}).get(key) for key in cfg.space})
        row.update({"step": m.get("step"), **{k: m.get(k) for k in metric_columns(cfg.objective)},
                    "objective": m.get("objective"), "feasible": m.get("feasible"),
                    "model": str(run_dir / "model") if status == "completed" else "",
                    "error": str(result.error).splitlines()[0] if result.error else ""})
        rows.append(row)
    return sorted(rows, key=lambda r: (r["objective"] is None, r["objective"] or 0.0))


def _write_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _plot_pareto(rows: list[dict], cfg: SweepConfig, target_value: float | None, best: dict | None,
                 path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dipo_scale.report import save_figure

    o = cfg.objective
    x_key, y_key = o.metric_key, o.constraint or "knowmem_r"
    done = [r for r in rows if r.get(x_key) is not None and r.get(y_key) is not None]
    sign = 1.0 if o.mode == "min" else -1.0
    points = [(sign * r[x_key], r[y_key]) for r in done]
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([r[x_key] for r in done], [r[y_key] for r in done], c="tab:blue", label="trials")
    ax.plot([done[i][x_key] for i in front], [done[i][y_key] for i in front], "o-", c="tab:orange",
            label="Pareto front")
    if best is not None and best.get(x_key) is not None:
        ax.scatter([best[x_key]], [best[y_key]], marker="*", s=250, c="tab:red", zorder=3, label="best")
    if o.constraint is not None and target_value is not None:
        ax.axhline(o.min_fraction * target_value, ls="--", c="gray",
                   label=f"{o.min_fraction:g} × target {o.constraint}")
    ax.set_xlabel(f"{x_key} ({'lower' if o.mode == 'min' else 'higher'} is better)")
    ax.set_ylabel(f"{y_key} (higher is better)")
    ax.set_title(f"Sweep: {len(done)} trials")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    save_figure(fig, path)


def run_sweep(cfg: SweepConfig) -> dict:
    """Run the sweep; returns best.json's content."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from dipo_scale.unlearn import absolute_paths, validate_run

    out = Path(cfg.out_dir).resolve()
    if (out / "sweep.csv").exists() or (out / "tune").exists():
        raise UserInputError(f"{out}: holds a sweep already (choose another out_dir)")
    validate_run(cfg.unlearn)  # every value of the space was validated with the config (SweepConfig)
    _scheduler(cfg)  # ASHA's settings, before any work
    u = cfg.unlearn
    check_output_dir(out, "sweep", flag="out_dir", inputs=[
        ("unlearn.model.path", u.model.path), ("unlearn.data.prepared_dir", u.data.prepared_dir),
        ("unlearn.eval.data_dir", u.eval.data_dir), ("objective.data_dir", cfg.objective.data_dir),
        ("objective.reference_model", cfg.objective.reference_model)])
    if cfg.objective.final_evaluation:  # the final evaluation's inputs, before any trial starts
        from dipo_scale.eval.run import detect_layout
        from dipo_scale.preflight import check_model

        detect_layout(cfg.objective.data_dir)
        if cfg.objective.reference_model:
            check_model(cfg.objective.reference_model, "objective.reference_model")
    base = absolute_paths(cfg.unlearn)
    init_ray()  # and its state API checked
    check_resources(u.train.worker_range[0], use_gpu=u.train.use_gpu, flag="unlearn.train.num_workers",
                    extra_cpus=cfg.trial_cpus)
    mark_output_dir(out, "sweep")
    atomic_write_json(out / "config.json", cfg.model_dump(by_alias=True))
    target_value = _target_value(cfg, out)

    if cfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        search_alg = OptunaSearch(seed=cfg.seed)
    else:
        # (Tune ignores max_concurrent_trials for a generator passed in: it is set here.)
        search_alg = BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.max_concurrent_trials)
    scheduler = _scheduler(cfg)
    o = cfg.objective  # its local paths, as trials (in other directories) open them
    objective = o.model_dump() | {"data_dir": absolute_if_local(o.data_dir),
                                  "reference_model": absolute_if_local(o.reference_model),
                                  "relearn": o.relearn.model_dump() | {"data": absolute_if_local(o.relearn.data)}}
    trainable = tune.with_parameters(_trial, base=base.model_dump(by_alias=True), out_dir=str(out),
                                     objective=objective, target_value=target_value)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": cfg.trial_cpus, "memory": TRIAL_DRIVER_MEMORY}),
        param_space=_param_space(cfg),
        tune_config=tune.TuneConfig(metric="objective", mode="min", search_alg=search_alg,
                                    scheduler=scheduler, num_samples=cfg.num_samples,
                                    max_concurrent_trials=cfg.max_concurrent_trials),
        run_config=tune.RunConfig(name="sweep", storage_path=str(out / "tune")),
    )
    rows = _rows(tuner.fit(), cfg, out)
    _write_csv(rows, out / "sweep.csv")
    ranked = [r for r in rows if r["objective"] is not None and not math.isnan(r["objective"])]
    best_row = ranked[0] if ranked else None
    best = {"trial_id": None, "feasible": False, "target_value": target_value,
            "note": "no trial reported an evaluation"}
    if best_row is not None:
        trial_config = json.loads((out / "trials" / best_row["trial_id"] / "config.json").read_text())
        best = {"trial_id": best_row["trial_id"], "status": best_row["status"],
                "params": {k: best_row[k] for k in cfg.space},
                "metrics": {k: best_row[k] for k in metric_columns(cfg.objective)}, "objective": best_row["objective"],
                "feasible": best_row["feasible"], "target_value": target_value, "model": best_row["model"],
                "config": trial_config}
        if not best_row["feasible"]:
            best["note"] = (f"no trial kept {cfg.objective.constraint} >= {cfg.objective.min_fraction:g} × "
                            "the target's; this is the closest")
    atomic_write_json(out / "best.json", best)
    _plot_pareto(rows, cfg, target_value, best_row, out / "pareto.png")
    return best
