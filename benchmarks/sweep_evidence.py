"""Evidence that sweeps close the gap to the retain model (issue 16, item 4), on the generated
TOFU-layout corpus, at equal tuning for DiPO and NPO.

    .venv/bin/python benchmarks/sweep_evidence.py --out /tmp/evidence [--doc docs/demo.md]

1. `dipo-scale demo --data <generated TOFU dir>` with DiPO and NPO (the demo's tiny target and
   retain models, its prepared forget01-style data, its default unlearning settings), built once
   under `<out>/demo` and reused.
2. Two `dipo-scale sweep`s from the demo's target (`run_sweep`, the public entry point), ranked by
   TOFU's objective (`objective.kind=tofu`: the highest forget quality among trials with model
   utility >= 0.95 x the target's), each trial's model evaluated once at its end on the TOFU data
   against the retain model (`objective.data_dir`): DiPO over alpha, beta, lr and steps; NPO over
   beta, lr and steps. Each grid holds the demo's default configuration, so the default run and
   the chosen one are measured by the same evaluation.

`--doc` writes both tables of trials (default and chosen marked), the command and the date into
`<doc>` between `<!-- sweep-evidence:begin -->` and `<!-- sweep-evidence:end -->` (the demo keeps
that section when it rewrites the page). `--from-json FILE` writes them from an earlier run's JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from bench_assets import command_line, machine_facts, write_doc_section  # noqa: E402

FORGET = "forget10"
# The grids: every value of the demo's default configuration (dipo_scale.demo.DEMO_UNLEARN) is in
# them, so the default run is one of the trials.
SPACES = {
    "dipo": {"dipo.alpha": [5.0, 20.0], "dipo.beta": [0.1, 0.5], "train.lr": [1e-3, 3e-3], "train.steps": [30, 60]},
    "npo": {"npo.beta": [0.1, 0.5], "train.lr": [1e-3, 3e-3], "train.steps": [30, 60]},
}
COLUMNS = ("forget_quality", "model_utility", "knowmem_f", "objective", "feasible")


def _demo(out: Path) -> Path:
    """The demo on the generated TOFU-layout corpus (DiPO and NPO), built once."""
    from dipo_scale.data.tofu import generate_tofu
    from dipo_scale.demo import run_demo

    demo = out / "demo"
    if not (demo / "metrics.json").is_file():
        data = out / "tofu"
        if not data.is_dir():
            generate_tofu(data, seed=0)
        run_demo(demo, data_dir=str(data), forget=FORGET, methods=("dipo", "npo"))
    return demo


def _sweep(method: str, demo: Path, out: Path, workers: int) -> dict:
    """The sweep of `method` from the demo's target; returns its rows and best trial."""
    from dipo_scale.config import SweepConfig, load_config
    from dipo_scale.demo import DEMO_UNLEARN
    from dipo_scale.sweep import run_sweep

    sweep_dir = out / f"sweep_{method}"
    config = json.loads((demo / "runs" / method / "config.json").read_text())
    unlearn = {**DEMO_UNLEARN, "method": method, "model": {"path": config["model"]["path"]},
               "data": config["data"], "logging": {"wandb": "disabled"},
               "train": {**DEMO_UNLEARN["train"], "num_workers": workers}}
    base = {"out_dir": str(sweep_dir), "unlearn": unlearn, "max_concurrent_trials": max(1, 2 // workers),
            "space": {key: {"grid": values} for key, values in SPACES[method].items()},
            "objective": {"kind": "tofu", "data_dir": str(out / "tofu"), "forget": FORGET,
                          "reference_model": str(demo / "models" / "retrain")}}
    best = sweep_dir / "best.json"
    if not (best.is_file() and json.loads(best.read_text()).get("complete")):  # else run, or resume it
        run_sweep(load_config(None, [], SweepConfig, base=base))
    rows = list(csv.DictReader((sweep_dir / "sweep.csv").open()))
    default = {key: _value(DEMO_UNLEARN, key, method) for key in SPACES[method]}
    return {"rows": rows, "best": json.loads((sweep_dir / "best.json").read_text()), "default": default,
            "target_metrics": json.loads((sweep_dir / "target_metrics.json").read_text())}


def _value(tree: dict, dotted: str, method: str):
    node = {**tree, "method": method}
    for part in dotted.split("."):
        node = node[part]
    return node


def _same(row: dict, params: dict) -> bool:
    return all(float(row[key]) == float(value) for key, value in params.items())


def render(result: dict) -> str:
    lines = ["## Sweeps at equal tuning (TOFU objective)", "",
             f"Written by `{result['command']}` on {result['date_utc']} ({result['machine']['cpus']} CPUs, "
             f"load {result['machine']['load_average_at_start'][0]:.1f} at the start, {result['seconds']:.0f} s "
             "in all), on the generated TOFU-layout corpus (`generate_tofu`, seed 0), "
             f"{FORGET}, from the demo's tiny target. Objective: the highest forget quality among trials whose "
             "model utility is at least 0.95 x the target's (`objective.kind=tofu`); each trial's model "
             "evaluated once at its end against the retain model (`objective.data_dir`). Each grid holds the "
             "demo's default configuration (marked *default*); the chosen trial is marked **chosen**.", ""]
    for method, sweep in result["sweeps"].items():
        keys = list(SPACES[method])
        floor = 0.95 * sweep["target_metrics"]["model_utility"]
        lines += [f"### {method.upper()} over {', '.join(keys)}", "",
                  f"Target model utility {sweep['target_metrics']['model_utility']:.4f} (floor {floor:.4f}), "
                  f"target forget quality {sweep['target_metrics'].get('forget_quality', float('nan')):.3g}.", "",
                  "| " + " | ".join(keys + list(COLUMNS)) + " | |", "|" + "---|" * (len(keys) + len(COLUMNS) + 1)]
        for row in sorted(sweep["rows"], key=lambda r: float(r.get("objective") or "inf")):
            marks = [m for m, hit in (("**chosen**", row["trial_id"] == sweep["best"]["trial_id"]),
                                      ("*default*", _same(row, sweep["default"]))) if hit]
            cells = [f"{float(row[k]):g}" for k in keys] + [
                f"{float(row[c]):.4g}" if row.get(c) not in (None, "", "True", "False") else (row.get(c) or "–")
                for c in COLUMNS]
            lines.append("| " + " | ".join(cells + [" ".join(marks + [row["status"]] * (row["status"] != "completed"))])
                         + " |")
        lines.append("")
        default_row = next((r for r in sweep["rows"] if _same(r, sweep["default"])), None)
        best = next(r for r in sweep["rows"] if r["trial_id"] == sweep["best"]["trial_id"])
        if default_row is not None and default_row.get("forget_quality"):
            lines += [f"Chosen vs default: forget quality {float(best['forget_quality']):.4g} vs "
                      f"{float(default_row['forget_quality']):.4g}, model utility "
                      f"{float(best['model_utility']):.4f} vs {float(default_row['model_utility']):.4f} "
                      f"(feasible: {best['feasible']}).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="work directory (demo models, sweeps); reused when rerun")
    parser.add_argument("--workers", type=int, default=1, help="ZeRO-3 workers per trial (2 // workers trials at once)")
    parser.add_argument("--json", default=None, help="write the result here")
    parser.add_argument("--doc", default=None, help="write the tables into this docs page (e.g. docs/demo.md)")
    parser.add_argument("--from-json", default=None, help="render an earlier run's JSON, running nothing")
    args = parser.parse_args()
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
    else:
        if not args.out:
            parser.error("--out is needed (or --from-json)")
        started, load = time.time(), os.getloadavg()
        out = Path(args.out).resolve()
        demo = _demo(out)
        sweeps = {method: _sweep(method, demo, out, args.workers) for method in SPACES}
        result = {"command": command_line("sweep_evidence.py", None),
                  "seconds": time.time() - started, "sweeps": sweeps, **machine_facts(load)}
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    text = render(result)
    print(text)
    if args.doc:
        write_doc_section(Path(args.doc), "sweep-evidence", text)


if __name__ == "__main__":
    main()
