"""Sequential (sustainability) and scalability series: where the forget sets come from (MUSE's
sets, folds, the hub), real unlearning runs per request, a lineage manifest, and a series killed
during request 2 that resumes there. The generated corpus has no sust/ (scal/) sets: the runs use
forget_sets=folds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dipo_scale.config import SeriesConfig, load_config
from dipo_scale.data.muse import load_forget_requests, load_muse_dir
from dipo_scale.errors import UserInputError
from dipo_scale.files import MARKER
from dipo_scale.sequential import forget_sets

REQUESTS = 2


def _sets(tiny_assets, out_dir, *extra):
    return [f"data_dir={tiny_assets['corpus']}", f"unlearn.model.path={tiny_assets['target']}",
            f"out_dir={out_dir}", "forget_sets=folds", f"folds={REQUESTS}", "unlearn.train.num_workers=1",
            "unlearn.train.steps=3", "unlearn.train.global_batch_size=2", "unlearn.train.micro_batch_size=2",
            "unlearn.train.lr=2e-3", "unlearn.train.checkpoint_every=1", "unlearn.logging.wandb=disabled",
            "unlearn.data.block_size=64", "unlearn.eval.limit=2", "unlearn.eval.verbmem_max_new_tokens=8",
            "unlearn.eval.knowmem_max_new_tokens=8", *extra]


def _cli(kind, sets):
    return [sys.executable, "-m", "dipo_scale.cli", kind, *(a for s in sets for a in ("--set", s))]


def _lineage(out_dir: Path) -> dict:
    return json.loads((out_dir / "lineage.json").read_text())


def test_folds_and_muse_request_layouts(tiny_assets, tmp_path):
    data = load_muse_dir(tiny_assets["corpus"])
    given = [f"data_dir={tiny_assets['corpus']}", "unlearn.model.path=m", "folds=3"]
    with pytest.raises(UserInputError, match=r"no sust forget sets .*; set forget_sets=folds"):
        forget_sets(load_config(None, given, SeriesConfig), data, "sequential")  # the default: MUSE's sets
    cfg = load_config(None, given + ["forget_sets=folds"], SeriesConfig)
    seq = forget_sets(cfg, data, "sequential")
    assert [d for _, docs in seq for d in docs] == data.forget_docs  # disjoint folds covering the set
    scal = forget_sets(cfg, data, "scalability")
    assert [len(docs) for _, docs in scal] == sorted(len(docs) for _, docs in scal)
    assert all(docs == data.forget_docs[:len(docs)] for _, docs in scal) and scal[-1][1] == data.forget_docs

    root = tmp_path / "muse"
    (root / "sust").mkdir(parents=True)
    (root / "sust" / "forget_1.txt").write_text("first doc\n\nsecond doc\n")
    (root / "sust" / "forget_2.jsonl").write_text(json.dumps({"text": "third doc"}) + "\n")
    (root / "sust" / "forget_4.txt").write_text("not reached: forget_3 is missing\n")
    requests = load_forget_requests(root, "sust")
    assert [docs for _, docs in requests] == [["first doc", "second doc"], ["third doc"]]
    assert load_forget_requests(root, "scal") == []
    from_data = cfg.model_copy(update={"data_dir": str(root), "forget_sets": "data"})
    # A series never drops a set: forget_4 after the gap, and a file named like a set that is none,
    # are each an error naming the file.
    with pytest.raises(UserInputError, match=r"sust/forget_4.txt: forget set 4 follows no forget_3"):
        forget_sets(from_data, data, "sequential")
    (root / "sust" / "forget_4.txt").rename(root / "sust" / "forget_03.txt")
    with pytest.raises(UserInputError, match=r"sust/forget_03.txt: not a forget set name the series reads"):
        forget_sets(from_data, data, "sequential")
    (root / "sust" / "forget_03.txt").unlink()
    assert forget_sets(from_data, data, "sequential") == requests
    assert forget_sets(cfg.model_copy(update={"data_dir": str(root)}), data, "sequential") == seq  # folds asked
    (root / "sust" / "forget_2.txt").write_text("x\n")
    with pytest.raises(UserInputError, match="several forget_2 files"):
        load_forget_requests(root, "sust")
    with pytest.raises(UserInputError, match="folds: 9 is more than the 4 forget documents"):
        forget_sets(cfg.model_copy(update={"folds": 9}), data, "sequential")


def test_hub_forget_sets_and_optional_splits_say_what_failed(monkeypatch, capsys):
    """From the hub: the sust config's forget_k splits in order; a config or an optional split that
    cannot be loaded is one `note:` line on stderr naming it and the reason."""
    import datasets

    from dipo_scale.data.muse import load_muse_hub

    sust = {"forget_2": [{"text": "two"}], "forget_1": [{"text": " one "}, {"text": ""}], "forget_4": [{"text": "x"}]}

    def load_dataset(name, config, split=None):
        if config == "sust" and split is None:
            return sust
        if config == "raw" or (config, split) in (("verbmem", "forget"), ("knowmem", "forget_qa"),
                                                  ("knowmem", "retain_qa")):
            return [{"text": "t", "prompt": "p", "gt": "g", "question": "q", "answer": "a"}]
        raise ConnectionError(f"offline: {config}/{split}")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_forget_requests("muse-bench/MUSE-News", "sust") == [
        ("muse-bench/MUSE-News[sust/forget_1]", ["one"]), ("muse-bench/MUSE-News[sust/forget_2]", ["two"])]
    assert capsys.readouterr().err == ""
    assert load_forget_requests("muse-bench/MUSE-News", "scal") == []
    assert capsys.readouterr().err == ("note: muse-bench/MUSE-News[scal]: optional, cannot be loaded from the hub "
                                       "(ConnectionError: offline: scal/None); continuing without it\n")
    data = load_muse_hub("muse-bench/MUSE-News")
    assert data.forget_qa_icl == [] and data.privleak_forget == []
    notes = capsys.readouterr().err.splitlines()
    assert [n.split(":")[1] for n in notes] == [" muse-bench/MUSE-News[knowmem/forget_qa_icl]",
                                                " muse-bench/MUSE-News[knowmem/retain_qa_icl]",
                                                " muse-bench/MUSE-News[privleak/forget]",
                                                " muse-bench/MUSE-News[privleak/holdout]"]
    assert all(n.startswith("note: ") and "(ConnectionError: offline:" in n for n in notes)


def _wait_for(predicate, proc, what, timeout=420):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"series ended before {what}"
        time.sleep(0.2)
    raise TimeoutError(what)


def test_killed_sequential_series_resumes_at_its_unfinished_request(tiny_assets, tmp_path):
    whole = tmp_path / "uninterrupted"
    proc = subprocess.run(_cli("sequential", _sets(tiny_assets, whole)), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reference = _lineage(whole)
    assert [e["request"] for e in reference["requests"]] == list(range(1, REQUESTS + 1))
    for prev, entry in zip(reference["requests"], reference["requests"][1:]):  # each from the previous
        assert entry["input_model"] == prev["output_model"]
        assert entry["input_fingerprint"] == prev["output_fingerprint"]
    assert reference["requests"][0]["input_fingerprint"] == reference["initial"]["fingerprint"]
    assert len({e["output_fingerprint"] for e in reference["requests"]}) == REQUESTS
    assert (whole / "report.md").is_file() and (whole / "sustainability.png").is_file()
    assert "## Sustainability" in (whole / "report.md").read_text()

    # The state a series leaves once request 1 is done (its output-dir marker, config and lineage
    # entry, pointing at that request's model): copied from the uninterrupted series (same config).
    out = tmp_path / "killed"
    out.mkdir()
    for name in (MARKER, "config.json"):
        (out / name).write_bytes((whole / name).read_bytes())
    (out / "lineage.json").write_text(json.dumps({**reference, "requests": reference["requests"][:1]}))
    args = _cli("sequential", _sets(tiny_assets, out))
    proc = subprocess.Popen(args, stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    run2 = out / "requests" / "2" / "run"

    def checkpoint_registered() -> bool:  # Ray Train's record of request 2's step-1 checkpoint
        snapshots = list(run2.glob("ray/*/checkpoint_manager_snapshot.json"))
        return bool(snapshots) and "checkpoint_" in snapshots[0].read_text()

    _wait_for(checkpoint_registered, proc, "request 2 checkpointed")
    os.killpg(proc.pid, signal.SIGKILL)  # the series and everything it started (its local Ray)
    proc.wait()
    assert len(_lineage(out)["requests"]) == 1
    finished_1 = _lineage(out)["requests"][0]

    second = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "request 1: finished before, skipped" in second.stdout
    assert json.loads((run2 / "ranks" / "rank0.json").read_text())["resumed_from_step"] >= 1
    resumed = _lineage(out)
    assert resumed["requests"][0] == finished_1  # not redone
    keys = ("request", "forget_source", "forget_docs", "forget_tokens", "steps", "input_fingerprint",
            "output_fingerprint")
    assert [{k: e[k] for k in keys} for e in resumed["requests"]] == \
        [{k: e[k] for k in keys} for e in reference["requests"]]
    for a, b in zip(resumed["requests"], reference["requests"]):
        assert a["metrics"].keys() == b["metrics"].keys()
        for key in a["metrics"]:  # (the intervals are [low, high] lists)
            assert a["metrics"][key] == pytest.approx(b["metrics"][key], abs=1e-9), key


# The scalability series end to end: tests/test_cluster.py submits it with `ray job submit`.
