"""The memory planner (dipo_scale/plan.py, `dipo-scale plan`): its model-states figure against
DeepSpeed's own estimator, its activation formula against what autograd really keeps, and the
GPU recipe (configs/gpu_7b.yaml) fitting 80 GB with checkpointing and refused without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dipo_scale.cli import main
from dipo_scale.config import load_unlearn_config
from dipo_scale.errors import UserInputError
from dipo_scale.plan import (GiB, ModelShape, check_fits, layer_activation_bytes, parse_memory, plan_memory,
                             read_model_shape, trunk_activation_bytes)

REPO = Path(__file__).resolve().parent.parent
GPU_7B = str(REPO / "configs" / "gpu_7b.yaml")
SHAPES = REPO / "configs" / "model_shapes"
# Parameter counts published with the models (Meta's model cards / the HF checkpoints' sizes).
PUBLISHED_PARAMS = {"llama-2-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248, "llama-2-70b": 68_976_648_192}


def _gpu_config(shape: str, *overrides: str):
    return load_unlearn_config(GPU_7B, [f"model.path={SHAPES / shape}", *overrides])


def test_parse_memory():
    assert parse_memory("80GiB") == 80 * GiB
    assert parse_memory("80 GB") == 80 * 10 ** 9
    assert parse_memory("81920MiB") == 80 * GiB
    assert parse_memory("79.5gib") == int(79.5 * GiB)
    for bad in ("80", "eighty GiB", "0GiB", "80 GiBs", "-1GB"):
        with pytest.raises(UserInputError, match=r"^--gpu-memory .*expected a size like 80GiB"):
            parse_memory(bad)


@pytest.mark.parametrize("shape", ["llama-2-7b", "llama-3-8b", "llama-2-70b"])
def test_model_states_agree_with_deepspeeds_estimator(shape):
    """The policy's model states (ZeRO-3 partitions of parameters, gradients and AdamW states, plus
    the larger of the backward's gathered parameters and the step's fp32 gradient) within 10 % of
    `estimate_zero3_model_states_mem_needs` (the figure `..._all_cold` prints for offload none,
    zero_init=1) on one and two 8-GPU nodes. The parameter counts, from the model built on the
    meta device, are the published ones."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cfg = _gpu_config(shape, "method=ga", "loss.retain=none")  # the policy alone: no reference engine
    for nodes in (1, 2):
        plan = plan_memory(cfg, num_workers=8 * nodes)
        assert plan.shape.params == PUBLISHED_PARAMS[shape]
        _, deepspeed_gpu, _ = estimate_zero3_model_states_mem_needs(
            plan.shape.params, plan.shape.largest_layer, num_gpus_per_node=8, num_nodes=nodes,
            cpu_offload=False, cpu_offload_params=False, zero_init=True)
        ratio = plan.model_states_bytes / deepspeed_gpu
        print(f"{shape} {8 * nodes} GPUs: plan {plan.model_states_bytes / GiB:.2f} GiB, "
              f"DeepSpeed {deepspeed_gpu / GiB:.2f} GiB ({ratio - 1:+.1%})")
        assert abs(ratio - 1) <= 0.10, (shape, nodes, ratio)


