"""A sweep given a bad objective, whose trials fail, or stopped with Ctrl-C, through the real
command (issue 27, item 7: each of these ended with exit 0, "best trial: None" or a best.json,
and the interrupted sweep's out_dir then refused every rerun).

The conventions of tests/test_bad_inputs.py: a bad input is exit 2 with exactly one stderr line
`error: ...` naming it, no traceback, nothing of the user's changed. Beyond bad input: exit 0 only
for a checked result; a sweep whose trials failed exits 1 and claims no best; Ctrl-C exits 130,
claims no best, and the same command then resumes the sweep (another config is refused).
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_bad_inputs import _env, _snapshot
from test_unlearn import ECHO_LIMIT, ECHO_TOKENS

CLI = [sys.executable, "-m", "dipo_scale.cli"]


def _sweep(*sets: str) -> list[str]:
    """`dipo-scale sweep` on the working directory's copies: two tiny trials (lr 1e-7 and 2e-7),
    one after the other, each 2 steps with one worker and an evaluation at step 2 on 4 items; the
    target's knowmem_r given (no evaluation of the target first). `sets` override or add."""
    base = ["out_dir=sw", "unlearn.model.path=model", "unlearn.data.prepared_dir=prepared", "unlearn.method=dipo",
            "unlearn.train.num_workers=1", "unlearn.train.steps=2", "unlearn.train.global_batch_size=4",
            "unlearn.train.micro_batch_size=2", "unlearn.logging.wandb=disabled", "unlearn.eval.every=2",
            "unlearn.eval.data_dir=corpus", f"unlearn.eval.limit={ECHO_LIMIT}",
            f"unlearn.eval.verbmem_max_new_tokens={ECHO_TOKENS}", f"unlearn.eval.knowmem_max_new_tokens={ECHO_TOKENS}",
            "objective.target_value=50", "max_concurrent_trials=1", "space.train.lr.grid=[1.0e-7, 2.0e-7]"]
    overridden = {s.split("=", 1)[0] for s in sets}
    items = [s for s in base if s.split("=", 1)[0] not in overridden] + list(sets)
    return [*CLI, "sweep", *(a for s in items for a in ("--set", s))]


def _sweep_env(workdir: Path) -> dict:
    """`_env`, with DeepSpeed's CPU op taken from the build directory of this (the real) home, where
    it is built already: in the command's fresh $HOME each run compiled it again (~70 s), and a trial
    interrupted while it compiled left torch's build lock there, on which every later run waited."""
    from torch.utils.cpp_extension import _get_build_directory

    return {**_env(workdir), "TORCH_EXTENSIONS_DIR": str(Path(_get_build_directory("deepspeed_shm_comm", False)).parent)}


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def _rows(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "sweep.csv").open()))


