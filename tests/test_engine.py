"""The training worker's engine path in one process (a 1-rank gloo group, DeepSpeed ZeRO-3 on CPU):
gradient checkpointing really recomputes the layers, uneven shares weight rows right, and the
collectives' device discipline (what a GPU run's nccl group would refuse)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

ENGINE_SCRIPT = r"""
import json, os, sys
import numpy as np, torch
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
import torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1)
from dipo_scale.config import load_unlearn_config
from dipo_scale.prepare import BlockReader
from dipo_scale.engine import hf_model, init_engines, load_ds_config
from dipo_scale.unlearn import micro_step

out = {}
for checkpointing in (False, True):
    cfg = load_unlearn_config(None, [f"model.path={sys.argv[1]}", f"data.prepared_dir={sys.argv[2]}",
                                     "method=ga", "loss.retain=gd", "train.micro_batch_size=2",
                                     f"train.gradient_checkpointing={str(checkpointing).lower()}"])
    torch.manual_seed(0)
    engine, _, _ = init_engines(cfg, load_ds_config(cfg, 1))
    # the attention inside the layer (transformers may checkpoint the layer's forward, inside its
    # hooks; the recomputation stops early once the backward has what it needs, before the MLP)
    attention = hf_model(engine).model.layers[0].self_attn
    calls = []
    attention.register_forward_hook(lambda *a: calls.append(1))
    rows = {k: np.concatenate([BlockReader(sys.argv[2], s).read(np.arange(2))[k] for s in ("forget", "retain")])
            for k in ("input_ids", "labels", "attention_mask")}
    batch = {k: torch.as_tensor(v) for k, v in rows.items()}
    record = micro_step(cfg, engine, None, batch, n_forget=2)
    # The same rows at loss_scale 0 (a dummy row's weight): the logged values are the unscaled ones.
    zero = micro_step(cfg, engine, None, batch, n_forget=2, loss_scale=0.0)
    out[str(checkpointing)] = {"layer_calls": len(calls), "record": record, "zero": zero}
print("RESULT " + json.dumps(out))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gradient_checkpointing_recomputes_each_layer_in_the_backward(tiny_assets):
    """`train.gradient_checkpointing`: the engine's decoder layers run twice per micro step (forward,
    then recomputed in the backward) and the step's values are those without it. (HF checkpoints
    in training mode only; `from_pretrained` leaves eval mode, which `micro_step` switches.)"""
    proc = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, str(tiny_assets["target"]),
                           str(tiny_assets["prepared"]), str(_free_port())], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    plain, checkpointed = result["False"], result["True"]
    assert plain["layer_calls"] == 2  # two micro steps, one forward each
    assert checkpointed["layer_calls"] == 4  # each forward recomputed in its backward
    for key, value in plain["record"].items():
        assert checkpointed["record"][key] == pytest.approx(value, rel=1e-6), key
    assert plain["zero"]["loss"] != 0 and plain["zero"]["loss"] == pytest.approx(plain["zero"]["loss"])


def test_rank_rows_split_any_global_batch_and_weight_rows_equally():
    """Any world size up to the global batch splits it (shares differ by at most one); the loss
    scales of `train_worker` make every row weigh 1/G in the step's gradient."""
    from dipo_scale.engine import accumulation_steps
    from dipo_scale.unlearn import rank_rows

    for G in (1, 5, 8, 17, 720):
        for W in range(1, min(G, 20) + 1):
            shares = [rank_rows(G, W, r) for r in range(W)]
            assert shares[0].start == 0 and shares[-1].stop == G
            assert all(a.stop == b.start for a, b in zip(shares, shares[1:]))
            sizes = [s.stop - s.start for s in shares]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
            for micro in (1, 2, 3, 4):
                A = accumulation_steps(G, W, micro)
                assert A * micro >= max(sizes) > (A - 1) * micro
                # gradient = 1/(W·A) Σ_ranks Σ_micro scale·mean(rows), scale = n·W·A/G: Σ weights = 1
                weight = 0.0
                for size in sizes:
                    for m in range(A):
                        n = min((m + 1) * micro, size) - min(m * micro, size)
                        weight += (n * W * A / G) / (W * A)
                assert weight == pytest.approx(1.0)


