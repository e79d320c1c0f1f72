"""What each ZeRO-3 worker holds: parameters, gradients and optimizer state, with 1 and 2 workers,
and with the 8-bit optimizer (bitsandbytes AdamW8bit).

    .venv/bin/python benchmarks/zero3_memory.py --json /tmp/zero3_memory.json

Each setting is a real Ray Train run of `engine.init_engines` (the training engine, from the run
config) on a small Llama, followed by one `unlearn.micro_step` so that gradients and optimizer
states exist. Each worker then counts the bytes of the tensors DeepSpeed's ZeRO-3 optimizer keeps
for it (unique storages only):
  params     its partition of the model's parameters (`param.ds_tensor`)
  master     the fp32 partition the optimizer updates (`fp32_partitioned_groups_flat`), when it is
             a separate copy (with fp32 training it may share storage with the params)
  grads      its partition of the gradients (`grad_partitions_flat_buffer`)
  optimizer  the optimizer's state tensors (AdamW: exp_avg, exp_avg_sq; AdamW8bit: state1/state2
             in uint8, their block scales and quantisation maps)
Activations, the logits and allocator caches are not counted: this is the memory that ZeRO-3
partitions. Key figure: `two_over_one_worker_memory` = per-worker total with 2 workers over the
total with 1 (target <= 0.55).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_assets import build_bench_assets, num_parameters  # noqa: E402


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def memory_worker(config: dict) -> None:
    import numpy as np
    import ray.train
    import torch

    from dipo_scale.config import UnlearnConfig
    from dipo_scale.prepare import read_blocks
    from dipo_scale.engine import init_engines, load_ds_config
    from dipo_scale.unlearn import micro_step

    os.environ["DS_ACCELERATOR"] = "cpu"
    cfg = UnlearnConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    engine, *_ = init_engines(cfg, load_ds_config(cfg, world))
    blocks = read_blocks(cfg.data.prepared_dir, "forget")
    rows = np.arange(rank * cfg.train.micro_batch_size, (rank + 1) * cfg.train.micro_batch_size)
    batch = {k: torch.as_tensor(blocks[k][rows]) for k in ("input_ids", "labels", "attention_mask")}
    micro_step(cfg, engine, None, batch, n_forget=len(rows))

    opt = engine.optimizer
    params = [p.ds_tensor for p in engine.module.parameters()]
    param_storages = {t.untyped_storage().data_ptr() for t in params}
    master = [t for t in opt.fp32_partitioned_groups_flat if t.untyped_storage().data_ptr() not in param_storages]
    state = [v for st in opt.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
    grads = [opt.grad_partitions_flat_buffer] if getattr(opt, "grad_partitions_flat_buffer", None) is not None else []
    record = {"rank": rank, "world_size": world, "params": _bytes(params), "master": _bytes(master),
              "grads": _bytes(grads), "optimizer": _bytes(state),
              "state_dtypes": sorted({str(v.dtype) for v in state})}
    record["total"] = sum(record[k] for k in ("params", "master", "grads", "optimizer"))
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(record))


def measure(assets: dict, workers: int, optimizer: str, out: Path) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dipo_scale.config import load_unlearn_config

    out.mkdir(parents=True, exist_ok=True)
    cfg = load_unlearn_config(None, [f"model.path={assets['model']}", f"data.prepared_dir={assets['prepared']}",
                                     "method=ga", "loss.retain=none", f"train.num_workers={workers}",
                                     f"train.global_batch_size={workers}", "train.micro_batch_size=1",
                                     f"train.optimizer={optimizer}", f"out_dir={out}"])
    TorchTrainer(memory_worker, train_loop_config={"cfg": cfg.model_dump(by_alias=True), "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=workers),
                 torch_config=TorchConfig(backend="gloo"),
                 run_config=RunConfig(name=f"mem_{workers}_{optimizer}", storage_path=str(out / "ray"))).fit()
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(workers)]
    per_worker = {k: max(r[k] for r in ranks) for k in ("params", "master", "grads", "optimizer", "total")}
    return {"workers": workers, "optimizer": optimizer, "per_worker_bytes": per_worker,
            "state_dtypes": ranks[0]["state_dtypes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--work-dir", default=None, help="where the model and runs go (default: a temp dir)")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="zero3_memory_"))
    assets = build_bench_assets(work / "assets", vocab_size=args.vocab, hidden_size=args.hidden,
                                num_layers=args.layers, block_size=64, num_blocks=4)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    runs = {f"{o}_{w}w": measure(assets, w, o, work / f"run_{o}_{w}")
            for o in ("adamw", "adamw_8bit") for w in (1, 2)}
    ray.shutdown()
    total = lambda name: runs[name]["per_worker_bytes"]["total"]  # noqa: E731
    opt = lambda name: runs[name]["per_worker_bytes"]["optimizer"]  # noqa: E731
    result = {
        "model": {"parameters": num_parameters(assets["model"]), "vocab": args.vocab, "hidden": args.hidden,
                  "layers": args.layers, "dtype": "float32"},
        "runs": runs,
        "two_over_one_worker_memory": total("adamw_2w") / total("adamw_1w"),
        "two_over_one_worker_memory_8bit": total("adamw_8bit_2w") / total("adamw_8bit_1w"),
        "eight_bit_over_adamw_optimizer_state": opt("adamw_8bit_1w") / opt("adamw_1w"),
        "eight_bit_over_adamw_total": total("adamw_8bit_1w") / total("adamw_1w"),
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
