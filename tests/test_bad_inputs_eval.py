"""Issue 27, `dipo-scale evaluate`: nothing silently wrong, and no refusal after the work.

* Items without a usable reference (an empty or whitespace VerbMem `gt` or QA answer; TOFU: also
  an empty paraphrased or perturbed answer) scored as perfect forgetting (ROUGE against nothing is
  0): they are left out, said in one `note:` line, counted in metrics.json `skipped_items`; a list
  with none usable is refused in one line naming its file and metric, before any model loads.
* A metric that is not a finite number (weights that are NaN) was written into metrics.json as NaN
  with exit 0: one line naming the metric and the model, nothing written.
* An earlier output that cannot be written (immutable) was found only when the results were
  written, after the whole evaluation: refused in one line naming --out before any model loads.

Each run goes through the real command on copies of the tiny corpus and model (`workdir`), with
--device cpu, --limit and a few new tokens; the files of the user (everything but the output the
command made) are unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_bad_inputs import _env, _snapshot

LOADED = "evaluate: "  # the start of the line a model's load prints ("evaluate: model on cpu (float32)")


def _evaluate(workdir: Path, *args: str, model: str = "model", data: str = "corpus", out: str = "ev",
              limit: int = 3) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "dipo_scale.cli", "evaluate", "--model", model, "--data", data, "--out", out,
            "--limit", str(limit), "--max-new-tokens", "4", "--batch-size", "4", "--device", "cpu", *args]
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=600)
    proc.seconds = time.monotonic() - t0
    return proc


def _one_error(proc: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line of a refused command (exit 2, no traceback)."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def _model_loaded(proc: subprocess.CompletedProcess) -> bool:
    return any(line.startswith(LOADED) and " on cpu (" in line for line in proc.stdout.splitlines())


def _strict_json(path: Path):
    """The JSON at `path`; NaN / Infinity in it fail the test."""
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _edit_records(path: Path, edit) -> None:
    """The JSON array at `path` with `edit(records)` applied (in place, kept as a JSON array)."""
    records = json.loads(path.read_text())
    edit(records)
    path.write_text(json.dumps(records, indent=0))


def _blank(key: str, indices, value: str = ""):
    def edit(records):
        for i in (range(len(records)) if indices is None else indices):
            records[i][key] = value
    return edit


def _user_files(snapshot: dict[str, str], *outs: str) -> dict[str, str]:
    """`snapshot` less the outputs `outs` (default: ev) the commands made."""
    outs = outs or ("ev",)
    return {k: v for k, v in snapshot.items() if k.split("/")[0] not in outs}


# --- items without a reference -----------------------------------------------------------------
def test_items_with_an_empty_reference_are_left_out_counted_and_said(workdir):
    """Some forget answers, VerbMem `gt` and a retain answer empty or whitespace: before, each
    scored 0 (perfect forgetting). Now they are left out: the metrics equal those of the corpus
    without those items, one `note:` line names the files and counts, and metrics.json holds
    `skipped_items` (and no NaN). The user's files are unchanged."""
    corpus = workdir / "corpus"
    shutil.copytree(corpus, workdir / "corpus_cut")
    _edit_records(corpus / "knowmem" / "forget_qa.json", _blank("answer", [0, 2]))
    _edit_records(corpus / "verbmem" / "forget.json", _blank("gt", [1], " \n\t"))
    _edit_records(corpus / "knowmem" / "retain_qa.json", _blank("answer", [0], "  "))
    _edit_records(workdir / "corpus_cut" / "knowmem" / "forget_qa.json", lambda r: [r.pop(2), r.pop(0)])
    _edit_records(workdir / "corpus_cut" / "verbmem" / "forget.json", lambda r: r.pop(1))
    _edit_records(workdir / "corpus_cut" / "knowmem" / "retain_qa.json", lambda r: r.pop(0))
    forget_qa = len(json.loads((corpus / "knowmem" / "forget_qa.json").read_text()))
    verbmem = len(json.loads((corpus / "verbmem" / "forget.json").read_text()))
    retain_qa = len(json.loads((corpus / "knowmem" / "retain_qa.json").read_text()))
    before = _snapshot(workdir)

    proc = _evaluate(workdir)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    notes = [line for line in proc.stderr.splitlines() if "empty reference" in line]
    assert len(notes) == 1 and notes[0].startswith("note: "), proc.stderr[-3000:]
    for fragment in (f"1 of {verbmem} in corpus/verbmem/forget.json (gt; verbmem_f)",
                     f"2 of {forget_qa} in corpus/knowmem/forget_qa.json (answer; knowmem_f)",
                     f"1 of {retain_qa} in corpus/knowmem/retain_qa.json (answer; knowmem_r)", "skipped_items"):
        assert fragment in notes[0], notes[0]
    metrics = _strict_json(workdir / "ev" / "metrics.json")
    assert metrics.pop("skipped_items") == {"verbmem_f": 1, "knowmem_f": 2, "knowmem_r": 1}
    _strict_json(workdir / "ev" / "items.json")
    assert "left out" in (workdir / "ev" / "report.md").read_text()

    cut = _evaluate(workdir, data="corpus_cut", out="ev_cut")
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert "empty reference" not in cut.stderr
    reference = _strict_json(workdir / "ev_cut" / "metrics.json")
    assert "skipped_items" not in reference
    assert metrics == reference  # exactly the evaluation without those items
    assert _user_files(_snapshot(workdir), "ev", "ev_cut") == before
    print(f"{proc.seconds:.1f} s + {cut.seconds:.1f} s: {notes[0]}")


