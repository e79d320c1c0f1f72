"""PrivLeak (Min-K% Prob, AUC) and TOFU metrics (truth ratio, forget quality, model utility),
the report, and `dipo-scale evaluate` on TOFU data: hand-computed values and a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import hmean, ks_2samp
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dipo_scale.data.prompts import tofu_prompt
from dipo_scale.eval import generation as gen
from dipo_scale.eval import privacy, tofu
from dipo_scale.models import train_tokenizer
from dipo_scale.cli import main
from dipo_scale.data.tofu import TofuData, TofuItem, load_tofu
from dipo_scale.report import write_report

CORPUS = [
    "Question: Who is A?\nAnswer: A writer.\n\n",
    "Question: Where does A live?\nAnswer: In Paris.\n\n",
    "Question: Who wrote Hamlet?\nAnswer: Shakespeare\n\n",
    "The cat sat on the mat while the dog slept by the door.",
    "Once upon a time there was a quiet village near the river.",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(CORPUS * 4, 300)  # the byte-level BPE the demo models use


def _tiny_model(tokenizer, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=0.5)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    return _tiny_model(tokenizer, seed=0)


def _saved(path: Path, model, tokenizer) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, tokenizer) -> Path:
    return _saved(tmp_path_factory.mktemp("tiny_model"), model, tokenizer)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory, tokenizer) -> Path:
    """Another tiny model as the retain (retrained) model: unlike the model itself as its own
    reference (forget quality 1 and PrivLeak 0 by construction), its forget truth ratios are
    separated from the model's and its MIA AUC differs (seed 5; the tests check both)."""
    return _saved(tmp_path_factory.mktemp("reference_model"), _tiny_model(tokenizer, seed=5), tokenizer)


# --- Min-K% Prob, AUC, PrivLeak --------------------------------------------------------------------
def test_min_k_percent_hand_computed():
    logprobs = torch.tensor([
        [-1.0, -5.0, -2.0, -3.0, -0.5],  # n=5: floor(2.0)=2 lowest: -5, -3 -> -4
        [-2.0, -1.0, -7.0, -99.0, -99.0],  # n=3 (padding -99 masked): floor(1.2)=1 -> -7
        [-0.3, -99.0, -99.0, -99.0, -99.0],  # n=1: floor(0.4)=0 -> at least one token -> -0.3
    ])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    assert privacy.min_k_percent(logprobs, mask).tolist() == pytest.approx([-4.0, -7.0, -0.3])
    assert privacy.min_k_percent(logprobs, mask, k=1.0).tolist() == pytest.approx([-2.3, -10 / 3, -0.3])
    assert privacy.min_k_percent(logprobs, mask, k=0.2).tolist() == pytest.approx([-5.0, -7.0, -0.3])
    # 10 tokens, K = 40%: the 4 lowest of -1..-10 are -10..-7 -> -8.5.
    ten = -torch.arange(1.0, 11.0)[torch.randperm(10)].unsqueeze(0)
    assert privacy.min_k_percent(ten, torch.ones_like(ten)).item() == pytest.approx(-8.5)
    assert privacy.min_k_from_lists([torch.tensor([-1.0, -5.0, -2.0, -3.0, -0.5]), torch.tensor([-0.3])]) == \
        pytest.approx([-4.0, -0.3])
    with pytest.raises(ValueError):
        privacy.min_k_percent(logprobs, mask, k=0.0)
    with pytest.raises(ValueError):
        privacy.min_k_percent(logprobs, torch.zeros_like(mask))


def test_auc_and_privleak_hand_computed(monkeypatch):
    # Pairs (member, non-member): 0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1 -> 3/4.
    assert privacy.auc_from_scores([0.9, 0.4], [0.5, 0.1]) == pytest.approx(0.75)
    assert privacy.auc_from_scores([0.5], [0.5]) == pytest.approx(0.5)  # a tie counts 1/2
    assert privacy.auc_from_scores([0.0], [1.0]) == 0.0
    with pytest.raises(ValueError):
        privacy.auc_from_scores([], [0.1])

    scores = {"f1": 0.9, "f2": 0.4, "h1": 0.5, "h2": 0.1}
    monkeypatch.setattr(privacy, "min_k_scores", lambda m, t, texts, **kw: [scores[x] for x in texts])
    assert privacy.mia_auc(None, None, ["f1", "f2"], ["h1", "h2"]) == pytest.approx(0.75)  # forget = label 1

    assert privacy.privleak(0.75, 0.5) == pytest.approx(50.0)
    assert privacy.privleak(0.4, 0.5) == pytest.approx(-20.0)
    assert privacy.privleak(0.5, 0.5) == 0.0
    with pytest.raises(ValueError):
        privacy.privleak(0.5, 0.0)


