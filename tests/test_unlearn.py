"""The distributed path for real: local Ray, CPU workers, DeepSpeed ZeRO-3 over gloo."""

from __future__ import annotations

import json

import pytest

from dipo_scale.config import load_unlearn_config
from dipo_scale.unlearn import batch_schedule, run_unlearning, select_evaluation


def _run(tiny_assets, tmp_path, name, *overrides):
    cfg = load_unlearn_config(None, [
        f"model.path={tiny_assets['target']}", f"data.prepared_dir={tiny_assets['prepared']}",
        f"out_dir={tmp_path / name}", "train.global_batch_size=4", "train.micro_batch_size=2",
        "train.lr=2e-3", "train.steps=6", *overrides])
    model_dir = run_unlearning(cfg)
    log = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    return model_dir, log


# DiPO with the online reference (a second ZeRO-3 engine), forget term only.
TWO_WORKER_DIPO = ("method=dipo", "loss.retain=none", "train.num_workers=2", "dipo.alpha=3.0")


@pytest.fixture(scope="module")
def two_worker_run(tiny_assets, ray_cluster, tmp_path_factory):
    """A 2-worker ZeRO-3 DiPO run with evaluation during unlearning and MUSE's checkpoint selection."""
    tmp_path = tmp_path_factory.mktemp("unlearn")
    model_dir, log = _run(tiny_assets, tmp_path, "dipo2", *TWO_WORKER_DIPO,
                          "eval.every=3", f"eval.data_dir={tiny_assets['corpus']}", "eval.limit=2",
                          "eval.verbmem_max_new_tokens=8", "eval.knowmem_max_new_tokens=8",
                          "eval.select=muse", "eval.retrain_knowmem_f=100")
    return tmp_path, model_dir, log


def test_two_worker_zero3_dipo_unlearns_and_exports(two_worker_run):
    from transformers import AutoModelForCausalLM

    tmp_path, model_dir, log = two_worker_run
    ranks = [json.loads((tmp_path / "dipo2" / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:  # ZeRO-3: each rank holds only its partition of the parameters
        assert r["world_size"] == 2
        assert 0 < r["local_numel"] < r["total_numel"]
    assert sum(r["local_numel"] for r in ranks) >= ranks[0]["total_numel"]
    assert len(log) == 6
    assert log[-1]["loss"] < log[0]["loss"]
    assert log[-1]["forget_nll"] > log[0]["forget_nll"]
    assert log[-1]["dipo_margin"] > 0
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert (model_dir / "model.safetensors").is_file()
    assert sum(p.numel() for p in model.parameters()) == ranks[0]["total_numel"]
    meta = json.loads((model_dir / "dipo_scale.json").read_text())
    assert meta["method"].startswith("dipo")
    assert list((tmp_path / "dipo2").glob("wandb/offline-run-*")), "wandb offline run missing"
    evals = [json.loads(line) for line in (tmp_path / "dipo2" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [3, 6]
    assert all(0 <= e[k] <= 100 for e in evals for k in ("verbmem_f", "knowmem_f", "knowmem_r"))
    selected = json.loads((tmp_path / "dipo2" / "selected_model" / "dipo_scale.json").read_text())
    assert selected["step"] == 3 and selected["selection_rule"] == "muse"  # first with knowmem_f <= 100
    AutoModelForCausalLM.from_pretrained(tmp_path / "dipo2" / "selected_model")


# 1 worker vs 2 workers give the same loss curve: tests/test_cluster.py (the 2 workers on 2 nodes).


def test_fused_lm_head_trains_like_the_logits_path_under_zero3(tiny_assets, two_worker_run, tmp_path):
    """`loss.fused` (the loss from hidden states + the ZeRO-3-gathered LM head, inside the engine's
    forward; the reference from its hidden states + its gathered head) against the same run on the
    logits: same losses step by step, same trained weights. (Evaluation during the logits run does
    not touch training.) The retain terms on an LMHead: tests/losses/test_fused.py."""
    import torch
    from safetensors.torch import load_file

    _, plain_dir, plain_log = two_worker_run
    fused_dir, fused_log = _run(tiny_assets, tmp_path, "fused", *TWO_WORKER_DIPO, "loss.fused=true",
                                "loss.chunk_size=16", "logging.wandb=disabled")
    plain, fused = load_file(plain_dir / "model.safetensors"), load_file(fused_dir / "model.safetensors")
    assert len(fused_log) == len(plain_log)
    for a, b in zip(plain_log, fused_log):
        for key in ("loss", "forget_loss", "forget_nll", "dipo_margin"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a["step"])
    assert plain.keys() == fused.keys()
    start = load_file(tiny_assets["target"] / "model.safetensors")
    largest_update = max((w - start[n]).abs().max().item() for n, w in plain.items())
    assert largest_update > 1e-4  # it trained
    for name, weight in plain.items():  # updates agree to 1% of the largest (Adam amplifies rounding a bit)
        assert torch.allclose(fused[name], weight, rtol=0, atol=1e-2 * largest_update), name


def test_fused_refuses_models_that_transform_their_logits(tiny_assets, tmp_path):
    import shutil

    from dipo_scale.errors import UserInputError
    from dipo_scale.unlearn import validate_run

    model = tmp_path / "softcapped"
    shutil.copytree(tiny_assets["target"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 30.0}))
    cfg = load_unlearn_config(None, [f"model.path={model}", f"data.prepared_dir={tiny_assets['prepared']}",
                                     "loss.fused=true"])
    with pytest.raises(UserInputError, match="loss.fused: .*final_logit_softcapping=30.0"):
        validate_run(cfg)


def test_batch_schedule_is_a_deterministic_stream_of_permutations():
    ids = [batch_schedule(10, 4, s, seed=3) for s in range(5)]
    flat = [i for b in ids for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert all(len(b) == 4 for b in ids)
    assert (batch_schedule(10, 4, 2, seed=3) == ids[2]).all()


def test_checkpoint_selection_rules():
    history = [{"step": 10, "knowmem_f": 40, "knowmem_r": 90}, {"step": 20, "knowmem_f": 20, "knowmem_r": 85},
               {"step": 30, "knowmem_f": 10, "knowmem_r": 88}, {"step": 40, "knowmem_f": 5, "knowmem_r": 60}]
    assert select_evaluation("muse", history, retrain_knowmem_f=25)["step"] == 20
    assert select_evaluation("muse", history, retrain_knowmem_f=1) is None
    assert select_evaluation("knowmem_r", history, forget_target=15)["step"] == 30
    assert select_evaluation("knowmem_r", history, forget_target=50)["step"] == 10
    assert select_evaluation("none", history) is None


def test_selection_settings_are_validated_together():
    from dipo_scale.errors import UserInputError

    with pytest.raises(UserInputError) as e:
        load_unlearn_config(None, ["eval.select=muse"])
    assert "eval.select=muse needs eval.retrain_knowmem_f" in str(e.value)