def _saved_bytes_per_token(num_layers: int, *, checkpointing: bool, padded: bool, kv_heads: int = 2,
                           block: int = 96):
    """Bytes of every tensor autograd keeps for the backward of a tiny bf16 Llama trunk (SDPA), per
    token: each storage counted once, parameters left out."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=kv_heads,
                         num_hidden_layers=num_layers, vocab_size=500, max_position_embeddings=256,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(torch.bfloat16).train()
    if checkpointing:  # as engine.init_engines enables it
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows = 2
    ids = torch.randint(0, 500, (rows, block))
    mask = torch.ones(rows, block, dtype=torch.long)
    if padded:
        mask[1, -17:] = 0
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    return sum(saved.values()) / (rows * block), _shape_of(config)


def _shape_of(config):
    """The planner's view of a config (its dimensions; the parameter counts are not needed here)."""
    return ModelShape(model_type="llama", params=0, param_numels=(), module_params=(), largest_layer=0, hidden=config.hidden_size,
                      layers=config.num_hidden_layers, heads=config.num_attention_heads,
                      kv_heads=config.num_key_value_heads, head_dim=config.hidden_size // config.num_attention_heads,
                      intermediate=config.intermediate_size, vocab=config.vocab_size,
                      max_positions=config.max_position_embeddings)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_formula_is_what_autograd_keeps(checkpointing):
    """`trunk_activation_bytes` (docs/memory_plan.md, "Activations") against the tensors autograd
    really saves in a bf16 Llama trunk with SDPA: within 3 % for a padded batch with grouped-query
    attention (what the formula describes), and at most the formula without padding."""
    block = 96
    for layers in (2, 3):
        measured, shape = _saved_bytes_per_token(layers, checkpointing=checkpointing, padded=True, block=block)
        planned = trunk_activation_bytes(shape, 2, block, checkpointing)
        assert abs(measured / planned - 1) <= 0.03, (layers, measured, planned)
        unpadded, _ = _saved_bytes_per_token(layers, checkpointing=checkpointing, padded=False, block=block)
        assert unpadded <= planned * 1.01 and unpadded >= 0.8 * planned, (layers, unpadded, planned)
    # one layer more adds one layer's activations (or, checkpointed, its input)
    two, shape = _saved_bytes_per_token(2, checkpointing=checkpointing, padded=True, block=block)
    three, _ = _saved_bytes_per_token(3, checkpointing=checkpointing, padded=True, block=block)
    per_layer = 2 * shape.hidden if checkpointing else layer_activation_bytes(shape, 2, block)
    assert three - two == pytest.approx(per_layer, rel=0.02)


