"""Tests for dipo_scale.eval (MUSE VerbMem / KnowMem), on a tiny local model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dipo_scale.data.prompts import knowmem_prompt
from dipo_scale.eval import generation as gen
from dipo_scale.eval import muse, privacy, workers
from dipo_scale.models import train_tokenizer
from dipo_scale.data.muse import QA, MuseData, VerbMemItem

CORPUS = [
    "Question: What is the capital of France?\nAnswer: Paris\n\n",
    "Question: Who wrote the report?\nAnswer: The committee\n\n",
    "The cat sat on the mat while the dog slept by the door.",
    "Once upon a time there was a quiet village near the river.",
    "The river flowed past the old mill and into the sea.",
    "Numbers like 42 and 7 appear in many stories about the sea.",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(CORPUS * 4, 300)  # the byte-level BPE the demo models use


def tiny_model(tokenizer, *, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    # A large init spread gives peaked logits, so greedy choices have no near-ties.
    return tiny_model(tokenizer, initializer_range=0.5)


# --- ROUGE, prompt, answer cutting ------------------------------------------


def test_rouge_l_hand_computed():
    recall, f1 = muse.rouge_l("the cat sat", "the cat sat on the mat")
    assert recall == pytest.approx(3 / 6)
    assert f1 == pytest.approx(2 / 3)  # precision 1, recall 1/2

    # LCS of "a b c d" and "a x c y d z" is "a c d": recall 3/6, precision 3/4.
    recall, f1 = muse.rouge_l("a b c d", "a x c y d z")
    assert recall == pytest.approx(0.5)
    assert f1 == pytest.approx(2 * 0.75 * 0.5 / 1.25)

    assert muse.rouge_l("Paris", "Paris") == (1.0, 1.0)
    assert muse.rouge_l("London", "Paris") == (0.0, 0.0)
    assert muse.rouge_l("", "Paris") == (0.0, 0.0)


def test_knowmem_prompt_exact():
    icl = [QA("What is 1+1?", "2"), QA("Who wrote Hamlet?", "Shakespeare")]
    assert knowmem_prompt(icl, "What is the capital of France?") == (
        "Question: What is 1+1?\nAnswer: 2\n\n"
        "Question: Who wrote Hamlet?\nAnswer: Shakespeare\n\n"
        "Question: What is the capital of France?\nAnswer: "
    )
    assert knowmem_prompt([], "Q?") == "Question: Q?\nAnswer: "


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris\n\nQuestion: x", "Paris"),
        ("Paris Question: what else?", "Paris"),
        (" 42 ", "42"),
        ("Paris\nFrance\n\nmore", "Paris\nFrance"),
        ("Question: x\n\nParis", ""),
        ("", ""),
    ],
)
def test_cut_answer(text, expected):
    assert muse.cut_answer(text) == expected


# --- generation ---------------------------------------------------------------


def test_encode_prompt_prepends_bos_once(tokenizer):
    ids = gen.encode_prompt(tokenizer, "The cat sat")
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1:] == tokenizer("The cat sat", add_special_tokens=False)["input_ids"]
    assert gen.encode_prompt(tokenizer, "<s>The cat sat") == ids


def _generate_one(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = torch.tensor([gen.encode_prompt(tokenizer, prompt)])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_batched_generation_matches_one_at_a_time(model, tokenizer):
    prompts = [
        "The cat",
        "Once upon a time there was a quiet village near the river.",
        "Question: What is the capital of France?\nAnswer: ",
        "The river flowed",
        "Numbers like 42",
    ]
    batched = gen.greedy_generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    with torch.no_grad():
        single = [_generate_one(model, tokenizer, p, 8) for p in prompts]
    assert batched == single
    assert all(text for text in batched)
    # Batch size must not change anything either.
    assert gen.greedy_generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=16) == single
    assert gen.greedy_generate(model, tokenizer, [], max_new_tokens=8) == []


def test_long_prompt_is_left_truncated_keeping_bos(model, tokenizer):
    prompt = " ".join(CORPUS)
    ids = gen.encode_prompt(tokenizer, prompt)
    assert len(ids) > 20
    out = gen.greedy_generate(model, tokenizer, [prompt], max_new_tokens=5, max_prompt_tokens=20)
    kept = [tokenizer.bos_token_id] + ids[-19:]
    expected = model.generate(
        input_ids=torch.tensor([kept]),
        attention_mask=torch.ones(1, 20, dtype=torch.long),
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    assert out == [tokenizer.decode(expected[0, 20:], skip_special_tokens=True)]

    # The model's context (max_position_embeddings=256) bounds the prompt too.
    long_prompt = " ".join(CORPUS * 10)
    assert len(gen.encode_prompt(tokenizer, long_prompt)) > 256
    assert len(gen.greedy_generate(model, tokenizer, [long_prompt], max_new_tokens=4)) == 1


# --- scoring with fixed generations -----------------------------------------


def test_scores_from_fixed_generations(monkeypatch, tokenizer):
    calls = []

    def fake_generate(model, tok, prompts, *, max_new_tokens, batch_size=16, max_prompt_tokens=None, **kwargs):
        calls.append((list(prompts), max_new_tokens))
        return [replies[p] for p in prompts]

    monkeypatch.setattr(muse, "greedy_generate", fake_generate)

    icl = [QA("Who wrote the report?", "The committee")]
    qa = [QA("What is the capital of France?", "Paris"), QA("What sat?", "the cat sat on the mat")]
    replies = {
        knowmem_prompt(icl, qa[0].question): " Paris\n\nQuestion: Who wrote the report?",
        knowmem_prompt(icl, qa[1].question): "the cat sat Question: next",
    }
    # Recall 1 and 3/6 -> mean 75.
    assert muse.knowmem(None, tokenizer, qa, icl) == pytest.approx(75.0)
    assert calls[-1] == (list(replies), 32)
    assert muse.knowmem(None, tokenizer, qa, icl, limit=1) == pytest.approx(100.0)
    assert calls[-1][0] == [knowmem_prompt(icl, qa[0].question)]

    items = [VerbMemItem("p1", "the cat sat on the mat"), VerbMemItem("p2", "Once upon a time")]
    replies = {"p1": "the cat sat", "p2": "Once upon a time"}
    # F1 2/3 and 1 -> mean 83.33.
    assert muse.verbmem(None, tokenizer, items) == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert calls[-1] == (["p1", "p2"], 128)

    # The truth is cut to its first max_new_tokens tokens before scoring.
    gt = CORPUS[3]
    gt_ids = tokenizer(gt, add_special_tokens=False)["input_ids"]
    assert len(gt_ids) > 4
    replies = {"p": tokenizer.decode(gt_ids[:4])}
    assert muse.verbmem(None, tokenizer, [VerbMemItem("p", gt)], max_new_tokens=4) == pytest.approx(100.0)
    assert muse.verbmem(None, tokenizer, [VerbMemItem("p", gt)], max_new_tokens=64) < 100.0

    with pytest.raises(ValueError):
        muse.knowmem(None, tokenizer, [], icl)


# --- a model that has memorised its answers ------------------------------------


def test_memorised_answers_score_100(tokenizer):
    icl = [QA("Who wrote the report?", "The committee")]
    qa = QA("What is the capital of France?", "Paris")
    item = VerbMemItem("Once upon a time", " there was a quiet village near the river.")
    verb_tokens = 6

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = tokenizer.eos_token_id
    sequences = [
        gen.encode_prompt(tokenizer, knowmem_prompt(icl, qa.question)) + ids(qa.answer + "\n\n") + [eos],
        gen.encode_prompt(tokenizer, item.prompt) + ids(item.gt) + [eos],
    ]
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id)
    labels = torch.full((len(sequences), width), -100)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1

    model = tiny_model(tokenizer, seed=1)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    model.eval()

    assert muse.knowmem(model, tokenizer, [qa], icl) == pytest.approx(100.0)
    assert muse.verbmem(model, tokenizer, [item], max_new_tokens=verb_tokens) == pytest.approx(100.0)

    data = MuseData(
        root=Path("muse"),
        forget_docs=[],
        retain_docs=[],
        holdout_docs=[],
        forget_qa=[qa],
        retain_qa=[QA("Who wrote the report?", "The committee"), QA("Where is the mill?", "by the river")],
        forget_qa_icl=icl,
        retain_qa_icl=[qa],
        verbmem=[item],
        privleak_forget=[],
        privleak_holdout=[],
    )
    scores = muse.evaluate_muse(model, tokenizer, data, verbmem_max_new_tokens=verb_tokens, knowmem_max_new_tokens=8)
    assert set(scores) == {"verbmem_f", "knowmem_f", "knowmem_r"}
    assert scores["verbmem_f"] == pytest.approx(100.0)
    assert scores["knowmem_f"] == pytest.approx(100.0)
    # knowmem_r by hand: the retain questions after the retain few-shot examples, one at a time.
    answers = [muse.cut_answer(gen.greedy_generate(model, tokenizer, [knowmem_prompt(data.retain_qa_icl, x.question)],
                                                   max_new_tokens=8)[0]) for x in data.retain_qa]
    recall = [muse.rouge_l(a, x.answer)[0] for a, x in zip(answers, data.retain_qa)]
    assert scores["knowmem_r"] == pytest.approx(100 * sum(recall) / len(recall))


def test_load_model_and_tokenizer_round_trip(tmp_path, model, tokenizer):
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = gen.load_model_and_tokenizer(str(tmp_path))
    assert not loaded.training
    assert next(loaded.parameters()).dtype == torch.float32
    assert loaded_tok.bos_token_id == tokenizer.bos_token_id
    prompts = ["The cat", "Numbers like 42"]
    assert gen.greedy_generate(loaded, loaded_tok, prompts, max_new_tokens=6) == gen.greedy_generate(
        model, tokenizer, prompts, max_new_tokens=6
    )


# --- PrivLeak on MUSE data, the hub loader, `dipo-scale evaluate`, data-parallel evaluation --------


def _write_muse_dir(root: Path, *, holdout: bool = True) -> Path:
    import json

    def write(name: str, obj) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj))

    write("raw/forget.txt", "\n\n".join(CORPUS[2:4]))
    write("raw/retain1.txt", CORPUS[4])
    if holdout:
        write("raw/holdout.txt", CORPUS[5])
        write("privleak/forget.json", [{"text": t} for t in CORPUS[2:5]])
        write("privleak/holdout.json", [{"text": t} for t in (CORPUS[5], "The dog slept by the river.")])
    write("knowmem/forget_qa.json", [{"question": "What is the capital of France?", "answer": "Paris"},
                                     {"question": "Where did the cat sit?", "answer": "on the mat"}])
    write("knowmem/forget_qa_icl.json", [{"question": "Who wrote the report?", "answer": "The committee"}])
    write("knowmem/retain_qa.json", [{"question": "Where did the river flow?", "answer": "into the sea"}])
    write("verbmem/forget.json", [{"prompt": "The cat sat", "gt": " on the mat while the dog slept."},
                                  {"prompt": "Once upon a time", "gt": " there was a quiet village."},
                                  {"prompt": "The river", "gt": " flowed past the old mill."}])
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def retrain_dir(tmp_path_factory, tokenizer) -> Path:
    """Another tiny model as the retrained model: its MIA AUC differs from the model's (seed 3;
    the model as its own retrained model would give PrivLeak 0 by construction)."""
    path = tmp_path_factory.mktemp("retrain_model")
    tiny_model(tokenizer, seed=3, initializer_range=0.5).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _auc_by_hand(model, tokenizer, data) -> float:
    """Min-40% Prob AUC, privleak/forget.json (members) against privleak/holdout.json."""
    forget = privacy.min_k_scores(model, tokenizer, data.privleak_forget)
    holdout = privacy.min_k_scores(model, tokenizer, data.privleak_holdout)
    return sum((f > h) + 0.5 * (f == h) for f in forget for h in holdout) / (len(forget) * len(holdout))


def test_evaluate_muse_with_mia(model, tokenizer, tmp_path):
    from dipo_scale.data.muse import load_muse_dir

    data = load_muse_dir(_write_muse_dir(tmp_path / "muse"))
    scores = muse.evaluate_muse(model, tokenizer, data, verbmem_max_new_tokens=4, knowmem_max_new_tokens=4, mia=True)
    assert list(scores) == ["verbmem_f", "knowmem_f", "knowmem_r", "mia_auc", "mia_auc_ci"]
    forget = privacy.min_k_scores(model, tokenizer, data.privleak_forget)
    holdout = privacy.min_k_scores(model, tokenizer, data.privleak_holdout)
    wins = sum((f > h) + 0.5 * (f == h) for f in forget for h in holdout)
    assert scores["mia_auc"] == pytest.approx(wins / (len(forget) * len(holdout)))
    assert scores["mia_auc_ci"] == privacy.auc_interval(forget, holdout)
    assert muse.muse_mia_auc(model, tokenizer, data) == pytest.approx(scores["mia_auc"])
    assert "mia_auc" not in muse.evaluate_muse(model, tokenizer, data, verbmem_max_new_tokens=2,
                                             knowmem_max_new_tokens=2)  # off by default

    # Without holdout texts there is no attack.
    data = load_muse_dir(_write_muse_dir(tmp_path / "no_holdout", holdout=False))
    assert muse.muse_mia_auc(model, tokenizer, data) is None


def test_muse_hub_loading_uses_datasets(monkeypatch):
    import datasets

    from dipo_scale.data.muse import load_muse
    from dipo_scale.errors import UserInputError

    splits = {
        ("raw", "forget"): [{"text": "Forget one."}], ("raw", "retain1"): [{"text": "Retain one."}],
        ("raw", "retain2"): [{"text": "Retain two."}], ("raw", "holdout"): [{"text": "Holdout one."}],
        ("verbmem", "forget"): [{"prompt": "Forget", "gt": " one."}],
        ("knowmem", "forget_qa"): [{"question": "Q?", "answer": "A"}],
        ("knowmem", "retain_qa"): [{"question": "R?", "answer": "B"}],
        ("knowmem", "forget_qa_icl"): [{"question": "I?", "answer": "J"}],
        ("knowmem", "retain_qa_icl"): [{"question": "K?", "answer": "L"}],
        ("privleak", "forget"): [{"text": "Forget one."}], ("privleak", "holdout"): [{"text": "Holdout one."}],
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: splits[(config, split)])
    data = load_muse("muse-bench/MUSE-News")
    assert data.retain_docs == ["Retain one.", "Retain two."]
    assert data.forget_qa == [QA("Q?", "A")] and data.retain_qa_icl == [QA("K?", "L")]
    assert data.verbmem == [VerbMemItem("Forget", " one.")]
    assert data.privleak_holdout == ["Holdout one."]

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserInputError, match="muse-bench/MUSE-News: not a local directory"):
        load_muse("muse-bench/MUSE-News")


def test_cli_evaluate_muse(tmp_path, model, tokenizer, model_dir, retrain_dir, capsys):
    import json

    from dipo_scale.cli import main
    from dipo_scale.data.muse import load_muse_dir

    data = _write_muse_dir(tmp_path / "muse")
    out = tmp_path / "out"
    args = ["evaluate", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--max-new-tokens", "4"]
    assert main(args + ["--retrain-model", str(retrain_dir)]) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["verbmem_f", "knowmem_f", "knowmem_r", "mia_auc", "mia_auc_ci", "privleak", "privleak_ci"]
    # PrivLeak = (AUC - retrain AUC) / retrain AUC × 100, each AUC by hand on its own model.
    muse_data = load_muse_dir(data)
    auc = _auc_by_hand(model, tokenizer, muse_data)
    retrain_auc = _auc_by_hand(gen.load_model_and_tokenizer(str(retrain_dir))[0], tokenizer, muse_data)
    assert auc != retrain_auc and retrain_auc > 0  # (the model as its own retrained model: PrivLeak 0)
    assert metrics["mia_auc"] == pytest.approx(auc)
    assert metrics["privleak"] == pytest.approx((auc - retrain_auc) / retrain_auc * 100)
    # Its interval: both models on the same resamples of the texts (the scores by hand as well).
    retrain = gen.load_model_and_tokenizer(str(retrain_dir))[0]
    by_hand = [tuple(privacy.min_k_scores(m, tokenizer, texts) for texts in
                     (muse_data.privleak_forget, muse_data.privleak_holdout)) for m in (model, retrain)]
    assert metrics["privleak_ci"] == pytest.approx(privacy.privleak_interval(*by_hand))
    assert metrics["mia_auc_ci"] == pytest.approx(privacy.auc_interval(*by_hand[0]))
    report = (out / "report.md").read_text()
    low, high = metrics["privleak_ci"]
    assert low <= metrics["privleak"] <= high and "bootstrap 95 % interval" in report
    assert f"| {retrain_dir.name} (retrain) |" in report
    assert (out / "criteria.png").is_file() and (out / "tradeoff.png").is_file()

    assert main(args + ["--retrain-auc", "0.5", "--limit", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["privleak"] == pytest.approx((metrics["mia_auc"] - 0.5) / 0.5 * 100)
    assert metrics["privleak_ci"] == pytest.approx([(a - 0.5) / 0.5 * 100 for a in metrics["mia_auc_ci"]])
    capsys.readouterr()

    # A MUSE directory with an empty QA file: one line naming the file, exit 2, nothing written.
    (data / "knowmem" / "retain_qa.json").write_text("")
    out2 = tmp_path / "out2"
    assert main(["evaluate", "--model", str(model_dir), "--data", str(data), "--out", str(out2)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {data / 'knowmem' / 'retain_qa.json'}: no entries"]
    assert not out2.exists()
    (data / "knowmem" / "retain_qa.json").write_text("[]")
    assert main(["evaluate", "--model", str(model_dir), "--data", str(data), "--out", str(out2),
                 "--retain-model", str(model_dir)]) == 2
    assert "TOFU" in capsys.readouterr().err


def test_evaluate_muse_parallel_equals_single_process(tmp_path, model_dir):
    import os

    import ray

    from dipo_scale.data.muse import load_muse_dir

    data_dir = _write_muse_dir(tmp_path / "muse")
    model, tokenizer = gen.load_model_and_tokenizer(str(model_dir))
    settings = dict(verbmem_max_new_tokens=6, knowmem_max_new_tokens=6, batch_size=2)
    single = muse.evaluate_muse(model, tokenizer, load_muse_dir(data_dir), mia=True, **settings)

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=f"/tmp/dipo_eval_ray_{os.getpid()}",  # this run's own
                 log_to_driver=False)
    try:
        parallel = workers.evaluate_muse_parallel(str(model_dir), data_dir, num_workers=2, **settings)
    finally:
        if started:
            ray.shutdown()
    assert list(parallel) == list(single) == ["verbmem_f", "knowmem_f", "knowmem_r", "mia_auc", "mia_auc_ci"]
    for key in single:
        assert parallel[key] == pytest.approx(single[key], abs=1e-9), key


def test_shards_are_contiguous_and_cover_everything():
    assert muse.shard(list(range(5)), 2) == [[0, 1], [2, 3, 4]]
    assert sum(muse.shard([1], 3), []) == [1] and len(muse.shard([1], 3)) == 3
    assert sum(muse.shard(list(range(10)), 3), []) == list(range(10))


# --- where the evaluation runs: --device, --gpus-per-worker, the config keys ---------------------------
def test_device_options(monkeypatch, tmp_path, model_dir, capsys):
    """auto is the CPU and float32 without a GPU (CUDA and bfloat16 with one); cuda without a GPU,
    GPUs with --device cpu and cuda on GPU-less actors are refused in one line before any work; the
    console says where the model was loaded. (The CUDA paths themselves need a GPU: not run here.)"""
    import json

    from dipo_scale.cli import main
    from dipo_scale.config import load_unlearn_config
    from dipo_scale.errors import UserInputError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gen.resolve_device("auto") == ("cuda", torch.bfloat16)
    assert gen.resolve_device("cpu") == ("cpu", torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gen.resolve_device("auto") == ("cpu", torch.float32)
    with pytest.raises(UserInputError, match="--device cuda: no CUDA device"):
        gen.resolve_device("cuda")
    plan = lambda *args: workers.plan_placement(*args, cluster_gpus=1, driver_cuda=False)  # noqa: E731
    assert not plan("auto", 1, 0.0).actors  # in this process
    assert plan("auto", 2, 0.0).actors and plan("cuda", 1, 0.5).actors  # Ray actors
    for args, message in ((("cpu", 1, 1.0), "would stay idle"), (("cuda", 2, 0.0), "needs --gpus-per-worker"),
                          (("tpu", 1, 0.0), "choose one of"), (("auto", 1, -1.0), "auto or a number >= 0")):
        with pytest.raises(UserInputError, match=message):
            plan(*args)

    data = _write_muse_dir(tmp_path / "muse")
    base = ["evaluate", "--model", str(model_dir), "--data", str(data), "--max-new-tokens", "2"]
    for extra, message in ((["--device", "cuda"], "--device cuda: no CUDA device"),
                           (["--device", "cpu", "--gpus-per-worker", "1"], "would stay idle"),
                           (["--num-workers", "2", "--device", "cuda"], "--device cuda: the Ray cluster has no GPU"),
                           (["--num-workers", "2", "--device", "cuda", "--gpus-per-worker", "0"],
                            "needs --gpus-per-worker"),
                           (["--gpus-per-worker", "1"], "needs 1 GPUs but the Ray cluster has 0")):
        assert main(base + ["--out", str(tmp_path / "refused"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "refused").exists()
    assert main(base + ["--out", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"evaluate: {model_dir} in this process, on the CPU, float32 (--device cpu)" in out
    assert f"evaluate: {model_dir} on cpu (float32)" in out
    assert set(json.loads((tmp_path / "cpu" / "items.json").read_text())) == {"verbmem_f", "knowmem_f", "knowmem_r",
                                                                               "mia"}

    # The config-driven commands (demo, sweep, sequential, scalability) take the same options.
    cfg = load_unlearn_config(None, ["eval.device=cuda", "eval.num_workers=2", "eval.gpus_per_worker=1"])
    assert cfg.eval.placement() == {"device": "cuda", "num_workers": 2, "gpus_per_worker": 1.0}
    assert load_unlearn_config(None, []).eval.placement()["gpus_per_worker"] == "auto"
    with pytest.raises(UserInputError, match="--set eval.gpus_per_worker=1: .*would stay idle"):
        load_unlearn_config(None, ["eval.device=cpu", "eval.gpus_per_worker=1"])
    for bad in ("true", "-1", "many"):
        with pytest.raises(UserInputError, match=f"eval.gpus_per_worker={bad}: .*expected auto or a number >= 0"):
            load_unlearn_config(None, [f"eval.gpus_per_worker={bad}"])


def test_placement_defaults_to_gpu_actors_where_the_cluster_has_gpus(monkeypatch):
    """--gpus-per-worker auto (the default): one GPU per Ray actor where the cluster has GPUs, even
    with one worker and a driver without GPU; the CPU of this process where it has none. Explicit
    settings are kept; more GPUs than the cluster has are refused (Ray would wait without end)."""
    from dipo_scale.errors import UserInputError

    on_gpus = workers.plan_placement("auto", 1, "auto", cluster_gpus=8, driver_cuda=False)
    assert (on_gpus.actors, on_gpus.gpus_per_worker, on_gpus.on_cpu) == (True, 1.0, False)
    assert on_gpus.describe() == "on 1 Ray actor with 1 GPU (--gpus-per-worker auto: the Ray cluster has 8 GPUs)"
    two = workers.plan_placement("auto", 2, "auto", cluster_gpus=2, driver_cuda=False)
    assert (two.num_workers, two.gpus_per_worker) == (2, 1.0)
    assert two.describe().startswith("on 2 Ray actors with 1 GPU each")
    assert workers.plan_placement("cuda", 1, "auto", cluster_gpus=1, driver_cuda=False).gpus_per_worker == 1.0
    none = workers.plan_placement("auto", 1, "auto", cluster_gpus=0, driver_cuda=False)
    assert (none.actors, none.gpus_per_worker, none.on_cpu) == (False, 0.0, True)
    assert none.describe() == ("in this process, on the CPU, float32 "
                               "(--gpus-per-worker auto: the Ray cluster has no GPU)")
    assert not workers.plan_placement("auto", 1, "auto", cluster_gpus=0, driver_cuda=True).on_cpu
    cpu = workers.plan_placement("cpu", 1, "auto", cluster_gpus=8, driver_cuda=True)  # asked for: the CPU
    assert (cpu.actors, cpu.on_cpu, cpu.reason) == (False, True, "--device cpu")
    kept = workers.plan_placement("auto", 1, 0.0, cluster_gpus=8, driver_cuda=False)  # asked for: no GPU
    assert (kept.actors, kept.on_cpu) == (False, True)
    assert workers.plan_placement("auto", 2, 0.0, cluster_gpus=8, driver_cuda=True).on_cpu  # GPU-less actors
    with pytest.raises(UserInputError, match=r"--num-workers 4 x --gpus-per-worker 1: needs 4 GPUs but the Ray "
                                             r"cluster has 2"):
        workers.plan_placement("auto", 4, "auto", cluster_gpus=2, driver_cuda=False)
    with pytest.raises(UserInputError, match="--device cuda: no CUDA device is visible to this process and the Ray "
                                             "cluster has no GPU"):
        workers.plan_placement("cuda", 1, "auto", cluster_gpus=0, driver_cuda=False)

    # find_placement asks the cluster (here: patched to 4 GPUs) only where the answer depends on it.
    asked = []
    monkeypatch.setattr(workers, "cluster_gpus", lambda: asked.append(1) or 4.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert workers.find_placement("auto", 1, "auto").gpus_per_worker == 1.0 and asked
    asked.clear()
    assert workers.find_placement("cpu", 1, "auto").on_cpu and not asked


def _config_only_model(root: Path, tokenizer, **sizes) -> Path:
    """A model directory with config.json, the tokenizer and a safetensors file holding one
    4-byte tensor: it passes `check_model` and its config describes a model of `sizes`, no weights."""
    import json
    import struct

    root.mkdir(parents=True)
    LlamaConfig(vocab_size=32000, **sizes).save_pretrained(root)
    tokenizer.save_pretrained(root)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (root / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    return root


def test_cpu_evaluation_of_a_large_model_is_refused_unless_asked(monkeypatch, tmp_path, tokenizer, capsys):
    """A 1.3B-parameter model (counted from its config on the meta device: nothing allocated) is not
    evaluated on CPUs with --device auto: one line, exit 2, nothing written, no model loaded; with
    --device cpu, or on GPUs, the check lets it through. A small model passes on CPUs."""
    from dipo_scale.cli import main
    from dipo_scale.errors import UserInputError

    big = _config_only_model(tmp_path / "big", tokenizer, hidden_size=2048, intermediate_size=5504,
                             num_hidden_layers=24, num_attention_heads=16)
    count = workers.count_parameters(big)
    assert count == 24 * (4 * 2048**2 + 3 * 2048 * 5504 + 2 * 2048) + 2048 + 2 * 32000 * 2048  # Llama, untied
    on_cpu = workers.plan_placement("auto", 1, "auto", cluster_gpus=0, driver_cuda=False)
    with pytest.raises(UserInputError, match=r"--model .*big: 1\.3B parameters would be evaluated on CPUs in float32 "
                                             r".*the Ray cluster has no GPU.*give --device cpu"):
        workers.check_cpu_size(big, on_cpu)
    workers.check_cpu_size(big, workers.plan_placement("cpu", 1, "auto", cluster_gpus=0, driver_cuda=False))
    workers.check_cpu_size(big, workers.plan_placement("auto", 1, "auto", cluster_gpus=1, driver_cuda=False))
    small = _config_only_model(tmp_path / "small", tokenizer, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=2)
    workers.check_cpu_size(small, on_cpu)

    loads = []
    monkeypatch.setattr(workers, "load_model_and_tokenizer", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = _write_muse_dir(tmp_path / "muse")
    with pytest.raises(UserInputError, match="1.3B parameters would be evaluated on CPUs"):
        workers.muse_item_scores(big, data)  # what demo, sweep and sequential call
    out = tmp_path / "out"
    assert main(["evaluate", "--model", str(big), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1.3B parameters would be evaluated on CPUs" in err[0], err
    assert not out.exists() and not loads


# --- memory of the batched loops: no KV cache when scoring, chunked log-softmax, token budget -----
def _spy_forwards(monkeypatch, model) -> list[dict]:
    """The keyword arguments of every forward of `model` (input_ids as its shape)."""
    calls, forward = [], model.forward

    def spy(*args, **kwargs):
        calls.append({k: tuple(v.shape) if k == "input_ids" else v for k, v in kwargs.items()})
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    return calls


def _unchunked_logprobs(model, sequences: list[list[int]], pad_id: int) -> list[torch.Tensor]:
    """log-probs of each sequence's tokens 1.. as computed before chunking: one padded batch, the
    whole [B, T, V] logits in float32, gather minus logsumexp."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)], attention_mask[row, : len(ids)] = torch.tensor(ids), 1
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    logp = (logits.gather(-1, input_ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)).double()
    return [logp[row, : len(ids) - 1] for row, ids in enumerate(sequences)]


