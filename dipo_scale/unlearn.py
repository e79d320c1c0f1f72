"""Unlearn: Ray Train workers, each running DeepSpeed ZeRO-3, optimise DiPO / NPO / GA.

Driver side (`run_unlearning`) checks the run, then starts N Ray Train workers (`engine.torch_trainer`). Each worker
(`train_worker`) runs, top to bottom:

1. a DeepSpeed ZeRO-3 engine for the policy (parameters partitioned across the workers) and,
   when the method needs one, the frozen reference as a second ZeRO-3 engine without optimizer
   (the "online" reference form). With `reference.form=hidden|topk` no reference engine is
   built: each micro step reads the reference statistics of its own block ids from the cache
   (`dipo_scale.reference.cache.ReferenceCache`; verified against the run by `preflight.validate_run`);
2. a deterministic data schedule: global batch s is a fixed set of forget block ids (and as many
   retain block ids) that does not depend on the number of workers; worker r takes its slice,
   so 1 worker and 2 workers with the same global batch see the same data. A worker reads only
   the blocks of its own slices (`StepBlocks`, a window of steps at a time, from the parquet
   shards that hold them, each shard verified once), never whole splits;
3. per step: one forward over [forget; retain] blocks, the loss from `dipo_scale.losses`,
   `engine.backward`, `engine.step`; rank 0 logs to `log.jsonl` and wandb (offline by default).
   With `loss.fused` the engine wraps the model in `FusedHeadModel`, whose forward runs the decoder
   trunk and the loss from the final hidden states and the LM head, chunk by chunk: the
   [B, T, V] logits (and their gradient) never exist;
4. at the end: a DeepSpeed checkpoint reported through `ray.train.report`, and an HF-format
   export (safetensors) gathered from the ZeRO-3 shards into `<out_dir>/model`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dipo_scale import checkpoint
from dipo_scale.cluster import init_ray
from dipo_scale.collectives import sum_over_ranks
from dipo_scale.config import UnlearnConfig, absolute_paths, run_dir_of
from dipo_scale.engine import (accumulation_steps, evaluation_model, export_hf, hf_model, init_engines, load_ds_config,
                               partition_sizes, torch_trainer, use_accelerator)
from dipo_scale.errors import UserInputError, run_user_error
from dipo_scale.files import (atomic_write_json, check_output_dir, check_run_dir,
                              claim_run_dir, follow_umask_within, hold_output_dir,
                              reopen_step_log)
from dipo_scale.losses import (HiddenReference, dipo_loss, ga_loss, kl_retain_loss, nll_loss,
                               npo_loss, shift_targets)
from dipo_scale.memory import peak_rss_bytes
from dipo_scale.preflight import check_workers_can_run, validate_run
from dipo_scale.progress import Progress


# ------------------------------------------------------------------------------------------
# Pieces both sides use
# ------------------------------------------------------------------------------------------
def rank_rows(global_batch: int, world_size: int, rank: int) -> slice:
    """Rank `rank`'s rows of a global batch: contiguous shares whose sizes differ by at most one
    (the first `global_batch % world_size` ranks take one more), so any world size up to the global
    batch splits it and an elastic group may take any size in its range."""
    base, extra = divmod(global_batch, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


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


class StepBlocks:
    """One rank's blocks of one prepared split, step by step: `get(step)` gives the global
    batch's block ids (`batch_schedule`) and this rank's rows of it (`rank_rows`, a slice of the
    global batch), as int64 arrays [len(rows), block_size] in batch order.

    Only the blocks of this rank's own steps are read (`prepare.BlockReader`: from the shards that
    hold them, each shard's sha256 checked once before it is trusted), a window of steps at a time
    (as many steps as fill `window_rows` rows, at least one, up to `last_step`): each shard a
    window touches is read once per window, and at most one window's rows are in memory."""

    def __init__(self, reader, global_batch: int, seed: int, rank_rows: slice, last_step: int,
                 window_rows: int = 1024):
        self.reader, self.global_batch, self.seed, self.rank_rows = reader, global_batch, seed, rank_rows
        self.last_step = last_step
        per_step = len(range(global_batch)[rank_rows])
        self.window = max(1, window_rows // max(1, per_step))
        self._first = self._stop = None
        self._ids: dict[int, np.ndarray] = {}
        self._rows: dict[str, np.ndarray] = {}
        self._position: dict[int, int] = {}

    def step_ids(self, step: int) -> np.ndarray:
        """The block ids of global batch `step`."""
        return batch_schedule(self.reader.num_blocks, self.global_batch, step, self.seed)

    def _load(self, step: int) -> None:
        stop = max(step + 1, min(step + self.window, self.last_step))
        self._ids = {s: self.step_ids(s) for s in range(step, stop)}
        needed = np.unique(np.concatenate([ids[self.rank_rows] for ids in self._ids.values()]))
        self._rows = self.reader.read(needed)
        self._position = {b: i for i, b in enumerate(needed.tolist())}
        self._first, self._stop = step, stop

    def get(self, step: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if self._first is None or not self._first <= step < self._stop:
            self._load(step)
        ids = self._ids[step]
        index = np.asarray([self._position[b] for b in ids[self.rank_rows].tolist()], dtype=np.int64)
        return ids, {k: v[index] for k, v in self._rows.items()}


# ------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------


def _forget_loss(cfg: UnlearnConfig, logits, ref_logits, targets):
    """Forget term, its extra statistic (DiPO margin or NPO log-ratio, per row; None for GA and
    relearn) and the forget NLL, all from the loss's own chunks (no second pass over the logits)."""
    chunk = cfg.loss.chunk_size
    if cfg.method == "dipo":
        d = cfg.dipo
        return dipo_loss(logits, ref_logits, targets, alpha=d.alpha, beta=d.beta, select=d.select, k=d.k,
                         p=d.p, reduction=d.reduction, source=d.source, chunk_size=chunk, with_nll=True)
    if cfg.method == "npo":
        return npo_loss(logits, ref_logits, targets, beta=cfg.npo.beta, chunk_size=chunk, with_nll=True)
    if cfg.method == "relearn":  # the relearning attack: descend the forget NLL
        nll = nll_loss(logits, targets, chunk_size=chunk)
        return nll, None, nll.detach()
    loss, nll = ga_loss(logits, targets, chunk_size=chunk, with_nll=True)
    return loss, None, nll


def _retain_loss(cfg: UnlearnConfig, logits, ref_logits, targets):
    """Retain term and the retain NLL (the term itself for `gd`)."""
    if cfg.loss.retain == "gd":
        loss = nll_loss(logits, targets, chunk_size=cfg.loss.chunk_size)
        return loss, loss.detach()
    return kl_retain_loss(logits, ref_logits, targets, chunk_size=cfg.loss.chunk_size, with_nll=True)


def _start_wandb(cfg: UnlearnConfig, run_dir: Path):
    if cfg.logging.wandb == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    mode = cfg.logging.wandb  # online without credentials is refused before workers start (validate_run)
    safe_config = cfg.model_dump(by_alias=True)
    return wandb.init(project=cfg.logging.project, name=cfg.run_name, dir=str(run_dir),
                      mode=mode, config=safe_config, reinit="finish_previous")


def micro_step(cfg: UnlearnConfig, engine, ref_engine, batch: dict, n_forget: int,
               cached_ref: dict | None = None, ref_head: tuple | None = None,
               loss_scale: float = 1.0) -> dict[str, float]:
    """One micro step of training: forward over the batch's rows ([forget; retain]: `batch` holds
    `input_ids`, `labels`, `attention_mask` on the engine's device, the first `n_forget` rows the
    forget ones), the loss of `cfg` (method, retain term, `loss.fused`), `engine.backward`,
    `engine.step` (DeepSpeed steps the optimizer at the accumulation boundary). Returns the values
    training logs (loss, forget/retain loss and NLL, DiPO margin or NPO log-ratio).
    The reference is the online `ref_engine`'s logits (fused: its final hidden states with the
    gathered `ref_head`; both from `init_engines`), or `cached_ref` {"forget": ..., "retain": ...}
    (cached forms, `ReferenceCache.references`) for the batch's forget and retain rows.
    `loss_scale` multiplies the loss handed to backward (uneven shares of the global batch,
    `train_worker`; 0 for a dummy row); the values returned are the unscaled ones. The values
    reach the host once per micro step (one synchronisation on GPUs)."""
    targets = shift_targets(batch["labels"])
    f, r = slice(0, n_forget), slice(n_forget, None)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    fused = cfg.loss.fused
    ref_f, ref_r = (cached_ref.get("forget"), cached_ref.get("retain")) if cached_ref else (None, None)
    if ref_engine is not None:
        with torch.no_grad():
            ref = (HiddenReference(ref_engine(**inputs), *ref_head) if fused
                   else ref_engine(**inputs, use_cache=False).logits)
        ref_f, ref_r = ref[f], ref[r]
    has_retain = len(batch["input_ids"]) > n_forget
    if not hf_model(engine).training:  # from_pretrained (and evaluation) leave eval mode; gradient
        engine.train()                 # checkpointing acts in training mode only

    def losses(policy):  # logits [B, T, V], or an LMHead (fused: inside the engine's forward)
        forget_loss, stat, forget_nll = _forget_loss(cfg, policy[f], ref_f, targets[f])
        loss = cfg.loss.gamma * forget_loss
        record = {"forget_loss": forget_loss, "forget_nll": forget_nll}
        if has_retain:
            retain_loss, retain_nll = _retain_loss(cfg, policy[r], ref_r, targets[r])
            loss = loss + cfg.loss.lam * retain_loss
            record.update(retain_loss=retain_loss, retain_nll=retain_nll)
        record["loss"] = loss
        if cfg.method in ("dipo", "npo"):
            record["dipo_margin" if cfg.method == "dipo" else "npo_log_ratio"] = stat.mean()
        return loss if loss_scale == 1.0 else loss * loss_scale, record

    if fused:
        loss, record = engine(**inputs, loss_fn=losses)
    else:
        loss, record = losses(engine(**inputs, use_cache=False).logits)
    engine.backward(loss)
    engine.step()
    values = torch.stack([v.detach().float() for v in record.values()]).tolist()
    return dict(zip(record, values))


def run_identity(cfg: UnlearnConfig) -> dict:
    """Everything that determines a run's weights, and so its checkpoints: its config (local paths
    absolute) but the worker count (checkpoints load at any world size), and the fingerprints of
    what it reads: the model's and the reference's weights (`files.sampled_fingerprint`), the
    prepared data (its manifest, which holds every shard's sha256)."""
    from dipo_scale.files import sampled_fingerprint
    from dipo_scale.preflight import resolve_model_dir

    cfg = absolute_paths(cfg)
    config = cfg.model_dump(by_alias=True)
    model = sampled_fingerprint(resolve_model_dir(cfg.model.path, "model.path"))
    reference = model if not cfg.model.reference_path else sampled_fingerprint(
        resolve_model_dir(cfg.model.reference_path, "model.reference_path"))
    manifest = Path(cfg.data.prepared_dir) / "manifest.json"
    return {**config, "train": {k: v for k, v in config["train"].items() if k != "num_workers"},
            "inputs": {"model": model, "reference": reference,
                       "prepared": hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]}}


def checkpoint_root(cfg: UnlearnConfig, identity: dict | None = None) -> Path:
    """Where Ray Train stores this run's checkpoints (dipo_scale/checkpoint.py): a folder named by
    the run and a hash of its identity (`run_identity`, computed when not given), so runs that
    share `train.storage_path` never resume (or prune) each other's checkpoints, whatever their names."""
    identity = run_identity(cfg) if identity is None else identity
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.train.storage_path or run_dir_of(cfg) / "ray") / f"{cfg.run_name}-{key}"


