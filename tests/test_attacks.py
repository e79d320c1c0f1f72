"""Tests for dipo_scale.eval.attacks: the quantization and relearning attacks, their metrics keys,
and the relearned slice kept out of the evaluation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dipo_scale.cli import main
from dipo_scale.config import RelearnConfig
from dipo_scale.data.muse import load_muse_dir
from dipo_scale.data.tofu import generate_tofu, load_tofu
from dipo_scale.errors import UserInputError
from dipo_scale.eval.attacks import (ATTACKS, attack_keys, check_quantization, parse_attacks, split_metrics,
                                     split_relearn)
from dipo_scale.eval.generation import load_model_and_tokenizer


def test_parse_attacks():
    assert parse_attacks("quantize,relearn", "--kind") == ["quantize8", "quantize4", "relearn"]
    assert parse_attacks(" relearn , quantize4", "--kind") == ["quantize4", "relearn"]
    for bad in ("quantise", "", "quantize,,foo"):
        with pytest.raises(UserInputError, match="--kind"):
            parse_attacks(bad, "--kind")


def test_attack_keys_recovery_is_after_minus_before():
    before = {"knowmem_f": 10.0, "mia_auc": 0.6, "mia_auc_ci": [0.5, 0.7], "privleak": 20.0}
    after = {"quantize4": {"knowmem_f": 35.5, "mia_auc": 0.8, "mia_auc_ci": [0.7, 0.9]},
             "relearn": {"knowmem_f": 12.0, "privleak": 5.0, "extra": 1.0}}
    keys = attack_keys(before, after)
    assert keys["knowmem_f@quantize4"] == 35.5 and keys["knowmem_f@quantize4_recovery"] == 25.5
    assert keys["mia_auc@quantize4_recovery"] == pytest.approx(0.2)
    assert keys["mia_auc@quantize4_ci"] == [0.7, 0.9] and "mia_auc_ci@quantize4" not in keys
    assert keys["privleak@relearn_recovery"] == -15.0
    assert "extra@relearn" in keys and "extra@relearn_recovery" not in keys  # no before value
    plain, attacked = split_metrics({**before, **keys})
    assert plain == before
    assert attacked["quantize4"]["knowmem_f"] == (35.5, 25.5)
    assert attacked["relearn"]["privleak"] == (5.0, -15.0)


def test_quantized_models_load_and_run_on_cpu(tiny_assets):
    """bitsandbytes' 8-bit and 4-bit NF4 Llama layers load and run on this machine's CPU; the logits
    stay close to the float32 model's."""
    path = str(tiny_assets["target"])
    full, tokenizer = load_model_and_tokenizer(path)
    ids = tokenizer("The committee met on Monday to discuss the report.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = full(ids).logits
    for bits, layer in (("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")):
        check_quantization(f"quantize{bits[0]}", "cpu")
        model, _ = load_model_and_tokenizer(path, quantize=bits)
        assert type(model.model.layers[0].mlp.down_proj).__name__ == layer
        with torch.no_grad():
            logits = model(ids).logits
        assert not torch.equal(logits, reference)  # quantized: not the same weights
        # a quantized model predicts mostly the same next tokens
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        assert agree >= 0.8, (bits, agree)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no CUDA backend exists")
def test_quantization_backend_that_cannot_is_one_line():
    with pytest.raises(UserInputError) as err:
        check_quantization("quantize4", "cuda")
    message = str(err.value)
    assert message.startswith("quantize4: bitsandbytes cannot run 4bit layers on cuda here") and "\n" not in message


def _normalised(text: str) -> str:
    return " ".join(text.split()).casefold()


def test_relearn_slice_is_kept_out_of_the_muse_evaluation(tiny_assets):
    data = load_muse_dir(tiny_assets["corpus"])
    split = split_relearn(data, RelearnConfig(fraction=0.25, seed=3))
    relearned = split.record["relearned"]["forget_docs"]
    evaluated = split.record["evaluated"]
    assert len(relearned) == round(0.25 * len(data.forget_docs)) and not set(relearned) & set(evaluated["forget_docs"])
    assert sorted(relearned + evaluated["forget_docs"]) == list(range(len(data.forget_docs)))
    assert split.train.forget_docs == [data.forget_docs[i] for i in relearned] and not split.train.retain_docs
    slice_docs = [_normalised(d) for d in split.train.forget_docs]
    for item in split.evaluate.verbmem:
        assert not any(_normalised(item.prompt) in d for d in slice_docs)
    for qa in split.evaluate.forget_qa:
        assert not any(_normalised(qa.answer) in d for d in slice_docs)
    for text in split.evaluate.privleak_forget:
        assert not any(_normalised(text) in d or d in _normalised(text) for d in slice_docs)
    assert len(split.evaluate.verbmem) == len(evaluated["verbmem"]) < len(data.verbmem)
    assert split.evaluate.retain_qa == data.retain_qa  # the retain side is untouched
    again = split_relearn(data, RelearnConfig(fraction=0.25, seed=3))
    assert again.record == split.record  # seeded


def test_relearn_slice_tofu_and_related_set(tmp_path):
    data = load_tofu(generate_tofu(tmp_path / "tofu", num_authors=4, seed=0), forget="forget10")
    split = split_relearn(data, RelearnConfig(fraction=0.5))
    ids, rest = split.record["relearned"]["forget"], split.record["evaluated"]["forget"]
    assert not set(ids) & set(rest) and sorted(ids + rest) == list(range(len(data.forget)))
    assert [qa.question for qa in split.train.forget_qa] == [data.forget[i].question for i in ids]
    assert [it.question for it in split.evaluate.forget] == [data.forget[i].question for i in rest]
    assert split.with_qa
    related = tmp_path / "related.txt"
    related.write_text("One related story.\n\nAnother one.\n")
    split = split_relearn(data, RelearnConfig(data=str(related)))
    assert split.train.forget_docs == ["One related story.", "Another one."] and split.evaluate is data
    with pytest.raises(UserInputError, match="two or more"):
        split_relearn(replace(data, forget=data.forget[:1]), RelearnConfig())


def test_relearn_runs_on_gpus_where_the_cluster_has_them(monkeypatch):
    """relearn.use_gpu auto (the default): GPU workers with zero3_bf16.json where the Ray cluster has
    GPUs, CPU workers with zero3_cpu.json where it has none; explicit settings are kept. Fewer GPUs
    than relearning workers is a one-line error before any model loads."""
    from dipo_scale.eval import workers
    from dipo_scale.eval.attacks import check_relearn, relearn_config

    assert RelearnConfig().use_gpu == "auto"
    for gpus, use_gpu, ds_config in ((8.0, True, "zero3_bf16.json"), (0.0, False, "zero3_cpu.json")):
        monkeypatch.setattr(workers, "cluster_gpus", lambda: gpus)
        ucfg = relearn_config(RelearnConfig(), "m", Path("out"))
        assert (ucfg.train.use_gpu, ucfg.ds_config_name, ucfg.model_dtype) == (
            use_gpu, ds_config, "bfloat16" if use_gpu else "float32")
    assert relearn_config(RelearnConfig(use_gpu=False), "m", Path("out")).train.use_gpu is False  # (0 GPUs here)
    monkeypatch.setattr(workers, "cluster_gpus", lambda: 8.0)
    assert relearn_config(RelearnConfig(use_gpu=False), "m", Path("out")).train.use_gpu is False
    monkeypatch.setattr(workers, "cluster_gpus", lambda: 1.0)
    with pytest.raises(UserInputError, match=r"relearn.num_workers=2: .* needs 2 GPUs but the Ray cluster has 1; "
                                             r"set relearn.num_workers=1"):
        check_relearn(RelearnConfig())
    monkeypatch.setattr(workers, "cluster_gpus", lambda: 0.0)
    with pytest.raises(UserInputError, match="relearn.use_gpu=true: the Ray cluster has no GPU"):
        check_relearn(RelearnConfig(use_gpu=True))


def test_attack_end_to_end_quantize_and_relearn(tiny_assets, ray_cluster, tmp_path):
    """`dipo-scale attack --kind quantize,relearn` on the memorised target: every criterion after
    each attack and its recovery (after - before), the relearning run under 2-worker ZeRO-3 trained
    on the slice's documents only, and no evaluated item from the slice."""
    out = tmp_path / "attack"
    rc = main(["attack", "--model", str(tiny_assets["target"]), "--data", str(tiny_assets["corpus"]),
               "--out", str(out), "--retrain-model", str(tiny_assets["retrain"]), "--kind", "quantize,relearn",
               "--max-new-tokens", "8", "--set", "relearn.steps=3", "--set", "relearn.lr=1e-3",
               "--set", "relearn.fraction=0.25", "--set", "relearn.block_size=64"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    criteria = ("verbmem_f", "knowmem_f", "knowmem_r", "mia_auc", "privleak")
    for attack in ATTACKS:
        for key in criteria:
            after, recovery = metrics[f"{key}@{attack}"], metrics[f"{key}@{attack}_recovery"]
            assert recovery == pytest.approx(after - metrics[key], abs=1e-9), (attack, key)
        assert len(metrics[f"mia_auc@{attack}_ci"]) == 2
    # The relearning run: 2 ZeRO-3 workers, method relearn, 3 steps, its forget NLL falling.
    run = out / "relearn" / "run"
    ranks = [json.loads(p.read_text()) for p in sorted((run / "ranks").glob("rank*.json"))]
    assert [r["world_size"] for r in ranks] == [2, 2] and all(r["local_numel"] < r["total_numel"] for r in ranks)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and log[-1]["forget_nll"] < log[0]["forget_nll"]
    # Trained on the slice's documents, evaluated on the rest (by ids and by text).
    data = load_muse_dir(tiny_assets["corpus"])
    record = json.loads((out / "relearn" / "slice.json").read_text())
    relearned, evaluated = record["relearned"]["forget_docs"], record["evaluated"]
    assert relearned and not set(relearned) & set(evaluated["forget_docs"])
    from transformers import AutoTokenizer

    from dipo_scale.prepare import read_blocks

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    blocks = read_blocks(out / "relearn" / "prepared", "forget")
    trained = _normalised(" ".join(tokenizer.decode(row, skip_special_tokens=True) for row in blocks["input_ids"]))
    for i, doc in enumerate(data.forget_docs):
        assert (_normalised(doc)[:60] in trained) == (i in relearned), i
    items = json.loads((out / "items.json").read_text())
    assert len(items["verbmem_f"]["outputs"]) == len(evaluated["verbmem"])
    assert len(items["knowmem_f"]["outputs"]) == len(evaluated["knowmem_f"])
    for i in evaluated["verbmem"]:
        assert not any(_normalised(data.verbmem[i].prompt) in _normalised(data.forget_docs[j]) for j in relearned)
    report = (out / "report.md").read_text()
    assert "## Robustness to attacks" in report and (out / "attacks_target.png").is_file()


def test_attack_bad_input(tiny_assets, tmp_path, capsys):
    base = ["attack", "--model", str(tiny_assets["target"]), "--data", str(tiny_assets["corpus"])]
    cases = [
        (["--out", str(tmp_path / "a"), "--kind", "quantise"], "--kind quantise: unknown attack 'quantise'"),
        (["--out", str(tmp_path / "b"), "--kind", "quantize", "--set", "relearn.steps=3"],
         "--config / --set set the relearning attack"),
        (["--out", str(tmp_path / "c"), "--kind", "relearn", "--set", "relearn.fraction=1.5"],
         "relearn.fraction: must be in (0, 1)"),
        (["--out", str(tmp_path / "d"), "--kind", "relearn", "--set", "relearn.data=/no/such.txt"],
         "relearn.data /no/such.txt: no such file"),
        (["--out", str(tmp_path / "e"), "--kind", "quantize", "--device", "cuda"], "--device cuda"),
    ]
    for args, expected in cases:
        assert main(base + args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "\n" not in err, (args, err)
        assert not Path(args[1]).exists(), args  # nothing written