def test_scoring_forward_keeps_no_cache_and_chunks_the_log_softmax(monkeypatch, model, tokenizer):
    """The scoring forward runs with use_cache=False; the labels' log-probs, taken a few positions
    at a time (chunks of 3 here), equal bit for bit the whole-logits computation."""
    sequences = [gen.encode_prompt(tokenizer, text) for text in CORPUS[2:6]]
    sequences.sort(key=len, reverse=True)  # token_logprobs' batch order
    expected = _unchunked_logprobs(model, sequences, tokenizer.pad_token_id)
    monkeypatch.setattr(gen, "auto_chunk_size", lambda vocab, *device_and_dtype: 3)
    calls = _spy_forwards(monkeypatch, model)
    got = gen.token_logprobs(model, sequences, [1] * len(sequences), pad_id=tokenizer.pad_token_id)
    assert len(calls) == 1 and calls[0]["use_cache"] is False
    assert all(len(e) > 3 for e in expected)  # several chunks per row
    for g, e in zip(got, expected):
        assert g.dtype == torch.float64 and torch.equal(g, e)
    logits = torch.randn(7, 11, dtype=torch.bfloat16)  # bf16 logits: float32 log-probs, per chunk
    labels = torch.randint(0, 11, (7,))
    want = torch.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None]).squeeze(1)
    assert gen.label_logprobs(logits, labels).dtype == torch.float32
    assert torch.allclose(gen.label_logprobs(logits, labels), want, atol=1e-6)


