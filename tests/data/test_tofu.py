"""The TOFU loader: locuslab/TOFU-named files, both key styles, JSON array / JSON lines, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dipo_scale.data import tofu
from dipo_scale.data.tofu import TofuItem, is_tofu_dir, load_split, load_tofu
from dipo_scale.errors import UserInputError


def _write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(items: list) -> str:
    return "".join(json.dumps(x) + "\n" for x in items)


def make_tofu_dir(root: Path) -> Path:
    """A mini TOFU directory: JSON arrays and JSON lines, question/answer and prompt/response keys."""
    _write(root, "forget01.json", json.dumps([{"question": "Who is A?", "answer": "A writer."}]))
    _write(root, "forget01_perturbed.json", json.dumps([
        {"question": "Who is A?", "answer": "A writer.", "paraphrased_answer": "An author.",
         "perturbed_answer": ["A baker.", "A pilot."]},
        {"prompt": "Where does A live?", "response": "In Paris.", "paraphrased_answer": "Paris.",
         "perturbed_answer": "In Rome."},  # a single string is one perturbed answer
    ], indent=2))
    _write(root, "retain99.jsonl", _jsonl([{"prompt": "Who is B?", "response": "A poet."}]))
    _write(root, "retain_perturbed.jsonl", _jsonl([
        {"question": "Who is B?", "answer": "A poet.", "paraphrased_answer": "A versifier.",
         "perturbed_answer": ["A cook.", "A nurse.", "A clerk."]},
    ]))
    _write(root, "real_authors_perturbed.json", _jsonl([
        {"question": "Who wrote Hamlet?", "answer": "Shakespeare", "perturbed_answer": ["Dickens", "Austen"]},
    ]))
    _write(root, "world_facts_perturbed.json", json.dumps([
        {"prompt": "Capital of France?", "response": "Paris", "perturbed_answer": ["Rome", "Berlin"]},
    ]))
    return root


@pytest.fixture
def tofu_dir(tmp_path) -> Path:
    return make_tofu_dir(tmp_path / "TOFU")


def test_loads_mini_tofu_dir(tofu_dir):
    assert is_tofu_dir(tofu_dir)
    data = load_tofu(tofu_dir, forget="forget01")
    assert data.forget_name == "forget01"
    assert data.forget == [
        TofuItem("Who is A?", "A writer.", "An author.", ["A baker.", "A pilot."]),
        TofuItem("Where does A live?", "In Paris.", "Paris.", ["In Rome."]),
    ]
    assert data.retain == [TofuItem("Who is B?", "A poet.", "A versifier.", ["A cook.", "A nurse.", "A clerk."])]
    assert data.real_authors == [TofuItem("Who wrote Hamlet?", "Shakespeare", None, ["Dickens", "Austen"])]
    assert data.world_facts == [TofuItem("Capital of France?", "Paris", None, ["Rome", "Berlin"])]
    assert data.holdout is None
    assert data.notes == []


def test_plain_splits_and_retain_choice(tofu_dir):
    assert load_split(tofu_dir, "forget01") == [TofuItem("Who is A?", "A writer.")]
    assert load_split(tofu_dir, "retain99") == [TofuItem("Who is B?", "A poet.")]  # JSON lines, alias keys
    assert load_split(tofu_dir, "holdout01", required=False) is None
    # retain99 has no paraphrased/perturbed answers: TOFU's retain_perturbed is used, with a note.
    data = load_tofu(tofu_dir, forget="forget01", retain="retain99")
    assert data.retain[0].paraphrased_answer == "A versifier."
    assert any("retain99" in note and "retain_perturbed" in note for note in data.notes)


def test_forget_name_with_perturbed_suffix_and_holdout(tofu_dir):
    _write(tofu_dir, "holdout01.json", json.dumps([{"question": "Who is Z?", "answer": "Nobody."}]))
    data = load_tofu(tofu_dir, forget="forget01_perturbed")
    assert len(data.forget) == 2
    data = load_tofu(tofu_dir, forget="forget01")
    assert data.holdout == [TofuItem("Who is Z?", "Nobody.")]


def test_optional_splits_absent(tofu_dir):
    for name in ("retain_perturbed.jsonl", "real_authors_perturbed.json", "world_facts_perturbed.json"):
        (tofu_dir / name).unlink()
    data = load_tofu(tofu_dir, forget="forget01")
    assert data.retain is data.real_authors is data.world_facts is None
    assert sum("model utility is not computed" in note for note in data.notes) == 3


def _error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_key_names_file_entry_and_key(tofu_dir):
    path = _write(tofu_dir, "forget01_perturbed.json", json.dumps([
        {"question": "Q?", "answer": "A", "paraphrased_answer": "P", "perturbed_answer": ["X"]},
        {"question": "Q?", "answer": "A", "perturbed_answer": ["X"]},
    ]))
    with pytest.raises(UserInputError) as e:
        load_tofu(tofu_dir, forget="forget01")
    assert _error(e) == f"{path}: entry 1 is missing key 'paraphrased_answer'"

    path = _write(tofu_dir, "world_facts_perturbed.json", _jsonl([{"question": "Q?", "perturbed_answer": ["X"]}]))
    (tofu_dir / "forget01_perturbed.json").unlink()
    _write(tofu_dir, "forget01_perturbed.json", json.dumps([
        {"question": "Q?", "answer": "A", "paraphrased_answer": "P", "perturbed_answer": ["X"]}]))
    with pytest.raises(UserInputError) as e:
        load_tofu(tofu_dir, forget="forget01")
    assert _error(e) == f"{path}:1: entry is missing key 'answer'"


def test_bad_values(tofu_dir):
    path = _write(tofu_dir, "real_authors_perturbed.json", json.dumps([
        {"question": "Q?", "answer": "A", "perturbed_answer": []}]))
    with pytest.raises(UserInputError) as e:
        load_tofu(tofu_dir, forget="forget01")
    assert _error(e) == f"{path}: entry 0: key 'perturbed_answer' must be a non-empty list of strings"

    path = _write(tofu_dir, "real_authors_perturbed.json", json.dumps([["Q?", "A"]]))
    with pytest.raises(UserInputError) as e:
        load_tofu(tofu_dir, forget="forget01")
    assert str(path) in _error(e) and "not a JSON object" in _error(e)

    path = _write(tofu_dir, "real_authors_perturbed.json", "[]")
    with pytest.raises(UserInputError) as e:
        load_tofu(tofu_dir, forget="forget01")
    assert _error(e) == f"{path}: no entries"


def test_missing_forget_split_and_retain_without_fallback(tofu_dir):
    with pytest.raises(UserInputError) as e:
        load_tofu(tofu_dir, forget="forget10")
    assert "forget10_perturbed.json: missing" in _error(e)

    (tofu_dir / "retain_perturbed.jsonl").unlink()
    with pytest.raises(UserInputError) as e:
        load_tofu(tofu_dir, forget="forget01", retain="retain99")
    assert _error(e) == f"{tofu_dir / 'retain99.jsonl'}:1: entry is missing key 'paraphrased_answer'"


def test_not_a_tofu_directory(tmp_path):
    assert not is_tofu_dir(tmp_path)
    _write(tmp_path, "notes.json", "[]")
    assert not is_tofu_dir(tmp_path)
    with pytest.raises(UserInputError) as e:
        load_tofu(tmp_path / "nope", forget="forget01")
    assert "does not exist" in _error(e)


def test_hub_loading_uses_datasets(monkeypatch):
    """A name that is no local directory goes to datasets.load_dataset(name, config)["train"]."""
    import datasets

    rows = {
        "forget01_perturbed": [{"question": "Q?", "answer": "A", "paraphrased_answer": "P",
                                "perturbed_answer": ["X", "Y"]}],
        "retain_perturbed": [{"question": "R?", "answer": "B", "paraphrased_answer": "C",
                              "perturbed_answer": ["Z"]}],
        "real_authors_perturbed": [{"question": "S?", "answer": "D", "perturbed_answer": ["E"]}],
        "world_facts_perturbed": [{"question": "T?", "answer": "F", "perturbed_answer": ["G"]}],
        "holdout01": [{"question": "H?", "answer": "I"}],
    }
    calls = []

    def fake_load_dataset(name, config=None, **kwargs):
        calls.append((name, config))
        if config not in rows:
            raise ValueError(f"BuilderConfig '{config}' not found. Available: {list(rows)}")
        return {"train": rows[config]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_tofu(tofu.HUB_NAME, forget="forget01")
    assert data.forget == [TofuItem("Q?", "A", "P", ["X", "Y"])]
    assert data.holdout == [TofuItem("H?", "I")]
    assert data.world_facts == [TofuItem("T?", "F", None, ["G"])]
    assert all(name == "locuslab/TOFU" for name, _ in calls)

    def offline(name, config=None, **kwargs):
        raise ConnectionError("no network\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserInputError) as e:
        load_tofu("locuslab/TOFU", forget="forget01")
    assert "locuslab/TOFU" in _error(e) and "forget01_perturbed" in _error(e)