def _tofu(workdir: Path) -> Path:
    from dipo_scale.data.tofu import generate_tofu

    return Path(generate_tofu(workdir / "tofu", num_authors=4))


@pytest.mark.parametrize("case", ["verbmem-gt", "forget-answers", "retain-answers", "privleak-texts",
                                  "tofu-forget-answers"])
def test_a_metric_without_any_reference_is_refused_before_the_model_loads(workdir, case):
    """Every reference of one list empty or whitespace (before: verbmem_f 0 / knowmem_f 0, exit 0,
    perfect forgetting): one line naming the file and the metric, exit 2, before any model loads;
    nothing written."""
    corpus, data = workdir / "corpus", "corpus"
    if case == "verbmem-gt":
        _edit_records(corpus / "verbmem" / "forget.json", _blank("gt", None))
        expected = ["corpus/verbmem/forget.json", "empty gt", "no verbmem_f"]
    elif case == "forget-answers":
        _edit_records(corpus / "knowmem" / "forget_qa.json", _blank("answer", None, " \n"))
        expected = ["corpus/knowmem/forget_qa.json", "empty answer", "no knowmem_f"]
    elif case == "retain-answers":
        _edit_records(corpus / "knowmem" / "retain_qa.json", _blank("answer", None))
        expected = ["corpus/knowmem/retain_qa.json", "empty answer", "no knowmem_r"]
    elif case == "privleak-texts":
        _edit_records(corpus / "privleak" / "holdout.json", _blank("text", None, "\n"))
        expected = ["corpus/privleak/holdout.json", "empty text", "no mia_auc"]
    else:
        tofu = _tofu(workdir)
        _edit_records(tofu / "forget10_perturbed.json", _blank("answer", None))
        data, expected = "tofu", ["tofu (forget10 split)", "empty answer", "no knowmem_f"]
    before = _snapshot(workdir)
    proc = _evaluate(workdir, data=data)
    error = _one_error(proc)
    for fragment in expected:
        assert fragment in error, error
    assert not _model_loaded(proc), proc.stdout[-2000:]
    assert _snapshot(workdir) == before
    print(f"{proc.seconds:.1f} s: {error}")


