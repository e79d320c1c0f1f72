"""The memory plan: each worker's peak memory, estimated before anything starts.

    plan = plan_memory(cfg, num_workers=16, gpu_memory_bytes=parse_memory("80GiB"))
    print(plan.table())       # `dipo-scale plan --config C [--gpu-memory 80GiB] [--num-workers N]`
    check_fits(cfg, num_workers=16, gpu_memory_bytes=...)   # one-line UserInputError if it cannot fit

From the model's config alone (the model is built on the meta device: no weights are read), the
DeepSpeed config (read with DeepSpeed's own config class, defaults included), the block size, the
micro batch and the world size. Memory is counted in three parts (docs/memory_plan.md derives every
row):

* resident: what stays on the GPU for the whole run. ZeRO-3 partitions of the policy's parameters,
  gradients and optimizer states, the reference engine's parameter partitions, the parameters ZeRO-3
  keeps whole (below `stage3_param_persistence_threshold`), its gradient bucket, a gathered copy of a
  reference LM head (fused online reference, `hidden` cache);
* phases, of which only one runs at a time: the forward/backward of a micro step (ZeRO-3's gathered
  parameters, activations with or without checkpointing, the logits or the fused LM head, the loss
  chunk, the reference's outputs), the optimizer step (the fp32 gradient of one sub-group and AdamW's
  temporaries), and, with `eval.every`, the evaluation's generation (KV cache) and log-prob forward;
* a safety margin: CUDA context, cuBLAS/NCCL workspaces, allocator fragmentation.

The peak is resident + the largest phase + the margin. `MemoryPlan.model_states_bytes` is the
policy's model states at their peak (partitions, plus the larger of the gathered parameters of the
backward and the fp32 gradient of the step): the scope of DeepSpeed's own estimator
(`deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs`), which tests/test_plan.py
compares it with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dipo_scale.config import UnlearnConfig
from dipo_scale.errors import UserInputError

GiB = 1 << 30
MARGIN_FIXED_BYTES = 2 * GiB   # CUDA context (~0.5 GiB), cuBLAS and NCCL workspaces, DeepSpeed's comm buffers
MARGIN_FRACTION = 0.10         # of the rest: the caching allocator's fragmentation
FP32 = 4

_UNITS = {"gib": GiB, "gb": 10 ** 9, "mib": 1 << 20, "mb": 10 ** 6, "tib": 1 << 40, "tb": 10 ** 12}


def parse_memory(text: str, flag: str = "--gpu-memory") -> int:
    """Bytes of a size like "80GiB", "80GB", "81920MiB" or "79.6 GiB" (GiB = 2^30, GB = 10^9)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]+)\s*", str(text))
    unit = match and _UNITS.get(match.group(2).lower())
    if not unit or float(match.group(1)) <= 0:
        raise UserInputError(f"{flag} {text}: expected a size like 80GiB, 80GB or 81920MiB")
    return int(float(match.group(1)) * unit)


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


# ------------------------------------------------------------------------------------------
# The model's shape, from its config alone
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What memory depends on: parameter counts (from the model built on the meta device) and the
    decoder's dimensions (from its config)."""
    model_type: str
    params: int                          # shared (tied) parameters counted once
    param_numels: tuple[int, ...]        # numel of each parameter (shared ones once)
    module_params: tuple[tuple[int, ...], ...]  # numel of each module's own parameters (shared ones in each), in order
    largest_layer: int                   # the module with the most parameters of its own (DeepSpeed's "layer")
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int | None
    config: object = None                # the (text) config, for the evaluation's own per-token costs


