"""benchmarks/sweep_evidence.py renders its tables from a run's JSON (the run itself is a benchmark:
tests/test_sweep.py runs real sweeps with the same objective code)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import sweep_evidence  # noqa: E402


def _row(trial, alpha, beta, lr, steps, fq, mu, objective, feasible):
    return {"trial_id": trial, "status": "completed", "dipo.alpha": str(alpha), "dipo.beta": str(beta), "train.lr": str(lr),
            "train.steps": str(steps), "forget_quality": str(fq), "model_utility": str(mu), "knowmem_f": "10.0",
            "objective": str(objective), "feasible": str(feasible)}


def test_render_marks_the_default_and_the_chosen_trial():
    rows = [_row("t1", 5.0, 0.1, 0.001, 30, 0.01, 0.80, -0.01, True),   # the demo's default
            _row("t2", 20.0, 0.5, 0.003, 60, 0.40, 0.78, -0.40, True),  # chosen
            _row("t3", 20.0, 0.1, 0.003, 60, 0.90, 0.50, 1000.3, False)]
    result = {"command": "python benchmarks/sweep_evidence.py --out X", "date_utc": "2026-12-02T07:00:00+00:00",
              "seconds": 600.0, "machine": {"cpus": 2, "load_average_at_start": [1.0, 1.0, 1.0]},
              "sweeps": {"dipo": {"rows": rows, "best": {"trial_id": "t2"},
                                  "default": {"dipo.alpha": 5.0, "dipo.beta": 0.1, "train.lr": 1e-3, "train.steps": 30},
                                  "target_metrics": {"model_utility": 0.82, "forget_quality": 1e-5}}}}
    text = sweep_evidence.render(result)
    lines = text.splitlines()
    chosen = next(line for line in lines if line.startswith("|") and "**chosen**" in line)
    default = next(line for line in lines if line.startswith("|") and "*default*" in line)
    assert chosen.startswith("| 20 | 0.5 | 0.003 | 60 | 0.4 | 0.78") and default.startswith("| 5 | 0.1 | 0.001 | 30 |")
    assert lines.index(chosen) < lines.index(default)  # sorted by objective
    assert "floor 0.7790" in text and "forget quality 0.4 vs 0.01" in text
    assert "python benchmarks/sweep_evidence.py --out X" in text