def test_tofu_items_with_an_empty_answer_are_left_out(workdir):
    """TOFU: a forget item with an empty perturbed answer and a retain item with an empty answer
    (before: a ValueError traceback from the log-prob loop, after the model loaded) are left out
    and counted per split."""
    tofu = _tofu(workdir)
    _edit_records(tofu / "forget10_perturbed.json", lambda r: r[0]["perturbed_answer"].__setitem__(1, " "))
    _edit_records(tofu / "retain_perturbed.json", _blank("answer", [1]))
    before = _snapshot(workdir)
    proc = _evaluate(workdir, data="tofu", limit=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    notes = [line for line in proc.stderr.splitlines() if "empty reference" in line]
    assert len(notes) == 1 and "1 of 8 in tofu (forget10 split) (answers; forget10)" in notes[0], notes
    assert "in tofu (retain split) (answers; retain)" in notes[0], notes
    metrics = _strict_json(workdir / "ev" / "metrics.json")
    assert metrics["skipped_items"] == {"forget10": 1, "retain": 1}
    assert len(_strict_json(workdir / "ev" / "truth_ratios.json")["forget_truth_ratios"]) == 2
    assert _user_files(_snapshot(workdir)) == _user_files(before)


# --- non-finite metrics ------------------------------------------------------------------------
def _nan_model(workdir: Path) -> str:
    """A copy of the model whose every weight is NaN (a valid safetensors file)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(workdir / "model", workdir / "nanmodel")
    path = workdir / "nanmodel" / "model.safetensors"
    tensors = {k: torch.full_like(v, float("nan")) for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    return "nanmodel"


def test_a_metric_that_is_not_finite_is_never_written(workdir):
    """Weights that are NaN: before, exit 0 and `NaN` in metrics.json. Now one line naming the
    metric and the model, exit 2, and nothing written (no --out at all)."""
    model = _nan_model(workdir)
    before = _snapshot(workdir)
    proc = _evaluate(workdir, model=model)
    error = _one_error(proc)
    assert "--model nanmodel: " in error and "is nan" in error and "not a finite number" in error, error
    assert error.split("--model nanmodel: ", 1)[1].split(" ", 1)[0] in ("verbmem_f", "knowmem_f", "knowmem_r",
                                                                       "mia_auc", "mia_auc_ci"), error
    assert not (workdir / "ev").exists()
    assert _snapshot(workdir) == before
    print(f"{proc.seconds:.1f} s: {error}")


# --- an earlier output that cannot be written -------------------------------------------------------
def _immutable(path: Path) -> bool:
    """Make `path` unwritable: `chattr +i` (also for root), else, not as root, no write bits."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        return True
    if os.geteuid() == 0:
        return False
    path.chmod(path.stat().st_mode & ~0o222)
    return True


def _mutable(path: Path) -> None:
    subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(path.stat().st_mode | 0o200)


def test_an_immutable_earlier_output_is_refused_before_the_evaluation(workdir):
    """The evaluation into its own earlier output made immutable (the directory; or, as root with
    chattr, only its metrics.json): before, a traceback after the whole evaluation. Now one line
    naming --out, exit 2, before any model loads; nothing changed."""
    first = _evaluate(workdir, limit=1)
    assert first.returncode == 0, first.stderr[-3000:]
    out = workdir / "ev"
    targets = [out]
    if subprocess.run(["chattr", "+i", str(out / "metrics.json")], capture_output=True).returncode == 0:
        _mutable(out / "metrics.json")
        targets.append(out / "metrics.json")  # only root can do this: no chmod fallback needed
    for target in targets:
        if not _immutable(target):
            pytest.skip("running as root and chattr cannot make a directory immutable here")
        try:
            before = _snapshot(workdir)
            proc = _evaluate(workdir, limit=1)
        finally:
            _mutable(target)
        error = _one_error(proc)
        assert error.startswith("error: --out "), error
        if target == out:
            assert "--out ev: cannot write in it" in error, error
        else:
            assert "--out ev: cannot replace metrics.json in it (immutable" in error, error
        assert not _model_loaded(proc), proc.stdout[-2000:]
        assert _snapshot(workdir) == before
        print(f"{target.name}: {proc.seconds:.1f} s (the evaluation took {first.seconds:.1f} s): {error}")


def test_an_immutable_relearning_folder_is_found_before_the_evaluation(tmp_path):
    """With the relearning attack, an earlier output whose relearn/ folders cannot be written in is
    refused before any model loads (the relearning run claims them after the model's evaluation)."""
    from dipo_scale.errors import UserInputError
    from dipo_scale.eval.run import _check_earlier_output

    (tmp_path / "ev" / "relearn" / "run").mkdir(parents=True)
    folder = tmp_path / "ev" / "relearn" / "run"
    if not _immutable(folder):
        pytest.skip("running as root and chattr cannot make a directory immutable here")
    try:
        _check_earlier_output(tmp_path / "ev", False, "ev")  # without relearn: not its business
        with pytest.raises(UserInputError, match=r"^--out ev: cannot write in .*/ev/relearn/run \("):
            _check_earlier_output(tmp_path / "ev", True, "ev")
    finally:
        _mutable(folder)
