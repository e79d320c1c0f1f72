"""Issue 27, items 2, 10 and 12 (part): `sequential` / `scalability` and `attack` refuse what they
can check before any work, and reuse earlier work only when it was made from the same inputs.

Each case runs the real command (as tests/test_bad_inputs.py does) and asserts: exit 2, exactly
one stderr line `error: ...` naming the input and the problem, no traceback, nothing evaluated,
prepared or trained (no progress line, no Ray Train worker, for the checks that need no cluster
no Ray at all), and every file of the working directory unchanged (a failed check claims nothing:
the corrected command just runs). The relearning attack's case also runs the earlier attack for
real and checks its outputs are kept as they were.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dipo_scale.files import MARKER
from test_bad_inputs import _env, _snapshot

RAY_STARTED = "Started a local Ray instance"


def _run(workdir: Path, argv: list[str], timeout: int = 300) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dipo_scale.cli", *argv], cwd=workdir, env=_env(workdir),
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def _refused(workdir: Path, argv: list[str], fragments: list[str], *, ray: bool = False) -> str:
    """Run `argv`; assert the refusal (module docstring) and return its error line. `ray`: the
    check may start (not use) the Ray cluster."""
    before = _snapshot(workdir)
    proc, seconds = _run(workdir, argv)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode} after {seconds:.0f} s\n{output[-4000:]}"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    for work in ("evaluat", "prepare:", "request 0", "request 1", "relearn:", "RayTrainWorker"):
        assert work not in proc.stdout, (work, proc.stdout[-3000:])
    assert "RayTrainWorker" not in output
    if not ray:
        assert RAY_STARTED not in output, output[-3000:]
    assert _snapshot(workdir) == before  # nothing claimed, replaced or half-written
    print(f"{seconds:.1f} s: {errors[0]}")
    return errors[0]


# --- item 10: a series checks everything before it claims out_dir or starts Ray ---------------------
def _series(*extra: str, kind: str = "sequential") -> list[str]:
    sets = ["data_dir=corpus", "unlearn.model.path=model", "out_dir=series", "forget_sets=folds", "folds=2",
            "unlearn.train.steps=2", "unlearn.train.global_batch_size=4", "unlearn.train.micro_batch_size=2",
            "unlearn.logging.wandb=disabled", "unlearn.eval.limit=2", *extra]
    return [kind, *(a for s in sets for a in ("--set", s))]


def _sust(tmp: Path, numbers=(1, 2, 4)) -> None:
    """corpus/sust/forget_<k>.txt for each k, each a slice of the forget documents."""
    from dipo_scale.data.muse import load_muse_dir

    docs = load_muse_dir(tmp / "corpus").forget_docs
    (tmp / "corpus" / "sust").mkdir()
    for i, k in enumerate(numbers):
        (tmp / "corpus" / "sust" / f"forget_{k}.txt").write_text("\n\n".join(docs[i::len(numbers)]) + "\n")


SERIES_CASES = [
    # A batch preflight checks: refused after Ray started, the starting model was evaluated and
    # request 1 prepared (10-27 s), with out_dir claimed (the corrected command refused for good).
    ("batch-smaller-than-workers", lambda t: _series("unlearn.train.global_batch_size=1",
                                                     "unlearn.train.micro_batch_size=1"),
     ["unlearn.train.global_batch_size: 1 is smaller than the 2 workers"]),
    ("more-workers-than-cpus", lambda t: _series("unlearn.train.num_workers=64", "unlearn.train.global_batch_size=64"),
     ["unlearn.train.num_workers=64", "needs 64 CPUs"]),
    ("block-size-beyond-positions", lambda t: _series("unlearn.data.block_size=4096"),
     ["unlearn.data.block_size=4096", "positions"]),
    ("scalability-batch-smaller-than-workers", lambda t: _series(
        "unlearn.train.global_batch_size=1", "unlearn.train.micro_batch_size=1", kind="scalability"),
     ["unlearn.train.global_batch_size: 1 is smaller than the 2 workers"]),
    # sust/forget_1, 2, 4: it planned 2 requests and dropped forget_4 without a word.
    ("sust-set-after-a-gap", lambda t: (_sust(t), _series("forget_sets=data"))[1],
     ["corpus/sust/forget_4.txt", "forget set 4 follows no forget_3"]),
    ("sust-set-misnamed", lambda t: (_sust(t, (1, 2)), (t / "corpus" / "sust" / "forget_2.txt").rename(
        t / "corpus" / "sust" / "forget_02.txt"), _series("forget_sets=data"))[-1],
     ["corpus/sust/forget_02.txt", "not a forget set name"]),
]


@pytest.mark.parametrize("setup,fragments", [c[1:] for c in SERIES_CASES], ids=[c[0] for c in SERIES_CASES])
def test_series_refuses_before_any_work_and_claims_nothing(setup, fragments, workdir):
    _refused(workdir, setup(workdir), fragments)
    assert not (workdir / "series").exists()  # nothing claimed: the corrected command runs


# --- item 2 (sequential): a resumed series reuses only what was made from the same inputs ----------
def _started_series(workdir: Path, *, finished: int = 0) -> list[str]:
    """out_dir `series` as a series leaves it after the starting model's evaluation and `finished`
    requests (its marker, config record and lineage; each finished request's output model a copy
    of the model, at out1, out2, ...); returns the command that resumes it."""
    from dipo_scale.config import SeriesConfig, load_config
    from dipo_scale.data.muse import load_muse_dir
    from dipo_scale.sequential import data_fingerprint, forget_fingerprint, forget_sets, weights_fingerprint

    argv = _series()
    sets = [argv[i + 1] for i in range(1, len(argv), 2)]
    cfg = load_config(None, sets, SeriesConfig)
    cfg = cfg.model_copy(update={"data_dir": str((workdir / cfg.data_dir).resolve())})  # as run_series records it
    data = load_muse_dir(workdir / "corpus")
    out = workdir / "series"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"command": "sequential"}))
    (out / "config.json").write_text(json.dumps({"kind": "sequential", **cfg.model_dump(by_alias=True,
                                                                                         exclude={"out_dir"})}))
    metrics = {"verbmem_f": 50.0, "knowmem_f": 40.0, "knowmem_r": 30.0}
    requests = []
    for k, (source, docs) in enumerate(forget_sets(cfg, data, "sequential")[:finished], start=1):
        shutil.copytree(workdir / "model", workdir / f"out{k}")
        requests.append({"request": k, "forget_source": source, "forget_docs": len(docs),
                         "forget_fingerprint": forget_fingerprint(docs), "forget_tokens": 100, "steps": 2,
                         "input_model": "model" if k == 1 else str(workdir / f"out{k - 1}"),
                         "input_fingerprint": weights_fingerprint(workdir / "model"),
                         "output_model": str(workdir / f"out{k}"),
                         "output_fingerprint": weights_fingerprint(workdir / f"out{k}"), "metrics": metrics,
                         "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:01:00+00:00",
                         "seconds": 60.0})
    (out / "lineage.json").write_text(json.dumps({
        "kind": "sequential", "data_dir": cfg.data_dir, "data_fingerprint": data_fingerprint(data),
        "requests": requests, "initial": {"model": "model", "fingerprint": weights_fingerprint(workdir / "model"),
                                          "metrics": metrics}}))
    return argv


def _replace_weights(model_dir: Path, other: Path) -> None:
    shutil.copy(other / "model.safetensors", model_dir / "model.safetensors")


def _amend_forget_doc(workdir: Path, index: int = 0) -> None:
    """One forget document of the corpus changed (a sentence added)."""
    from dipo_scale.data.muse import load_muse_dir

    doc = load_muse_dir(workdir / "corpus").forget_docs[index]
    path = workdir / "corpus" / "raw" / "forget.txt"
    text = path.read_text()
    assert doc in text
    path.write_text(text.replace(doc, doc + " It was later amended.", 1))


def test_a_resumed_series_refuses_what_changed_since(workdir, tiny_assets):
    """A series resumed after its starting model, its data or a finished request's model changed:
    refused in one line naming out_dir and what changed, before any work (it reused the lineage
    and printed the old metrics as if they were this model's)."""
    argv = _started_series(workdir)
    _replace_weights(workdir / "model", tiny_assets["retrain"])
    _refused(workdir, argv, ["out_dir series", "the model at unlearn.model.path model changed since"])
    _replace_weights(workdir / "model", tiny_assets["target"])  # restored

    _amend_forget_doc(workdir)
    _refused(workdir, argv, ["out_dir series", "data_dir", "changed since"])
    shutil.copytree(tiny_assets["corpus"], workdir / "corpus", dirs_exist_ok=True)  # restored

    shutil.rmtree(workdir / "series")
    argv = _started_series(workdir, finished=1)
    _replace_weights(workdir / "out1", tiny_assets["retrain"])
    _refused(workdir, argv, ["out1: weights differ from lineage.json's record of request 1"])


# --- item 12 (part): the relearning run's workers are checked before the evaluation ---------------
def _attack(*sets: str, model: str = "model", out: str = "at") -> list[str]:
    base = ["relearn.steps=2", "relearn.global_batch_size=4", "relearn.micro_batch_size=2"]
    keys = {s.split("=", 1)[0] for s in sets}
    items = [s for s in base if s.split("=", 1)[0] not in keys] + list(sets)
    return ["attack", "--model", model, "--data", "corpus", "--out", out, "--kind", "relearn", "--limit", "2",
            "--max-new-tokens", "4", "--device", "cpu", *(a for s in items for a in ("--set", s))]


@pytest.mark.parametrize("sets,fragments", [
    # refused after the evaluation and a prepare, naming train.num_workers
    (["relearn.num_workers=64", "relearn.global_batch_size=64"], ["relearn.num_workers=64", "needs 64 CPUs"]),
    (["relearn.num_workers=64"], ["error: relearn.global_batch_size: 4 is smaller than the 64 workers"]),
    (["relearn.block_size=4096"], ["relearn.block_size=4096", "positions of --model model"]),
], ids=["more-workers-than-cpus", "batch-smaller-than-workers", "block-size-beyond-positions"])
def test_attack_refuses_relearn_settings_before_any_work(sets, fragments, workdir):
    line = _refused(workdir, _attack(*sets), fragments, ray=True)
    assert "train." not in line.replace("relearn.", "")  # the user's keys, not the engine's
    assert not (workdir / "at").exists()


# --- item 2 (attack): a relearned model is reused only for the model, data and settings it came from
def test_attack_never_reuses_a_relearned_model_of_other_inputs(workdir, tiny_assets):
    """`attack --kind relearn` twice into the same --out, the model at --model replaced in between:
    the second kept the old relearned weights and reported a recovery that never happened (then:
    refused after the evaluation and a prepare, naming the internal out_dir). Now refused in one
    line naming --out and what changed, before any work, the earlier attack's outputs untouched;
    likewise other relearn settings and other relearned documents."""
    shutil.copytree(workdir / "model", workdir / "m")
    argv = _attack(model="m")
    proc, seconds = _run(workdir, argv, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    earlier = (workdir / "at" / "metrics.json").read_text()
    source = json.loads((workdir / "at" / "relearn" / "source.json").read_text())
    assert set(source) == {"model", "data", "settings"} and (workdir / "at" / "relearn" / "run" / "model").is_dir()
    print(f"earlier attack: {seconds:.0f} s")

    _replace_weights(workdir / "m", tiny_assets["retrain"])
    line = _refused(workdir, argv, ["--out at", "the model at --model m changed since the earlier attack"])
    assert f"fingerprint {source['model']} then" in line
    _replace_weights(workdir / "m", tiny_assets["target"])  # the model it was made from

    _refused(workdir, _attack("relearn.steps=3", model="m"),
             ["--out at", "other settings", "relearn.steps: 2 then, 3 now"])

    relearned = json.loads((workdir / "at" / "relearn" / "slice.json").read_text())["relearned"]["forget_docs"]
    _amend_forget_doc(workdir, relearned[0])
    _refused(workdir, argv, ["--out at", "trained on other data", "--data corpus"])
    assert (workdir / "at" / "metrics.json").read_text() == earlier