def test_gpu_7b_fits_80gb_and_is_refused_without_checkpointing(capsys):
    """configs/gpu_7b.yaml (Llama-2-7B shape, 16 workers, block 2048) fits 80 GB GPUs; the same run
    without activation checkpointing is refused in one line naming the figure and the fix."""
    shape = ["--set", f"model.path={SHAPES / 'llama-2-7b'}"]
    assert main(["plan", "--config", GPU_7B, *shape, "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "16 workers" in out and "2048 tokens" in out and "checkpointing on" in out
    assert "fits," in out and "does NOT fit" not in out

    off = [*shape, "--set", "train.gradient_checkpointing=false"]
    assert main(["plan", "--config", GPU_7B, *off, "--gpu-memory", "80GB"]) == 2
    captured = capsys.readouterr()
    assert "does NOT fit" in captured.out
    error = captured.err.strip()
    assert error.count("\n") == 0 and error.startswith("error: plan: ")
    assert "per GPU (activations" in error and "set train.gradient_checkpointing=true" in error

    cfg = _gpu_config("llama-2-7b", "train.gradient_checkpointing=false")
    with pytest.raises(UserInputError, match=r"needs ~\d+\.\d GiB per GPU \(activations \d+\.\d GiB\) on 74\.5 GiB"):
        check_fits(cfg, num_workers=16, gpu_memory_bytes=parse_memory("80GB"))
    on = check_fits(_gpu_config("llama-2-7b"), num_workers=16, gpu_memory_bytes=parse_memory("80GB"))
    assert on.fits and on.total_bytes < parse_memory("80GB")
    # checkpointing is what makes the difference: the activations shrink more than 5-fold
    activations = {r[0]: r[1] for r in on.rows}["activations"]
    off_plan = plan_memory(cfg, num_workers=16)
    assert off_plan.fits is None and {r[0]: r[1] for r in off_plan.rows}["activations"] > 5 * activations


def test_states_bound_run_is_refused_with_what_to_change():
    """A 7B run on one GPU: the optimizer states alone exceed 80 GiB; the refusal says so and names
    more workers, the 8-bit optimizer or offloading. Offloading the optimizer (zero3_offload.json)
    moves the gradients and optimizer states off the GPU."""
    cfg = _gpu_config("llama-2-7b", "train.num_workers=1", "train.global_batch_size=4")
    with pytest.raises(UserInputError, match=r"\(policy optimizer states \d+\.\d GiB\).*use more workers"):
        check_fits(cfg, num_workers=1, gpu_memory_bytes=parse_memory("80GiB"))
    offload = plan_memory(load_unlearn_config(GPU_7B, [f"model.path={SHAPES / 'llama-2-7b'}",
                                                        "train.ds_config=zero3_offload.json"]), num_workers=16)
    rows = {r[0]: r[1] for r in offload.rows}
    assert rows["policy optimizer states"] == 0 and rows["policy gradients (bf16 partition)"] == 0
    assert rows["policy parameters (bf16 partition)"] == 0  # offload_param too


def test_evaluation_phase_within_the_evaluations_own_budget():
    """With `eval.every` the plan adds the evaluation's batches at their worst (eval.batch_size x
    the model's context), capped, as eval/generation.py caps them, at half the GPU memory the
    resident rows leave free."""
    cfg = _gpu_config("llama-2-7b", "eval.every=10", "eval.data_dir=/x")
    unknown = plan_memory(cfg, num_workers=16)
    assert unknown.phases["evaluation: generation"] > 32 * GiB  # 16 x 4096 tokens of KV cache
    gpu = parse_memory("80GB")
    capped = plan_memory(cfg, num_workers=16, gpu_memory_bytes=gpu)
    kv = {r[0]: r[1] for r in capped.rows}["KV cache + prefill"]
    assert kv == pytest.approx(0.5 * (gpu - capped.resident_bytes), rel=1e-6)
    assert capped.fits and "capped" in capped.table()


def test_block_size_from_the_prepared_manifest(tmp_path):
    """With a prepared directory the manifest's block size is planned for (data.block_size is only
    the fallback); without one nothing is required of data.prepared_dir."""
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    split = {"blocks": 1, "tokens": 512, "shards": []}
    (prepared / "manifest.json").write_text(json.dumps({
        "block_size": 512, "tokenizer_fingerprint": "x", "data_fingerprint": "y",
        "splits": {"forget": split, "retain": split}}))
    small = plan_memory(_gpu_config("llama-2-7b", f"data.prepared_dir={prepared}"), num_workers=16)
    assert "x 512 tokens" in small.table() and "manifest" in small.table()
    full = plan_memory(_gpu_config("llama-2-7b"), num_workers=16)  # /shared/prepared/news: absent here
    assert "x 2048 tokens (data.block_size" in full.table()
    assert small.total_bytes < full.total_bytes


def test_tied_embeddings_are_counted_once(tmp_path):
    """A model whose LM head is its embedding: one parameter, counted once in the total, and still
    a module of the trace (the head's forward uses it last)."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2,
                vocab_size=1000, tie_word_embeddings=True).save_pretrained(tmp_path)
    shape = read_model_shape(str(tmp_path))
    layer = 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert shape.params == 1000 * 64 + 2 * layer + 64
    assert shape.module_params[-1] == (1000 * 64,) and shape.largest_layer == 1000 * 64


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    base = ["plan", "--config", GPU_7B, "--set", f"model.path={SHAPES / 'llama-2-7b'}"]
    for extra, expected in ((["--gpu-memory", "80"], "--gpu-memory 80: expected a size"),
                            (["--num-workers", "0"], "num_workers 0: must be at least 1"),
                            (["--set", f"model.path={tmp_path / 'nope'}"], "model.path"),
                            (["--set", "train.micro_batch_size=0"], "micro_batch_size")):
        assert main(base + extra) == 2, extra
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and expected in error, (extra, error)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no_such_arch"}')
    assert main(["plan", "--config", GPU_7B, "--set", f"model.path={broken}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "cannot build the model from its config" in error


def test_unlearn_checks_the_plan_on_the_clusters_gpus_before_workers_start(monkeypatch):
    """A GPU run is planned on the driver for the group's smallest size (an elastic group shrunk
    holds the largest partitions) against one GPU's memory as a GPU node reports it, and refused in
    one line when it cannot fit. (No GPU here: the cluster's resources and the GPU's memory are
    stood in for; the rest of the check is the real one.)"""
    from dipo_scale import engine, preflight

    monkeypatch.setattr(preflight, "check_resources", lambda *a, **k: None)
    monkeypatch.setattr(engine, "gpu_memory_bytes", lambda: 80 * 10 ** 9)
    preflight.check_workers_can_run(_gpu_config("llama-2-7b"))  # the recipe fits
    with pytest.raises(UserInputError, match=r"^plan: .* needs ~12\d\.\d GiB per GPU .* with 16 workers; set "
                                             r"train.gradient_checkpointing=true"):
        preflight.check_workers_can_run(_gpu_config("llama-2-7b", "train.gradient_checkpointing=false"))
    # elastic [4, 16]: planned for 4 workers, whose partitions of the 70B shape cannot fit
    with pytest.raises(UserInputError, match=r"with 4 workers"):
        preflight.check_workers_can_run(_gpu_config("llama-2-70b", "train.num_workers=[4,16]"))
