"""Unlearn: Ray Train workers, each running DeepSpeed ZeRO-3, optimise DiPO / NPO / GA.

Driver side (`run_unlearning`) builds a `TorchTrainer` with N workers. Each worker
(`train_worker`) runs, top to bottom:

1. a DeepSpeed ZeRO-3 engine for the policy (parameters partitioned across the workers) and,
   when the method needs one, the frozen reference as a second ZeRO-3 engine without optimizer
   (the "online" reference form);
2. a deterministic data schedule: global batch s is a fixed set of forget block ids (and as many
   retain block ids) that does not depend on the number of workers; worker r takes its slice,
   so 1 worker and 2 workers with the same global batch see the same data;
3. per step: one forward over [forget; retain] blocks, the loss from `dipo_scale.losses`,
   `engine.backward`, `engine.step`; rank 0 logs to `log.jsonl` and wandb (offline by default);
4. at the end: a DeepSpeed checkpoint reported through `ray.train.report`, and an HF-format
   export (safetensors) gathered from the ZeRO-3 shards into `<out_dir>/model`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dipo_scale.config import UnlearnConfig, resolve_ds_config_path
from dipo_scale.errors import UserInputError
from dipo_scale.files import atomic_dir, atomic_write_json
from dipo_scale.losses import (dipo_loss, ga_loss, kl_retain_loss, nll_loss, npo_loss,
                               shift_targets)


# ------------------------------------------------------------------------------------------
# Pieces both sides use
# ------------------------------------------------------------------------------------------
def load_ds_config(cfg: UnlearnConfig, world_size: int) -> dict:
    """The ds_configs/ file with its "auto" values filled from the run config."""
    path = resolve_ds_config_path(cfg.train.ds_config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserInputError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise UserInputError(f"{path}: zero_optimization.stage is {stage!r}; this system needs ZeRO stage 3")
    t = cfg.train
    per_worker, rem = divmod(t.global_batch_size, world_size)
    if rem or per_worker % t.micro_batch_size:
        raise UserInputError(
            f"train.global_batch_size: {t.global_batch_size} must be a multiple of "
            f"num_workers × micro_batch_size ({world_size} × {t.micro_batch_size})")
    filled = {"train_batch_size": t.global_batch_size,
              "train_micro_batch_size_per_gpu": t.micro_batch_size,
              "gradient_accumulation_steps": per_worker // t.micro_batch_size,
              "gradient_clipping": t.grad_clip}
    for key, value in filled.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    return ds


def batch_schedule(num_blocks: int, global_batch: int, step: int, seed: int) -> np.ndarray:
    """Block ids of global batch `step`: an endless stream of seeded permutations, one per epoch."""
    start, stop = step * global_batch, (step + 1) * global_batch
    out, epoch = [], start // num_blocks
    while epoch * num_blocks < stop:
        perm = np.random.default_rng([seed, epoch]).permutation(num_blocks)
        lo = max(start - epoch * num_blocks, 0)
        hi = min(stop - epoch * num_blocks, num_blocks)
        out.append(perm[lo:hi])
        epoch += 1
    return np.concatenate(out)


def run_dir_of(cfg: UnlearnConfig) -> Path:
    return Path(cfg.out_dir).resolve()


# ------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------
def _init_engines(cfg: UnlearnConfig, ds_config: dict):
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    # Ray Train already formed the process group; DeepSpeed adopts it.
    deepspeed.init_distributed(dist_backend="nccl" if cfg.train.use_gpu else "gloo")
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    load = dict(dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841  (keeps zero.Init on for from_pretrained)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, **load)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay)
    warmup = cfg.train.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / (warmup + 1)))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                      config=ds_config)
    ref_engine = None
    if cfg.needs_reference():
        ref_config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
        hf_ref = HfDeepSpeedConfig(ref_config)  # noqa: F841
        ref_model = AutoModelForCausalLM.from_pretrained(cfg.model.reference_path or cfg.model.path, **load)
        ref_model.requires_grad_(False)
        ref_engine, *_ = deepspeed.initialize(model=ref_model, config=ref_config)
        ref_engine.eval()
    return engine, ref_engine


def _partition_sizes(engine) -> dict:
    params = list(engine.module.parameters())
    return {"local_numel": int(sum(p.ds_tensor.numel() for p in params)),
            "total_numel": int(sum(p.ds_numel for p in params))}


def _forget_loss(cfg: UnlearnConfig, logits, ref_logits, targets):
    """Forget term and its extra statistic (DiPO margin or NPO log-ratio, per row)."""
    chunk = cfg.loss.chunk_size
    if cfg.method == "dipo":
        d = cfg.dipo
        return dipo_loss(logits, ref_logits, targets, alpha=d.alpha, beta=d.beta, select=d.select,
                         k=d.k, p=d.p, reduction=d.reduction, source=d.source, chunk_size=chunk)
    if cfg.method == "npo":
        return npo_loss(logits, ref_logits, targets, beta=cfg.npo.beta, chunk_size=chunk)
    return ga_loss(logits, targets, chunk_size=chunk), None


def _retain_loss(cfg: UnlearnConfig, logits, ref_logits, targets):
    if cfg.loss.retain == "gd":
        return nll_loss(logits, targets, chunk_size=cfg.loss.chunk_size)
    return kl_retain_loss(logits, ref_logits, targets, chunk_size=cfg.loss.chunk_size)


def _mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _start_wandb(cfg: UnlearnConfig, run_dir: Path):
    if cfg.logging.wandb == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    mode = cfg.logging.wandb
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or Path("~/.netrc").expanduser().exists()):
        mode = "offline"  # online only when the user configured credentials
    safe_config = cfg.model_dump(by_alias=True)
    return wandb.init(project=cfg.logging.project, name=cfg.run_name, dir=str(run_dir),
                      mode=mode, config=safe_config, reinit="finish_previous")


def train_worker(config: dict) -> None:
    """Runs in every Ray Train worker process."""
    import ray.train

    cfg = UnlearnConfig.model_validate(config["cfg"])
    if not cfg.train.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    from dipo_scale.prepare import read_blocks

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir = run_dir_of(cfg)
    torch.manual_seed(cfg.train.seed)
    ds_config = load_ds_config(cfg, world)
    engine, ref_engine = _init_engines(cfg, ds_config)
    device = engine.device

    forget = read_blocks(cfg.data.prepared_dir, "forget")
    retain = read_blocks(cfg.data.prepared_dir, "retain") if cfg.loss.retain != "none" else None
    G, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
    local = G // world

    (run_dir / "ranks").mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "ranks" / f"rank{rank}.json",
                      {"rank": rank, "world_size": world, **_partition_sizes(engine)})
    wandb_run = _start_wandb(cfg, run_dir) if rank == 0 else None
    log_file = open(run_dir / "log.jsonl", "w") if rank == 0 else None

    for step in range(cfg.train.steps):
        t0 = time.time()
        f_ids = batch_schedule(len(forget["input_ids"]), G, step, cfg.train.seed)[rank * local:(rank + 1) * local]
        r_ids = (batch_schedule(len(retain["input_ids"]), G, step, cfg.train.seed + 1)[rank * local:(rank + 1) * local]
                 if retain is not None else None)
        sums: dict[str, float] = {}
        for m in range(0, local, micro):
            f_rows = f_ids[m:m + micro]
            parts = [forget]
            rows = [f_rows]
            if retain is not None:
                parts.append(retain)
                rows.append(r_ids[m:m + micro])
            batch = {k: torch.as_tensor(np.concatenate([p[k][r] for p, r in zip(parts, rows)])).to(device)
                     for k in ("input_ids", "labels", "attention_mask")}
            targets = shift_targets(batch["labels"])
            n_f = len(f_rows)
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            ref_logits = None
            if ref_engine is not None:
                with torch.no_grad():
                    ref_logits = ref_engine(input_ids=batch["input_ids"],
                                            attention_mask=batch["attention_mask"]).logits
            forget_loss, stat = _forget_loss(cfg, logits[:n_f], None if ref_logits is None else ref_logits[:n_f],
                                             targets[:n_f])
            loss = cfg.loss.gamma * forget_loss
            record = {"forget_loss": forget_loss.item()}
            if retain is not None:
                retain_loss = _retain_loss(cfg, logits[n_f:], None if ref_logits is None else ref_logits[n_f:],
                                           targets[n_f:])
                loss = loss + cfg.loss.lam * retain_loss
                record["retain_loss"] = retain_loss.item()
            engine.backward(loss)
            engine.step()
            with torch.no_grad():
                record["loss"] = loss.item()
                record["forget_nll"] = nll_loss(logits[:n_f].detach(), targets[:n_f]).item()
                if retain is not None:
                    record["retain_nll"] = nll_loss(logits[n_f:].detach(), targets[n_f:]).item()
                if cfg.method == "dipo":
                    record["dipo_margin"] = stat.mean().item()
                elif cfg.method == "npo":
                    record["npo_log_ratio"] = stat.mean().item()
            for k, v in record.items():
                sums[k] = sums.get(k, 0.0) + v * len(f_rows) / local
        metrics = _mean_over_ranks(sums)
        metrics.update(step=step + 1, lr=engine.get_lr()[0], step_time_s=time.time() - t0)
        if rank == 0:
            metrics["forget_block_ids"] = batch_schedule(len(forget["input_ids"]), G, step, cfg.train.seed).tolist()
            log_file.write(json.dumps(metrics) + "\n")
            log_file.flush()
            if wandb_run is not None:
                wandb_run.log({k: v for k, v in metrics.items() if not isinstance(v, list)}, step=step + 1)

    _save_and_export(cfg, engine, rank, run_dir)
    if rank == 0:
        log_file.close()
        if wandb_run is not None:
            wandb_run.finish()


def _save_and_export(cfg: UnlearnConfig, engine, rank: int, run_dir: Path) -> None:
    """DeepSpeed checkpoint through ray.train.report, then the consolidated HF export (rank 0)."""
    import ray.train

    from transformers import AutoTokenizer

    state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
    if rank == 0:
        with atomic_dir(run_dir / "model") as tmp:
            engine.module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code
                                          ).save_pretrained(tmp)
            atomic_write_json(tmp / "dipo_scale.json", {
                "method": cfg.run_name, "source_model": cfg.model.path,
                "prepared_dir": cfg.data.prepared_dir,
                "config": cfg.model_dump(by_alias=True)})
    with tempfile.TemporaryDirectory() as ckpt:
        engine.save_checkpoint(ckpt, tag="final")
        ray.train.report({"step": cfg.train.steps},
                         checkpoint=ray.train.Checkpoint.from_directory(ckpt))


# ------------------------------------------------------------------------------------------
# Driver side
# ------------------------------------------------------------------------------------------
def validate_run(cfg: UnlearnConfig) -> None:
    """Everything that can be checked before workers start (one-line errors, exit 2)."""
    from dipo_scale.prepare import read_manifest

    if not cfg.model.path:
        raise UserInputError("model.path: not set (the model to unlearn)")
    if not cfg.data.prepared_dir:
        raise UserInputError("data.prepared_dir: not set (run `dipo-scale prepare` first)")
    manifest = read_manifest(cfg.data.prepared_dir)
    if manifest["splits"]["forget"]["tokens"] == 0:
        raise UserInputError(f"{cfg.data.prepared_dir}: forget set is empty")
    load_ds_config(cfg, cfg.train.num_workers)


def run_unlearning(cfg: UnlearnConfig) -> Path:
    """Run one unlearning job on the Ray cluster (local one if none); returns the HF export dir."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    validate_run(cfg)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", cfg.model_dump(by_alias=True))
    if not ray.is_initialized():
        ray.init(log_to_driver=True, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}} if not cfg.train.use_gpu else None)
    cfg = cfg.model_copy(update={"out_dir": str(run_dir),
                                 "data": cfg.data.model_copy(update={"prepared_dir": str(Path(cfg.data.prepared_dir).resolve())})})
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.model_dump(by_alias=True)},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(name=cfg.run_name, storage_path=str(run_dir / "ray"),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
    )
    trainer.fit()
    return run_dir / "model"
