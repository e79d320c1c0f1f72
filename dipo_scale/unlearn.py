"""Unlearn: Ray Train workers, each running DeepSpeed ZeRO-3, optimise DiPO / NPO / GA.

Driver side (`run_unlearning`) builds a `TorchTrainer` with N workers. Each worker
(`train_worker`) runs, top to bottom:

1. a DeepSpeed ZeRO-3 engine for the policy (parameters partitioned across the workers) and,
   when the method needs one, the frozen reference as a second ZeRO-3 engine without optimizer
   (the "online" reference form). With `reference.form=hidden|topk` no reference engine is
   built: each micro step reads the reference statistics of its own block ids from the cache
   (`dipo_scale.reference.cache.ReferenceCache`; verified against the run by `validate_run`);
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
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from dipo_scale import checkpoint
from dipo_scale.cluster import init_ray
from dipo_scale.collectives import sum_over_ranks
from dipo_scale.config import UnlearnConfig, resolve_ds_config_path
from dipo_scale.errors import UserInputError, run_user_error, user_error_behind
from dipo_scale.files import (absolute_if_local, atomic_dir, atomic_write_json, check_output_dir, check_run_dir,
                              claim_run_dir, follow_umask_within, hold_output_dir,
                              reopen_step_log)
from dipo_scale.losses import (HiddenReference, LMHead, dipo_loss, ga_loss, kl_retain_loss, nll_loss,
                               npo_loss, shift_targets)
from dipo_scale.memory import peak_rss_bytes
from dipo_scale.progress import Progress


# ------------------------------------------------------------------------------------------
# Pieces both sides use
# ------------------------------------------------------------------------------------------
def load_ds_config(cfg: UnlearnConfig, world_size: int) -> dict:
    """The ds_configs/ file with its "auto" values filled from the run config."""
    path = resolve_ds_config_path(cfg.ds_config_name)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserInputError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise UserInputError(f"{path}: zero_optimization.stage is {stage!r}; this system needs ZeRO stage 3")
    bf16 = bool(ds.get("bf16", {}).get("enabled"))
    if cfg.train.use_gpu and bf16 != (cfg.model_dtype == "bfloat16"):
        raise UserInputError(
            f"train.ds_config: {path.name} has bf16 {'on' if bf16 else 'off'} but the model trains in "
            f"{cfg.model_dtype} (model.dtype={cfg.model.dtype}) on GPUs; use train.ds_config=auto "
            f"(zero3_bf16.json) with model.dtype=auto, or make the two agree")
    t = cfg.train
    if t.global_batch_size < world_size:
        raise UserInputError(f"train.global_batch_size: {t.global_batch_size} is smaller than the {world_size} "
                             "workers (every worker needs at least one row of each global batch)")
    accumulation = accumulation_steps(t.global_batch_size, world_size, t.micro_batch_size)
    # DeepSpeed checks train_batch_size = micro × accumulation × world; with uneven shares that is an
    # upper bound of the rows, and micro_step's loss_scale makes the gradient the global batch's mean.
    filled = {"train_batch_size": t.micro_batch_size * accumulation * world_size,
              "train_micro_batch_size_per_gpu": t.micro_batch_size,
              "gradient_accumulation_steps": accumulation,
              "gradient_clipping": t.grad_clip}
    for key, value in filled.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    return ds


def rank_rows(global_batch: int, world_size: int, rank: int) -> slice:
    """Rank `rank`'s rows of a global batch: contiguous shares whose sizes differ by at most one
    (the first `global_batch % world_size` ranks take one more), so any world size up to the global
    batch splits it and an elastic group may take any size in its range."""
    base, extra = divmod(global_batch, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def accumulation_steps(global_batch: int, world_size: int, micro_batch: int) -> int:
    """Micro steps per optimizer step, the same on every rank (DeepSpeed's gradient accumulation
    boundary): enough for the largest share. A rank whose share is smaller fills its last micro
    steps with fewer rows, or with a dummy row of weight 0 (`train_worker`)."""
    return math.ceil(math.ceil(global_batch / world_size) / micro_batch)


def offloads_optimizer(ds_config: dict | None) -> bool:
    """Whether a DeepSpeed config keeps the optimizer states (and steps them) on the CPU."""
    offload = ((ds_config or {}).get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    return offload == "cpu"


def make_optimizer(cfg: UnlearnConfig, params, ds_config: dict | None = None):
    """AdamW, or with `train.optimizer=adamw_8bit` bitsandbytes' AdamW8bit (its two moments in
    8 bits with blockwise scales: ~2 bytes per parameter instead of 8). Under ZeRO-3 DeepSpeed
    hands it each rank's fp32 partition, so the 8-bit states are partitioned too. With the
    optimizer offloaded to the CPU (`ds_config`'s offload_optimizer, ds_configs/zero3_offload.json)
    AdamW is DeepSpeed's vectorised, multi-threaded CPU Adam (torch's AdamW would step a 7B
    model's partition on one core)."""
    t = cfg.train
    if t.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay)
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=t.lr, weight_decay=t.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def check_optimizer(cfg: UnlearnConfig) -> None:
    """A one-line error, before any worker starts, when bitsandbytes cannot run its 8-bit
    optimizer on this machine (one step on a small tensor)."""
    if cfg.train.optimizer != "adamw_8bit":
        return
    try:
        probe = torch.nn.Parameter(torch.zeros(4096, device="cuda" if cfg.train.use_gpu else "cpu"))
        probe.grad = torch.ones_like(probe)
        make_optimizer(cfg, [probe]).step()
    except Exception as e:  # ImportError, no kernel for this device, ...
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserInputError(f"train.optimizer=adamw_8bit: bitsandbytes cannot run its 8-bit optimizer "
                             f"here ({type(e).__name__}: {first}); use train.optimizer=adamw") from None