def _report_checkpoint(cfg: UnlearnConfig, engine, step: int, metrics: dict) -> None:
    """Every rank saves its part and its record; Ray merges them into one checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as ckpt_dir:
        checkpoint.save(engine, Path(ckpt_dir), step, portable=cfg.train.optimizer == "adamw")
        follow_umask_within(Path(ckpt_dir))  # (safetensors makes its files 0600; Ray copies the modes)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir),
                         checkpoint_dir_name=f"{checkpoint.CHECKPOINT_PREFIX}{step:07d}")


def train_worker(config: dict) -> None:
    """Runs in every Ray Train worker process. `config`: {"cfg": the run's UnlearnConfig (validated
    on the driver, paths absolute), "checkpoint_root": where its checkpoints live}."""
    import ray.train

    cfg: UnlearnConfig = config["cfg"]
    use_accelerator(cfg.train.use_gpu)
    from dipo_scale.eval.in_training import Evaluator
    from dipo_scale.prepare import BlockReader, read_manifest

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir = run_dir_of(cfg)
    torch.manual_seed(cfg.train.seed)
    engine, ref_engine, ref_head = init_engines(cfg, load_ds_config(cfg, world))
    resume_from = checkpoint.newest_checkpoint(Path(config["checkpoint_root"]))
    start, saved_world = checkpoint.load(engine, resume_from) if resume_from else (0, world)

    G, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
    mine = rank_rows(G, world, rank)  # this worker's rows of a global batch (shares differ by at most one)
    accumulation = accumulation_steps(G, world, micro)
    # Only the blocks of this worker's own steps are read (StepBlocks), never whole splits.
    manifest = read_manifest(cfg.data.prepared_dir)
    forget = StepBlocks(BlockReader(cfg.data.prepared_dir, "forget", manifest=manifest), G, cfg.train.seed, mine,
                        cfg.train.steps)
    retain = (StepBlocks(BlockReader(cfg.data.prepared_dir, "retain", manifest=manifest), G, cfg.train.seed + 1,
                         mine, cfg.train.steps) if cfg.loss.retain != "none" else None)
    cache, cached_splits = None, []
    if cfg.reference_cached():
        from dipo_scale.reference.cache import ReferenceCache, needed_splits

        cache, cached_splits = ReferenceCache(cfg.reference.cache_dir), needed_splits(cfg)

    (run_dir / "ranks").mkdir(parents=True, exist_ok=True)
    rank_record = {"rank": rank, "world_size": world, "pid": os.getpid(),
                   "node_id": ray.get_runtime_context().get_node_id(),
                   "node_ip": ray.util.get_node_ip_address(), "resumed_from_step": start,
                   **partition_sizes(engine)}
    atomic_write_json(run_dir / "ranks" / f"rank{rank}.json", rank_record)
    wandb_run = _start_wandb(cfg, run_dir) if rank == 0 else None
    log_file = reopen_step_log(run_dir / "log.jsonl", start)[1] if rank == 0 else None
    evaluator = Evaluator(cfg, run_dir, start, rank=rank, world=world) if cfg.eval.every else None
    every = cfg.train.checkpoint_every
    if rank == 0:
        print(f"unlearn: {cfg.run_name}, {world} workers, " + (
            f"resuming after step {start} ({resume_from.name}, written by {saved_world} workers)"
            if start else "from the start"), flush=True)
        progress = Progress("unlearn", total=cfg.train.steps, unit="steps", done=start)

    for step in range(start, cfg.train.steps):
        t0 = time.time()
        forget_ids, forget_rows = forget.get(step)
        retain_ids, retain_rows = retain.get(step) if retain is not None else (None, None)
        parts = [forget_rows] + ([retain_rows] if retain is not None else [])
        share = mine.stop - mine.start
        sums: dict[str, float] = {}
        for m in range(accumulation):  # the same number of micro steps on every rank (ZeRO-3 is collective)
            rows = slice(min(m * micro, share), min((m + 1) * micro, share))  # of this worker's share
            n = rows.stop - rows.start
            if n == 0:  # a smaller share ran out: one dummy row (its first), weight 0, keeps the ranks in step
                rows = slice(0, 1)
            batch = {k: torch.as_tensor(np.concatenate([part[k][rows] for part in parts])).to(engine.device)
                     for k in ("input_ids", "labels", "attention_mask")}
            cached_ref = None if cache is None else cache.references(  # only this worker's rows
                engine.device, forget=forget_ids[mine][rows] if "forget" in cached_splits else None,
                retain=retain_ids[mine][rows] if "retain" in cached_splits else None)
            # The losses are means over rows; DeepSpeed divides by accumulation × world: this scale
            # makes the step's gradient the mean over the G rows of the global batch, however split.
            record = micro_step(cfg, engine, ref_engine, batch, n_forget=rows.stop - rows.start,
                                cached_ref=cached_ref, ref_head=ref_head, loss_scale=n * world * accumulation / G)
            for k, v in record.items():
                sums[k] = sums.get(k, 0.0) + v * n / G
        metrics = sum_over_ranks(sums, engine.device)  # means over the global batch's rows
        _check_finite(cfg, step + 1, metrics)  # every rank sees the same sums: all stop together
        metrics.update(step=step + 1, lr=engine.get_lr()[0], step_time_s=time.time() - t0, world_size=world)
        if rank == 0:
            log_file.write(json.dumps({**metrics, "forget_block_ids": forget_ids.tolist()}) + "\n")
            log_file.flush()
            if wandb_run is not None:
                wandb_run.log(metrics, step=step + 1)
            progress.update(loss=metrics["loss"], forget_nll=metrics["forget_nll"])
        if evaluator is not None and (step + 1) % cfg.eval.every == 0:
            with evaluation_model(engine) as model:  # every rank evaluates its share, in the engine
                record = evaluator.run(step + 1, model, lambda path, meta: export_hf(cfg, engine, rank, path, meta),
                                       wandb_run)
            # Every rank reports (a Ray Train report is collective); rank 0's carries the metrics,
            # which reach Ray Tune through the sweep's callback (ASHA stops trials on them).
            ray.train.report({"step": step + 1, "eval": True,
                              **{k: v for k, v in record.items() if isinstance(v, (int, float))}})
        if every and (step + 1) % every == 0 and step + 1 < cfg.train.steps:
            _report_checkpoint(cfg, engine, step + 1, metrics)

    export_hf(cfg, engine, rank, run_dir / "model", {"method": cfg.run_name, "source_model": cfg.model.path,
                                                      "prepared_dir": cfg.data.prepared_dir,
                                                      "config": cfg.model_dump(by_alias=True)})
    if start < cfg.train.steps:  # (a rerun of a finished run loaded that checkpoint: it stays as it is)
        _report_checkpoint(cfg, engine, cfg.train.steps, {"step": cfg.train.steps})
    # the worker process's peak RSS over the run (the scale benchmark compares it across corpus sizes)
    atomic_write_json(run_dir / "ranks" / f"rank{rank}.json", {**rank_record, "peak_rss_bytes": peak_rss_bytes()})
    if rank == 0:
        progress.close()
        log_file.close()
        if evaluator is not None:
            evaluator.close()
        if wandb_run is not None:
            wandb_run.finish()


def _check_finite(cfg: UnlearnConfig, step: int, metrics: dict[str, float]) -> None:
    """A step whose loss is not finite stops the run in one line (nothing more is logged or exported)."""
    bad = next((k for k in ("loss", "forget_loss", "retain_loss") if not math.isfinite(metrics.get(k, 0.0))), None)
    if bad is not None:
        raise UserInputError(f"unlearn: step {step}: {bad} is {metrics[bad]} (the run diverged); no model is "
                             f"exported; rerun into a new out_dir with a lower train.lr (now {cfg.train.lr:g})")


# ------------------------------------------------------------------------------------------
# Driver side
# ------------------------------------------------------------------------------------------
def _run_started(run_dir: Path) -> bool:
    """Whether a run directory holds progress worth keeping (its config may not change)."""
    log = run_dir / "log.jsonl"
    return (run_dir / "model").is_dir() or (log.is_file() and log.stat().st_size > 0)


def run_unlearning(cfg: UnlearnConfig, callbacks: list | None = None) -> Path:
    """Run one unlearning job on the Ray cluster (a local one if none is running).

    Re-running the same config with the same out_dir resumes from its last checkpoint (Ray Train
    restores a run by name and storage path); a different config in that out_dir is refused.
    `callbacks`: Ray Train callbacks (the sweep passes one that forwards evaluations to Ray Tune).
    Returns the HF export directory.
    """
    validate_run(cfg)
    inputs = [("model.path", cfg.model.path), ("data.prepared_dir", cfg.data.prepared_dir),
              ("reference.cache_dir", cfg.reference.cache_dir), ("eval.data_dir", cfg.eval.data_dir)]
    check_output_dir(cfg.out_dir, "unlearn", flag="out_dir", inputs=inputs)  # named as the user wrote it
    cfg = absolute_paths(cfg)
    run_dir = Path(cfg.out_dir)
    # The same command with another train.num_workers resumes the run; another model at the same
    # path, other data or any other setting is another run (refused once this one has started).
    identity = run_identity(cfg)
    root = checkpoint_root(cfg, identity)
    check_run_dir(run_dir, identity, "unlearn", started=_run_started)
    resumable = checkpoint.complete_checkpoints(root)
    if resumable:  # the one the workers will resume from, verified here
        checkpoint.verify_checkpoint(resumable[-1][1])
    init_ray()
    check_workers_can_run(cfg)
    with hold_output_dir(run_dir, "unlearn", flag="out_dir"):  # (so are its checkpoints: the folder is named by it)
        claim_run_dir(run_dir, identity, "unlearn", started=_run_started)  # nothing is written before this
        checkpoint.prune_checkpoints(root, cfg.train.keep_checkpoints)
        trainer = torch_trainer(
            train_worker, {"cfg": cfg, "checkpoint_root": str(root)}, num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu, name=root.name, storage_path=root.parent,
            placement_strategy=cfg.train.placement_strategy, resize_check_s=cfg.train.resize_check_s,
            max_failures=cfg.train.max_failures, keep_checkpoints=cfg.train.keep_checkpoints, callbacks=callbacks)
        try:
            trainer.fit()
        except Exception as e:  # ray.train.TrainingFailedError: a worker's bad-input error is one line
            user_error = run_user_error(e)
            if user_error is not None:
                raise UserInputError(str(user_error)) from None
            raise
        finally:
            checkpoint.prune_checkpoints(root, cfg.train.keep_checkpoints)
    return run_dir / "model"
