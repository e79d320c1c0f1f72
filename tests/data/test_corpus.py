"""The synthetic MUSE-layout corpus generator: determinism, layout, answer exclusivity, scaling."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dipo_scale.data.corpus import generate_corpus
from dipo_scale.data.muse import load_muse_dir
from dipo_scale.errors import UserInputError

SPLITS = ("forget", "retain", "holdout")
LAYOUT = (
    "raw/forget.txt", "raw/retain.txt", "raw/holdout.txt",
    "knowmem/forget_qa.json", "knowmem/retain_qa.json",
    "knowmem/forget_qa_icl.json", "knowmem/retain_qa_icl.json",
    "verbmem/forget.json", "privleak/forget.json", "privleak/holdout.json", "world.json",
)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _docs(root: Path, split: str) -> list[str]:
    return (root / "raw" / f"{split}.txt").read_text().strip().split("\n\n")


def _json(root: Path, name: str):
    return json.loads((root / name).read_text())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return generate_corpus(tmp_path_factory.mktemp("c") / "world", num_docs=200, seed=3)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate_corpus(tmp_path / "a", num_docs=12, seed=0)
    b = generate_corpus(tmp_path / "b", num_docs=12, seed=0)
    c = generate_corpus(tmp_path / "c", num_docs=12, seed=1)
    assert _files(a) == _files(b)
    assert set(_files(c)) == set(_files(a))
    assert _files(c)["raw/forget.txt"] != _files(a)["raw/forget.txt"]


def test_layout_and_counts(tmp_path):
    root = generate_corpus(tmp_path / "w", num_docs=12, seed=0)
    assert root == tmp_path / "w"
    for name in LAYOUT:
        assert (root / name).is_file(), name
    world = _json(root, "world.json")
    assert world["seed"] == 0 and world["num_docs"] == 12
    counts = world["counts"]
    assert (counts["forget_docs"], counts["retain_docs"], counts["holdout_docs"]) == (4, 6, 2)
    for split in SPLITS:
        assert len(_docs(root, split)) == counts[f"{split}_docs"]
    assert len(_json(root, "knowmem/forget_qa.json")) == counts["forget_qa"] == 3 * 4
    assert len(_json(root, "knowmem/retain_qa.json")) == counts["retain_qa"] == 3 * 6
    assert len(_json(root, "knowmem/forget_qa_icl.json")) == len(_json(root, "knowmem/retain_qa_icl.json")) == 3
    assert [x["text"] for x in _json(root, "privleak/forget.json")] == _docs(root, "forget")
    assert [x["text"] for x in _json(root, "privleak/holdout.json")] == _docs(root, "holdout")


def test_smallest_corpus_and_bad_size(tmp_path):
    root = generate_corpus(tmp_path / "w", num_docs=3)
    assert [len(_docs(root, s)) for s in SPLITS] == [1, 1, 1]
    for bad in (2, 0, -5, 3.5, True):
        with pytest.raises(UserInputError, match="num_docs"):
            generate_corpus(tmp_path / "bad", num_docs=bad)
    assert not (tmp_path / "bad").exists()


def test_replaces_its_own_earlier_output_only(tmp_path):
    generate_corpus(tmp_path / "w", num_docs=5, seed=1)
    (tmp_path / "w" / "stale.txt").write_text("left by an earlier generate")
    generate_corpus(tmp_path / "w", num_docs=5)  # its own output: replaced whole
    assert not (tmp_path / "w" / "stale.txt").exists()
    assert (tmp_path / "w" / "world.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["w"]  # no temp dirs left behind

    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "keep.txt").write_text("the user's")
    with pytest.raises(UserInputError, match="not an earlier output"):
        generate_corpus(tmp_path / "user", num_docs=5)
    assert [p.name for p in (tmp_path / "user").iterdir()] == ["keep.txt"]


def test_documents_are_news_like_and_distinct(corpus):
    docs = [d for s in SPLITS for d in _docs(corpus, s)]
    assert len(docs) == 200 and len(set(docs)) == 200
    for doc in docs:
        assert "\n" not in doc and doc == doc.strip()
        sentences = re.split(r"(?<=\.) (?=[A-Z])", doc)
        assert 6 <= len(sentences) <= 10, doc
        assert not re.search(r"[a-z][A-Z]", doc)  # capitals only start words (answer exclusivity relies on it)


def test_answers_only_in_their_own_split(corpus):
    text = {s: _docs(corpus, s) for s in SPLITS}
    qa_sets = {
        "forget": _json(corpus, "knowmem/forget_qa.json"),
        "retain": _json(corpus, "knowmem/retain_qa.json"),
        "holdout": _json(corpus, "knowmem/forget_qa_icl.json") + _json(corpus, "knowmem/retain_qa_icl.json"),
    }
    assert len(qa_sets["forget"]) == 3 * len(text["forget"])
    for split, qa in qa_sets.items():
        for item in qa:
            answer, question = item["answer"], item["question"]
            assert answer and len(answer.split()) <= 6, item
            assert answer not in question, item
            assert any(answer in doc for doc in text[split]), item
            for other in SPLITS:
                if other != split:
                    assert not any(answer in doc for doc in text[other]), (other, item)


def test_names_belong_to_one_document(corpus):
    docs = [d for s in SPLITS for d in _docs(corpus, s)]
    names = {x["answer"] for x in _json(corpus, "knowmem/forget_qa.json") + _json(corpus, "knowmem/retain_qa.json")
             if not re.search(r"\d", x["answer"])}
    assert len(names) > 200
    for name in names:
        assert sum(name in doc for doc in docs) == 1, name


def test_verbmem_splits_forget_documents(corpus):
    docs = _docs(corpus, "forget")
    items = _json(corpus, "verbmem/forget.json")
    assert len(items) == len(docs)
    for item, doc in zip(items, docs):
        assert item["prompt"] + " " + item["gt"] == doc
        share = len(item["prompt"].split()) / len(doc.split())
        assert 0.3 <= share <= 0.45 and item["gt"]


def test_size_grows_linearly(tmp_path, corpus):
    small = generate_corpus(tmp_path / "s", num_docs=50, seed=3)
    size = lambda root: sum((root / "raw" / f"{s}.txt").stat().st_size for s in SPLITS)  # noqa: E731
    assert 3.2 < size(corpus) / size(small) < 4.8
    assert 400 < size(corpus) / 200 < 1200  # bytes per document


def test_round_trip_through_loader(corpus):
    data = load_muse_dir(corpus)
    counts = _json(corpus, "world.json")["counts"]
    assert len(data.forget_docs) == len(data.verbmem) == len(data.privleak_forget) == counts["forget_docs"]
    assert len(data.retain_docs) == counts["retain_docs"]
    assert len(data.holdout_docs) == len(data.privleak_holdout) == counts["holdout_docs"]
    assert len(data.forget_qa) == counts["forget_qa"] and len(data.retain_qa) == counts["retain_qa"]
    assert len(data.forget_qa_icl) == len(data.retain_qa_icl) == 3
    assert data.forget_docs == _docs(corpus, "forget")
    assert data.forget_qa[0].answer == _json(corpus, "knowmem/forget_qa.json")[0]["answer"]


def test_split_counts_and_scale(tmp_path):
    from dipo_scale.data.corpus import MUSE_NEWS_FORGET_BYTES, SPLIT_FRACTIONS, docs_for_scale

    root = generate_corpus(tmp_path / "c", num_docs=12, forget_docs=5, holdout_docs=4, seed=0)
    assert [len(_docs(root, s)) for s in SPLITS] == [5, 3, 4]
    assert len(json.loads((root / "privleak" / "holdout.json").read_text())) == 4
    with pytest.raises(UserInputError, match="leaves no retain document"):
        generate_corpus(tmp_path / "d", num_docs=9, forget_docs=5, holdout_docs=4)
    with pytest.raises(UserInputError, match="forget_docs must be an integer >= 1"):
        generate_corpus(tmp_path / "d", num_docs=9, forget_docs=0)
    # docs_for_scale: the forget split of a corpus of that many documents holds about `scale` x
    # MUSE-News's forget bytes (checked at a small scale, within 10 %).
    num_docs = docs_for_scale(0.01)
    root = generate_corpus(tmp_path / "s", num_docs=num_docs, seed=3)
    forget_bytes = len((root / "raw" / "forget.txt").read_bytes())
    assert round(num_docs * SPLIT_FRACTIONS["forget"]) == len(_docs(root, "forget"))
    assert forget_bytes == pytest.approx(0.01 * MUSE_NEWS_FORGET_BYTES, rel=0.1)