def read_model_shape(path: str, *, trust_remote_code: bool = False, flag: str = "model.path") -> ModelShape:
    """The shape of the model at `path` (a local directory, a config.json alone is enough, or a hub
    name in the local Hugging Face cache), without reading any weight."""
    from dipo_scale.preflight import meta_model

    config, model = meta_model(path, flag, trust_remote_code=trust_remote_code)
    module_params = [tuple(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    module_params = [own for own in module_params if own]
    param_numels = tuple(p.numel() for p in model.parameters())  # (shared parameters once)
    text = config.get_text_config()
    hidden, heads = text.hidden_size, text.num_attention_heads
    return ModelShape(
        model_type=str(getattr(text, "model_type", "?")),
        params=sum(param_numels), param_numels=param_numels, module_params=tuple(module_params),
        largest_layer=max(sum(own) for own in module_params),
        hidden=hidden, layers=text.num_hidden_layers, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or hidden // heads,
        intermediate=getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden,
        vocab=text.vocab_size, max_positions=getattr(text, "max_position_embeddings", None), config=text)


# ------------------------------------------------------------------------------------------
# Activations of a Llama-style decoder (docs/memory_plan.md, "Activations")
# ------------------------------------------------------------------------------------------
def layer_activation_bytes(shape: ModelShape, dtype_bytes: int, block_size: int) -> int:
    """Bytes per token one decoder layer keeps for its backward (no checkpointing): the two
    RMSNorms' float32 inputs and their outputs, Q, K, V and the attention output (SDPA's flash /
    memory-efficient kernels keep no T x T matrix, only a float32 log-sum-exp per head), the gated
    MLP's four [I] tensors. K and V count at every query head and the padding mask as a [T, T]
    additive bias per row: what SDPA keeps for a padded batch (without padding, GQA runs on the
    K/V heads and there is no mask, a little less)."""
    a, h = dtype_bytes, shape.hidden
    return (2 * FP32 * h                        # input_layernorm, post_attention_layernorm: float32 inputs
            + a * (4 * h                        # the norms' normalised inputs and outputs
                   + h + 2 * h + h              # Q, K and V (repeated to every head), attention output
                   + 4 * shape.intermediate     # gate, SiLU(gate), up, SiLU(gate) * up
                   + block_size)                # the padding mask as an additive bias
            + FP32 * shape.heads + 2 * FP32)    # attention log-sum-exp, the norms' 1/rms


def trunk_activation_bytes(shape: ModelShape, dtype_bytes: int, block_size: int, checkpointing: bool) -> int:
    """Bytes per token the decoder trunk keeps from its forward to its backward: every layer's
    activations, or with checkpointing each layer's input only; plus the final norm's (float32
    input, normalised input) and the input ids."""
    per_layer = dtype_bytes * shape.hidden if checkpointing else layer_activation_bytes(shape, dtype_bytes, block_size)
    return shape.layers * per_layer + FP32 * shape.hidden + dtype_bytes * shape.hidden + 8 + FP32


# ------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------
RESIDENT = "resident"
FORWARD_BACKWARD = "forward/backward"
STEP = "optimizer step"
GENERATION = "evaluation: generation"
LOGPROBS = "evaluation: log-probs"


@dataclass
class _Row:
    name: str
    bytes: int
    note: str
    phase: str
    advice: str = ""  # what lowers it, for the refusal


@dataclass
class MemoryPlan:
    """Per-GPU (per-worker) memory of a run. `rows` are (name, bytes, note) in table order; the
    peak `total_bytes` is the resident rows + the largest phase + the safety margin."""
    run: str
    num_workers: int
    shape: ModelShape
    header: list[str]
    entries: list[_Row]
    model_states_bytes: int
    gpu_memory_bytes: int | None
    per: str = "per GPU"  # "per worker" for CPU workers

    @property
    def rows(self) -> list[tuple[str, int, str]]:
        return [(r.name, r.bytes, r.note) for r in self.entries] + [
            ("safety margin", self.margin_bytes, _margin_note())]

    @property
    def phases(self) -> dict[str, int]:
        """Bytes of each phase (only one runs at a time)."""
        out: dict[str, int] = {}
        for r in self.entries:
            if r.phase != RESIDENT:
                out[r.phase] = out.get(r.phase, 0) + r.bytes
        return out

    @property
    def peak_phase(self) -> str:
        return max(self.phases.items(), key=lambda kv: kv[1])[0]

    @property
    def resident_bytes(self) -> int:
        return sum(r.bytes for r in self.entries if r.phase == RESIDENT)

    @property
    def margin_bytes(self) -> int:
        return int(MARGIN_FIXED_BYTES + MARGIN_FRACTION * (self.resident_bytes + self.phases[self.peak_phase]))

    @property
    def total_bytes(self) -> int:
        """The peak per GPU: resident + the largest phase + the safety margin."""
        return self.resident_bytes + self.phases[self.peak_phase] + self.margin_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory_bytes is None else self.total_bytes <= self.gpu_memory_bytes

    def refusal(self) -> str | None:
        """The one-line refusal when the plan does not fit (None when it fits or memory is unknown)."""
        if self.fits is not False:
            return None
        candidates = [r for r in self.entries if r.phase in (RESIDENT, self.peak_phase) and r.advice]
        biggest = max(candidates, key=lambda r: r.bytes)
        return (f"plan: {self.run} needs ~{_gib(self.total_bytes)} per GPU ({biggest.name} "
                f"{_gib(biggest.bytes)}) on {_gib(self.gpu_memory_bytes)} GPUs with {self.num_workers} workers; "
                f"{biggest.advice} (dipo-scale plan --config ... prints the table)")

    def table(self) -> str:
        width = max(len(r.name) for r in self.entries) + 4
        lines = list(self.header) + ["", f"{'GiB':>7}  {self.per:<{width}}how"]

        def line(name, n, note, indent=""):
            lines.append(f"{n / GiB:7.2f}  {(indent + name):<{width}}{note}")

        for r in self.entries:
            if r.phase == RESIDENT:
                line(r.name, r.bytes, r.note)
        for phase, total in self.phases.items():
            mark = "  <- peak" if phase == self.peak_phase else ""
            lines.append(f"{total / GiB:7.2f}  {phase}{mark}")
            for r in self.entries:
                if r.phase == phase:
                    line(r.name, r.bytes, r.note, indent="  ")
        line("safety margin", self.margin_bytes, _margin_note())
        lines.append(f"{self.total_bytes / GiB:7.2f}  peak {self.per}: resident + {self.peak_phase} + margin")
        lines.append(f"{self.model_states_bytes / GiB:7.2f}  (of which the policy's model states at their peak, "
                     "DeepSpeed's estimator's scope)")
        if self.gpu_memory_bytes is None:
            lines.append("         fits: unknown (give --gpu-memory, e.g. 80GiB)")
        else:
            spare = self.gpu_memory_bytes - self.total_bytes
            verdict = (f"fits, {_gib(spare)} to spare" if spare >= 0 else f"does NOT fit, {_gib(-spare)} short")
            lines.append(f"{self.gpu_memory_bytes / GiB:7.2f}  GPU memory: {verdict}")
        return "\n".join(lines)


def _margin_note() -> str:
    return (f"{MARGIN_FIXED_BYTES / GiB:g} GiB (CUDA context, workspaces) + {MARGIN_FRACTION:.0%} of the rest "
            "(fragmentation)")


def _block_size(cfg: UnlearnConfig) -> tuple[int, str]:
    """The prepared data's block size when its manifest is there, else `data.block_size`."""
    manifest = Path(cfg.data.prepared_dir) / "manifest.json" if cfg.data.prepared_dir else None
    if manifest is not None and manifest.is_file():
        from dipo_scale.prepare import read_manifest

        return int(read_manifest(cfg.data.prepared_dir)["block_size"]), f"{cfg.data.prepared_dir}'s manifest"
    return cfg.data.block_size, "data.block_size"


def _offloaded(setting) -> bool:
    return setting is not None and str(getattr(setting.device, "value", setting.device)) in ("cpu", "nvme")


def _gathered_suffix(shape: ModelShape, persistent_threshold: int, max_reuse_distance: int) -> int:
    """Parameters ZeRO-3 still holds gathered when the backward starts: after a module's forward it
    releases its parameters unless they are used again within `stage3_max_reuse_distance`
    parameters of the trace, and those of the last modules are: the trace runs to the end and back,
    so module i is next used 2 x (the parameters of the modules after it) later."""
    sizes = [sum(n for n in own if n > persistent_threshold) for own in shape.module_params]
    kept, after = 0, 0
    for size in reversed(sizes):
        if size and 2 * after < max_reuse_distance:
            kept += size
        after += size
    return kept


def plan_memory(cfg: UnlearnConfig, *, num_workers: int, gpu_memory_bytes: int | None = None) -> MemoryPlan:
    """The memory plan of `cfg` on `num_workers` workers (module docstring)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    import torch

    from dipo_scale.losses import auto_chunk_size, head_matmul_dtype, loss_chunk_bytes
    from dipo_scale.engine import load_ds_config

    if num_workers < 1:
        raise UserInputError(f"num_workers {num_workers}: must be at least 1")
    shape = read_model_shape(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    ref_path = cfg.model.reference_path or cfg.model.path
    ref_shape = shape if ref_path == cfg.model.path else read_model_shape(
        ref_path, trust_remote_code=cfg.model.trust_remote_code, flag="model.reference_path")
    ds = load_ds_config(cfg, num_workers)  # the run's own checks: ZeRO stage 3, bf16 vs dtype, batch sizes
    try:  # DeepSpeed's config class: its defaults for every key the file leaves out
        zero = DeepSpeedZeroConfig(**ds.get("zero_optimization", {}))
    except Exception as e:  # pydantic's ValidationError: a key DeepSpeed does not know, a bad value
        raise UserInputError(f"train.ds_config {cfg.ds_config_name}: zero_optimization: "
                             f"{' '.join(str(e).split())[:200]}") from None

    t, loss, N = cfg.train, cfg.loss, num_workers
    a = 2 if cfg.model_dtype == "bfloat16" else 4
    dtype = "bf16" if a == 2 else "fp32"
    torch_dtype = torch.bfloat16 if a == 2 else torch.float32
    device = "cuda" if t.use_gpu else "cpu"
    P, H, V = shape.params, shape.hidden, shape.vocab
    VH = V * H
    block, block_source = _block_size(cfg)
    two_terms = loss.retain != "none"
    rows_per_forward = t.micro_batch_size * (2 if two_terms else 1)
    tokens = rows_per_forward * block
    params_off, optim_off = _offloaded(zero.offload_param), _offloaded(zero.offload_optimizer)
    online = cfg.needs_reference() and not cfg.reference_cached()
    form = cfg.reference.form if cfg.needs_reference() else "none"
    entries: list[_Row] = []

    def row(phase, name, n, note, advice=""):
        entries.append(_Row(name, int(n), note, phase, advice))

    # --- resident ------------------------------------------------------------------------
    more = f"use more workers (train.num_workers, now {N})"
    states_advice = f"{more}, train.optimizer=adamw_8bit or train.ds_config=zero3_offload.json"
    where = lambda off, n: 0 if off else n  # noqa: E731  (offloaded states live in CPU memory)
    off_note = lambda off, note: "offloaded to CPU (ds config)" if off else note  # noqa: E731
    row(RESIDENT, f"policy parameters ({dtype} partition)", where(params_off, a * P / N),
        off_note(params_off, f"{a} B x {P / 1e9:.2f} B params / {N}"), states_advice)
    row(RESIDENT, f"policy gradients ({dtype} partition)", where(optim_off, a * P / N),
        off_note(optim_off, f"{a} B x params / {N}"), states_advice)
    if t.optimizer == "adamw_8bit":
        optim_bytes = FP32 + 2 + 2 * FP32 / 256
        optim_note = "fp32 master + two 8-bit moments (+ a float32 scale per 256)"
    else:
        optim_bytes, optim_note = 3 * FP32, "fp32 master + AdamW's two fp32 moments: 12 B x params"
    row(RESIDENT, "policy optimizer states", where(optim_off, optim_bytes * P / N),
        off_note(optim_off, f"{optim_note} / {N}"), states_advice)
    if online:
        row(RESIDENT, f"reference parameters ({dtype} partition)", where(params_off, a * ref_shape.params / N),
            off_note(params_off, f"frozen second engine: {a} B x {ref_shape.params / 1e9:.2f} B params / {N}"),
            states_advice)
    threshold = zero.param_persistence_threshold
    persistent = a * sum(n for n in shape.param_numels if n <= threshold)
    if online:
        persistent += a * sum(n for n in ref_shape.param_numels if n <= threshold)
    bucket = a * zero.reduce_bucket_size if zero.contiguous_gradients else 0
    row(RESIDENT, "ZeRO-3 whole parameters + gradient bucket", persistent + bucket,
        f"params <= stage3_param_persistence_threshold ({threshold:g}) on every rank; "
        f"reduce_bucket_size {zero.reduce_bucket_size:.3g} x {a} B")
    if form == "hidden" or (online and loss.fused):
        ref_a = a if online else (2 if cfg.reference_dtype == "bfloat16" else 4)
        row(RESIDENT, "reference LM head (whole copy)", ref_a * ref_shape.vocab * ref_shape.hidden,
            "gathered once per worker (fused online reference)" if online else "read from the hidden cache")

    # --- forward/backward of a micro step -------------------------------------------------
    fb = FORWARD_BACKWARD
    suffix = _gathered_suffix(shape, threshold, zero.max_reuse_distance)
    gathered = a * (suffix + zero.prefetch_bucket_size + shape.largest_layer)
    row(fb, "ZeRO-3 gathered parameters", gathered,
        f"last modules within stage3_max_reuse_distance ({suffix / 1e6:.0f} M) + prefetch bucket "
        f"({zero.prefetch_bucket_size / 1e6:.0f} M) + largest layer's gradient ({shape.largest_layer / 1e6:.0f} M), "
        f"x {a} B")
    layer = layer_activation_bytes(shape, a, block)
    kept = trunk_activation_bytes(shape, a, block, t.gradient_checkpointing)
    if t.gradient_checkpointing:
        act = tokens * (kept + 2 * layer)
        act_note = (f"checkpointed: {tokens} tokens x ({shape.layers} layer inputs + 1 layer recomputed "
                    f"+ 1 layer's gradients: {(kept + 2 * layer) / 1024:.0f} KiB)")
        act_advice = f"lower train.micro_batch_size ({t.micro_batch_size}) or data.block_size ({block}), or {more}"
    else:
        act = tokens * (kept + layer)
        act_note = (f"every layer kept: {tokens} tokens x ({shape.layers} layers + 1 layer's gradients: "
                    f"{(kept + layer) / 1024:.0f} KiB)")
        act_advice = (f"set train.gradient_checkpointing=true or lower train.micro_batch_size ({t.micro_batch_size}) "
                      f"/ data.block_size ({block})")
    row(fb, "activations", act, act_note, act_advice)
    # The LM head's matmuls in the losses' own dtype rule: the weight's dtype on GPUs, float32 on CPUs.
    matmul_dtype = head_matmul_dtype(torch.empty(0, dtype=torch_dtype, device="meta"),
                                     torch.empty(0, dtype=torch_dtype, device="meta" if t.use_gpu else "cpu"))
    head_upcast = FP32 * VH if matmul_dtype != torch_dtype else 0  # a float32 copy of a bf16 head (CPU)
    if loss.fused:
        product = a * VH if matmul_dtype != torch.float32 else 0  # each chunk's bf16 [V, H] weight-gradient product
        head = tokens * 3 * a * H + head_upcast + FP32 * VH + product + (a * VH if two_terms else 0)
        row(fb, "fused LM head + loss", head,
            "hidden states and their gradient (3 x H per token), the head's fp32 gradient accumulator"
            + (", a bf16 product" if product else "") + (", a fp32 copy of the head" if head_upcast else "")
            + (", the other term's head gradient" if two_terms else ""),
            f"lower train.micro_batch_size ({t.micro_batch_size}) or {more}")
    else:
        row(fb, f"logits [{rows_per_forward}, {block}, {V}] + gradient", tokens * (3 * a * V + a * H),
            f"logits and up to two full-size gradients ({dtype})", "set loss.fused=true")
    positions = t.micro_batch_size * block  # one loss term's positions
    chunk = min(positions, loss.chunk_size or auto_chunk_size(V, device, torch_dtype))
    row(fb, "loss chunk", loss_chunk_bytes(chunk, V, torch_dtype),
        f"[{chunk}, {V}] temporaries: losses.loss_chunk_bytes (chunk: "
        f"{'loss.chunk_size' if loss.chunk_size else 'losses.auto_chunk_size'})",
        "set loss.chunk_size lower" if loss.chunk_size else "")
    ref_note = f"reference.form={form}"
    if online and loss.fused:
        row(fb, "reference hidden states", tokens * a * H + 3 * head_upcast,
            f"{ref_note}: [{rows_per_forward}, {block}, {H}] {dtype}"
            + (" + 3 fp32 casts of the head (the batch's and its slices' HiddenReference)" if head_upcast else ""),
            "set reference.form=hidden (a cache)")
    elif online:
        row(fb, "reference logits", tokens * a * V, f"{ref_note}: [{rows_per_forward}, {block}, {V}] {dtype}",
            "set loss.fused=true")
    elif form == "hidden":
        ref_a = 2 if cfg.reference_dtype == "bfloat16" else 4
        casts = (1 + (loss.retain == "kl")) if (ref_a == 2 and not t.use_gpu) else 0
        row(fb, "reference hidden rows", tokens * ref_a * H + casts * FP32 * VH,
            f"{ref_note}: cached [{rows_per_forward}, {block}, {H}]"
            + (f" + {casts} fp32 cast(s) of the head" if casts else ""))
    elif form == "topk":
        ref_a = 2 if cfg.reference_dtype == "bfloat16" else 4
        row(fb, "reference top-k rows", tokens * (cfg.reference.k * (ref_a + 8) + FP32),
            f"{ref_note}: k={cfg.reference.k} logits, ids and log-sum-exp per token")

    # --- optimizer step -------------------------------------------------------------------
    sub_group = min(zero.sub_group_size, -(-P // N))
    step_gradient = 0 if optim_off else FP32 * sub_group
    if not optim_off:
        row(STEP, "fp32 gradient of a sub-group", step_gradient,
            f"min(sub_group_size {zero.sub_group_size:.3g}, partition) x 4 B")
        if t.optimizer == "adamw":
            row(STEP, "AdamW temporaries", FP32 * sub_group, "torch's AdamW: sqrt(v) of the sub-group")

    # --- evaluation during training -------------------------------------------------------
    if cfg.eval.every:  # batches sized by the evaluation's own rule (eval/generation.py, "Memory")
        from types import SimpleNamespace

        from dipo_scale.eval.generation import GPU_MEMORY_FRACTION, generation_token_bytes, scoring_token_bytes

        model_like = SimpleNamespace(config=shape.config, dtype=torch_dtype)  # what those functions read
        context = shape.max_positions or block
        worst = cfg.eval.batch_size * context  # texts and prompts are cut only to the model's context
        resident = sum(r.bytes for r in entries if r.phase == RESIDENT)
        budget = (GPU_MEMORY_FRACTION * (gpu_memory_bytes - resident)
                  if gpu_memory_bytes is not None and t.use_gpu else None)
        for phase, name, per_token in ((GENERATION, "KV cache + prefill", generation_token_bytes(model_like)),
                                       (LOGPROBS, "logits + one layer", scoring_token_bytes(model_like))):
            n = worst * per_token
            note = (f"eval.batch_size {cfg.eval.batch_size} x {context} positions (the context) x "
                    f"{per_token / 1024:.0f} KiB (eval/generation.py)")
            if budget is not None and n > budget:
                n, note = budget, f"capped: {GPU_MEMORY_FRACTION:.0%} of the free GPU memory (token_budget)"
            row(phase, "ZeRO-3 gathered parameters", a * (shape.largest_layer + zero.prefetch_bucket_size),
                "largest layer + prefetch bucket")
            row(phase, name, n, note, f"lower eval.batch_size ({cfg.eval.batch_size})")

    # --- the policy's model states at their peak (DeepSpeed's estimator's scope) ----------------
    policy_whole = a * sum(n for n in shape.param_numels if n <= threshold)
    model_states = sum(r.bytes for r in entries[:3]) + policy_whole + bucket + max(gathered, step_gradient)
    header = [
        f"memory plan: {cfg.run_name}, {N} workers{' (GPUs)' if t.use_gpu else ' (CPU workers)'}, {dtype}, ZeRO-3 "
        f"({cfg.ds_config_name})",
        f"model: {cfg.model.path} ({shape.model_type}, {P / 1e9:.2f} B params, largest layer "
        f"{shape.largest_layer / 1e6:.0f} M, {shape.layers} layers, hidden {H}, vocab {V}); reference: {form}",
        f"micro step: {rows_per_forward} rows x {block} tokens ({block_source}; micro batch {t.micro_batch_size}"
        f"{' forget + as many retain' if two_terms else ''}), activation checkpointing "
        f"{'on' if t.gradient_checkpointing else 'off'}, loss {'fused' if loss.fused else 'on full logits'}",
        "rows: docs/memory_plan.md",
    ]
    return MemoryPlan(run=cfg.run_name, num_workers=N, shape=shape, header=header, entries=entries,
                      model_states_bytes=int(model_states), gpu_memory_bytes=gpu_memory_bytes,
                      per="per GPU" if t.use_gpu else "per worker")


def check_fits(cfg: UnlearnConfig, *, num_workers: int, gpu_memory_bytes: int | None) -> MemoryPlan:
    """The plan, or a one-line UserInputError when it does not fit `gpu_memory_bytes` per GPU."""
    plan = plan_memory(cfg, num_workers=num_workers, gpu_memory_bytes=gpu_memory_bytes)
    refusal = plan.refusal()
    if refusal:
        raise UserInputError(refusal)
    return plan
