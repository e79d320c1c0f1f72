"""What a full unlearning step costs: DiPO (cached and online reference), NPO and GA against a plain
fine-tuning step, side by side on the same batch, on the local 2-worker ZeRO-3 cluster.

    .venv/bin/python benchmarks/step.py --json /tmp/step.json

Setup: a small Llama (default 32k vocabulary, hidden 256, 4 layers: ~20M parameters, float32)
and random-text blocks through the real `prepare` stage; the `hidden` reference cache is written
by the real precompute (`dipo_scale.reference.precompute_reference`). One Ray Train run with 2
workers builds the training engine and the online reference engine once (`unlearn.init_engines`),
then times `unlearn.micro_step` (forward over [forget; retain], loss, backward, ZeRO-3 optimizer
step; with `gd` retain) for each variant in turn, round-robin, on the same global batch (one
micro step per worker per step). Reading the cache rows is inside the timed region, as in
training. Each timing is bracketed by barriers; the figure is the median over `--reps` rounds
after `--warmup` rounds.

Variants: `sft` (plain fine-tuning: cross-entropy on the forget and retain rows), `ga`,
`npo_online`, `npo_cached`, `dipo_online`, `dipo_cached` (hidden form), `dipo_topk` (K=32), and
with `loss.fused=true` (a second training engine wrapped in `unlearn.FusedHeadModel`: the LM head
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_assets import build_bench_assets, num_parameters  # noqa: E402
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
    from dipo_scale.unlearn import init_engines, load_ds_config, micro_step

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


def main() -> None:
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
    args = parser.parse_args()
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
        "dipo_over_sft_step_time": median["dipo_cached"] / median["sft"],
        "dipo_online_over_sft_step_time": median["dipo_online"] / median["sft"],
        "dipo_topk_over_sft_step_time": median["dipo_topk"] / median["sft"],
        "npo_cached_over_sft_step_time": median["npo_cached"] / median["sft"],
        "online_over_cached_step_time": median["dipo_online"] / median["dipo_cached"],
        "ga_over_sft_step_time": median["ga"] / median["sft"],  # same computation: the noise floor
        "fused_over_logits_dipo_step_peak_memory": peak_mb["dipo_cached_fused"] / peak_mb["dipo_cached"],
        "fused_over_logits_sft_step_peak_memory": peak_mb["sft_fused"] / peak_mb["sft"],
        "fused_over_logits_dipo_step_time": median["dipo_cached_fused"] / median["dipo_cached"],
        "fused_dipo_over_fused_sft_step_time": median["dipo_cached_fused"] / median["sft_fused"],
        "fused_dipo_over_sft_step_time": median["dipo_cached_fused"] / median["sft"],
        "precompute": precompute,
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "step_time_s_all"}, indent=2))


if __name__ == "__main__":
    main()
