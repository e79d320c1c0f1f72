"""The distributed path for real: local Ray, CPU workers, DeepSpeed ZeRO-3 over gloo."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import cpu_stress

from dipo_scale.config import load_unlearn_config
from dipo_scale.eval.in_training import select_evaluation
from dipo_scale.unlearn import batch_schedule, run_unlearning

# Evaluation during unlearning in these tests: the first ECHO_LIMIT items of each set, short answers.
ECHO_LIMIT, ECHO_TOKENS = 4, 8
EVAL_SETTINGS = (f"eval.limit={ECHO_LIMIT}", f"eval.verbmem_max_new_tokens={ECHO_TOKENS}",
                 f"eval.knowmem_max_new_tokens={ECHO_TOKENS}")


def echo_eval_dir(tiny_assets, out: Path) -> Path:
    """A copy of the tiny corpus whose evaluated items (the first ECHO_LIMIT of each set) have the
    target model's own greedy outputs as their answers (KnowMem) and truths (VerbMem): the target
    scores 100 on all three, and an evaluation during unlearning measures how far the model has
    moved from the target's answers (the tiny models' answers to the corpus' questions are mostly
    wrong: on the corpus itself every evaluation scores about 0, and no selection rule has a choice)."""
    from dipo_scale.data.muse import load_muse_dir
    from dipo_scale.data.prompts import knowmem_prompt
    from dipo_scale.eval import generation as gen
    from dipo_scale.eval.muse import cut_answer

    shutil.copytree(tiny_assets["corpus"], out)
    data = load_muse_dir(out)
    model, tokenizer = gen.load_model_and_tokenizer(str(tiny_assets["target"]))

    def generate(prompts):
        return gen.greedy_generate(model, tokenizer, prompts, max_new_tokens=ECHO_TOKENS)

    for name, qa, icl in (("forget_qa", data.forget_qa, data.forget_qa_icl),
                          ("retain_qa", data.retain_qa, data.retain_qa_icl)):
        answers = [cut_answer(a) for a in generate([knowmem_prompt(icl, x.question) for x in qa])]
        rows = [{"question": x.question, "answer": a} for x, a in zip(qa, answers) if a.strip()][:ECHO_LIMIT]
        assert len(rows) == ECHO_LIMIT, (name, answers)
        (out / "knowmem" / f"{name}.json").write_text(json.dumps(rows))
    items = data.verbmem[:ECHO_LIMIT]
    truths = generate([x.prompt for x in items])
    (out / "verbmem" / "forget.json").write_text(json.dumps([{"prompt": x.prompt, "gt": t} for x, t in zip(items, truths)]))
    scores = evaluate_on(tiny_assets["target"], out)
    assert scores == {"verbmem_f": 100.0, "knowmem_f": 100.0, "knowmem_r": 100.0}, scores
    return out


def evaluate_on(model_dir, data_dir) -> dict:
    """evaluate_muse of an exported model with the settings of EVAL_SETTINGS."""
    from dipo_scale.data.muse import load_muse_dir
    from dipo_scale.eval import generation as gen
    from dipo_scale.eval.muse import evaluate_muse

    model, tokenizer = gen.load_model_and_tokenizer(str(model_dir))
    return evaluate_muse(model, tokenizer, load_muse_dir(data_dir), limit=ECHO_LIMIT,
                            verbmem_max_new_tokens=ECHO_TOKENS, knowmem_max_new_tokens=ECHO_TOKENS)


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
    """A 2-worker ZeRO-3 DiPO run (evaluation during unlearning and checkpoint selection: the NPO
    and GA runs below), on a loaded machine: two busy processes beside it."""
    tmp_path = tmp_path_factory.mktemp("unlearn")
    with cpu_stress():
        model_dir, log = _run(tiny_assets, tmp_path, "dipo2", *TWO_WORKER_DIPO)
    return tmp_path, model_dir, log


def test_two_worker_zero3_dipo_unlearns_and_exports(two_worker_run):
    from transformers import AutoModelForCausalLM

    tmp_path, model_dir, log = two_worker_run
    ranks = [json.loads((tmp_path / "dipo2" / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    numels = [p.numel() for p in model.parameters()]
    for r in ranks:  # ZeRO-3: each rank holds exactly its partition of every parameter, ceil(n / 2) values
        assert r["world_size"] == 2 and r["total_numel"] == sum(numels)
        assert r["local_numel"] == sum(math.ceil(n / 2) for n in numels)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["loss"] < log[0]["loss"]
    assert log[-1]["forget_nll"] > log[0]["forget_nll"]
    assert log[0]["dipo_margin"] == pytest.approx(0.0, abs=1e-6)  # policy = reference at step 1
    assert log[-1]["dipo_margin"] > 0
    assert (model_dir / "model.safetensors").is_file()
    meta = json.loads((model_dir / "dipo_scale.json").read_text())
    assert meta["method"].startswith("dipo")
    assert list((tmp_path / "dipo2").glob("wandb/offline-run-*")), "wandb offline run missing"
    assert not (tmp_path / "dipo2" / "eval.jsonl").exists()  # eval.every=0: no evaluation


# 1 worker vs 2 workers: NPO and GA below; DiPO in tests/test_cluster.py (the 2 workers on 2 nodes).


def test_fused_lm_head_trains_like_the_logits_path_under_zero3(tiny_assets, two_worker_run, tmp_path):
    """`loss.fused` (the loss from hidden states + the ZeRO-3-gathered LM head, inside the engine's
    forward; the reference from its hidden states + its gathered head) against the same run on the
    logits: same losses step by step, same trained weights. The retain terms on an LMHead:
    tests/losses/test_fused.py."""
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
    from dipo_scale.errors import UserInputError
    from dipo_scale.preflight import validate_run

    model = tmp_path / "softcapped"
    shutil.copytree(tiny_assets["target"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 30.0}))
    cfg = load_unlearn_config(None, [f"model.path={model}", f"data.prepared_dir={tiny_assets['prepared']}",
                                     "loss.fused=true"])
    with pytest.raises(UserInputError, match="loss.fused: .*final_logit_softcapping=30.0"):
        validate_run(cfg)


# --- NPO and GA under 2-worker ZeRO-3; evaluation during unlearning and checkpoint selection -------
# Same global batch and seed, 1 worker vs 2 workers: DeepSpeed averages gradients over ranks and
# gradient accumulation makes up the rest, so the curves agree up to float32 summation order.
ONE_VS_TWO_RTOL = 1e-4


@pytest.fixture(scope="module")
def echo_eval(tiny_assets, tmp_path_factory):
    return echo_eval_dir(tiny_assets, tmp_path_factory.mktemp("echo") / "eval")


def _full_batch(tiny_assets) -> list[str]:
    """Every step's global batch is the whole forget set (the blocks of one epoch), so each step's
    forget loss is measured on the same data and must fall step after step."""
    from dipo_scale.prepare import read_manifest

    blocks = read_manifest(tiny_assets["prepared"])["splits"]["forget"]["blocks"]
    batch = blocks - blocks % 2  # 2 workers × 1 micro batch, or 1 worker × 2
    return [f"train.global_batch_size={batch}", f"train.micro_batch_size={batch // 2}"]


# (method, retain term, selection rule and its threshold). A warm-up keeps the first steps small:
# the first evaluation scores (about) the target's 100 on the echo data and the later ones fall
# towards 0, so each rule has to choose one evaluation among others that it must not pick.
SELECTION_CASES = {
    "npo_klr-muse": ("npo", "kl", ("eval.select=muse", "eval.retrain_knowmem_f=50")),
    "ga_gdr-knowmem_r": ("ga", "gd", ("eval.select=knowmem_r", "eval.forget_target=30")),
}


def _expected_selection(rule: str, evals: list[dict], threshold: float) -> dict:
    """The selection rules spelled out independently of select_evaluation."""
    if rule == "muse":  # the first evaluation whose knowmem_f is at most the retrain model's
        return [e for e in evals if e["knowmem_f"] <= threshold][0]
    reaching = [e for e in evals if e["knowmem_f"] <= threshold]  # the best knowmem_r, earliest on ties
    best = max(e["knowmem_r"] for e in reaching)
    return [e for e in reaching if e["knowmem_r"] == best][0]


def _evaluate_command(model_dir, data_dir, out, num_workers: int) -> dict:
    """`dipo-scale evaluate` of a model with the settings of EVAL_SETTINGS: its metrics and its
    per-item results (items.json)."""
    from dipo_scale.eval import run_evaluation

    metrics = run_evaluation(str(model_dir), str(data_dir), out, limit=ECHO_LIMIT, max_new_tokens=ECHO_TOKENS,
                             num_workers=num_workers)
    return {"metrics": metrics, "items": json.loads((Path(out) / "items.json").read_text())}


def _same_evaluation(a: dict, b: dict) -> None:
    """Two evaluations' per-item results (an eval_items/step<N>.json or an items.json): the same
    generations and ROUGE scores, Min-K% scores within 1e-5."""
    for key in ("verbmem_f", "knowmem_f", "knowmem_r"):
        assert a[key] == b[key], key
    for split in ("forget", "holdout"):
        assert len(a["mia"][split]) == len(b["mia"][split]) > 0
        assert a["mia"][split] == pytest.approx(b["mia"][split], rel=0, abs=1e-5), split


@pytest.mark.parametrize("case", list(SELECTION_CASES))
def test_two_worker_npo_and_ga_match_one_worker_and_select_checkpoints(case, tiny_assets, ray_cluster, echo_eval,
                                                                       tmp_path):
    """NPO (KL retain term, online reference engine) and GA (GD retain term, no reference) under
    ZeRO-3: the forget loss falls at every step, 1 and 2 workers give the same curves, and both
    runs, evaluated after every step inside their engines (2 workers: each rank its share of the
    items), export the checkpoint their selection rule picks. The evaluation during unlearning at
    step N is `dipo-scale evaluate` of the model exported at step N (with 1 and 2 evaluation
    workers: the same generations, Min-K% scores within 1e-5)."""
    from safetensors.torch import load_file

    from dipo_scale.files import weights_fingerprint

    method, retain, select = SELECTION_CASES[case]
    common = (f"method={method}", f"loss.retain={retain}", "train.steps=4", "train.warmup_steps=3",
              "logging.wandb=disabled", "eval.every=1", f"eval.data_dir={echo_eval}", *EVAL_SETTINGS, *select,
              *_full_batch(tiny_assets))
    one_dir, one = _run(tiny_assets, tmp_path, "one", *common, "train.num_workers=1")
    model_dir, two = _run(tiny_assets, tmp_path, "two", *common, "train.num_workers=2")
    run = tmp_path / "two"

    assert [json.loads((run / "ranks" / f"rank{r}.json").read_text())["world_size"] for r in (0, 1)] == [2, 2]
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    forget_loss = [r["forget_loss"] for r in two]
    assert all(b < a for a, b in zip(forget_loss, forget_loss[1:])), forget_loss
    assert two[-1]["loss"] < two[0]["loss"]
    assert two[-1]["forget_nll"] > two[0]["forget_nll"]
    keys = ["loss", "forget_loss", "forget_nll", "retain_loss", "retain_nll"] + (["npo_log_ratio"] if method == "npo" else [])
    assert [r["forget_block_ids"] for r in one] == [r["forget_block_ids"] for r in two]
    for a, b in zip(one, two):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=ONE_VS_TWO_RTOL, abs=1e-6), (key, a["step"])

    rule, threshold = select[0].split("=")[1], float(select[1].split("=")[1])
    metric_keys = ("verbmem_f", "knowmem_f", "knowmem_r", "mia_auc")
    for name, final_dir in (("one", one_dir), ("two", model_dir)):
        out = tmp_path / name
        evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
        assert [e["step"] for e in evals] == [1, 2, 3, 4]
        assert all(set(metric_keys) <= set(e) for e in evals)
        expected = _expected_selection(rule, evals, threshold)
        # The case discriminates: the rule must pick neither the first evaluation nor the last.
        assert expected["step"] not in (evals[0]["step"], evals[-1]["step"]), evals
        assert [e["step"] for e in evals if "weights_fingerprint" in e] == [expected["step"]]
        selected = json.loads((out / "selected_model" / "dipo_scale.json").read_text())
        assert (selected["step"], selected["selection_rule"]) == (expected["step"], rule), evals
        assert {k: selected["metrics"][k] for k in (*metric_keys, "mia_auc_ci")} == \
            {k: expected[k] for k in (*metric_keys, "mia_auc_ci")}
        assert all(e["seconds"] > 0 for e in evals)
        # The export is what was evaluated: its fingerprint is recorded with the evaluation, and
        # `dipo-scale evaluate` of it gives that evaluation, item by item.
        assert selected["weights_fingerprint"] == expected["weights_fingerprint"] == \
            weights_fingerprint(out / "selected_model")
        step_items = json.loads((out / "eval_items" / f"step{expected['step']:07d}.json").read_text())
        command = _evaluate_command(out / "selected_model", echo_eval, tmp_path / f"ev_{name}", 1)
        _same_evaluation(step_items, command["items"])
        assert command["metrics"]["verbmem_f"] == expected["verbmem_f"]
        assert {k: command["metrics"][k] for k in metric_keys[:3]} == {k: expected[k] for k in metric_keys[:3]}
        assert command["metrics"]["mia_auc"] == pytest.approx(expected["mia_auc"], abs=1e-12)
        # The final export is the last evaluation's model, which differs from the selected one.
        last_items = json.loads((out / "eval_items" / f"step{4:07d}.json").read_text())
        _same_evaluation(last_items, _evaluate_command(final_dir, echo_eval, tmp_path / f"ev_{name}_final", 1)["items"])
        assert {k: evals[-1][k] for k in metric_keys[:3]} != {k: expected[k] for k in metric_keys[:3]}
        final, chosen = load_file(final_dir / "model.safetensors"), load_file(out / "selected_model" / "model.safetensors")
        assert any((final[n] != w).any() for n, w in chosen.items())

    # 1 vs 2 evaluation workers (Ray actors) on the same model: the same per-item results.
    two_items = json.loads((run / "eval_items" / f"step{4:07d}.json").read_text())
    _same_evaluation(two_items, _evaluate_command(model_dir, echo_eval, tmp_path / "ev_two_final_2", 2)["items"])


def test_batch_schedule_is_a_deterministic_stream_of_permutations():
    ids = [batch_schedule(10, 4, s, seed=3) for s in range(5)]
    flat = [i for b in ids for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert all(len(b) == 4 for b in ids)
    assert (batch_schedule(10, 4, 2, seed=3) == ids[2]).all()


def test_checkpoint_selection_rules():
    history = [{"step": 10, "knowmem_f": 40, "knowmem_r": 90}, {"step": 20, "knowmem_f": 20, "knowmem_r": 85},
               {"step": 30, "knowmem_f": 10, "knowmem_r": 88}, {"step": 40, "knowmem_f": 5, "knowmem_r": 60}]
    # muse: the first evaluation at or below the retrain model's knowmem_f (not the lowest, not the last)
    assert select_evaluation("muse", history, retrain_knowmem_f=25)["step"] == 20
    assert select_evaluation("muse", history, retrain_knowmem_f=20)["step"] == 20  # "at most"
    assert select_evaluation("muse", history, retrain_knowmem_f=19.9)["step"] == 30
    assert select_evaluation("muse", history, retrain_knowmem_f=1) is None
    assert select_evaluation("muse", history[:1], retrain_knowmem_f=40) is history[0]  # the record itself
    # knowmem_r: the best knowmem_r among evaluations reaching the forget target (step 10's 90 does not)
    assert select_evaluation("knowmem_r", history, forget_target=15)["step"] == 30
    assert select_evaluation("knowmem_r", history, forget_target=20)["step"] == 30
    assert select_evaluation("knowmem_r", history, forget_target=5)["step"] == 40
    assert select_evaluation("knowmem_r", history, forget_target=50)["step"] == 10
    assert select_evaluation("knowmem_r", history, forget_target=4) is None
    tie = [{"step": 1, "knowmem_f": 50, "knowmem_r": 70}, {"step": 2, "knowmem_f": 10, "knowmem_r": 60},
           {"step": 3, "knowmem_f": 5, "knowmem_r": 60}, {"step": 4, "knowmem_f": 0, "knowmem_r": 40}]
    assert select_evaluation("knowmem_r", tie, forget_target=10)["step"] == 2  # the earliest of equals
    assert select_evaluation("none", history) is None


def test_selection_settings_are_validated_together():
    from dipo_scale.errors import UserInputError

    with pytest.raises(UserInputError) as e:
        load_unlearn_config(None, ["eval.select=muse"])
    assert "eval.select=muse needs eval.retrain_knowmem_f" in str(e.value)


def test_an_uneven_global_batch_over_two_workers_trains_like_one(tiny_assets, ray_cluster, tmp_path):
    """A global batch of 5 rows over 2 workers: shares of 3 and 2 rows, 2 micro steps of up to 2
    rows on each rank (the second rank's last one a dummy row of weight 0), with gradient
    checkpointing on. Each row weighs 1/5 in every step's gradient, as on 1 worker (3 micro steps
    of 2, 2 and 1 rows, no checkpointing): the same losses step by step and the same weights."""
    from safetensors.torch import load_file

    common = ("method=dipo", "loss.retain=gd", "train.global_batch_size=5", "train.micro_batch_size=2",
              "train.steps=3", "logging.wandb=disabled")
    one_dir, one = _run(tiny_assets, tmp_path, "one", *common, "train.num_workers=1")
    two_dir, two = _run(tiny_assets, tmp_path, "two", *common, "train.num_workers=2",
                        "train.gradient_checkpointing=true")
    assert [r["world_size"] for r in two] == [2, 2, 2]
    for a, b in zip(one, two):
        assert a["forget_block_ids"] == b["forget_block_ids"] and len(a["forget_block_ids"]) == 5
        for key in ("loss", "forget_loss", "forget_nll", "retain_loss", "retain_nll", "dipo_margin"):
            assert b[key] == pytest.approx(a[key], rel=ONE_VS_TWO_RTOL, abs=1e-6), (key, a["step"])
    start = load_file(tiny_assets["target"] / "model.safetensors")
    one_w, two_w = load_file(one_dir / "model.safetensors"), load_file(two_dir / "model.safetensors")
    largest_update = max((w - start[n]).abs().max().item() for n, w in one_w.items())
    assert largest_update > 1e-4
    worst = max((two_w[n] - w).abs().max().item() for n, w in one_w.items())
    assert worst <= 1e-2 * largest_update, (worst, largest_update)  # Adam amplifies summation-order rounding