def _manual_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return torch.stack([logp[t - 1, ids[t]] for t in range(1, len(ids))])


def test_min_k_scores_batched_equal_one_by_one(model, tokenizer):
    texts = ["The cat sat on the mat.", "Once upon a time there was a quiet village near the river.", "A dog"]
    batched = privacy.min_k_scores(model, tokenizer, texts, batch_size=2)
    for text, score in zip(texts, batched):
        lp = _manual_logprobs(model, gen.encode_prompt(tokenizer, text))
        lowest = lp.sort().values[: max(1, int(len(lp) * 0.4))]
        assert score == pytest.approx(lowest.mean().item(), abs=1e-4)
    # Texts longer than the context are cut to it.
    long = " ".join(CORPUS * 8)
    assert len(gen.encode_prompt(tokenizer, long)) > 128
    assert len(gen.text_token_logprobs(model, tokenizer, [long])[0]) == 127


def test_qa_logprobs_score_the_answer_tokens_only(model, tokenizer):
    pairs = [("Who is A?", "A writer."), ("Where does A live?", "In Paris, near the river.")]
    got = gen.qa_logprobs(model, tokenizer, pairs, batch_size=2)
    for (q, a), value in zip(pairs, got):
        prompt = gen.encode_prompt(tokenizer, tofu_prompt(q))
        answer = tokenizer(a, add_special_tokens=False)["input_ids"]
        lp = _manual_logprobs(model, prompt + answer)[len(prompt) - 1 :]
        assert len(lp) == len(answer)
        assert value == pytest.approx(lp.mean().item(), abs=1e-4)
    with pytest.raises(ValueError):
        gen.qa_logprobs(model, tokenizer, [("Q?", "")])


# --- TOFU formulas ---------------------------------------------------------------------------------
def test_truth_ratio_probability_and_scores_hand_computed():
    log = math.log
    # Geometric mean of 0.25 and 0.0625 is 0.125; over the paraphrase's 0.5 -> 0.25.
    assert tofu.truth_ratios([log(0.5)], [[log(0.25), log(0.0625)]]).tolist() == pytest.approx([0.25])
    assert tofu.truth_ratios([log(0.2), log(0.5)], [[log(0.4)], [log(0.5)]]).tolist() == pytest.approx([2.0, 1.0])
    assert tofu.truth_ratio_score([0.25, 2.0]) == pytest.approx((0.75 + 0.0) / 2)  # max(0, 1 - R)
    assert tofu.truth_ratio_score([0.25, 2.0], forget=True) == pytest.approx((0.25 + 0.5) / 2)  # min(R, 1/R)
    assert tofu.tofu_probability([log(0.5), log(0.2)]) == pytest.approx(0.35)
    # Normalised: 0.5 / (0.5 + 0.25 + 0.25) and 0.2 / (0.2 + 0.2).
    assert tofu.tofu_probability([log(0.5), log(0.2)], [[log(0.25), log(0.25)], [log(0.2)]]) == pytest.approx(0.5)