def check_fused_head(cfg: UnlearnConfig) -> None:
    """`loss.fused` computes logits as `hidden @ lm_head.weight.T (+ bias)`: refuse, in one line,
    models whose config rescales or softcaps their logits (the fused path would be silently wrong)."""
    from transformers import AutoConfig

    paths = {cfg.model.path, cfg.model.reference_path or cfg.model.path}
    for path in sorted(paths):
        text = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code).get_text_config()
        for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
            value = getattr(text, attr, None)
            if value not in (None, 1, 1.0):
                raise UserInputError(f"loss.fused: {path} transforms its logits ({attr}={value}); the fused "
                                     "LM head supports plain linear heads only; set loss.fused=false")


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


def run_dir_of(cfg: UnlearnConfig) -> Path:
    return Path(cfg.out_dir).resolve()


# ------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------
class FusedHeadModel(torch.nn.Module):
    """`loss.fused`: wraps an HF causal LM so that one engine forward runs its decoder trunk and
    then `loss_fn(LMHead(final hidden states, LM-head weight, bias))`, the loss computed from the
    hidden states chunk by chunk (`dipo_scale.losses`), so the [B, T, V] logits never exist.
    Without `loss_fn` the forward returns the final hidden states (the fused online reference).

    Why inside the forward: under ZeRO-3 the head weight is an empty placeholder outside the
    forward of a module that uses it. Registered as an external parameter of this module, it is
    gathered around this forward, gathered again for the backward (DeepSpeed's hook fires when the
    returned loss receives its gradient) and its gradient is reduce-scattered like any other.
    (`deepspeed.zero.GatheredParameters` is for reads only: it re-partitions the weight on exit,
    before `engine.backward`.) Tied embeddings are the same parameter, and its gradient sums both
    uses. Heads are plain linear maps of `get_decoder()(...)[0]` (Llama, Mistral, Qwen, ...);
    `validate_run` refuses models that rescale or softcap their logits.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, loss_fn=None):
        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        if loss_fn is None:
            return hidden
        head = self.model.get_output_embeddings()
        return loss_fn(LMHead(hidden, head.weight, getattr(head, "bias", None)))


def hf_model(engine):
    """The HF model an engine trains (unwrapped from `FusedHeadModel`)."""
    return engine.module.model if isinstance(engine.module, FusedHeadModel) else engine.module


@contextmanager
def evaluation_model(engine):
    """The HF model an engine trains, to evaluate in place: its forwards run on the ZeRO-3
    partitioned parameters (each layer gathered as it runs). With `loss.fused` the engine's module
    is `FusedHeadModel`, whose forward evaluation does not call; DeepSpeed resets its parameter
    coordinator at the start of that module's forward, and a hook does it at the HF model's."""
    model = hf_model(engine)
    handle = None
    if model is not engine.module and getattr(engine.optimizer, "parameter_offload", None) is not None:
        coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
        handle = model.register_forward_pre_hook(lambda *args: coordinator.reset_step(), prepend=True)
    try:
        yield model
    finally:
        if handle is not None:
            handle.remove()


def hf_state_dict(engine) -> dict | None:
    """The consolidated weights under the HF model's parameter names (a collective: every rank
    calls it; rank 0 gets the dict)."""
    state_dict = engine._zero3_consolidated_16bit_state_dict()
    if state_dict and isinstance(engine.module, FusedHeadModel):
        state_dict = type(state_dict)((k.removeprefix("model."), v) for k, v in state_dict.items())
    return state_dict


def init_distributed(cfg: UnlearnConfig) -> None:
    """DeepSpeed's process group on a Ray Train worker (nccl with `train.use_gpu`, else gloo): Ray
    Train has already formed it, DeepSpeed adopts it."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if cfg.train.use_gpu else "gloo")


