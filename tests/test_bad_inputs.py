"""Bad input as a new (and careless) user types it, through the real command.

Every case asserts: exit status 2, exactly one stderr line `error: ...` naming the input and the
problem, no traceback, and the working directory (inputs and outputs, every file's checksum)
unchanged: a failed check deletes, overwrites and claims nothing, so the corrected command runs.
The checks that guard Ray workers come back before any worker starts (asserted on the output:
no Ray Train worker ever printed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dipo_scale.files import MARKER


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under root: its sha256 (files) or "dir" (home/, the command's
    $HOME, where Ray and wandb keep caches, aside)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel.split("/")[0] == "home":
            continue
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def other_tokenizer_prepared(tiny_assets, tmp_path_factory):
    """The corpus prepared with a different tokenizer of the same vocabulary size."""
    from dipo_scale.data.muse import load_muse_dir
    from dipo_scale.models import train_tokenizer
    from dipo_scale.prepare import prepare

    data = load_muse_dir(tiny_assets["corpus"])
    vocab = len(json.loads((tiny_assets["tokenizer"] / "tokenizer.json").read_text())["model"]["vocab"])
    tokenizer = train_tokenizer(data.retain_docs, vocab)  # other texts: other merges, same size
    out = tmp_path_factory.mktemp("other_tok") / "prepared"
    prepare(data, tokenizer, out, block_size=64, with_qa=True, layout="per_sequence")
    return out


# ------------------------------------------------------------------------------------------------
# Each case: (id, setup(tmp, assets) -> argv after `dipo-scale`, fragments the error line must hold)
# `tmp` is the working directory; it holds copies of the inputs (model, prepared, corpus).
# ------------------------------------------------------------------------------------------------
def _unlearn(*sets):
    base = ["model.path=model", "data.prepared_dir=prepared", "out_dir=run", "train.steps=2",
            "train.global_batch_size=4", "train.micro_batch_size=2", "logging.wandb=disabled"]
    overridden = {s.split("=", 1)[0] for s in sets}
    items = [s for s in base if s.split("=", 1)[0] not in overridden] + list(sets)
    return ["unlearn", *(a for s in items for a in ("--set", s))]


def _user_dir(tmp: Path, name: str) -> Path:
    d = tmp / name
    d.mkdir()
    (d / "keep.txt").write_text("the user's file\n")
    return d


def _remove_weights(tmp):
    for p in (tmp / "model").glob("*.safetensors"):
        p.unlink()


def _rewrite_header(path: Path, edit) -> None:
    """The safetensors file at `path` with its JSON header replaced by `edit(header)` (the data kept)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(edit(json.loads(data[8:8 + n]))).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + n:])


def _first_tensor(header: dict) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


def _shard(tmp: Path) -> Path:
    return sorted((tmp / "prepared" / "forget").glob("part-*.parquet"))[0]


def _config(tmp: Path, yaml_bytes: bytes) -> list[str]:
    """`unlearn --config c.yaml` (the usual settings as --set) with c.yaml holding `yaml_bytes`."""
    (tmp / "c.yaml").write_bytes(yaml_bytes)
    return ["unlearn", "--config", "c.yaml", *_unlearn()[1:]]


def _prepare_with_empty_retain(tmp: Path) -> str:
    """The corpus prepared with its retain file emptied to whitespace (`prepare` says "retain: 1
    blocks, 0 tokens": one padding block; runs trained on it, logging a retain loss of 0)."""
    from transformers import AutoTokenizer

    from dipo_scale.data.muse import load_muse_dir
    from dipo_scale.prepare import prepare

    for retain in (tmp / "corpus" / "raw").glob("retain*"):
        retain.write_text("  \n\n \n")
    manifest = prepare(load_muse_dir(tmp / "corpus"), AutoTokenizer.from_pretrained(tmp / "model"),
                       tmp / "prepared_empty_retain", block_size=64, layout="per_sequence")
    assert manifest["splits"]["retain"]["tokens"] == 0 < manifest["splits"]["forget"]["tokens"]
    return "prepared_empty_retain"


