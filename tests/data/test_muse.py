"""The MUSE directory loader: real-MUSE-style layout, file formats, aliases and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dipo_scale.data.muse import QA, VerbMemItem, load_muse_dir, read_documents, read_records
from dipo_scale.errors import UserInputError


def _write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(items: list) -> str:
    return "".join(json.dumps(x) + "\n" for x in items)


def make_muse_dir(root: Path) -> Path:
    """A small directory laid out like the real MUSE-News download."""
    _write(root, "raw/forget.txt", "Forget one.\nStill forget one.\n\nForget two.\n\n\n")
    _write(root, "raw/retain1.txt", "Retain one.\n\nRetain two.\n")
    _write(root, "raw/retain2.txt", "Retain three.\n")
    _write(root, "raw/holdout.txt", "Holdout one.\n")
    _write(root, "knowmem/forget_qa.json", json.dumps([{"question": "Q1?", "answer": "A1"},
                                                       {"question": "Q2?", "answer": "A2"}], indent=2))
    _write(root, "knowmem/retain2_qa.json", _jsonl([{"prompt": "R1?", "response": "B1"},
                                                    {"question": "R2?", "answer": 1995}]))
    _write(root, "knowmem/forget_qa_icl.json", json.dumps([{"question": "I?", "answer": "J"}]))
    _write(root, "knowmem/retain2_qa_icl.json", json.dumps([{"question": "K?", "answer": "L"}]))
    _write(root, "verbmem/forget.json", json.dumps([{"prompt": "Forget", "gt": "one."}]))
    _write(root, "privleak/forget.json", json.dumps(["Forget one.", {"text": "Forget two."}]))
    _write(root, "privleak/holdout.json", json.dumps([{"input": "Holdout one."}]))
    return root


@pytest.fixture
def muse(tmp_path) -> Path:
    return make_muse_dir(tmp_path / "MUSE-News")


def test_loads_real_muse_layout(muse):
    data = load_muse_dir(muse)
    assert data.root == muse
    assert data.forget_docs == ["Forget one.\nStill forget one.", "Forget two."]
    assert data.retain_docs == ["Retain one.", "Retain two.", "Retain three."]  # retain1 then retain2
    assert data.holdout_docs == ["Holdout one."]
    assert data.forget_qa == [QA("Q1?", "A1"), QA("Q2?", "A2")]
    assert data.retain_qa == [QA("R1?", "B1"), QA("R2?", "1995")]  # JSON lines, alias keys, number
    assert data.forget_qa_icl == [QA("I?", "J")] and data.retain_qa_icl == [QA("K?", "L")]
    assert data.verbmem == [VerbMemItem("Forget", "one.")]
    assert data.privleak_forget == ["Forget one.", "Forget two."]
    assert data.privleak_holdout == ["Holdout one."]


def test_optional_parts_may_be_missing(muse):
    for name in ("raw/holdout.txt", "knowmem/forget_qa_icl.json", "knowmem/retain2_qa_icl.json",
                 "privleak/forget.json", "privleak/holdout.json"):
        (muse / name).unlink()
    data = load_muse_dir(muse)
    assert data.holdout_docs == data.forget_qa_icl == data.retain_qa_icl == []
    assert data.privleak_forget == data.privleak_holdout == []


def test_retain_qa_json_preferred_and_jsonl_extension(muse):
    (muse / "knowmem/retain2_qa.json").unlink()
    _write(muse, "knowmem/retain_qa.jsonl", _jsonl([{"question": "X?", "answer": "Y"}]))
    assert load_muse_dir(muse).retain_qa == [QA("X?", "Y")]


def test_raw_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["First doc.", "Second doc."]
    jsonl = _write(tmp_path, "a.jsonl", _jsonl([{"text": docs[0]}, docs[1]]) + "\n")
    array = _write(tmp_path, "b.json", json.dumps([docs[0], {"text": docs[1]}]))
    txt = _write(tmp_path, "c.txt", "First doc.\r\n\r\n  Second doc.  \n \n")
    pq.write_table(pa.table({"text": docs, "id": [1, 2]}), tmp_path / "d.parquet")
    for path in (jsonl, array, txt, tmp_path / "d.parquet"):
        assert read_documents(path) == docs, path


def test_parquet_forget_split(muse):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (muse / "raw/forget.txt").unlink()
    pq.write_table(pa.table({"text": ["P one.", "P two."]}), muse / "raw/forget.parquet")
    assert load_muse_dir(muse).forget_docs == ["P one.", "P two."]


def test_read_records(tmp_path):
    rows = [{"a": 1}, {"a": 2}]
    assert read_records(_write(tmp_path, "r.jsonl", _jsonl(rows))) == rows
    assert read_records(_write(tmp_path, "r.json", json.dumps(rows, indent=2))) == rows
    assert read_records(_write(tmp_path, "lines.json", _jsonl(rows))) == rows  # JSON lines in .json
    with pytest.raises(UserInputError, match=r"r2\.json: entry 1 is not a JSON object"):
        read_records(_write(tmp_path, "r2.json", json.dumps([{"a": 1}, 5])))


# --- errors: each a one-line UserInputError naming the file ---------------------------------------
def _error(path) -> str:
    with pytest.raises(UserInputError) as info:
        load_muse_dir(path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_missing_directory(tmp_path):
    message = _error(tmp_path / "nope")
    assert str(tmp_path / "nope") in message and "does not exist" in message


@pytest.mark.parametrize("name, reported", [
    ("raw/forget.txt", "missing raw/forget.*"),
    ("knowmem/forget_qa.json", "missing knowmem/forget_qa.json"),
    ("knowmem/retain2_qa.json", "missing knowmem/retain_qa.json|knowmem/retain2_qa.json"),
    ("verbmem/forget.json", "missing verbmem/forget.json"),
])
def test_missing_required_file(muse, name, reported):
    (muse / name).unlink()
    message = _error(muse)
    assert message.startswith(f"{muse}: {reported} (MUSE layout needs raw/forget.*, raw/retain*.*")


def test_missing_retain_raw(muse):
    (muse / "raw/retain1.txt").unlink()
    (muse / "raw/retain2.txt").unlink()
    assert "missing raw/retain*.*" in _error(muse)


def test_two_forget_files(muse):
    _write(muse, "raw/forget.jsonl", _jsonl(["x"]))
    assert "several forget files" in _error(muse)


def test_malformed_json_array_names_line(muse):
    path = _write(muse, "knowmem/forget_qa.json", '[\n  {"question": "Q?", "answer": "A"},\n  {"question": }\n]\n')
    assert _error(muse).startswith(f"{path}:3: malformed JSON: ")


def test_malformed_json_line_names_line(muse):
    path = _write(muse, "knowmem/retain2_qa.json", '{"question": "Q?", "answer": "A"}\n\n{"question": "Q2?", "ans\n')
    assert _error(muse).startswith(f"{path}:3: malformed JSON line: ")


def test_single_multiline_object_is_not_a_record_file(muse):
    path = _write(muse, "knowmem/forget_qa.json", json.dumps({"question": "Q?", "answer": "A"}, indent=2))
    assert _error(muse) == f"{path}: expected a JSON array or JSON lines, found one multi-line JSON value"


def test_entry_missing_key_names_entry(muse):
    path = _write(muse, "knowmem/forget_qa.json", json.dumps([{"question": "Q?", "answer": "A"}] * 3 + [{"question": "Q?"}]))
    assert _error(muse) == f"{path}: entry 3 is missing key 'answer'"


def test_jsonl_entry_missing_key_names_line(muse):
    path = _write(muse, "knowmem/retain2_qa.json", _jsonl([{"question": "Q?", "answer": "A"}, {"answer": "A"}]))
    assert _error(muse) == f"{path}:2: entry is missing key 'question'"


def test_verbmem_entry_missing_gt(muse):
    path = _write(muse, "verbmem/forget.json", json.dumps([{"prompt": "p"}]))
    assert _error(muse) == f"{path}: entry 0 is missing key 'gt'"


def test_answer_of_wrong_type(muse):
    path = _write(muse, "knowmem/forget_qa.json", json.dumps([{"question": "Q?", "answer": ["A"]}]))
    assert _error(muse) == f"{path}: entry 0: key 'answer' must be a string (got list)"


def test_empty_forget_set(muse):
    path = _write(muse, "raw/forget.txt", "\n\n  \n")
    assert _error(muse) == f"{path}: forget set is empty"


@pytest.mark.parametrize("content", ["[]", "", "\n\n"])
def test_empty_qa_file(muse, content):
    path = _write(muse, "knowmem/forget_qa.json", content)
    assert _error(muse) == f"{path}: no entries"


def test_bad_privleak_entry(muse):
    path = _write(muse, "privleak/holdout.json", json.dumps([{"txt": "x"}]))
    assert _error(muse) == f"{path}: entry 0 is missing key 'text'"


def test_unsupported_document_file(tmp_path):
    with pytest.raises(UserInputError, match=r"x\.csv: unsupported document file type"):
        read_documents(_write(tmp_path, "x.csv", "a,b"))


def test_parquet_without_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(UserInputError, match=r"x\.parquet: parquet file has no 'text' column \(columns: body\)"):
        read_documents(tmp_path / "x.parquet")


def test_not_utf8(muse):
    path = muse / "raw/forget.txt"
    path.write_bytes(b"\xff\xfe bad")
    message = _error(muse)
    assert message.startswith(f"{path}: not UTF-8 text")
