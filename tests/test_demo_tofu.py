"""`dipo-scale demo` on a TOFU-layout directory: the TOFU protocol in miniature, end to end (real
Ray Train + DeepSpeed workers), the generated TOFU directory, and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import TINY

from dipo_scale import demo
from dipo_scale.cli import main
from dipo_scale.data.tofu import generate_tofu, load_split, load_tofu
from dipo_scale.models import TinyModelSettings

# Long enough blocks for a whole QA pair, and enough epochs for the tiny models to learn them.
TOFU_TINY = {**TINY, "block_size": 96, "epochs": 30}
FAST = ["train.steps=2", "train.global_batch_size=4", "train.micro_batch_size=2",
        "logging.wandb=disabled", "eval.knowmem_max_new_tokens=24"]
MODELS = ["target", "retrain", "dipo"]  # the end-to-end test runs DiPO only (--methods dipo): time


@pytest.fixture(scope="module")
def tofu_dir(tmp_path_factory):
    """4 authors: forget01 = the last one (8 pairs), retain99 = the other three (24 pairs)."""
    return generate_tofu(tmp_path_factory.mktemp("tofu") / "data", num_authors=4, seed=0)


def _demo_args(out, data, *extra):
    overrides = [arg for o in FAST for arg in ("--set", o)]
    return [str(a) for a in ("demo", "--out", out, "--data", data, *extra, *overrides)]


def test_generated_tofu_dir_has_the_tofu_splits(tofu_dir, tmp_path):
    data = load_tofu(tofu_dir, forget="forget01")
    assert (len(data.forget), len(data.retain), len(data.holdout)) == (8, 8, 8)
    assert data.real_authors and data.world_facts and not data.notes
    for item in data.forget + data.retain:
        assert item.paraphrased_answer and len(item.perturbed_answers) == 3
        assert item.answer not in item.perturbed_answers
    retain99 = {it.question for it in load_split(tofu_dir, "retain99")}
    assert len(retain99) == 24
    assert {it.question for it in data.retain} <= retain99  # retain_perturbed: a subset of retain
    assert not retain99 & {it.question for it in load_split(tofu_dir, "forget01")}
    assert not retain99 & {it.question for it in data.holdout}
    again = generate_tofu(tmp_path / "again", num_authors=4, seed=0)
    for path in tofu_dir.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name


def test_tofu_demo_end_to_end(tofu_dir, tmp_path, monkeypatch, ray_cluster, capsys):
    # ray_cluster (conftest): a private local Ray, shut down after this module; the demo uses it
    # instead of starting its own.
    monkeypatch.setattr(demo, "MODEL_SETTINGS", TinyModelSettings(**TOFU_TINY))
    out = tmp_path / "demo"
    args = _demo_args(out, tofu_dir, "--forget", "forget01", "--retain", "retain99", "--retain-limit", "8",
                      "--methods", "dipo", "--attacks", "quantize4")
    assert main(args) == 0, capsys.readouterr().err

    manifest = json.loads((out / "prepared" / "manifest.json").read_text())
    assert manifest["splits"]["forget"]["blocks"] == 8  # one block per forget01 pair
    assert manifest["splits"]["retain"]["blocks"] == 8  # --retain-limit 8
    metrics = json.loads((out / "metrics.json").read_text())["models"]
    assert list(metrics) == MODELS
    # Every model's metrics, computed again from its exported weights on the demo's evaluation data
    # with the demo's settings (the dipo run: eval.knowmem_max_new_tokens=24, batch 32).
    from scipy.stats import hmean, ks_2samp

    from dipo_scale.eval.generation import load_model_and_tokenizer
    from dipo_scale.eval.tofu import evaluate_tofu, tofu_forget_truth_ratios

    data = demo.load_tofu_demo(str(tofu_dir), "forget01", "retain99", 8).eval
    paths = {"target": out / "models" / "target", "retrain": out / "models" / "retrain", "dipo": out / "runs" / "dipo" / "model"}
    loaded = {name: load_model_and_tokenizer(str(path)) for name, path in paths.items()}
    ratios = {name: tofu_forget_truth_ratios(*loaded[name], data, batch_size=32) for name in MODELS}
    for name in MODELS:
        expected = evaluate_tofu(*loaded[name], data, retain_truth_ratios=ratios["retrain"], batch_size=32,
                                 max_new_tokens=24).metrics
        for key, value in expected.items():
            assert metrics[name][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (name, key)
        # forget quality: the KS p-value against the retrain model's forget truth ratios; PrivLeak:
        # relative to the retrain model's MIA AUC; model utility: the harmonic mean of nine components.
        assert metrics[name]["forget_quality"] == pytest.approx(ks_2samp(ratios[name], ratios["retrain"]).pvalue), name
        retrain_auc = metrics["retrain"]["mia_auc"]
        assert metrics[name]["privleak"] == pytest.approx((metrics[name]["mia_auc"] - retrain_auc) / retrain_auc * 100)
        components = [v for k, v in metrics[name].items() if k.startswith(("prob_", "rouge_", "truth_ratio_"))]
        assert len(components) == 9 and metrics[name]["model_utility"] == pytest.approx(hmean(components)), name
    assert metrics["retrain"]["forget_quality"] == 1.0 and metrics["retrain"]["privleak"] == 0.0  # the reference
    assert metrics["target"]["forget_quality"] < 0.5  # it learnt the forget set; retrain did not
    assert metrics["target"]["privleak"] != 0.0
    report = (out / "report.md").read_text()
    assert "Forget quality" in report and "Model utility" in report
    header = next(line for line in report.splitlines() if line.startswith("| model |"))
    assert "_ci" not in header  # intervals in brackets after their value, not columns of their own
    assert all(f"| {name} |" in report for name in MODELS)
    assert "retain99 (8 of 24 QA pairs)" in report
    assert (out / "tradeoff.png").is_file()
    # --attacks quantize4: every model evaluated before and after 4-bit quantization (attacks/<name>/)
    attacked = json.loads((out / "metrics.json").read_text())["attacks"]
    assert list(attacked) == MODELS
    for name in MODELS:
        for key in ("forget_quality", "model_utility", "knowmem_f"):
            after, before = attacked[name][f"{key}@quantize4"], attacked[name][key]
            assert attacked[name][f"{key}@quantize4_recovery"] == pytest.approx(after - before), (name, key)
        assert json.loads((out / "attacks" / name / "metrics.json").read_text()) == attacked[name]
    assert "## Robustness to attacks" in report and (out / "attacks_dipo.png").is_file()
    print(json.dumps({n: {k: round(m[k], 4) for k in demo.TOFU_REPORT_KEYS if k in m}
                      for n, m in metrics.items()}))


def _one_line_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_tofu_demo_bad_input(tofu_dir, tmp_path, capsys):
    data = tmp_path / "tofu"
    shutil.copytree(tofu_dir, data)
    forget = data / "forget01_perturbed.json"
    rows = json.loads(forget.read_text())
    forget.write_text(json.dumps([{k: v for k, v in r.items() if k != "paraphrased_answer"} for r in rows]))
    out = tmp_path / "demo"
    assert main(_demo_args(out, data, "--forget", "forget01", "--retain", "retain99")) == 2
    assert _one_line_error(capsys) == f"error: {forget}: entry 0 is missing key 'paraphrased_answer'"
    assert not (out / "models").exists()

    assert main(_demo_args(out, tofu_dir, "--forget", "forget01", "--retain", "retain98")) == 2
    assert "retain98.json: missing" in _one_line_error(capsys)
    assert main(_demo_args(out, tofu_dir, "--retain-limit", "0")) == 2
    assert "--retain-limit 0: must be >= 1" in _one_line_error(capsys)
    assert main(_demo_args(out, tofu_dir, "--methods", "npo,ga")) == 2
    assert "--methods npo,ga: choose among dipo,npo,ga, dipo included" in _one_line_error(capsys)
    assert main(_demo_args(out, tofu_dir, "--forget", "forget_all")) == 2
    assert "--forget forget_all: not named forgetNN" in _one_line_error(capsys)


def test_tofu_options_need_tofu_data(tmp_path, capsys):
    from dipo_scale.data.corpus import generate_corpus

    muse = generate_corpus(tmp_path / "muse", num_docs=3, seed=0)
    assert main(_demo_args(tmp_path / "demo", muse, "--retain-limit", "5")) == 2
    assert "are for TOFU-layout data" in _one_line_error(capsys)
