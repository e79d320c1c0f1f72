"""Evaluation benchmark: the full MUSE evaluation with 1 and 2 workers, and the share of an
unlearning run's time that its in-training evaluation takes. CPU, side by side in one run.

    .venv/bin/python benchmarks/eval.py --json /tmp/eval.json [--demo-dir demo_out] [--doc]

On the demo's target model and corpus (`dipo-scale demo` builds them under `<demo-dir>`; built
here when missing, with the demo's settings):

1. `eval_one_worker_seconds`, `eval_two_workers_seconds`: wall time of `dipo-scale evaluate`'s
   entry point (`dipo_scale.eval.run_evaluation`) on the demo target, every item of the demo
   corpus (VerbMem, KnowMem forget and retain, the Min-K% attack), `--num-workers 1` (in this
   process, torch's default threads) and `--num-workers 2` (two Ray actors of 1 CPU each; Ray
   itself is started before the clock, the actors' start and model load are timed). They
   alternate `--reps` times; the medians give `eval_two_over_one_time` (goal <= 0.65). The two
   runs' metrics must be equal (checked; `metrics_equal`).
2. `in_training_eval_share`: a DiPO run (the demo's settings, 2 Ray Train workers, ZeRO-3,
   `--steps` steps) evaluating every `--every` steps inside its engines: the evaluations' wall
   seconds (eval.jsonl `seconds`) over the run's wall seconds (`run_unlearning`, Ray started).

`--doc` writes the figures into docs/benchmarks.md between `<!-- eval:begin -->` and
`<!-- eval:end -->` (`--from-json FILE` writes them from an earlier run's JSON, running nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from bench_assets import demo_assets, machine_facts, write_doc_section  # noqa: E402


def evaluation_times(assets: dict, reps: int, work: Path) -> dict:
    """Section 1: the full MUSE evaluation with 1 and 2 workers, alternating, `reps` times each."""
    from dipo_scale.eval.run import run_evaluation

    times: dict[int, list[float]] = {1: [], 2: []}
    metrics: dict[int, dict] = {}
    for rep in range(reps):
        for workers in (1, 2):
            t = time.perf_counter()
            metrics[workers] = run_evaluation(str(assets["target"]), str(assets["corpus"]),
                                              work / f"eval_{workers}_{rep}", num_workers=workers, device="cpu")
            times[workers].append(time.perf_counter() - t)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    return {"eval_one_worker_seconds": round(one, 2), "eval_two_workers_seconds": round(two, 2),
            "eval_two_over_one_time": round(two / one, 3), "eval_times": times,
            "metrics_equal": metrics[1] == metrics[2], "eval_items": _item_counts(assets["corpus"])}


def _item_counts(corpus: Path) -> dict:
    from dipo_scale.data.muse import load_muse_dir
    from dipo_scale.eval.muse import muse_items

    items = muse_items(load_muse_dir(corpus), mia=True)
    return {"verbmem": len(items.verbmem), "knowmem_forget": len(items.forget_qa),
            "knowmem_retain": len(items.retain_qa), "mia_forget": len(items.mia_forget),
            "mia_holdout": len(items.mia_holdout)}


def in_training_share(assets: dict, steps: int, every: int, work: Path) -> dict:
    """Section 2: a DiPO run evaluating every `every` steps; the evaluations' share of its time."""
    from dipo_scale.config import load_unlearn_config
    from dipo_scale.demo import DEMO_UNLEARN
    from dipo_scale.unlearn import run_unlearning

    out = work / "unlearn_with_eval"
    cfg = load_unlearn_config(None, [
        f"model.path={assets['target']}", f"data.prepared_dir={assets['prepared']}", f"out_dir={out}",
        f"train.steps={steps}", f"eval.every={every}", f"eval.data_dir={assets['corpus']}", "method=dipo",
    ], base=DEMO_UNLEARN)
    t = time.perf_counter()
    run_unlearning(cfg)
    run_seconds = time.perf_counter() - t
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    eval_seconds = sum(e["seconds"] for e in evals)
    return {"in_training_run_seconds": round(run_seconds, 2), "in_training_eval_seconds": round(eval_seconds, 2),
            "in_training_evaluations": len(evals), "in_training_eval_share": round(eval_seconds / run_seconds, 3),
            "in_training_steps": steps, "in_training_every": every,
            "in_training_workers": cfg.train.num_workers}


def doc_section(r: dict, command: str) -> str:
    items = r["eval_items"]
    return "\n".join([
        "## Evaluation: 1 vs 2 workers, and in-training evaluation's share",
        "",
        f"`{command}` on {r['date_utc']} ({r['machine']['cpus']} CPUs, load average "
        f"{r['machine']['load_average_at_start'][0]:.1f} at start, {r['machine']['load_average'][0]:.1f} at end).",
        "",
        f"The full MUSE evaluation of the demo target ({items['verbmem']} VerbMem prompts, "
        f"{items['knowmem_forget']} + {items['knowmem_retain']} KnowMem questions, "
        f"{items['mia_forget']} + {items['mia_holdout']} Min-K% texts), median of {len(r['eval_times']['1'])}:",
        "",
        "| workers | seconds |",
        "|---|---|",
        f"| 1 (in process) | {r['eval_one_worker_seconds']:.1f} |",
        f"| 2 (Ray actors, 1 CPU each) | {r['eval_two_workers_seconds']:.1f} |",
        "",
        f"- `eval_two_over_one_time` = **{r['eval_two_over_one_time']:.2f}** (goal ≤ 0.65: "
        f"{'met' if r['eval_two_over_one_time'] <= 0.65 else 'not met'}); the two runs' metrics are "
        f"{'equal' if r['metrics_equal'] else 'NOT equal'}.",
        f"- `in_training_eval_share` = **{r['in_training_eval_share']:.2f}**: a DiPO run of "
        f"{r['in_training_steps']} steps on {r['in_training_workers']} Ray Train workers evaluating every "
        f"{r['in_training_every']} steps inside its ZeRO-3 engines spent {r['in_training_eval_seconds']:.1f} s "
        f"of {r['in_training_run_seconds']:.1f} s in {r['in_training_evaluations']} evaluations.",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--demo-dir", default=str(ROOT / "demo_out"))
    parser.add_argument("--reps", type=int, default=2, help="timed runs of each worker count")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--doc", action="store_true", help="write the figures into docs/benchmarks.md")
    parser.add_argument("--from-json", default=None, metavar="FILE",
                        help="run nothing: write the docs section from an earlier run's JSON")
    args = parser.parse_args(argv)
    command = "python benchmarks/eval.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        write_doc_section(ROOT / "docs" / "benchmarks.md", "eval", doc_section(result, result["command"]))
        return 0

    import ray

    load_at_start = os.getloadavg()
    assets = demo_assets(Path(args.demo_dir).resolve())
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    with tempfile.TemporaryDirectory(prefix="eval_bench_") as tmp:
        result = evaluation_times(assets, args.reps, Path(tmp))
        result.update(in_training_share(assets, args.steps, args.every, Path(tmp)))
    ray.shutdown()
    result.update(machine_facts(load_at_start), command=command)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=1))
    if args.doc:
        write_doc_section(ROOT / "docs" / "benchmarks.md", "eval", doc_section(result, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
