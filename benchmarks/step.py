"""What a full unlearning step costs: DiPO (cached and online reference), NPO and GA against a plain
fine-tuning step, side by side on the same batch, on the local 2-worker ZeRO-3 cluster.

    .venv/bin/python benchmarks/step.py --json /tmp/step.json

Setup: a small Llama (default 32k vocabulary, hidden 256, 4 layers: ~20M parameters, float32)
and random-text blocks through the real `prepare` stage; the `hidden` reference cache is written
by the real precompute (`dipo_scale.reference.precompute_reference`). One Ray Train run with 2
workers builds the training engine and the online reference engine once (`unlearn._init_engines`),
then times `unlearn._micro_step` (forward over [forget; retain], loss, backward, ZeRO-3 optimizer
step; with `gd` retain) for each variant in turn, round-robin, on the same global batch (one
micro step per worker per step). Reading the cache rows is inside the timed region, as in
training. Each timing is bracketed by barriers; the figure is the median over `--reps` rounds
after `--warmup` rounds.

Variants: `sft` (plain fine-tuning: cross-entropy on the forget and retain rows), `ga`,
`npo_online`, `npo_cached`, `dipo_online`, `dipo_cached` (hidden form), `dipo_topk` (K=32).
The plain fine-tuning step is computed by method `ga`: `ga_loss` is the negated NLL, so its forward,
backward and optimizer step are those of fine-tuning on the same tokens (only the sign of the forget
term differs). `sft` and `ga` are timed separately; their ratio shows the noise of the measurement.

Keys: `dipo_over_sft_step_time` (target <= 1.10), `online_over_cached_step_time`,
`step_time_s` and `tokens_per_s` per variant.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_assets import build_bench_assets, num_parameters  # noqa: E402

# variant -> (overrides of the run config, reference source)
VARIANTS = {
    "sft": (["method=ga"], None),
    "ga": (["method=ga"], None),
    "npo_online": (["method=npo"], "online"),
    "npo_cached": (["method=npo", "reference.form=hidden"], "hidden"),
    "dipo_online": (["method=dipo"], "online"),
    "dipo_cached": (["method=dipo", "reference.form=hidden"], "hidden"),
    "dipo_topk": (["method=dipo", "reference.form=topk", "reference.k=32"], "topk"),
}


def step_worker(config: dict) -> None:
    import numpy as np
    import ray.train
    import torch
    import torch.distributed as dist

    from dipo_scale.config import UnlearnConfig
    from dipo_scale.prepare import read_blocks
    from dipo_scale.reference import ReferenceCache
    from dipo_scale.unlearn import _init_engines, _micro_step, load_ds_config

    os.environ["DS_ACCELERATOR"] = "cpu"
    cfgs = {name: UnlearnConfig.model_validate(c) for name, c in config["cfgs"].items()}
    base = cfgs["dipo_online"]  # builds the training engine and the online reference engine
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    engine, ref_engine = _init_engines(base, load_ds_config(base, world))
    caches = {form: ReferenceCache(d) for form, d in config["caches"].items()}
    forget, retain = read_blocks(base.data.prepared_dir, "forget"), read_blocks(base.data.prepared_dir, "retain")
    micro = base.train.micro_batch_size
    ids = np.arange(rank * micro, (rank + 1) * micro)  # this worker's rows of the global batch
    batch = {k: torch.as_tensor(np.concatenate([forget[k][ids], retain[k][ids]])) for k in
             ("input_ids", "labels", "attention_mask")}

    def one_step(name: str) -> float:
        cfg, source = cfgs[name], VARIANTS[name][1]
        dist.barrier()
        t0 = time.perf_counter()
        cached = caches[source].references(forget=ids) if source in caches else None
        _micro_step(cfg, engine, ref_engine if source == "online" else None, batch, n_forget=micro,
                    cached_ref=cached)
        dist.barrier()
        return time.perf_counter() - t0

    times = {name: [] for name in cfgs}
    for r in range(config["warmup"] + config["reps"]):
        for name in cfgs:
            t = one_step(name)
            if r >= config["warmup"]:
                times[name].append(t)
    if rank == 0:
        Path(config["out"]).write_text(json.dumps(times))


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
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
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

    times = json.loads(out.read_text())
    median = {name: statistics.median(ts) for name, ts in times.items()}
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
        "tokens_per_s": {name: tokens / t for name, t in median.items()},
        "dipo_over_sft_step_time": median["dipo_cached"] / median["sft"],
        "dipo_online_over_sft_step_time": median["dipo_online"] / median["sft"],
        "dipo_topk_over_sft_step_time": median["dipo_topk"] / median["sft"],
        "npo_cached_over_sft_step_time": median["npo_cached"] / median["sft"],
        "online_over_cached_step_time": median["dipo_online"] / median["dipo_cached"],
        "ga_over_sft_step_time": median["ga"] / median["sft"],  # same computation: the noise floor
        "precompute": precompute,
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "step_time_s_all"}, indent=2))


if __name__ == "__main__":
    main()