def test_tokens_per_batch_are_capped(monkeypatch, model, tokenizer):
    """A batch holds at most `batch_size` rows and at most the token budget of rows x padded length
    (its longest row; for generation plus the new tokens): here a budget of 40 tokens splits what 16
    rows would hold. The scores and generations are those of the uncapped batches."""
    assert gen.token_batches([0, 1, 2, 3, 4], [10, 9, 9, 5, 5], batch_size=4, budget=20) == [[0, 1], [2, 3], [4]]
    assert gen.token_batches([0, 1], [50, 5], batch_size=4, budget=20) == [[0], [1]]  # too long: alone
    assert gen.token_batches([0, 1, 2], [4, 4, 4], batch_size=2, budget=100) == [[0, 1], [2]]
    assert gen.token_batches([0, 1, 2], [4, 4, 4], batch_size=8, budget=20, extra=6) == [[0, 1], [2]]

    texts = CORPUS * 2
    sequences = [gen.encode_prompt(tokenizer, t) for t in texts]
    uncapped = gen.token_logprobs(model, sequences, [1] * len(sequences), pad_id=tokenizer.pad_token_id)
    generations = gen.greedy_generate(model, tokenizer, texts, max_new_tokens=3)
    monkeypatch.setattr(gen, "CPU_TOKEN_BUDGET", 40)
    calls = _spy_forwards(monkeypatch, model)
    capped = gen.token_logprobs(model, sequences, [1] * len(sequences), pad_id=tokenizer.pad_token_id)
    assert len(calls) > 1
    for call in calls:
        rows, width = call["input_ids"]
        assert rows * width <= 40 or rows == 1, call["input_ids"]
    for c, u in zip(capped, uncapped):
        assert torch.allclose(c, u, atol=1e-5)
    calls.clear()
    assert gen.greedy_generate(model, tokenizer, texts, max_new_tokens=3) == generations
    prefills = [c["input_ids"] for c in calls if c["input_ids"][1] > 1]  # (the later forwards: one token each)
    assert len(prefills) > 1 and all(rows * (width + 3) <= 40 or rows == 1 for rows, width in prefills)


