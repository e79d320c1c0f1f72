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
    best.json         the best trial: values, metrics, model path, its whole unlearning config, and
                      complete (false: some trials failed, listed in failed_trials)
    pareto.png        forget (metric) against utility (constraint) for every trial, Pareto front marked
    target_metrics.json, config.json, inputs.json (the fingerprints of the model and data the
    trials read), trials/<trial_id>/ (each trial's run dir), tune/ (Tune's state)

Before Ray starts, every metric key the objective reads (`objective.metric` (with `after`),
`objective.constraint`, privleak for `max_abs_privleak`) is checked against the names the trials
will report (`trial_metric_names`: the evaluation code's own output, probed on the data), in one line.

Exit status (`dipo-scale sweep`): 0 only when every trial is accounted for (completed, or stopped
by ASHA) and best.json names the best. A sweep where trials failed raises `SweepFailed` (exit 1):
one line per failed trial on stderr, then one `error:` line (count, the first failure); sweep.csv
lists every trial, and best.json is written only when some trial completed, marked
`"complete": false` with the failed trials. Ctrl-C (SIGINT) raises `SweepInterrupted` (exit 130):
Tune saves its state, nothing claims a best. Rerunning the same command on the same out_dir
resumes an interrupted or failed sweep (`Tuner.restore`: finished trials are kept, interrupted
ones resume from their run dir's checkpoints, failed ones are retried); another config, other
inputs (fingerprints), or a finished sweep (a complete best.json) are refused in one line.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path

from dipo_scale.cluster import init_ray
from dipo_scale.config import ObjectiveConfig, SweepConfig, UnlearnConfig, _set_dotted
from dipo_scale.errors import UserInputError, first_line, run_user_error
from dipo_scale.files import (absolute_if_local, atomic_write_json, atomic_write_text, check_output_dir,
                              hold_output_dir, mark_output_dir)
from dipo_scale.preflight import check_resources

INFEASIBLE_PENALTY = 1000.0  # above any MUSE/TOFU metric range, so feasible trials always rank first
METRICS = ("verbmem_f", "knowmem_f", "knowmem_r")
# What a trial's driver reserves besides `trial_cpus` (Tune needs a non-empty request; the driver
# only waits on its TorchTrainer, whose workers reserve their own CPUs/GPUs).
TRIAL_DRIVER_MEMORY = 256 * 2**20
EXPERIMENT = "sweep"  # Tune's experiment: out_dir/tune/sweep


class SweepFailed(UserInputError):
    """Trials of the sweep failed: no checked result (the CLI prints the line, exit 1)."""

    exit_code = 1


class SweepInterrupted(UserInputError):
    """The sweep was interrupted (Ctrl-C, SIGINT): exit 130, as a shell reports a SIGINT."""

    exit_code = 130


# --- the metric names trials report, and the objective's keys checked against them ----------------
class _AnyItems(dict):
    """Per-item results of every criterion `muse_metrics` asks for (two items each), in the shape
    `score_muse_items` returns: a probe of the names the evaluation code reports."""

    def __missing__(self, key):
        return {"outputs": ["", ""], "scores": [0.0, 1.0]}


def _muse_metrics_probe(data_dir: str, limit: int | None, flag: str) -> dict:
    """`muse_metrics` (the metrics of every MUSE evaluation, during unlearning and after it) of
    made-up scores for the items an evaluation of `data_dir` scores: its keys are those a real
    evaluation reports (mia_auc only where the data has attack texts)."""
    from dipo_scale.data.muse import load_muse_dir
    from dipo_scale.eval.muse import muse_items, muse_metrics

    try:
        items = muse_items(load_muse_dir(data_dir), limit=limit, mia=True)
    except ValueError as e:
        raise UserInputError(f"{flag} {data_dir}: {e}") from None
    return muse_metrics(_AnyItems(mia={"forget": [float(i) for i in range(len(items.mia_forget))],
                                       "holdout": [i + 0.5 for i in range(len(items.mia_holdout))]}))


def trial_metric_names(cfg: SweepConfig) -> tuple[list[str], str] | None:
    """The metric names every trial reports to Tune (what the objective can read), and where they
    come from; None where only a real evaluation tells (`objective.data_dir` that is TOFU data or a
    hub name: `_target_value` checks the keys against the target model's evaluation then).

    During unlearning: the `Evaluator`'s record, `muse_metrics` of the evaluation data
    (dipo_scale/eval/in_training.py). With `objective.data_dir` (MUSE): `run_evaluation`'s metrics,
    privleak against `objective.reference_model`, and with `after` the attack's keys."""
    o, e = cfg.objective, cfg.unlearn.eval
    if not o.final_evaluation:
        metrics = _muse_metrics_probe(e.data_dir, e.limit, "unlearn.eval.data_dir")
        source = f"the evaluation during unlearning on unlearn.eval.data_dir {e.data_dir}"
    else:
        from dipo_scale.eval.attacks import attack_keys
        from dipo_scale.eval.privacy import add_privleak
        from dipo_scale.eval.run import detect_layout

        if not Path(o.data_dir).is_dir() or detect_layout(o.data_dir) != "muse":
            return None
        metrics = _muse_metrics_probe(o.data_dir, e.limit, "objective.data_dir")
        if o.reference_model:  # the retrain model's AUC (any value: only the names matter)
            add_privleak(metrics, 0.5)
        if o.after != "none":
            metrics.update(attack_keys(metrics, {o.after: dict(metrics)}))
        source = f"the evaluation of each finished model on objective.data_dir {o.data_dir}"
    return [k for k, v in metrics.items() if isinstance(v, float)], source


def objective_keys(o: ObjectiveConfig) -> list[tuple[str, object, str]]:
    """(setting, its value, the metric key it reads) for every metric the objective reads."""
    keys = [("objective.metric", o.metric, o.metric_key)]
    if o.constraint is not None:
        keys.append(("objective.constraint", o.constraint, o.constraint))
    if o.max_abs_privleak is not None:
        keys.append(("objective.max_abs_privleak", o.max_abs_privleak, "privleak"))
    return keys


def check_objective_keys(o: ObjectiveConfig, names: list[str], source: str) -> None:
    """Refuse, in one line, an objective key that is not among `names` (the metrics trials report)."""
    for setting, value, key in objective_keys(o):
        if key in names:
            continue
        plain = [n for n in names if "@" not in n]
        if setting == "objective.max_abs_privleak":
            raise UserInputError(f"{setting}={value}: bounds privleak, which {source} does not report "
                                 f"(it reports {', '.join(plain)}); drop the bound or use data with holdout texts")
        shown = f" (read as {key} with objective.after={o.after})" if key != value else ""
        raise UserInputError(f"{setting}={value}: not a metric the trials report{shown}; choose from "
                             f"{', '.join(plain)} ({source})")


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


def _replay_evaluations(cfg: UnlearnConfig, objective: ObjectiveConfig, target_value: float | None) -> None:
    """A trial Tune starts again (a sweep resumed after Ctrl-C) resumes its run from the run's
    newest checkpoint, and the evaluations made up to that step (in its eval.jsonl) are not made
    again: they are reported to Tune first, as the workers reported them."""
    from ray import tune

    from dipo_scale.checkpoint import complete_checkpoints
    from dipo_scale.unlearn import checkpoint_root

    log = Path(cfg.out_dir) / "eval.jsonl"
    if not log.is_file():
        return
    done = complete_checkpoints(checkpoint_root(cfg))
    start = done[-1][0] if done else 0
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # (a line cut short: the run cuts it too)
            continue
        if 0 < record.get("step", 0) <= start:
            value, feasible = objective_value(record, objective, target_value)
            tune.report({"eval": True, **{k: v for k, v in record.items() if isinstance(v, (int, float))},
                         "objective": value, "feasible": feasible})


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
        _replay_evaluations(cfg, objective, target_value)
        run_unlearning(cfg, callbacks=[_make_callback(objective, target_value)])
        return
    model = run_unlearning(cfg)
    metrics = final_metrics(model, objective, cfg.eval, Path(cfg.out_dir) / "eval")
    check_objective_keys(objective, [k for k, v in metrics.items() if isinstance(v, float)],
                         f"the evaluation on objective.data_dir {objective.data_dir}")
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
        names = [k for k, v in metrics.items() if isinstance(v, float)]
        if o.after != "none":  # the trials' evaluation adds the attack's keys to these
            from dipo_scale.eval.attacks import attack_keys

            names += list(attack_keys(metrics, {o.after: {k: metrics[k] for k in names}}))
        check_objective_keys(o, names, f"the evaluation on objective.data_dir {o.data_dir}")
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


def trial_error(error: BaseException) -> str:
    """One line for a trial's failure: the bad-input line a trial raised (Ray wraps it), else the
    type and first line of the error at the root of Ray's wrappers."""
    user = run_user_error(error)
    if user is not None:
        return first_line(user, 300)
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        failures = getattr(error, "worker_failures", None) or {}  # (Ray Train's TrainingFailedError)
        cause = next(iter(failures.values()), None) or getattr(error, "cause", None) or error.__cause__
        if cause is None:
            break
        error = cause
    return f"{type(error).__name__}: {first_line(error)}"


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
                    "error": trial_error(result.error) if result.error else ""})
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