def load_zero3_model(cfg: UnlearnConfig, ds_config: dict, path: str):
    """The HF causal LM at `path` in `model.dtype`, loaded under ZeRO-3's `zero.Init` from
    `ds_config` (each rank materialises only its partition of every parameter)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841  (keeps zero.Init on for from_pretrained)
    dtype = torch.bfloat16 if cfg.model_dtype == "bfloat16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)


def inference_ds_config(ds_config: dict) -> dict:
    """`ds_config` without optimizer and scheduler: the config of a frozen (inference-only) engine."""
    return {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}


def frozen_engine(module: torch.nn.Module, ds_config: dict):
    """`module` frozen (no gradients, no optimizer) as a ZeRO-3 engine in eval mode: the online
    reference of training, and the ZeRO-3 workers of the reference precompute."""
    import deepspeed

    module.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=module, config=inference_ds_config(ds_config))
    engine.eval()
    return engine


def init_engines(cfg: UnlearnConfig, ds_config: dict):
    """(engine, ref_engine, ref_head) of a training worker, from the run config and the filled
    DeepSpeed config (`load_ds_config`): the policy's ZeRO-3 training engine (wrapped in
    `FusedHeadModel` with `loss.fused`) with its optimizer (`make_optimizer`) and warm-up LR
    schedule; for the online reference form, the frozen reference engine (`frozen_engine`) and,
    fused, its gathered head (weight, bias): frozen, so one read-only copy per worker, like the
    hidden cache's. `ref_engine` and `ref_head` are None when the reference comes from a cache or
    the method needs none. Every rank calls it (ZeRO-3 set-up is collective)."""
    import deepspeed

    init_distributed(cfg)
    fused = cfg.loss.fused
    model = load_zero3_model(cfg, ds_config, cfg.model.path)
    if cfg.train.gradient_checkpointing:  # each decoder layer keeps its input only, recomputed in the backward
        enable = getattr(model, "activation_checkpointing_enable", None)  # its name from transformers 5.2x
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = make_optimizer(cfg, model.parameters(), ds_config)
    if fused:
        model = FusedHeadModel(model)
        head = model.model.get_output_embeddings()
        for param in (head.weight, getattr(head, "bias", None)):
            if param is not None:
                deepspeed.zero.register_external_parameter(model, param)
    warmup = cfg.train.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / (warmup + 1)))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                      config=ds_config)
    ref_engine, ref_head = None, None
    if cfg.needs_reference() and not cfg.reference_cached():
        ref_model = load_zero3_model(cfg, inference_ds_config(ds_config), cfg.model.reference_path or cfg.model.path)
        ref_model.requires_grad_(False)
        if fused:
            head = ref_model.get_output_embeddings()
            params = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
            with deepspeed.zero.GatheredParameters(params):  # collective, read-only
                ref_head = tuple(p.detach().clone() for p in params)
            ref_model = FusedHeadModel(ref_model)
        ref_engine = frozen_engine(ref_model, ds_config)
    return engine, ref_engine, ref_head


def _partition_sizes(engine) -> dict:
    params = list(engine.module.parameters())
    return {"local_numel": int(sum(p.ds_tensor.numel() for p in params)),
            "total_numel": int(sum(p.ds_numel for p in params))}


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
    """Runs in every Ray Train worker process."""
    import ray.train

    cfg = UnlearnConfig.model_validate(config["cfg"])
    if not cfg.train.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
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
                   **_partition_sizes(engine)}
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
                record = evaluator.run(step + 1, model, lambda path, meta: _export_hf(cfg, engine, rank, path, meta),
                                       wandb_run)
            # Every rank reports (a Ray Train report is collective); rank 0's carries the metrics,
            # which reach Ray Tune through the sweep's callback (ASHA stops trials on them).
            ray.train.report({"step": step + 1, "eval": True,
                              **{k: v for k, v in record.items() if isinstance(v, (int, float))}})
        if every and (step + 1) % every == 0 and step + 1 < cfg.train.steps:
            _report_checkpoint(cfg, engine, step + 1, metrics)

    _export_hf(cfg, engine, rank, run_dir / "model", {"method": cfg.run_name, "source_model": cfg.model.path,
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


def _export_hf(cfg: UnlearnConfig, engine, rank: int, path: Path, metadata: dict) -> str | None:
    """Consolidate the ZeRO-3 shards (a collective) and write an HF-format model to `path` from
    rank 0, with `metadata` and the weights fingerprint in its dipo_scale.json. Returns the
    fingerprint on rank 0 (None elsewhere)."""
    from transformers import AutoTokenizer

    from dipo_scale.files import weights_fingerprint

    state_dict = hf_state_dict(engine)  # every rank must call it
    if rank != 0:
        return None
    for name, tensor in state_dict.items():  # never export a diverged model
        if not torch.isfinite(tensor).all():
            raise UserInputError(f"unlearn: {name} holds non-finite values; no model is exported to {path}")
    with atomic_dir(path, "unlearn") as tmp:
        hf_model(engine).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code
                                      ).save_pretrained(tmp)
        fingerprint = weights_fingerprint(tmp)
        atomic_write_json(tmp / "dipo_scale.json", {**metadata, "weights_fingerprint": fingerprint})
    return fingerprint


# ------------------------------------------------------------------------------------------
# Driver side
# ------------------------------------------------------------------------------------------
def _wandb_credentials() -> bool:
    return bool(os.environ.get("WANDB_API_KEY")) or Path("~/.netrc").expanduser().is_file()


def validate_run(cfg: UnlearnConfig) -> None:
    """Everything that can be checked before workers start, on the driver, in seconds (one-line
    errors, exit 2; dipo_scale/preflight.py): the models, their tokenizer against the prepared
    data, every shard, the DeepSpeed config, the optimizer, the reference cache, evaluation data."""
    from dipo_scale.preflight import check_model, check_prepared, trained_splits

    if not cfg.model.path:
        raise UserInputError("model.path: not set (the model to unlearn)")
    if not cfg.data.prepared_dir:
        raise UserInputError("data.prepared_dir: not set (run `dipo-scale prepare` first)")
    model = check_model(cfg.model.path, "model.path", trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.reference_path and cfg.needs_reference() and not cfg.reference_cached():
        check_model(cfg.model.reference_path, "model.reference_path", trust_remote_code=cfg.model.trust_remote_code,
                    tokenizer=False)
    check_prepared(cfg.data.prepared_dir, model=model, trains_on=trained_splits(cfg))
    load_ds_config(cfg, cfg.train.worker_range[1])  # any size of an elastic group splits a batch the largest can
    if not cfg.train.use_gpu:  # a GPU run's optimizer is checked where its workers run (run_unlearning)
        check_optimizer(cfg)
    if cfg.loss.fused:
        check_fused_head(cfg)
    if cfg.reference_cached():
        from dipo_scale.reference.cache import check_cache

        check_cache(cfg)  # fingerprints, manifest, each shard's size and header (rows: as workers read them)
    if cfg.eval.every:
        from dipo_scale.data.muse import load_muse_dir

        load_muse_dir(cfg.eval.data_dir, need_raw=False)
    if cfg.logging.wandb == "online" and not _wandb_credentials():
        raise UserInputError("logging.wandb=online: no wandb credentials (set WANDB_API_KEY or run `wandb login`), "
                             "or use logging.wandb=offline")


def gpu_memory_bytes() -> int:
    """Total memory of one GPU of the Ray cluster (a task on a GPU node: the driver may have none)."""
    import ray

    def total() -> int:
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory

    return ray.get(ray.remote(num_gpus=1, max_retries=0)(total).remote())


def _check_workers_can_run(cfg: UnlearnConfig) -> None:
    """On the Ray cluster (initialised): enough resources for the workers, and for a GPU run the
    8-bit optimizer on a GPU node (the driver may have none) and the memory plan: a run whose
    estimated per-GPU peak exceeds the cluster's GPUs is refused in one line (`dipo-scale plan`)."""
    import ray

    from dipo_scale.preflight import check_resources

    low = cfg.train.worker_range[0]  # an elastic group starts with its min (and shrunk, holds the largest partitions)
    check_resources(low, use_gpu=cfg.train.use_gpu)
    if not cfg.train.use_gpu:
        return
    if cfg.train.optimizer == "adamw_8bit":
        try:
            ray.get(ray.remote(num_gpus=1, max_retries=0)(check_optimizer).remote(cfg))
        except UserInputError as e:  # a task's error carries its traceback: keep the cause's one line
            raise UserInputError(str(user_error_behind(e))) from None
    from dipo_scale.plan import check_fits

    check_fits(cfg, num_workers=low, gpu_memory_bytes=gpu_memory_bytes())


