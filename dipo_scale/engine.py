"""The DeepSpeed ZeRO-3 engine under Ray Train: what the training recipe (`unlearn`), the
reference precompute (`reference/`) and the relearn attack share.

- the DeepSpeed config of a run (`load_ds_config`: ds_configs/ with its "auto" values filled),
  the optimizer (`make_optimizer`, `check_optimizer`);
- the models as ZeRO-3 engines: `load_zero3_model` (each rank materialises only its partition),
  `init_engines` (the policy's training engine and the frozen online reference), `frozen_engine`,
  `FusedHeadModel` (`loss.fused`: the loss from the hidden states, no [B, T, V] logits);
- reading them back: `hf_model`, `evaluation_model`, `hf_state_dict`, `export_hf`;
- the Ray Train job that runs a worker function on N ZeRO-3 workers (`torch_trainer`), and the
  cluster's GPU memory (`gpu_memory_bytes`).

It imports nothing of the stages (recipe, reference, evaluation): they import it.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from dipo_scale.config import UnlearnConfig, resolve_ds_config_path
from dipo_scale.errors import UserInputError, first_line
from dipo_scale.files import atomic_dir, atomic_write_json
from dipo_scale.losses import LMHead

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # the config's dtype names


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
        raise UserInputError(f"train.optimizer=adamw_8bit: bitsandbytes cannot run its 8-bit optimizer "
                             f"here ({type(e).__name__}: {first_line(e)}); use train.optimizer=adamw") from None


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
    `preflight.validate_run` refuses models that rescale or softcap their logits.
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


def use_accelerator(use_gpu: bool) -> None:
    """DeepSpeed's accelerator for this worker process: its CUDA one on GPUs, else the CPU one
    (DS_ACCELERATOR=cpu). Called before deepspeed is imported: it picks its accelerator then."""
    if not use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"


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
    return AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[cfg.model_dtype],
                                                trust_remote_code=cfg.model.trust_remote_code)


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


def partition_sizes(engine) -> dict:
    params = list(engine.module.parameters())
    return {"local_numel": int(sum(p.ds_tensor.numel() for p in params)),
            "total_numel": int(sum(p.ds_numel for p in params))}


def export_hf(cfg: UnlearnConfig, engine, rank: int, path: Path, metadata: dict) -> str | None:
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


def gpu_memory_bytes() -> int:
    """Total memory of one GPU of the Ray cluster (a task on a GPU node: the driver may have none)."""
    import ray

    def total() -> int:
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory

    return ray.get(ray.remote(num_gpus=1, max_retries=0)(total).remote())


def torch_trainer(worker, config: dict, *, num_workers: int | tuple[int, int], use_gpu: bool, name: str,
                  storage_path: str | Path, resources_per_worker: dict | None = None,
                  placement_strategy: str = "PACK", resize_check_s: float | None = None, max_failures: int = 0,
                  keep_checkpoints: int | None = None, callbacks: list | None = None):
    """The Ray Train job running `worker(config)` on `num_workers` workers (a [min, max] range:
    elastic), each in the process group DeepSpeed adopts (`init_distributed`: nccl on GPUs, else
    gloo); its records (and checkpoints) under `storage_path`/`name`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    scaling = {"num_workers": num_workers, "use_gpu": use_gpu, "placement_strategy": placement_strategy}
    if resources_per_worker is not None:
        scaling["resources_per_worker"] = resources_per_worker
    if resize_check_s is not None:
        scaling["elastic_resize_monitor_interval_s"] = resize_check_s
    return TorchTrainer(
        worker, train_loop_config=config, scaling_config=ScalingConfig(**scaling),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(storage_path),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
                             callbacks=callbacks))