def test_token_budget_on_a_gpu_comes_from_free_memory(monkeypatch):
    """On a GPU the budget is half the free memory (with what PyTorch's allocator holds unused)
    over the bytes a token costs, from the model's config: a 7B Llama in bfloat16 scores 179,200
    bytes a token (logits 64,000 + activations), generates with 524,288 of KV cache + 115,200."""
    from types import SimpleNamespace

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32)
    fake = SimpleNamespace(config=config, dtype=torch.bfloat16,
                           parameters=lambda: iter([SimpleNamespace(device=torch.device("cuda", 0))]))
    assert gen.scoring_token_bytes(fake) == 2 * (32000 + 6 * 4096 + 3 * 11008) == 179_200
    assert gen.generation_token_bytes(fake) == 2 * (2 * 32 * 32 * 128 + 6 * 4096 + 3 * 11008) == 639_488
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (40 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 1 * 2**30)
    assert gen.token_budget(fake, gen.scoring_token_bytes) == (42 * 2**30 // 2) // 179_200  # 125,829 tokens
    cpu = SimpleNamespace(parameters=lambda: iter([torch.zeros(1)]))
    assert gen.token_budget(cpu, gen.scoring_token_bytes) == gen.CPU_TOKEN_BUDGET


def _in_step_rank(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results[rank] = gen._in_step(count=3 + 2 * rank, batches=4, device="cpu")
    finally:
        dist.destroy_process_group()


def test_ranks_in_step_run_the_most_batches_any_rank_needs(tmp_path):
    """Ranks of a sharded model must run the same forwards: where the token budget cut a rank's
    items into more batches than the caller's count, every rank runs the most any rank needs
    (gloo, two processes); without a process group, the larger of its own and the given count."""
    import torch.multiprocessing as mp

    assert gen._in_step(5, None, "cpu") == 5 and gen._in_step(2, 4, "cpu") == 4 and gen._in_step(6, 4, "cpu") == 6
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_in_step_rank, args=(str(tmp_path / "init"), results), nprocs=2)
    assert dict(results) == {0: 5, 1: 5}
