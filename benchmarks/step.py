"""What a full unlearning step costs: DiPO (cached and online reference), NPO and GA against a plain
fine-tuning step, side by side on the same batch, on the local 2-worker ZeRO-3 cluster.

    .venv/bin/python benchmarks/step.py --json /tmp/step.json [--doc]

Setup: a small Llama (default 32k vocabulary, hidden 256, 4 layers: ~20M parameters, float32)
and random-text blocks through the real `prepare` stage; the `hidden` reference cache is written
by the real precompute (`dipo_scale.reference.precompute_reference`). One Ray Train run with 2
workers builds the training engine and the online reference engine once (`engine.init_engines`),
then times `unlearn.micro_step` (forward over [forget; retain], loss, backward, ZeRO-3 optimizer
step; with `gd` retain) for each variant in turn, round-robin, on the same global batch (one
micro step per worker per step). Reading the cache rows is inside the timed region, as in
training. Each timing is bracketed by barriers; the figure is the median over `--reps` rounds
after `--warmup` rounds.

Variants: `sft` (plain fine-tuning: cross-entropy on the forget and retain rows), `ga`,
`npo_online`, `npo_cached`, `dipo_online`, `dipo_cached` (hidden form), `dipo_topk` (K=32), and
with `loss.fused=true` (a second training engine wrapped in `engine.FusedHeadModel`: the LM head
and the loss chunk by chunk, no [rows, T, V] logits) `sft_fused`, `dipo_cached_fused`,
`dipo_online_fused`. Both training engines start from the same weights.
The plain fine-tuning step is computed by method `ga`: `ga_loss` is the negated NLL, so its forward,
backward and optimizer step are those of fine-tuning on the same tokens (only the sign of the forget
term differs). `sft` and `ga` are timed separately; their ratio shows the noise of the measurement.

Memory: each worker's peak RSS during the step over its RSS just before it (the high-water mark
is reset with /proc/self/clear_refs; glibc's mmap threshold is pinned to 1 MiB from process start
so freed tensors leave RSS), max over the two workers, median over the rounds.

Keys: `dipo_over_sft_step_time` (target <= 1.10), `online_over_cached_step_time`,
`fused_over_logits_dipo_step_peak_memory`, `fused_over_logits_dipo_step_time`,
`fused_dipo_over_fused_sft_step_time`, `step_time_s`, `step_peak_mb` and `tokens_per_s` per variant.
A ratio is of the medians; `per_round` holds each ratio of two variants timed in the same round
(their median, min and max: the spread of the measurement), and `command`, `date_utc`, `machine`
(load average at start and end) say what ran where.

`--doc` writes the figures into docs/benchmarks.md between `<!-- step:begin -->` and
`<!-- step:end -->` (`--from-json FILE` writes them from an earlier run's JSON, running nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_assets import (build_bench_assets, command_line, machine_facts, num_parameters,  # noqa: E402
                          write_doc_section)
from loss import _reset_peak, _rss_bytes  # noqa: E402

# variant -> (overrides of the run config, reference source)
VARIANTS = {
    "sft": (["method=ga"], None),
    "ga": (["method=ga"], None),
    "npo_online": (["method=npo"], "online"),
    "npo_cached": (["method=npo", "reference.form=hidden"], "hidden"),
    "dipo_online": (["method=dipo"], "online"),
    "dipo_cached": (["method=dipo", "reference.form=hidden"], "hidden"),
    "dipo_topk": (["method=dipo", "reference.form=topk", "reference.k=32"], "topk"),
    "sft_fused": (["method=ga", "loss.fused=true"], None),
    "dipo_cached_fused": (["method=dipo", "reference.form=hidden", "loss.fused=true"], "hidden"),
    "dipo_online_fused": (["method=dipo", "loss.fused=true"], "online"),
}


def step_worker(config: dict) -> None:
    import numpy as np
    import ray.train
    import torch
    import torch.distributed as dist

    from dipo_scale.config import UnlearnConfig
    from dipo_scale.prepare import read_blocks
    from dipo_scale.reference import ReferenceCache
    from dipo_scale.engine import init_engines, load_ds_config
    from dipo_scale.unlearn import micro_step

    os.environ["DS_ACCELERATOR"] = "cpu"
    cfgs = {name: UnlearnConfig.model_validate(c) for name, c in config["cfgs"].items()}
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    engines = {}  # fused or not -> (engine, online reference engine, fused reference head)
    for fused, name in ((False, "dipo_online"), (True, "dipo_online_fused")):
        torch.manual_seed(0)  # builds the training engine and the online reference engine
        engines[fused] = init_engines(cfgs[name], load_ds_config(cfgs[name], world))
    base = cfgs["dipo_online"]
    caches = {form: ReferenceCache(d) for form, d in config["caches"].items()}
    forget, retain = read_blocks(base.data.prepared_dir, "forget"), read_blocks(base.data.prepared_dir, "retain")
    micro = base.train.micro_batch_size
    ids = np.arange(rank * micro, (rank + 1) * micro)  # this worker's rows of the global batch
    batch = {k: torch.as_tensor(np.concatenate([forget[k][ids], retain[k][ids]])) for k in
             ("input_ids", "labels", "attention_mask")}

    def one_step(name: str) -> tuple[float, float]:
        cfg, source = cfgs[name], VARIANTS[name][1]
        engine, ref_engine, ref_head = engines[cfg.loss.fused]
        dist.barrier()
        rss, _ = _rss_bytes(), _reset_peak()
        t0 = time.perf_counter()
        cached = caches[source].references(forget=ids) if source in caches else None
        micro_step(cfg, engine, ref_engine if source == "online" else None, batch, n_forget=micro,
                    cached_ref=cached, ref_head=ref_head)
        dist.barrier()
        seconds = time.perf_counter() - t0
        peak = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss, dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return seconds, peak.item() / 2 ** 20

    times = {name: [] for name in cfgs}
    peaks = {name: [] for name in cfgs}
    for r in range(config["warmup"] + config["reps"]):
        for name in cfgs:
            t, mb = one_step(name)
            if r >= config["warmup"]:
                times[name].append(t)
                peaks[name].append(mb)
    if rank == 0:
        Path(config["out"]).write_text(json.dumps({"times": times, "peaks": peaks}))


# ratio key -> (numerator, denominator) variants
RATIOS = {
    "dipo_over_sft_step_time": ("dipo_cached", "sft"),
    "dipo_online_over_sft_step_time": ("dipo_online", "sft"),
    "dipo_topk_over_sft_step_time": ("dipo_topk", "sft"),
    "npo_cached_over_sft_step_time": ("npo_cached", "sft"),
    "online_over_cached_step_time": ("dipo_online", "dipo_cached"),
    "ga_over_sft_step_time": ("ga", "sft"),  # same computation: the noise floor
    "fused_over_logits_dipo_step_time": ("dipo_cached_fused", "dipo_cached"),
    "fused_dipo_over_fused_sft_step_time": ("dipo_cached_fused", "sft_fused"),
    "fused_dipo_over_sft_step_time": ("dipo_cached_fused", "sft"),
}


def per_round(times: dict, numerator: str, denominator: str) -> dict:
    """The ratio of two variants' times in each round (timed back to back): median, min, max."""
    ratios = [a / b for a, b in zip(times[numerator], times[denominator])]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "all": ratios}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2, help="forget rows per worker (as many retain rows)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--doc", action="store_true", help="write the figures into docs/benchmarks.md")
    parser.add_argument("--from-json", default=None, metavar="FILE",
                        help="run nothing: write the docs section from an earlier run's JSON")
    args = parser.parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        write_doc_section(ROOT / "docs" / "benchmarks.md", "step", doc_section(result))
        return
    command, load_at_start = command_line("step.py", argv), os.getloadavg()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dipo_scale.config import load_unlearn_config
    from dipo_scale.reference import precompute_reference

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="step_bench_"))
    workers = 2
    assets = build_bench_assets(work / "assets", vocab_size=args.vocab, hidden_size=args.hidden,
                                num_layers=args.layers, block_size=args.block_size,
                                num_blocks=workers * args.micro_batch)
    common = [f"model.path={assets['model']}", f"data.prepared_dir={assets['prepared']}", "loss.retain=gd",
              f"train.num_workers={workers}", f"train.global_batch_size={workers * args.micro_batch}",
              f"train.micro_batch_size={args.micro_batch}", "train.lr=1e-4", f"out_dir={work / 'run'}",
              "logging.wandb=disabled"]
    caches = {"hidden": str(work / "cache_hidden"), "topk": str(work / "cache_topk")}
    cfgs = {}
    for name, (overrides, source) in VARIANTS.items():
        extra = [f"reference.cache_dir={caches[source]}"] if source in caches else []
        cfgs[name] = load_unlearn_config(None, common + overrides + extra)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,  # mmap threshold: see the docstring
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}})
    precompute = {}
    for name in ("dipo_cached", "dipo_topk"):
        t0 = time.perf_counter()
        manifest = precompute_reference(cfgs[name])
        precompute[manifest["form"]] = {"seconds": time.perf_counter() - t0,
                                        "bytes_per_token": manifest["bytes_per_token"]}
    out = work / "times.json"
    TorchTrainer(step_worker,
                 train_loop_config={"cfgs": {n: c.model_dump(by_alias=True) for n, c in cfgs.items()},
                                    "caches": caches, "warmup": args.warmup, "reps": args.reps, "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=workers), torch_config=TorchConfig(backend="gloo"),
                 run_config=RunConfig(name="step_bench", storage_path=str(work / "ray"))).fit()
    ray.shutdown()

    measured = json.loads(out.read_text())
    times = measured["times"]
    median = {name: statistics.median(ts) for name, ts in times.items()}
    peak_mb = {name: statistics.median(ps) for name, ps in measured["peaks"].items()}
    tokens = 2 * workers * args.micro_batch * args.block_size  # forget + retain rows of one global step
    result = {
        "model": {"parameters": num_parameters(assets["model"]), "vocab": args.vocab, "hidden": args.hidden,
                  "layers": args.layers, "dtype": "float32"},
        "batch": {"workers": workers, "forget_rows_per_worker": args.micro_batch,
                  "retain_rows_per_worker": args.micro_batch, "block_size": args.block_size,
                  "tokens_per_step": tokens},
        "reps": args.reps, "warmup": args.warmup,
        "step_time_s": median,
        "step_time_s_all": times,
        "step_peak_mb": peak_mb,
        "tokens_per_s": {name: tokens / t for name, t in median.items()},
        **{key: median[a] / median[b] for key, (a, b) in RATIOS.items()},
        "fused_over_logits_dipo_step_peak_memory": peak_mb["dipo_cached_fused"] / peak_mb["dipo_cached"],
        "fused_over_logits_sft_step_peak_memory": peak_mb["sft_fused"] / peak_mb["sft"],
        "per_round": {key: per_round(times, a, b) for key, (a, b) in RATIOS.items()},
        "precompute": precompute,
        "command": command,
        **machine_facts(load_at_start),
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("step_time_s_all", "per_round")}, indent=2))
    if args.doc:
        write_doc_section(ROOT / "docs" / "benchmarks.md", "step", doc_section(result))