@pytest.mark.parametrize("sets,fragments", [
    (["objective.metric=knowmem_ff"],
     ["error: objective.metric=knowmem_ff: not a metric the trials report", "choose from verbmem_f, knowmem_f, "
      "knowmem_r", "unlearn.eval.data_dir corpus"]),
    (["objective.constraint=knowmem_rr"], ["error: objective.constraint=knowmem_rr: not a metric the trials report",
                                           "knowmem_r"]),
    (["objective.metric=mia_auc", "unlearn.eval.data_dir=corpus_no_holdout"],  # no attack texts: no mia_auc
     ["error: objective.metric=mia_auc: not a metric the trials report", "unlearn.eval.data_dir corpus_no_holdout"]),
], ids=["metric", "constraint", "metric-the-data-cannot-give"])
def test_a_misspelled_objective_key_is_refused_before_ray_starts(sets, fragments, workdir):  # noqa: F811
    """Every trial raised KeyError on the objective's key and the sweep ended "best trial: None",
    exit 0. Now: one line naming the key, its value and the names the trials' evaluation reports,
    before Ray starts (no trial, nothing written)."""
    import shutil

    from dipo_scale.data.muse import load_muse_dir
    from dipo_scale.eval.muse import muse_items

    # a copy of the corpus without the texts of the membership attack (no mia_auc)
    shutil.copytree(workdir / "corpus", workdir / "corpus_no_holdout")
    for path in (workdir / "corpus_no_holdout").rglob("holdout*"):  # privleak/holdout.json, raw/holdout.txt
        path.unlink()
    assert muse_items(load_muse_dir(workdir / "corpus"), mia=True).mia_holdout  # (the corpus itself has them)
    assert not muse_items(load_muse_dir(workdir / "corpus_no_holdout"), mia=True).mia_holdout
    before = _snapshot(workdir)
    t0 = time.monotonic()
    proc = subprocess.run(_sweep(*sets), cwd=workdir, env=_sweep_env(workdir), capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - t0
    assert proc.returncode == 2, f"exit {proc.returncode} after {seconds:.0f} s\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    errors = _errors(proc.stderr)
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr  # refused before Ray starts
    assert not (workdir / "sw").exists() and _snapshot(workdir) == before  # no trial dir, nothing written
    assert seconds < 90, f"{seconds:.0f} s"  # the check reads the evaluation data, no model (a trial: minutes)
    print(f"{seconds:.1f} s: {errors[0]}")


def test_a_sweep_whose_trials_all_fail_exits_1_and_claims_no_best(workdir):  # noqa: F811
    """Both trials diverge (lr 1e30: a non-finite loss at step 2, which `unlearn` refuses): exit 1,
    one line per failed trial and one `error:` line saying all failed and why; sweep.csv lists
    both as errors, and no best.json is written."""
    proc = subprocess.run(_sweep("space.train.lr.grid=[1.0e30, 2.0e30]"), cwd=workdir, env=_sweep_env(workdir),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = _errors(proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "out_dir sw: all 2 trials failed" in errors[0] and "the run diverged" in errors[0], errors[0]
    assert "no best.json is written" in errors[0] and "rerun the same command" in errors[0], errors[0]
    out = workdir / "sw"
    rows = _rows(out)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"error"}, rows
    assert all("the run diverged" in r["error"] and "\n" not in r["error"] for r in rows), rows
    for r in rows:  # one line each on stderr
        assert sum(line.startswith(f"sweep: trial {r['trial_id']} failed: ") for line in proc.stderr.splitlines()) == 1
    assert not (out / "best.json").exists()
    assert "best trial" not in proc.stdout
    assert not any((out / "trials").glob("*/model"))  # no trial exported a model


def _wait_for(condition, what: str, proc: subprocess.Popen, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert proc.poll() is None, f"the sweep ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {deadline_s:.0f} s"
        time.sleep(0.2)


def test_ctrl_c_exits_130_claims_no_best_and_the_same_command_resumes(workdir):  # noqa: F811
    """Ctrl-C (SIGINT) once the first trial has started: exit 130, one line saying so, no
    best.json (before: exit 0 with a best.json, and every rerun refused). Then another config on
    that out_dir is refused in one line (nothing changed), the same command resumes the sweep (the
    interrupted trial, under its own id, and the one not yet run: 2 trials, both completed, exit
    0), and a rerun of the finished sweep is refused."""
    argv, out = _sweep(), workdir / "sw"
    logs = workdir / "home"  # (outside the snapshots; files, not pipes nobody reads while waiting)
    with open(logs / "first.out", "w") as stdout_file, open(logs / "first.err", "w") as stderr_file:
        first = subprocess.Popen(argv, cwd=workdir, env=_sweep_env(workdir), stdout=stdout_file, stderr=stderr_file)
    try:
        # a trial past its first step (its workers training: DeepSpeed's op loaded)
        _wait_for(lambda: any(p.stat().st_size for p in (out / "trials").glob("*/log.jsonl")), "trial's first step",
                  first, 600)
        started = sorted(p.parent.name for p in (out / "trials").glob("*/log.jsonl"))
        first.send_signal(signal.SIGINT)
        first.wait(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    stdout, stderr = (logs / "first.out").read_text(), (logs / "first.err").read_text()
    assert first.returncode == 130, stdout[-2000:] + stderr[-3000:]
    errors = _errors(stderr)
    assert len(errors) == 1, stderr[-3000:]
    assert "out_dir sw: the sweep was interrupted (Ctrl-C)" in errors[0], errors[0]
    assert "rerun the same command to resume it" in errors[0], errors[0]
    assert not (out / "best.json").exists() and not (out / "sweep.csv").exists()
    assert "best trial" not in stdout

    # another config on it: refused, nothing changed
    before = _snapshot(workdir)
    other = subprocess.run(_sweep("unlearn.dipo.beta=0.2"), cwd=workdir, env=_sweep_env(workdir), capture_output=True,
                           text=True, timeout=300)
    errors = _errors(other.stderr)
    assert other.returncode == 2 and len(errors) == 1 and "Traceback" not in other.stderr, other.stderr[-3000:]
    assert "out_dir sw: holds an unfinished sweep of another config (unlearn.dipo.beta differs)" in errors[0], errors[0]
    assert "rerun the command that started it to resume it" in errors[0], errors[0]
    assert "Started a local Ray instance" not in other.stdout + other.stderr
    assert _snapshot(workdir) == before

    # the same command: the sweep resumes and completes
    again = subprocess.run(argv, cwd=workdir, env=_sweep_env(workdir), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"sweep: resuming {out.resolve() / 'tune' / 'sweep'}" in again.stdout
    rows = _rows(out)
    assert len(rows) == 2 and all(r["status"] == "completed" and r["step"] == "2" for r in rows), rows
    assert sorted(float(r["train.lr"]) for r in rows) == [1e-7, 2e-7]
    assert set(started) <= {r["trial_id"] for r in rows}  # the interrupted trial went on under its id
    assert sorted(p.name for p in (out / "trials").iterdir()) == sorted(r["trial_id"] for r in rows)
    assert [p.name for p in (out / "tune").iterdir() if p.is_dir()] == ["sweep"]  # one experiment, restored
    best = json.loads((out / "best.json").read_text())
    assert best["complete"] is True and best["trial_id"] in {r["trial_id"] for r in rows}
    assert (Path(best["model"]) / "model.safetensors").is_file()

    # the finished sweep: a rerun is refused before Ray starts
    done = subprocess.run(argv, cwd=workdir, env=_sweep_env(workdir), capture_output=True, text=True, timeout=300)
    errors = _errors(done.stderr)
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-3000:]
    assert "out_dir sw: holds a finished sweep already" in errors[0], errors[0]
    assert "Started a local Ray instance" not in done.stdout + done.stderr


def test_trial_metric_names_come_from_the_evaluation_code(tmp_path):
    """The names the objective is checked against are the evaluation code's own: the evaluation
    during unlearning (MUSE's three criteria, mia_auc where the data has attack texts), and with
    objective.data_dir (MUSE) privleak against the reference model and the attack's keys."""
    from dipo_scale.config import SweepConfig, load_config
    from dipo_scale.data.corpus import generate_corpus
    from dipo_scale.errors import UserInputError
    from dipo_scale.sweep import check_objective_keys, trial_metric_names

    corpus = generate_corpus(tmp_path / "c", num_docs=3, seed=0)
    base = ["space.dipo.alpha.grid=[1]", "unlearn.eval.every=2", f"unlearn.eval.data_dir={corpus}"]
    names, source = trial_metric_names(load_config(None, base, SweepConfig))
    assert names == ["verbmem_f", "knowmem_f", "knowmem_r", "mia_auc"] and str(corpus) in source
    final = load_config(None, ["space.dipo.alpha.grid=[1]", f"objective.data_dir={corpus}",
                               "objective.reference_model=/m", "objective.after=quantize4",
                               "objective.max_abs_privleak=10"], SweepConfig)
    names, source = trial_metric_names(final)
    assert {"privleak", "knowmem_f@quantize4", "knowmem_r@quantize4", "privleak@quantize4"} <= set(names)
    check_objective_keys(final.objective, names, source)  # every key it reads is reported
    with pytest.raises(UserInputError, match=r"objective.metric=knowmem: not a metric the trials report \(read as "
                                             r"knowmem@quantize4 with objective.after=quantize4\); choose from "
                                             r"verbmem_f, knowmem_f, knowmem_r, mia_auc, privleak \("):
        check_objective_keys(final.objective.model_copy(update={"metric": "knowmem"}), names, source)
    # no attack texts: no mia_auc, so no privleak to bound
    for path in Path(corpus).rglob("holdout*"):
        path.unlink()
    names, source = trial_metric_names(final)
    assert "privleak" not in names and "mia_auc" not in names
    with pytest.raises(UserInputError, match="objective.max_abs_privleak=10.0: bounds privleak, which the evaluation"):
        check_objective_keys(final.objective, names, source)