def _first_difference(a, b, prefix: str = "") -> str:
    """The first dotted key where two config trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            if a.get(key, KeyError) != b.get(key, KeyError):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return prefix.rstrip(".") or "(the whole config)"


def _rerun(cfg: SweepConfig, out: Path, inputs: dict) -> bool:
    """Whether this run resumes the sweep in `out` (True) or starts one (False); refuses, in one
    line, a sweep there that this command may not resume: a finished one, one of another config or
    other inputs, or Tune state that cannot be restored. Reads only."""
    from ray.tune import Tuner

    best = out / "best.json"
    if best.is_file():
        try:
            complete = json.loads(best.read_text()).get("complete", True)
        except (ValueError, AttributeError):
            complete = True
        if complete:
            raise UserInputError(f"out_dir {cfg.out_dir}: holds a finished sweep already (its best.json); "
                                 "choose another out_dir")
    experiment = out / "tune" / EXPERIMENT
    if not Tuner.can_restore(experiment):
        if (out / "tune").exists():
            raise UserInputError(f"out_dir {cfg.out_dir}: holds a sweep whose Tune state cannot be restored "
                                 f"(no {experiment / 'tuner.pkl'}); choose another out_dir")
        return False  # nothing ran there yet: this config replaces the record
    current = json.loads(json.dumps(cfg.model_dump(by_alias=True)))
    for name, now in (("config.json", current), ("inputs.json", inputs)):
        try:
            saved = json.loads((out / name).read_text())
        except (OSError, ValueError) as e:
            raise UserInputError(f"out_dir {cfg.out_dir}: holds a sweep whose {name} cannot be read "
                                 f"({type(e).__name__}); choose another out_dir") from None
        if name == "config.json":
            saved.pop("out_dir", None), now.pop("out_dir", None)  # (the same directory, however written)
        if saved != now:
            what = (f"another config ({_first_difference(saved, now)} differs)" if name == "config.json" else
                    f"other inputs (the fingerprint of {_first_difference(saved, now)} changed since it started)")
            raise UserInputError(f"out_dir {cfg.out_dir}: holds an unfinished sweep of {what}; rerun the "
                                 "command that started it to resume it, or choose another out_dir")
    return True


def _fit(tuner):
    """`tuner.fit()`, and whether it ended on Ctrl-C (SIGINT). Tune catches the first SIGINT
    itself: it stops the trials, saves its state and returns, and puts back the handler it found
    (`ray.tune.tune._setup_signal_catching`), here `interrupted`; a handler still in place after
    fit is Tune's own, so no SIGINT came. A second SIGINT (or one Tune does not catch) raises
    KeyboardInterrupt. The handler in place before is restored."""
    def interrupted(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # (no signal handlers there)
        return tuner.fit(), False
    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        results = tuner.fit()
        tune_catches = not int(os.getenv("TUNE_DISABLE_SIGINT_HANDLER", "0"))
        return results, tune_catches and signal.getsignal(signal.SIGINT) is interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def run_sweep(cfg: SweepConfig) -> dict:
    """Run (or resume) the sweep; returns best.json's content. Raises `SweepFailed` when trials
    failed and `SweepInterrupted` on Ctrl-C (module docstring)."""
    try:
        return _checked_run(cfg)
    except KeyboardInterrupt:  # (Ctrl-C outside Tune's loop, or a second one)
        raise SweepInterrupted(f"out_dir {cfg.out_dir}: the sweep was interrupted (Ctrl-C); no best.json is "
                               "written; rerun the same command to resume it") from None


def _checked_run(cfg: SweepConfig) -> dict:
    """Every check before Ray starts, then the sweep in its held out_dir."""
    from dipo_scale.unlearn import absolute_paths, run_identity, validate_run

    out = Path(cfg.out_dir).resolve()
    validate_run(cfg.unlearn)  # every value of the space was validated with the config (SweepConfig)
    _scheduler(cfg)  # ASHA's settings, before any work
    if (names := trial_metric_names(cfg)) is not None:  # the objective's keys, before Ray or a trial
        check_objective_keys(cfg.objective, *names)
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
    inputs = run_identity(base)["inputs"]  # what every trial's weights come from
    resume = _rerun(cfg, out, inputs)
    init_ray()  # and its state API checked
    check_resources(u.train.worker_range[0], use_gpu=u.train.use_gpu, flag="unlearn.train.num_workers",
                    extra_cpus=cfg.trial_cpus)
    with hold_output_dir(out, "sweep", flag="out_dir"):
        return _run(cfg, out, base, inputs, resume)


def _run(cfg: SweepConfig, out: Path, base: UnlearnConfig, inputs: dict, resume: bool) -> dict:
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    mark_output_dir(out, "sweep")
    if not resume:
        atomic_write_json(out / "config.json", cfg.model_dump(by_alias=True))
        atomic_write_json(out / "inputs.json", inputs)
    else:  # an earlier run's partial results are not this run's
        for name in ("best.json", "sweep.csv", "pareto.png"):
            (out / name).unlink(missing_ok=True)
    o = cfg.objective
    if resume and o.constraint and o.target_value is None and (out / "target_metrics.json").is_file():
        target_value = json.loads((out / "target_metrics.json").read_text())[o.constraint]
    else:
        target_value = _target_value(cfg, out)

    objective = o.model_dump() | {"data_dir": absolute_if_local(o.data_dir),  # its local paths, as trials
                                  "reference_model": absolute_if_local(o.reference_model),  # (in other
                                  "relearn": o.relearn.model_dump() | {"data": absolute_if_local(o.relearn.data)}}
    trainable = tune.with_resources(  # directories) open them
        tune.with_parameters(_trial, base=base.model_dump(by_alias=True), out_dir=str(out), objective=objective,
                             target_value=target_value),
        {"cpu": cfg.trial_cpus, "memory": TRIAL_DRIVER_MEMORY})
    experiment = out / "tune" / EXPERIMENT
    if resume:
        print(f"sweep: resuming {experiment} (finished trials kept, failed ones retried)", flush=True)
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, restart_errored=True,
                                   param_space=_param_space(cfg))
    else:
        if cfg.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch
            search_alg = OptunaSearch(seed=cfg.seed)
        else:
            # (Tune ignores max_concurrent_trials for a generator passed in: it is set here.)
            search_alg = BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.max_concurrent_trials)
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(cfg),
            tune_config=tune.TuneConfig(metric="objective", mode="min", search_alg=search_alg,
                                        scheduler=_scheduler(cfg), num_samples=cfg.num_samples,
                                        max_concurrent_trials=cfg.max_concurrent_trials),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out / "tune")),
        )
    results, interrupted = _fit(tuner)
    rows = _rows(results, cfg, out)
    if interrupted:
        completed = sum(r["status"] == "completed" for r in rows)
        raise SweepInterrupted(f"out_dir {cfg.out_dir}: the sweep was interrupted (Ctrl-C) with {completed} of "
                               f"{len(rows)} trials completed; Tune saved its state and no best.json is written; "
                               "rerun the same command to resume it")
    _write_csv(rows, out / "sweep.csv")
    failed = [r for r in rows if r["status"] == "error"]
    for r in failed:
        print(f"sweep: trial {r['trial_id']} failed: {r['error']}", file=sys.stderr, flush=True)
    ranked = [r for r in rows if r["status"] != "error" and r["objective"] is not None
              and not math.isnan(r["objective"])]
    if not ranked:
        why = (f"all {len(rows)} trials failed (first, trial {failed[0]['trial_id']}: {failed[0]['error']})"
               if failed else f"none of its {len(rows)} trials reported an evaluation")
        raise SweepFailed(f"out_dir {cfg.out_dir}: {why}; no best.json is written (sweep.csv lists every "
                          "trial); rerun the same command to retry the failed trials")
    best_row = ranked[0]
    trial_config = json.loads((out / "trials" / best_row["trial_id"] / "config.json").read_text())
    best = {"trial_id": best_row["trial_id"], "status": best_row["status"], "complete": not failed,
            "params": {k: best_row[k] for k in cfg.space},
            "metrics": {k: best_row[k] for k in metric_columns(cfg.objective)}, "objective": best_row["objective"],
            "feasible": best_row["feasible"], "target_value": target_value, "model": best_row["model"],
            "config": trial_config}
    if not best_row["feasible"]:
        best["note"] = (f"no trial kept {cfg.objective.constraint} >= {cfg.objective.min_fraction:g} × "
                        "the target's; this is the closest")
    if failed:
        best["failed_trials"] = {r["trial_id"]: r["error"] for r in failed}
        best["note"] = "; ".join(filter(None, [
            f"{len(failed)} of {len(rows)} trials failed: the best of the others, not of the sweep; rerun the "
            "same command to retry the failed trials", best.get("note")]))
    atomic_write_json(out / "best.json", best)
    _plot_pareto(rows, cfg, target_value, best_row, out / "pareto.png")
    if failed:
        raise SweepFailed(f"out_dir {cfg.out_dir}: {len(failed)} of {len(rows)} trials failed (first, trial "
                          f"{failed[0]['trial_id']}: {failed[0]['error']}); best.json names the best of the "
                          "others, marked incomplete; rerun the same command to retry the failed trials")
    return best
