"""Bad input through the real command: one-line error, exit 2, nothing half-written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dipo_scale.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def corpus_copy(tiny_assets, tmp_path):
    dst = tmp_path / "corpus"
    shutil.copytree(tiny_assets["corpus"], dst)
    return dst


def _prepare(corpus, tiny_assets, out):
    return _cli("prepare", "--data", corpus, "--tokenizer", tiny_assets["tokenizer"], "--out", out)


def test_prepare_works_on_a_good_corpus(corpus_copy, tiny_assets, tmp_path):
    proc = _prepare(corpus_copy, tiny_assets, tmp_path / "prepared")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert manifest["splits"]["forget"]["blocks"] > 0


def test_missing_forget_set(corpus_copy, tiny_assets, tmp_path):
    (corpus_copy / "raw" / "forget.txt").unlink()
    _assert_one_line_error(_prepare(corpus_copy, tiny_assets, tmp_path / "out"), "raw/forget")
    assert not (tmp_path / "out").exists()


def test_empty_forget_set(corpus_copy, tiny_assets, tmp_path):
    (corpus_copy / "raw" / "forget.txt").write_text("\n\n")
    _assert_one_line_error(_prepare(corpus_copy, tiny_assets, tmp_path / "out"), "forget.txt", "empty")
    assert not (tmp_path / "out").exists()


def test_malformed_json_names_file_and_line(corpus_copy, tiny_assets, tmp_path):
    path = corpus_copy / "knowmem" / "forget_qa.json"
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace('"', "", 1)  # break line 4
    path.write_text("\n".join(lines))
    _assert_one_line_error(_prepare(corpus_copy, tiny_assets, tmp_path / "out"), "forget_qa.json:4")
    assert not (tmp_path / "out").exists()


def test_malformed_jsonl_names_file_and_line(corpus_copy, tiny_assets, tmp_path):
    (corpus_copy / "knowmem" / "retain_qa.json").unlink()
    (corpus_copy / "knowmem" / "retain_qa.jsonl").write_text(
        '{"question": "a?", "answer": "b"}\n{"question": "c?", "answer": \n')
    _assert_one_line_error(_prepare(corpus_copy, tiny_assets, tmp_path / "out"), "retain_qa.jsonl:2")


def test_muse_dir_missing_a_file(corpus_copy, tiny_assets, tmp_path):
    (corpus_copy / "verbmem" / "forget.json").unlink()
    _assert_one_line_error(_prepare(corpus_copy, tiny_assets, tmp_path / "out"), "verbmem/forget.json")
    assert not (tmp_path / "out").exists()


def test_invalid_config_values_all_reported_at_once(tiny_assets, tmp_path):
    proc = _cli("unlearn", "--set", "dipo.beta=0", "--set", "dipo.alpha=-1", "--set", "method=fancy",
                "--set", "dipo.colour=red", "--set", "dipo.k=100000",
                "--set", f"model.path={tiny_assets['target']}", "--set", f"out_dir={tmp_path / 'run'}")
    line = _assert_one_line_error(proc, "dipo.beta", "dipo.alpha", "method", "dipo.colour: unknown key",
                                  "dipo.k: 100000 exceeds the vocabulary")
    assert "greater than 0" in line
    assert not (tmp_path / "run").exists()


def test_config_file_with_unknown_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: dipo\ntrain:\n  stepz: 3\n")
    _assert_one_line_error(_cli("unlearn", "--config", cfg), "c.yaml", "train.stepz: unknown key")


def test_ds_config_with_wrong_stage(tiny_assets, tmp_path):
    ds = tmp_path / "zero2.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    proc = _cli("unlearn", "--set", f"model.path={tiny_assets['target']}",
                "--set", f"data.prepared_dir={tiny_assets['prepared']}", "--set", f"train.ds_config={ds}",
                "--set", f"out_dir={tmp_path / 'run'}")
    _assert_one_line_error(proc, "zero2.json", "stage 3")
    assert not (tmp_path / "run").exists()


def test_configs_unlearn_yaml_lists_every_key_with_its_default():
    """configs/unlearn.yaml says it lists every key: the same key tree as the config, and each
    value the default except the ones an example run sets (paths, method, workers, steps)."""
    import yaml

    from dipo_scale.config import UnlearnConfig

    def leaves(tree, prefix=""):
        out = {}
        for key, value in tree.items():
            out.update(leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    listed = leaves(yaml.safe_load((Path(__file__).parents[1] / "configs" / "unlearn.yaml").read_text()))
    defaults = leaves(UnlearnConfig().model_dump(by_alias=True))
    assert set(listed) == set(defaults), (set(listed) ^ set(defaults))
    example = {"method", "out_dir", "model.path", "data.prepared_dir", "train.num_workers", "train.steps",
               "train.global_batch_size", "train.micro_batch_size", "train.lr", "dipo.alpha"}
    differ = {k for k in listed if k not in example and listed[k] != defaults[k]}
    assert not differ, {k: (listed[k], defaults[k]) for k in differ}