def test_elastic_ranges_need_only_a_row_per_worker(tiny_assets):
    """[8, 16] workers used to need a global batch that every size in the range divides (a multiple
    of 720,720 × micro); now any global batch of at least `max` rows is accepted, and fewer rows than
    workers is refused in one line."""
    from dipo_scale.config import load_unlearn_config
    from dipo_scale.errors import UserInputError
    from dipo_scale.engine import load_ds_config

    cfg = load_unlearn_config(None, ["train.num_workers=[8,16]", "train.max_failures=3",
                                     "train.global_batch_size=32", "train.micro_batch_size=4"])
    for world in range(8, 17):
        ds = load_ds_config(cfg, world)
        assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    small = cfg.model_copy(update={"train": cfg.train.model_copy(update={"global_batch_size": 12})})
    with pytest.raises(UserInputError, match="train.global_batch_size: 12 is smaller than the 16 workers"):
        load_ds_config(small, 16)


def test_gpu_runs_refuse_a_deepspeed_precision_that_disagrees_with_the_model(tmp_path):
    from dipo_scale.config import load_unlearn_config
    from dipo_scale.errors import UserInputError
    from dipo_scale.engine import load_ds_config

    gpu = load_unlearn_config(None, ["train.use_gpu=true"])
    assert gpu.model_dtype == "bfloat16" and gpu.ds_config_name == "zero3_bf16.json"
    assert load_ds_config(gpu, 2)["bf16"]["enabled"]
    cpu = load_unlearn_config(None, [])
    assert cpu.model_dtype == "float32" and cpu.ds_config_name == "zero3_cpu.json" and cpu.reference_dtype == "float32"
    with pytest.raises(UserInputError, match="zero3_cpu.json has bf16 off but the model trains in bfloat16"):
        load_ds_config(load_unlearn_config(None, ["train.use_gpu=true", "train.ds_config=zero3_cpu.json"]), 2)
    explicit = load_unlearn_config(None, ["train.use_gpu=true", "train.ds_config=zero3_cpu.json", "model.dtype=float32"])
    assert not load_ds_config(explicit, 2)["bf16"]["enabled"]  # asked for: fp32 on GPUs


# --- collectives -------------------------------------------------------------------------------------
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "barrier",
               "gather_object", "broadcast_object_list", "all_gather_object", "scatter_object_list"}


def test_no_module_but_collectives_calls_a_collective():
    """Every collective of the package goes through dipo_scale/collectives.py, where tensors are
    checked against the engine's device (a CPU tensor on a GPU run's nccl group crashed step 1)."""
    offenders = []
    for path in sorted((REPO / "dipo_scale").rglob("*.py")):
        if path.name == "collectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and \
                    isinstance(node.value, ast.Name) and node.value.id == "dist":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} dist.{node.attr}")
    assert not offenders, offenders


def test_a_cpu_tensor_is_refused_on_an_nccl_group_before_the_collective(monkeypatch):
    import torch
    import torch.distributed as dist

    from dipo_scale import collectives

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cuda:nccl")
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: calls.append(t.device))
    with pytest.raises(RuntimeError, match=r"collective on a cpu tensor: .* serves \['cuda'\]"):
        collectives.sum_over_ranks({"loss": 1.0}, "cpu")
    assert calls == []
    with pytest.raises(RuntimeError, match="the engine's device is cuda:0"):
        collectives.check_collective_device(torch.zeros(1), torch.device("cuda", 0))
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cpu:gloo,cuda:gloo")
    assert collectives.sum_over_ranks({"b": 2.0, "a": 1.0}, "cpu") == {"a": 1.0, "b": 2.0}
    assert calls == [torch.device("cpu")]
    assert collectives.backend_device_types() == {"cpu", "cuda"}


def test_the_offload_config_steps_with_deepspeeds_cpu_adam():
    """zero3_offload.json keeps the optimizer on the CPU: make_optimizer then builds DeepSpeed's
    multi-threaded CPU Adam (torch's AdamW stepped a whole partition on one core); the GPU and CPU
    configs keep torch's AdamW. (The class is chosen from the config; building it JIT-compiles an op.)"""
    import json as _json

    from dipo_scale.config import DS_CONFIG_DIR
    from dipo_scale.engine import offloads_optimizer

    chosen = {name: offloads_optimizer(_json.loads((DS_CONFIG_DIR / name).read_text()))
              for name in ("zero3_offload.json", "zero3_bf16.json", "zero3_cpu.json")}
    assert chosen == {"zero3_offload.json": True, "zero3_bf16.json": False, "zero3_cpu.json": False}
    assert not offloads_optimizer(None)