def test_forget_quality_is_the_ks_p_value():
    a = [0.31, 0.52, 0.77, 0.12, 0.95, 0.44]
    b = [0.61, 0.83, 0.29, 1.42, 0.72]
    assert tofu.forget_quality(a, b) == pytest.approx(ks_2samp(a, b).pvalue)
    # Fully separated samples of 3 and 3: D = 1, exact p = 2 / C(6, 3) = 0.1.
    assert tofu.forget_quality([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)
    assert tofu.forget_quality(a, a) == pytest.approx(1.0)
    # TOFU tests 1/R; the KS p-value is the same.
    assert tofu.forget_quality(1 / np.array(a), 1 / np.array(b)) == pytest.approx(tofu.forget_quality(a, b))


def test_model_utility_is_the_harmonic_mean():
    assert tofu.model_utility([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)  # 3 / (1 + 2 + 4)
    assert tofu.model_utility([0.5] * 9) == pytest.approx(0.5)
    assert tofu.model_utility([0.0, 1.0]) == 0.0
    nine = [0.6, 1.0, 0.5, 0.5, 1.0, 0.5, 0.8, 1.0, 0.75]
    assert tofu.model_utility(nine) == pytest.approx(9 / sum(1 / x for x in nine))
    with pytest.raises(ValueError):
        tofu.model_utility([])


def _tofu_data(holdout=None) -> TofuData:
    return TofuData(
        source="mini", forget_name="forget01",
        forget=[TofuItem("Who is A?", "A writer.", "An author.", ["A baker.", "A pilot."]),
                TofuItem("Where does A live?", "In Paris.", "Paris.", ["In Rome."])],
        retain=[TofuItem("Who is B?", "A poet.", "A versifier.", ["A cook.", "A nurse."])],
        real_authors=[TofuItem("Who wrote Hamlet?", "Shakespeare", None, ["Dickens", "Austen"])],
        world_facts=[TofuItem("Capital of France?", "Paris", None, ["Rome"])],
        holdout=holdout,
    )


def test_evaluate_tofu_on_constructed_probabilities(monkeypatch):
    probs = {
        ("Who is A?", "A writer."): 0.5, ("Who is A?", "An author."): 0.5,
        ("Who is A?", "A baker."): 0.25, ("Who is A?", "A pilot."): 0.0625,  # R = 0.125 / 0.5 = 0.25
        ("Where does A live?", "In Paris."): 0.8, ("Where does A live?", "Paris."): 0.2,
        ("Where does A live?", "In Rome."): 0.4,  # R = 2
        ("Who is B?", "A poet."): 0.6, ("Who is B?", "A versifier."): 0.5,
        ("Who is B?", "A cook."): 0.25, ("Who is B?", "A nurse."): 0.25,  # R = 0.5
        ("Who wrote Hamlet?", "Shakespeare"): 0.5, ("Who wrote Hamlet?", "Dickens"): 0.25,
        ("Who wrote Hamlet?", "Austen"): 0.25,  # prob 0.5 / 1.0, R = 0.25 / 0.5
        ("Capital of France?", "Paris"): 0.4, ("Capital of France?", "Rome"): 0.1,  # prob 0.8, R = 0.25
    }
    replies = {tofu_prompt("Who is A?"): " A writer.", tofu_prompt("Where does A live?"): "Rome",
               tofu_prompt("Who is B?"): "A poet.", tofu_prompt("Who wrote Hamlet?"): "Shakespeare",
               tofu_prompt("Capital of France?"): "Paris"}
    monkeypatch.setattr(tofu, "qa_logprobs", lambda m, t, pairs, **kw: [math.log(probs[p]) for p in pairs])
    monkeypatch.setattr(tofu, "greedy_generate", lambda m, t, prompts, **kw: [replies[p] for p in prompts])

    # The retain model's ratios [3, 4] against the forget set's [0.25, 2]: fully separated samples
    # of 2 and 2, D = 1, exact p = 2 / C(4, 2) = 1/3 (the same ratios would give 1).
    result = tofu.evaluate_tofu(None, None, _tofu_data(), retain_truth_ratios=[3.0, 4.0])
    m = result.metrics
    assert result.forget_truth_ratios == pytest.approx([0.25, 2.0])
    assert m["forget_truth_ratio"] == pytest.approx(0.375)
    assert m["forget_prob"] == pytest.approx(0.65)
    assert m["forget_quality"] == pytest.approx(1 / 3)
    assert tofu.evaluate_tofu(None, None, _tofu_data(), retain_truth_ratios=[1.0, 3.0]).metrics["forget_quality"] == \
        pytest.approx(ks_2samp([0.25, 2.0], [1.0, 3.0]).pvalue)  # interleaved: D = 1/2
    assert m["knowmem_f"] == pytest.approx(50.0)  # ROUGE-L recall 1 and 0
    assert m["knowmem_r"] == pytest.approx(100.0)
    components = {"prob_retain": 0.6, "rouge_retain": 1.0, "truth_ratio_retain": 0.5,
                  "prob_real_authors": 0.5, "rouge_real_authors": 1.0, "truth_ratio_real_authors": 0.5,
                  "prob_world_facts": 0.8, "rouge_world_facts": 1.0, "truth_ratio_world_facts": 0.75}
    for key, value in components.items():
        assert m[key] == pytest.approx(value), key
    assert m["model_utility"] == pytest.approx(hmean(list(components.values())))
    assert "mia_auc" not in m

    # The retain model's ratios alone (the reference) and no utility without the three sets.
    assert tofu.tofu_forget_truth_ratios(None, None, _tofu_data()) == pytest.approx([0.25, 2.0])
    data = _tofu_data()
    data.world_facts = None
    m = tofu.evaluate_tofu(None, None, data).metrics
    assert "model_utility" not in m and "forget_quality" not in m and "prob_world_facts" not in m


def test_tofu_mia_auc_on_answer_tokens(monkeypatch):
    lps = {("Who is A?", "A writer."): [-0.1, -0.2, -3.0], ("Where does A live?", "In Paris."): [-0.5, -0.4],
           ("Who is Z?", "Nobody."): [-2.0, -2.5], ("Who is Y?", "Someone."): [-0.3, -0.45]}
    monkeypatch.setattr(tofu, "qa_token_logprobs",
                        lambda m, t, pairs, **kw: [torch.tensor(lps[p]) for p in pairs])
    data = _tofu_data(holdout=[TofuItem("Who is Z?", "Nobody."), TofuItem("Who is Y?", "Someone.")])
    # Min-40%: forget -3.0, -0.5; holdout -2.5, -0.45 -> pairs won: (-3 vs -2.5: no), (-3 vs -0.45: no),
    # (-0.5 vs -2.5: yes), (-0.5 vs -0.45: no) -> 1/4.
    assert tofu.tofu_mia_auc(None, None, data) == pytest.approx(0.25)


HOLDOUT = [TofuItem("Who is Z?", "Nobody."), TofuItem("Who is Y?", "Someone.")]


def _tofu_by_hand(model, tokenizer, data, max_new_tokens) -> tuple[dict, list[float]]:
    """TOFU's metrics of `model` on `data`, one question at a time, from the model's log-probs and
    greedy answers (the formulas of locuslab/tofu, written out here), and its forget truth ratios."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def lp(question, answer):  # length-normalised log P(answer | question)
        return gen.qa_logprobs(model, tokenizer, [(question, answer)], batch_size=1)[0]

    def ratio(item, base):  # geometric mean of P(perturbed) over P(base), length-normalised
        base_lp = lp(item.question, item.paraphrased_answer if base == "paraphrased" else item.answer)
        return math.exp(np.mean([lp(item.question, p) for p in item.perturbed_answers]) - base_lp)

    def rouge(item):
        out = gen.greedy_generate(model, tokenizer, [tofu_prompt(item.question)], max_new_tokens=max_new_tokens)[0]
        return scorer.score(target=item.answer, prediction=out.strip())["rougeL"].recall

    def min_40(question, answer):
        lps = sorted(gen.qa_token_logprobs(model, tokenizer, [(question, answer)], batch_size=1)[0].tolist())
        return float(np.mean(lps[: max(1, int(len(lps) * 0.4))]))

    forget_ratios = [ratio(it, "paraphrased") for it in data.forget]
    m = {"knowmem_f": 100 * np.mean([rouge(it) for it in data.forget]),
         "forget_prob": np.mean([math.exp(lp(it.question, it.answer)) for it in data.forget]),
         "forget_truth_ratio": np.mean([min(r, 1 / r) for r in forget_ratios])}
    for name, base in (("retain", "paraphrased"), ("real_authors", "answer"), ("world_facts", "answer")):
        items = getattr(data, name)
        probs = [math.exp(lp(it.question, it.answer)) for it in items]
        if name != "retain":  # normalised over the answer and its perturbations
            probs = [p / (p + sum(math.exp(lp(it.question, x)) for x in it.perturbed_answers))
                     for p, it in zip(probs, items)]
        m[f"prob_{name}"] = np.mean(probs)
        m[f"rouge_{name}"] = np.mean([rouge(it) for it in items])
        m[f"truth_ratio_{name}"] = np.mean([max(0.0, 1 - ratio(it, base)) for it in items])
    m["knowmem_r"] = 100 * m["rouge_retain"]
    components = [v for k, v in m.items() if k.startswith(("prob_", "rouge_", "truth_ratio_"))]
    assert len(components) == 9
    m["model_utility"] = 0.0 if min(components) == 0 else len(components) / sum(1 / v for v in components)
    if data.holdout:  # Min-40% of the answer tokens, forget (members) against holdout
        forget = [min_40(it.question, it.answer) for it in data.forget]
        holdout = [min_40(it.question, it.answer) for it in data.holdout]
        m["mia_auc"] = np.mean([(f > h) + 0.5 * (f == h) for f in forget for h in holdout])
    return {k: float(v) for k, v in m.items()}, forget_ratios


def test_evaluate_tofu_on_a_tiny_model(model, tokenizer):
    data = _tofu_data(holdout=HOLDOUT)
    result = tofu.evaluate_tofu(model, tokenizer, data, batch_size=3, max_new_tokens=4)
    expected, ratios = _tofu_by_hand(model, tokenizer, data, max_new_tokens=4)
    assert result.forget_truth_ratios == pytest.approx(ratios, rel=1e-4)
    assert set(expected) <= set(result.metrics)
    for key, value in expected.items():
        assert result.metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-9), key


# --- report ----------------------------------------------------------------------------------------
def test_write_report_table_and_plots(tmp_path):
    metrics = {
        "target": {"verbmem_f": 80.0, "knowmem_f": 60.0, "knowmem_r": 55.0, "mia_auc": 0.9, "privleak": 80.0},
        "dipo": {"verbmem_f": 10.0, "knowmem_f": 12.5, "knowmem_r": 50.0, "mia_auc": 0.52, "privleak": 4.0},
        "retrain (reference)": {"mia_auc": 0.5},
    }
    write_report(tmp_path / "r", metrics, title="MUSE run", notes=["a note"])
    text = (tmp_path / "r" / "report.md").read_text()
    assert text.startswith("# MUSE run\n")
    assert "| model | VerbMem forget ↓ | KnowMem forget ↓ | KnowMem retain ↑ | MIA AUC (Min-40%) | PrivLeak →0 |" in text
    assert "| dipo | 10.00 | 12.50 | 50.00 | 0.5200 | 4.00 |" in text
    assert "| retrain (reference) | – | – | – | 0.5000 | – |" in text
    assert "- a note" in text and "criteria.png" in text and "tradeoff.png" in text
    for png in ("criteria.png", "tradeoff.png"):
        assert (tmp_path / "r" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["criteria.png", "report.md", "tradeoff.png"]

    tofu = {"unlearned": {"knowmem_f": 40.0, "forget_quality": 1e-5, "model_utility": 0.52, "prob_retain": 0.9},
            "retain": {"forget_truth_ratio": 0.6}}
    write_report(tmp_path / "t", tofu, title="TOFU run", notes=[])
    text = (tmp_path / "t" / "report.md").read_text()
    assert "| unlearned | 40.00 | 1.00e-05 | 0.5200 | – | 0.9000 |" in text
    assert "Notes" not in text
    assert (tmp_path / "t" / "tradeoff.png").is_file()


# --- `dipo-scale evaluate` on TOFU data ---------------------------------------------------------------
def _write_tofu_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = _tofu_data()
    rows = lambda items, para: [  # noqa: E731
        {"question": it.question, "answer": it.answer, **({"paraphrased_answer": it.paraphrased_answer} if para else {}),
         "perturbed_answer": it.perturbed_answers} for it in items]
    (root / "forget01_perturbed.json").write_text(json.dumps(rows(data.forget, True)))
    (root / "retain_perturbed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(data.retain, True)))
    (root / "real_authors_perturbed.json").write_text(json.dumps(rows(data.real_authors, False)))
    (root / "world_facts_perturbed.json").write_text(json.dumps(
        [{"prompt": r["question"], "response": r["answer"], "perturbed_answer": r["perturbed_answer"]}
         for r in rows(data.world_facts, False)]))
    (root / "holdout01.json").write_text(json.dumps([{"question": "Who is Z?", "answer": "Nobody."},
                                                     {"question": "Who is Y?", "answer": "Someone."}]))
    return root


def test_cli_evaluate_tofu(tmp_path, model, tokenizer, model_dir, reference_dir, capsys):
    data = _write_tofu_dir(tmp_path / "tofu")
    out = tmp_path / "out"
    args = ["evaluate", "--model", str(model_dir), "--data", str(data), "--out", str(out),
            "--forget", "forget01", "--max-new-tokens", "4", "--batch-size", "4"]
    assert main(args + ["--retain-model", str(reference_dir)]) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics)[:9] == ["knowmem_f", "knowmem_r", "mia_auc", "mia_auc_ci", "privleak", "privleak_ci",
                                 "forget_quality", "forget_quality_ci", "model_utility"]
    expected, ratios = _tofu_by_hand(model, tokenizer, _tofu_data(holdout=HOLDOUT), max_new_tokens=4)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-9), key
    reference, reference_tok = gen.load_model_and_tokenizer(str(reference_dir))
    ref_expected, ref_ratios = _tofu_by_hand(reference, reference_tok, _tofu_data(holdout=HOLDOUT), max_new_tokens=4)
    # Forget quality: the KS p-value against the retain model's ratios; here fully separated
    # samples of 2 and 2 (p = 1/3; the model against itself would give 1).
    assert max(ratios) < min(ref_ratios) or min(ratios) > max(ref_ratios), (ratios, ref_ratios)
    assert metrics["forget_quality"] == pytest.approx(ks_2samp(ratios, ref_ratios).pvalue)
    assert metrics["forget_quality"] == pytest.approx(1 / 3)
    # Its bootstrap interval resamples the forget items, the same items for both models.
    from dipo_scale.eval.tofu import forget_quality_interval

    assert metrics["forget_quality_ci"] == pytest.approx(forget_quality_interval(ratios, ref_ratios))
    # PrivLeak: relative to the retain model's AUC (the model against itself would give 0).
    assert expected["mia_auc"] != ref_expected["mia_auc"]
    assert metrics["privleak"] == pytest.approx((expected["mia_auc"] - ref_expected["mia_auc"]) / ref_expected["mia_auc"] * 100)
    stored = json.loads((out / "truth_ratios.json").read_text())
    assert stored["forget"] == "forget01" and stored["forget_truth_ratios"] == pytest.approx(ratios, rel=1e-4)
    report = (out / "report.md").read_text()
    assert f"| {reference_dir.name} (retain) |" in report and (out / "tradeoff.png").is_file()

    # Stored truth ratios instead of a retain model (here the retain model's, written by hand);
    # a known retrain AUC.
    out2 = tmp_path / "out2"
    args[args.index(str(out))] = str(out2)
    ratios_file = tmp_path / "retain_ratios.json"
    ratios_file.write_text(json.dumps({"forget": "forget01", "forget_truth_ratios": ref_ratios}))
    assert main(args + ["--retain-truth-ratios", str(ratios_file), "--retrain-auc", "0.5"]) == 0
    metrics2 = json.loads((out2 / "metrics.json").read_text())
    assert metrics2["forget_quality"] == pytest.approx(metrics["forget_quality"])
    assert metrics2["privleak"] == pytest.approx((expected["mia_auc"] - 0.5) / 0.5 * 100)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_evaluate_bad_input(tmp_path, model_dir, capsys):
    data = _write_tofu_dir(tmp_path / "tofu")
    out = tmp_path / "out"
    base = ["evaluate", "--model", str(model_dir), "--out", str(out), "--forget", "forget01"]

    bad = data / "forget01_perturbed.json"
    bad.write_text(json.dumps([{"question": "Q?", "answer": "A", "paraphrased_answer": "P"}]))
    assert main(base + ["--data", str(data)]) == 2
    assert _one_line_error(capsys) == f"error: {bad}: entry 0 is missing key 'perturbed_answer'"

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hello")
    assert main(base + ["--data", str(tmp_path / "other")]) == 2
    assert "unknown data layout" in _one_line_error(capsys)

    assert main(base + ["--data", str(tmp_path / "missing")]) == 2
    assert "does not exist" in _one_line_error(capsys)

    data = _write_tofu_dir(tmp_path / "tofu2")
    ratios = tmp_path / "ratios.json"
    ratios.write_text('{"something": [1, 2]}')
    assert main(base + ["--data", str(data), "--retain-truth-ratios", str(ratios)]) == 2
    assert str(ratios) in _one_line_error(capsys)
    ratios.write_text("[1.0, -2]")
    assert main(base + ["--data", str(data), "--retain-truth-ratios", str(ratios)]) == 2
    assert "entry 1" in _one_line_error(capsys)

    assert main(base + ["--data", str(data), "--retrain-auc", "1.5"]) == 2
    assert "--retrain-auc" in _one_line_error(capsys)
    assert main(["evaluate", "--model", str(tmp_path / "no_model"), "--data", str(data), "--out", str(out),
                 "--forget", "forget01"]) == 2
    assert "--model" in _one_line_error(capsys)
    assert not out.exists()


def test_load_tofu_round_trip_of_cli_dir(tmp_path):
    data = load_tofu(_write_tofu_dir(tmp_path / "tofu"), forget="forget01")
    expected = _tofu_data(holdout=[TofuItem("Who is Z?", "Nobody."), TofuItem("Who is Y?", "Someone.")])
    assert (data.forget, data.retain, data.real_authors, data.world_facts, data.holdout) == \
        (expected.forget, expected.retain, expected.real_authors, expected.world_facts, expected.holdout)