def _run_started(run_dir: Path) -> bool:
    """Whether a run directory holds progress worth keeping (its config may not change)."""
    log = run_dir / "log.jsonl"
    return (run_dir / "model").is_dir() or (log.is_file() and log.stat().st_size > 0)


def absolute_paths(cfg: UnlearnConfig) -> UnlearnConfig:
    """Local paths made absolute: workers may run in another directory (or on another node)."""
    resolved = lambda p: str(Path(p).resolve()) if p else p  # noqa: E731  (may not exist yet)
    return cfg.model_copy(update={
        "out_dir": str(run_dir_of(cfg)),
        "model": cfg.model.model_copy(update={"path": absolute_if_local(cfg.model.path),
                                              "reference_path": absolute_if_local(cfg.model.reference_path)}),
        "data": cfg.data.model_copy(update={"prepared_dir": absolute_if_local(cfg.data.prepared_dir)}),
        "reference": cfg.reference.model_copy(update={"cache_dir": resolved(cfg.reference.cache_dir)}),
        "eval": cfg.eval.model_copy(update={"data_dir": absolute_if_local(cfg.eval.data_dir)}),
    })


def run_unlearning(cfg: UnlearnConfig, callbacks: list | None = None) -> Path:
    """Run one unlearning job on the Ray cluster (a local one if none is running).

    Re-running the same config with the same out_dir resumes from its last checkpoint (Ray Train
    restores a run by name and storage path); a different config in that out_dir is refused.
    `callbacks`: Ray Train callbacks (the sweep passes one that forwards evaluations to Ray Tune).
    Returns the HF export directory.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    validate_run(cfg)
    inputs = [("model.path", cfg.model.path), ("data.prepared_dir", cfg.data.prepared_dir),
              ("reference.cache_dir", cfg.reference.cache_dir), ("eval.data_dir", cfg.eval.data_dir)]
    check_output_dir(cfg.out_dir, "unlearn", flag="out_dir", inputs=inputs)  # named as the user wrote it
    cfg = absolute_paths(cfg)
    run_dir = Path(cfg.out_dir)
    config = cfg.model_dump(by_alias=True)
    # The same command with another train.num_workers resumes the run; another model at the same
    # path, other data or any other setting is another run (refused once this one has started).
    identity = run_identity(cfg)
    root = checkpoint_root(cfg, identity)
    check_run_dir(run_dir, identity, "unlearn", started=_run_started)
    resumable = checkpoint.complete_checkpoints(root)
    if resumable:  # the one the workers will resume from, verified here
        checkpoint.verify_checkpoint(resumable[-1][1])
    init_ray()
    _check_workers_can_run(cfg)
    with hold_output_dir(run_dir, "unlearn", flag="out_dir"):  # (so are its checkpoints: the folder is named by it)
        claim_run_dir(run_dir, identity, "unlearn", started=_run_started)  # nothing is written before this
        checkpoint.prune_checkpoints(root, cfg.train.keep_checkpoints)
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"cfg": config, "checkpoint_root": str(root)},
            scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                         placement_strategy=cfg.train.placement_strategy,
                                         elastic_resize_monitor_interval_s=cfg.train.resize_check_s),
            torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
            run_config=RunConfig(name=root.name, storage_path=str(root.parent),
                                 failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                                 callbacks=callbacks),
        )
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