CASES = [
    # --- generate -------------------------------------------------------------------------------
    ("generate-into-a-user-dir", lambda t, a: (_user_dir(t, "d"), ["generate", "--out", "d", "--num-docs", "5"])[1],
     ["--out d", "not empty"]),
    ("generate-into-the-working-dir", lambda t, a: ["generate", "--out", ".", "--num-docs", "5"],
     ["--out .", "not empty"]),
    ("generate-onto-a-file", lambda t, a: ((t / "f").write_text("x"), ["generate", "--out", "f"])[1],
     ["--out f", "not a directory"]),
    ("generate-under-proc", lambda t, a: ["generate", "--out", "/proc/dipo_scale_x"],
     ["--out /proc/dipo_scale_x", "cannot create"]),
    ("generate-too-few-docs", lambda t, a: ["generate", "--out", "new", "--num-docs", "2"], ["num_docs", ">= 3"]),
    ("generate-num-docs-and-scale", lambda t, a: ["generate", "--out", "new", "--num-docs", "9", "--scale", "1"],
     ["--num-docs or --scale"]),
    ("generate-scale-zero", lambda t, a: ["generate", "--out", "new", "--scale", "0"], ["--scale 0", "> 0"]),
    ("generate-no-retain-left", lambda t, a: ["generate", "--out", "new", "--num-docs", "6", "--forget-docs", "3",
                                              "--holdout-docs", "3"], ["no retain document"]),
    # --- prepare --------------------------------------------------------------------------------
    ("prepare-onto-its-corpus", lambda t, a: ["prepare", "--data", "corpus", "--tokenizer", "tokenizer",
                                              "--out", "corpus"], ["--out corpus", "is the input --data"]),
    ("prepare-inside-its-corpus", lambda t, a: ["prepare", "--data", "corpus", "--tokenizer", "tokenizer",
                                                "--out", "corpus/prepared"], ["--out corpus/prepared", "inside"]),
    ("prepare-block-size-0", lambda t, a: ["prepare", "--data", "corpus", "--tokenizer", "tokenizer", "--out", "p",
                                           "--block-size", "0"], ["--block-size 0", "at least 2"]),
    ("prepare-missing-absolute-tokenizer", lambda t, a: ["prepare", "--data", "corpus", "--tokenizer",
                                                         "/abs/missing", "--out", "p"],
     ["--tokenizer /abs/missing", "no such directory"]),
    ("prepare-mistyped-relative-tokenizer", lambda t, a: ["prepare", "--data", "corpus", "--tokenizer",
                                                          "corpus/tokenizr", "--out", "p"],
     ["--tokenizer corpus/tokenizr", "no such directory"]),
    # --- unlearn: the config ---------------------------------------------------------------------
    ("set-malformed-yaml", lambda t, a: _unlearn("dipo.alpha=[1,"), ["--set dipo.alpha=[1,", "malformed value"]),
    ("set-bool-as-steps", lambda t, a: _unlearn("train.steps=true"), ["train.steps", "expected a number"]),
    ("set-error-named-as-set-not-file", lambda t, a: ((t / "c.yaml").write_text("method: dipo\n"),
                                                      ["unlearn", "--config", "c.yaml", "--set", "dipo.beta=0"])[1],
     ["error: --set dipo.beta=0: dipo.beta"]),
    ("set-infinite-lr", lambda t, a: _unlearn("train.lr=.inf"), ["--set train.lr=.inf", "finite number"]),
    ("wandb-online-without-credentials", lambda t, a: _unlearn("logging.wandb=online"),
     ["logging.wandb=online", "credentials"]),
    # --- unlearn: the model ----------------------------------------------------------------------
    ("model-without-weights", lambda t, a: (_remove_weights(t), _unlearn())[1], ["model", "no weight files"]),
    ("model-truncated-safetensors", lambda t, a: (_truncate(t / "model" / "model.safetensors"), _unlearn())[1],
     ["model.safetensors", "truncated"]),
    ("model-header-a-list", lambda t, a: (_rewrite_header(t / "model" / "model.safetensors", lambda h: [h]),
                                          _unlearn())[1], ["model.safetensors", "a JSON list, not an object"]),
    ("model-header-no-data-offsets", lambda t, a: (_rewrite_header(
        t / "model" / "model.safetensors", lambda h: (_first_tensor(h).pop("data_offsets"), h)[1]), _unlearn())[1],
     ["model.safetensors", "corrupt safetensors header", "expected dtype, shape and data_offsets"]),
    ("model-header-dtype-of-another-size", lambda t, a: (_rewrite_header(
        t / "model" / "model.safetensors", lambda h: (_first_tensor(h).update(dtype="F16"), h)[1]), _unlearn())[1],
     ["model.safetensors", "F16", "data_offsets give"]),
    ("model-header-integer-dtype-of-the-same-size", lambda t, a: (_rewrite_header(
        t / "model" / "model.safetensors", lambda h: (_first_tensor(h).update(dtype="I32"), h)[1]), _unlearn())[1],
     ["model.safetensors", "is I32, not floating point"]),
    ("model-unknown-architecture", lambda t, a: (_edit_config(t / "model", model_type="fancy_lm"), _unlearn())[1],
     ["model.path model", "unknown architecture", "fancy_lm"]),
    ("model-needs-remote-code", lambda t, a: (_edit_config(t / "model", model_type="custom_lm", auto_map={
        "AutoModelForCausalLM": "modeling_custom.CustomLM"}), _unlearn())[1],
     ["model.path model", "trust_remote_code"]),
    ("tokenizer-larger-than-vocabulary", lambda t, a: (_edit_config(t / "model", vocab_size=100), _unlearn())[1],
     ["model.path model", "more than the model's vocabulary (100)"]),
    ("mistyped-relative-model-path", lambda t, a: _unlearn("model.path=model/targt"),
     ["model.path model/targt", "no such directory"]),
    # --- unlearn: the prepared data ----------------------------------------------------------------
    ("prepared-shard-flipped-byte", lambda t, a: (_flip_byte(_shard(t)), _unlearn())[1], ["part-00000", "checksum"]),
    ("prepared-shard-truncated", lambda t, a: (_truncate(_shard(t)), _unlearn())[1], ["part-00000", "checksum"]),
    ("prepared-manifest-truncated", lambda t, a: (_truncate(t / "prepared" / "manifest.json"), _unlearn())[1],
     ["manifest.json", "malformed JSON"]),
    ("prepared-with-another-tokenizer", lambda t, a: _unlearn(f"data.prepared_dir={a['other_prepared']}"),
     ["data.prepared_dir", "another tokenizer"]),
    ("block-size-beyond-positions", lambda t, a: (_edit_config(t / "model", max_position_embeddings=32), _unlearn())[1],
     ["block size 64", "32 positions"]),
    # --- unlearn: the output ---------------------------------------------------------------------
    ("out-dir-is-a-file", lambda t, a: ((t / "run").write_text("x"), _unlearn())[1], ["out_dir run", "not a directory"]),
    ("out-dir-a-user-dir", lambda t, a: (_user_dir(t, "run"), _unlearn())[1], ["out_dir run", "not empty"]),
    ("out-dir-garbage-config", lambda t, a: ((t / "run").mkdir(), (t / "run" / MARKER).write_text(
        '{"command": "unlearn"}'), (t / "run" / "config.json").write_text("{garbage"), _unlearn())[-1],
     ["config.json", "malformed JSON"]),
    ("out-dir-inside-the-model", lambda t, a: _unlearn("out_dir=model/run"), ["out_dir model/run", "inside the input"]),
    ("more-workers-than-cpus", lambda t, a: _unlearn("train.num_workers=64", "train.global_batch_size=128"),
     ["train.num_workers=64", "needs 64 CPUs"]),
    # --- reference, sweep, series, evaluate, demo ------------------------------------------------
    ("reference-cache-inside-prepared", lambda t, a: ["reference", *_unlearn(
        "reference.form=hidden", "reference.cache_dir=prepared/cache")[1:]], ["reference.cache_dir", "inside"]),
    ("sweep-invalid-second-grid-value", lambda t, a: ["sweep", "--set", "unlearn.model.path=model",
                                                      "--set", "unlearn.eval.every=1", "--set", "unlearn.eval.data_dir=corpus",
                                                      "--set", "space.dipo.beta.grid=[0.1,-1]"],
     ["space.dipo.beta", "-1", "greater than 0"]),
    ("scalability-truncated-model", lambda t, a: (_truncate(t / "model" / "model.safetensors"), [
        "scalability", "--set", "data_dir=corpus", "--set", "unlearn.model.path=model", "--set", "out_dir=series",
        "--set", "forget_sets=folds"])[1],
     ["model.safetensors", "truncated"]),
    ("sequential-into-a-user-dir", lambda t, a: (_user_dir(t, "series"), [
        "sequential", "--set", "data_dir=corpus", "--set", "unlearn.model.path=model", "--set", "out_dir=series",
        "--set", "forget_sets=folds"])[1], ["out_dir series", "not empty"]),
    ("evaluate-truncated-safetensors", lambda t, a: (_truncate(t / "model" / "model.safetensors"), [
        "evaluate", "--model", "model", "--data", "corpus", "--out", "ev"])[1], ["model.safetensors", "truncated"]),
    ("evaluate-out-under-proc", lambda t, a: ["evaluate", "--model", "model", "--data", "corpus", "--out",
                                              "/proc/dipo_scale_x"], ["--out /proc/dipo_scale_x", "cannot create"]),
    ("evaluate-out-is-the-model", lambda t, a: ["evaluate", "--model", "model", "--data", "corpus", "--out", "model"],
     ["--out model", "is the input --model"]),
    ("evaluate-mistyped-relative-model", lambda t, a: ["evaluate", "--model", "corpus/modle", "--data", "corpus",
                                                       "--out", "ev"], ["--model corpus/modle", "no such directory"]),
    ("demo-doc-over-a-user-file", lambda t, a: ((t / "notes.md").write_text("mine"),
                                                ["demo", "--out", "new", "--doc", "notes.md"])[1],
     ["--doc notes.md", "not overwriting"]),
    ("demo-into-a-user-dir", lambda t, a: (_user_dir(t, "demo"), ["demo", "--out", "demo"])[1],
     ["--out demo", "not empty"]),
    # --- issue 27 ---------------------------------------------------------------------------------
    # A key given twice: PyYAML kept the last and dropped the first block unread (its lr=.inf too).
    ("config-duplicate-section", lambda t, a: _config(
        t, b"train:\n  lr: .inf\nmethod: dipo\ntrain:\n  steps: 2\n"),
     ["error: c.yaml:4: duplicate key 'train' (first at line 1)"]),
    ("config-duplicate-nested-key", lambda t, a: _config(t, b"train:\n  steps: 2\n  lr: 1.0e-5\n  steps: 3\n"),
     ["error: c.yaml:4: duplicate key 'train.steps' (first at line 2)"]),
    ("config-not-utf8", lambda t, a: _config(t, b"method: dipo\ntrain:\n  steps: \xff2\n"),
     ["error: c.yaml:3: not UTF-8 text", "0xff at offset 29"]),
    ("config-control-character", lambda t, a: _config(t, b"method: dipo\n\x07\n"),
     ["error: c.yaml:2: malformed YAML", "#x0007"]),
    ("retain-split-empty-with-a-retain-term", lambda t, a: _unlearn(
        f"data.prepared_dir={_prepare_with_empty_retain(t)}", "loss.retain=gd"),
     ["data.prepared_dir prepared_empty_retain", "retain split holds no tokens", "loss.retain=gd"]),
]