ROWS = [  # variant, its label in the table, the denominator it is also compared with
    ("sft", "sft (plain fine-tuning)", None),
    ("ga", "ga", None),
    ("npo_online", "npo, online reference", None),
    ("npo_cached", "npo, hidden cache", None),
    ("dipo_online", "dipo, online reference", None),
    ("dipo_cached", "**dipo, hidden cache**", None),
    ("dipo_topk", "dipo, topk cache (K = 32)", None),
    ("sft_fused", "sft, fused LM head", None),
    ("dipo_cached_fused", "**dipo, hidden cache, fused LM head**", "sft_fused"),
    ("dipo_online_fused", "dipo, online reference, fused LM head", None),
]


def doc_section(result: dict) -> str:
    """The "Unlearning step" section of docs/benchmarks.md from a run's JSON."""
    m, b, times = result["model"], result["batch"], result["step_time_s"]
    all_times, peaks, rounds = result["step_time_s_all"], result["step_peak_mb"], result["per_round"]
    load = result["machine"]

    def spread(num: str, den: str) -> str:
        r = [x / y for x, y in zip(all_times[num], all_times[den])]
        return f"{min(r):.2f}–{max(r):.2f}"

    lines = [
        "## Unlearning step", "",
        f"`{result['command']}` on {result['date_utc']} ({load['cpus']} CPUs, torch {load['torch']}, load "
        f"average {load['load_average_at_start'][0]:.1f} at the start, {load['load_average'][0]:.1f} at the end; "
        "other sessions' jobs shared the cores).", "",
        "A full unlearning step on the local 2-worker ZeRO-3 cluster (Ray Train, DeepSpeed ZeRO-3 over gloo, "
        "`zero3_cpu.json`), every variant timed side by side in one run on the same global batch "
        "(`benchmarks/step.py`'s docstring): `unlearn.micro_step` (forward over [forget; retain], loss, "
        "backward, ZeRO-3 optimizer step, `gd` retain term) for each variant in turn, round-robin, "
        f"{result['warmup']} warm-up rounds then {result['reps']} timed ones, each bracketed by barriers. "
        "Reading the cache rows is inside the timed region, as in training; the caches are written by the "
        "real precompute first. `sft` (plain fine-tuning) is computed by method GA, whose loss is the negated "
        "NLL: the same forward, backward and optimizer step; `sft` and `ga` are timed separately, so their "
        "ratio is the noise floor. Peak memory per step: each worker's peak RSS during the step over its RSS "
        "just before it (glibc's mmap threshold pinned to 1 MiB, so freed tensors leave RSS), the larger of "
        "the two workers; it counts what the step allocates and frees, not the partitions ZeRO-3 keeps.", "",
        f"Llama of {m['parameters'] / 1e6:.1f} M parameters (vocabulary {m['vocab']}, hidden {m['hidden']}, "
        f"{m['layers']} layers, {m['dtype']}), {b['workers']} workers × ({b['forget_rows_per_worker']} forget + "
        f"{b['retain_rows_per_worker']} retain blocks of {b['block_size']} tokens) = {b['tokens_per_step']} "
        "tokens per step; DiPO α = 1, β = 0.1, top-1.", "",
        "| variant | step time (median) | tokens/s | time over sft (median; per-round range) | peak MB per worker |",
        "|---|---|---|---|---|",
    ]
    for name, label, other in ROWS:
        over = f"{times[name] / times['sft']:.2f} ({spread(name, 'sft')})" if name != "sft" else "1.00"
        if other:
            over += f"; {times[name] / times[other]:.2f} over {other}"
        lines.append(f"| {label} | {times[name]:.2f} s | {result['tokens_per_s'][name]:.0f} | {over} | "
                     f"{peaks[name]:.0f} |")
    target = result["dipo_over_sft_step_time"]
    r = rounds["dipo_over_sft_step_time"]
    lines += [
        "",
        f"- `dipo_over_sft_step_time` = **{target:.2f}** "
        f"(target ≤ 1.10: **{'met' if target <= 1.10 else 'missed'}**); "
        f"per round {r['median']:.2f} (median), {r['min']:.2f}–{r['max']:.2f}. In the same run "
        f"`ga_over_sft_step_time` = {result['ga_over_sft_step_time']:.2f} (the noise floor; per round "
        f"{rounds['ga_over_sft_step_time']['min']:.2f}–{rounds['ga_over_sft_step_time']['max']:.2f}), "
        f"`npo_cached_over_sft_step_time` = {result['npo_cached_over_sft_step_time']:.2f}, "
        f"`dipo_topk_over_sft_step_time` = {result['dipo_topk_over_sft_step_time']:.2f}.",
        f"- Fused LM head: `fused_over_logits_dipo_step_peak_memory` = "
        f"**{result['fused_over_logits_dipo_step_peak_memory']:.2f}** (plain fine-tuning: "
        f"{result['fused_over_logits_sft_step_peak_memory']:.2f}); `fused_dipo_over_fused_sft_step_time` = "
        f"**{result['fused_dipo_over_fused_sft_step_time']:.2f}** (per round "
        f"{rounds['fused_dipo_over_fused_sft_step_time']['min']:.2f}–"
        f"{rounds['fused_dipo_over_fused_sft_step_time']['max']:.2f}), "
        f"`fused_over_logits_dipo_step_time` = {result['fused_over_logits_dipo_step_time']:.2f}.",
        f"- `online_over_cached_step_time` = {result['online_over_cached_step_time']:.2f} (the online reference: "
        "a second ZeRO-3 engine, parameter all-gathers and a forward every step).",
        "- Precompute for this run: " + ", ".join(
            f"{form} cache {p['seconds']:.1f} s ({p['bytes_per_token']} bytes per token)"
            for form, p in result["precompute"].items()) + ".",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