def _env(workdir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(workdir / "home"), RAY_ADDRESS="local", HF_HUB_OFFLINE="1",
               RAY_TMPDIR=f"/tmp/dipo_bad_{os.getpid()}")  # a cluster of its own (never another test's)
    return env


@pytest.mark.parametrize("setup,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(setup, fragments, workdir, tiny_assets,
                                                          other_tokenizer_prepared):
    argv = setup(workdir, {**tiny_assets, "other_prepared": other_tokenizer_prepared})
    before = _snapshot(workdir)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dipo_scale.cli", *argv], cwd=workdir, env=_env(workdir),
                          capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - t0
    assert proc.returncode == 2, f"exit {proc.returncode} after {seconds:.0f} s\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "RayTrainWorker" not in proc.stdout + proc.stderr  # stopped before any worker started
    assert _snapshot(workdir) == before  # nothing deleted, overwritten or half-written
    print(f"{seconds:.1f} s: {errors[0]}")


def test_evaluate_reads_no_raw_text(workdir):
    """A MUSE directory with verbmem/, knowmem/ and privleak/ but no raw/ (the public release is
    often used that way) is evaluated: evaluation reads no raw text."""
    shutil.rmtree(workdir / "corpus" / "raw")
    proc = subprocess.run([sys.executable, "-m", "dipo_scale.cli", "evaluate", "--model", "model", "--data", "corpus",
                           "--out", "ev", "--limit", "2", "--max-new-tokens", "4"], cwd=workdir, env=_env(workdir),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((workdir / "ev" / "metrics.json").read_text())
    assert {"verbmem_f", "knowmem_f", "knowmem_r", "mia_auc"} <= set(metrics)


def test_outputs_follow_the_umask(tmp_path):
    """Files and directories a command creates get the permissions the umask gives."""
    from dipo_scale.data.corpus import generate_corpus

    old = os.umask(0o002)
    try:
        generate_corpus(tmp_path / "c", num_docs=3)
    finally:
        os.umask(old)
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o775
    assert (tmp_path / "c" / "world.json").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "c" / MARKER).stat().st_mode & 0o777 == 0o664


def test_files_a_writer_makes_0600_follow_the_umask(tmp_path):
    """safetensors' save_file makes its files 0600 whatever the umask (an exported model.safetensors,
    written by save_pretrained, was 0600 under umask 022): everything in an `atomic_dir` output
    (the exported model, prepare's shards, generated corpora) gets the umask's permissions."""
    import torch
    from safetensors.torch import save_file

    from dipo_scale.files import atomic_dir

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model", "unlearn") as tmp:
            save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")
            (tmp / "sub").mkdir(mode=0o700)
            save_file({"w": torch.zeros(2)}, tmp / "sub" / "part.safetensors")
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "run.sh").chmod(0o700)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [tmp_path / "model", *(tmp_path / "model").rglob("*")]}
    assert modes == {"model": 0o755, "model.safetensors": 0o644, "sub": 0o755, "part.safetensors": 0o644,
                     "run.sh": 0o755, MARKER: 0o644}


def test_a_diverging_run_stops_in_one_line_and_exports_nothing(workdir):
    """A learning rate that passes validation but makes training diverge (1e30: step 1's AdamW
    update sends the weights past float32): the run stops at the first non-finite loss with one line
    naming the step, exit 2; the steps before it stay in the log and no model is exported."""
    proc = subprocess.run([sys.executable, "-m", "dipo_scale.cli", *_unlearn("train.lr=1e30", "train.steps=4",
                                                                             "train.num_workers=1")],
                          cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "the run diverged" in errors[0] and "no model is exported" in errors[0], errors
    step = int(errors[0].split("step ", 1)[1].split(":", 1)[0])
    log = [json.loads(line) for line in (workdir / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, step)) and step >= 2
    assert all(np.isfinite(r["loss"]) for r in log)
    assert not (workdir / "run" / "model").exists()


def test_merged_keys_may_be_overridden_and_set_keeps_the_last(tmp_path):
    """Not duplicates: a key merged in with `<<: *anchor` and given again (YAML's override), and
    a --set given twice (the last wins, as before)."""
    from dipo_scale.config import load_config

    (tmp_path / "c.yaml").write_text("dipo: &shared {beta: 0.2}\nnpo:\n  <<: *shared\n  beta: 0.3\n")
    cfg = load_config(tmp_path / "c.yaml", ["train.steps=3", "train.steps=4"])
    assert (cfg.dipo.beta, cfg.npo.beta, cfg.train.steps) == (0.2, 0.3, 4)


def test_a_second_run_on_a_held_out_dir_is_refused_naming_the_holder(workdir):
    """Two `unlearn` on the same out_dir at once (both exited 0 before; the second reused the
    first's final checkpoint): the second is refused in one line naming the holder, changes
    nothing, and the first ends as if alone (each step once in its log, its model exported). Its
    checkpoint files follow the umask (safetensors made them 0600). Then, on that finished run: a
    damaged checkpoint and an immutable directory are each refused before Ray starts."""
    argv = [sys.executable, "-m", "dipo_scale.cli", *_unlearn("train.num_workers=1", "train.steps=3")]
    first = subprocess.Popen(argv, cwd=workdir, env=_env(workdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    lock = workdir / "run" / ".dipo-scale.lock"
    deadline = time.monotonic() + 300
    try:
        while not (lock.is_file() and f'"pid": {first.pid}' in lock.read_text()):
            assert first.poll() is None, first.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the first run never took its out_dir"
            time.sleep(0.2)
        second = subprocess.run(argv, cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=300)
        out, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-3000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert "out_dir" in errors[0] and f"in use by `dipo-scale unlearn` (pid {first.pid}" in errors[0], errors[0]
    assert first.returncode == 0, out[-3000:]
    log = [json.loads(line) for line in (workdir / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert (workdir / "run" / "model" / "model.safetensors").is_file()
    umask = os.umask(0o022)
    os.umask(umask)
    saved = [p for p in (workdir / "run" / "ray").rglob("*.safetensors")]
    assert saved and {p.stat().st_mode & 0o777 for p in saved} == {0o666 & ~umask}, saved

    # A flipped byte in the checkpoint a rerun would resume from: one line before Ray starts (it
    # was found after 86 s, with worker tracebacks); the checkpoint is left as it is.
    newest = sorted((workdir / "run" / "ray").glob("*/checkpoint_step*/portable/rank0.safetensors"))[-1]
    _flip_byte(newest)
    before = _snapshot(workdir)
    flipped = subprocess.run(argv, cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=300)
    errors = [line for line in flipped.stderr.splitlines() if line.startswith("error: ")]
    assert flipped.returncode == 2 and len(errors) == 1, flipped.stderr[-3000:]
    assert f"{newest}: checksum does not match" in errors[0] and "move" in errors[0], errors[0]
    assert "Started a local Ray instance" not in flipped.stdout + flipped.stderr
    assert _snapshot(workdir) == before
    _flip_byte(newest)  # mended

    # The finished run's directory made immutable: a rerun is refused in one line before Ray starts
    # (it was refused only after Ray started).
    if subprocess.run(["chattr", "+i", str(workdir / "run")], capture_output=True).returncode != 0:
        if os.geteuid() == 0:
            return  # no way to make it unwritable for root here
        (workdir / "run").chmod(0o555)
    try:
        t0 = time.monotonic()
        again = subprocess.run(argv, cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=300)
        seconds = time.monotonic() - t0
    finally:
        subprocess.run(["chattr", "-i", str(workdir / "run")], capture_output=True)
        (workdir / "run").chmod(0o755)
    errors = [line for line in again.stderr.splitlines() if line.startswith("error: ")]
    assert again.returncode == 2 and len(errors) == 1, again.stderr[-3000:]
    assert "out_dir run: cannot write in it" in errors[0], errors[0]
    assert "Started a local Ray instance" not in again.stdout + again.stderr, f"{seconds:.0f} s"


def test_an_out_that_is_a_symbolic_link_is_written_through_it(tmp_path):
    """`--out` a symbolic link (to an empty directory; dangling): the command writes the directory
    it points to and the link stays; a rerun replaces that output. Before: a traceback after the
    work, and a hidden `.NAME.*.tmp` holding the whole output left behind."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    (tmp_path / "dangling").symlink_to("elsewhere")
    for out in ("link", "link", "dangling"):
        proc = subprocess.run([sys.executable, "-m", "dipo_scale.cli", "generate", "--out", out, "--num-docs", "4"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "link").is_symlink() and (tmp_path / "dangling").is_symlink()
    for target in ("real", "elsewhere"):
        assert (tmp_path / target / MARKER).is_file() and (tmp_path / target / "raw").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "elsewhere", "link", "real"]  # no leftovers


def test_a_stale_deepspeed_build_lock_is_said(tmp_path, capsys):
    """A DeepSpeed op build stopped by Ctrl-C leaves torch's `lock` file and every later CPU run's
    workers waited on it in silence: an old lock is said in one note line (and left in place)."""
    from dipo_scale.preflight import note_build_locks

    old = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    old.parent.mkdir(parents=True)
    old.write_text("")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    fresh = tmp_path / "py311_cpu" / "other_op" / "lock"
    fresh.parent.mkdir(parents=True)
    fresh.write_text("")  # a build running now
    assert note_build_locks(tmp_path) == [old]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"note: {old} is 60 min old") and "remove it" in err[0]
    assert old.is_file()
