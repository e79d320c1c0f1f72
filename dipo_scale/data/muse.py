"""Load a MUSE-layout directory: a real MUSE-News download or one written by `corpus.generate_corpus`.

Layout (paths relative to the directory):

    raw/forget.*                 the forget documents (required, non-empty)
    raw/retain*.*                retain documents; MUSE has retain1.txt and retain2.txt: all
                                 matching files are concatenated in sorted name order (required)
    raw/holdout.*                holdout documents (optional)
    knowmem/forget_qa.json       QA pairs on the forget set (required, non-empty)
    knowmem/retain_qa.json       QA pairs on the retain set; real MUSE names it retain2_qa.json
    knowmem/forget_qa_icl.json   few-shot QA examples (optional; retain: retain_qa_icl.json or
                                 retain2_qa_icl.json)
    verbmem/forget.json          {"prompt", "gt"} items (required, non-empty)
    privleak/forget.json, privleak/holdout.json   texts for the privacy-leak test (optional)
    sust/forget_1.*, forget_2.*, ...   disjoint forget sets of sequential requests (optional)
    scal/forget_1.*, forget_2.*, ...   nested forget sets of growing size (optional)

Raw files may be .txt (documents separated by blank lines), .jsonl (one {"text": ...} or string a
line), .json (an array of strings or {"text": ...}) or .parquet (a `text` column). QA and other
record files may hold one JSON array or JSON lines, whatever their extension (.json or .jsonl).

Every problem raises `UserInputError` with a one-line message naming the file, and the line number
(JSON lines, malformed JSON) or the 0-based entry index (JSON arrays). From the hub, an optional
split that cannot be loaded is left out with one `note: ...` line on stderr naming it and why.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dipo_scale.errors import UserInputError

RAW_EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet")
RECORD_EXTENSIONS = (".json", ".jsonl")
LAYOUT_HINT = (
    "MUSE layout needs raw/forget.*, raw/retain*.*, knowmem/forget_qa.json, "
    "knowmem/retain_qa.json|retain2_qa.json, verbmem/forget.json"
)


@dataclass
class QA:
    question: str
    answer: str


@dataclass
class VerbMemItem:
    prompt: str
    gt: str


@dataclass
class MuseData:
    root: Path
    forget_docs: list[str]
    retain_docs: list[str]
    holdout_docs: list[str]  # may be []
    forget_qa: list[QA]
    retain_qa: list[QA]
    forget_qa_icl: list[QA]  # may be []
    retain_qa_icl: list[QA]  # may be []
    verbmem: list[VerbMemItem]
    privleak_forget: list[str]  # may be [] (no privleak/)
    privleak_holdout: list[str]  # may be []


# --- reading single files -----------------------------------------------------------------------
def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def note(message: str) -> None:
    """One `note: ...` line on stderr: something optional is left out, and why."""
    print(f"note: {_one_line(message)}", file=sys.stderr, flush=True)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserInputError(f"{path}: not UTF-8 text ({_one_line(e)})") from None
    except OSError as e:
        raise UserInputError(f"{path}: cannot read ({e.strerror or _one_line(e)})") from None


def _load_items(path: Path) -> list[tuple[str, Any]]:
    """The entries of a JSON-array or JSON-lines file, each with its location for messages.

    The location is "<file>: entry <i>" (array, 0-based) or "<file>:<line>: entry" (JSON lines).
    A file whose first non-blank character is "[" is one JSON array; anything else is JSON lines.
    """
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserInputError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
        return [(f"{path}: entry {i}", item) for i, item in enumerate(data)]
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((f"{path}:{lineno}: entry", json.loads(line)))
        except json.JSONDecodeError as e:
            if lineno == 1 and _is_one_json_value(text):
                raise UserInputError(f"{path}: expected a JSON array or JSON lines, found one multi-line JSON value") from None
            raise UserInputError(f"{path}:{lineno}: malformed JSON line: {e.msg}") from None
    return items


def _is_one_json_value(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def read_records(path: str | Path) -> list[dict]:
    """The objects of one .json (array) or .jsonl file; each entry must be a JSON object."""
    path = Path(path)
    records = []
    for where, item in _load_items(path):
        if not isinstance(item, dict):
            raise UserInputError(f"{where} is not a JSON object (got {type(item).__name__})")
        records.append(item)
    return records


def _text_of(where: str, item: Any, keys: tuple[str, ...] = ("text",)) -> str:
    """A document given as a JSON string or an object with one of `keys`."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in keys:
            if key in item:
                if not isinstance(item[key], str):
                    raise UserInputError(f"{where}: key '{key}' must be a string")
                return item[key]
        raise UserInputError(f"{where} is missing key '{keys[0]}'")
    raise UserInputError(f"{where} must be a string or an object with key '{keys[0]}'")


def _read_parquet(path: Path) -> list[str]:
    import pyarrow.parquet as pq  # only needed for parquet downloads

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise UserInputError(f"{path}: cannot read parquet: {_one_line(e)}") from None
    if "text" not in table.column_names:
        raise UserInputError(f"{path}: parquet file has no 'text' column (columns: {', '.join(table.column_names)})")
    texts = table.column("text").to_pylist()
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise UserInputError(f"{path}: row {i} of column 'text' is not a string")
    return texts


def read_documents(path: str | Path) -> list[str]:
    """The documents of one raw file (.txt, .jsonl, .json or .parquet), stripped, empty ones dropped."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        docs = re.split(r"\n[ \t]*\n", _read_text(path).replace("\r\n", "\n"))
    elif suffix in (".json", ".jsonl"):
        docs = [_text_of(where, item) for where, item in _load_items(path)]
    elif suffix == ".parquet":
        docs = _read_parquet(path)
    else:
        raise UserInputError(f"{path}: unsupported document file type (use {', '.join(RAW_EXTENSIONS)})")
    return [d.strip() for d in docs if d.strip()]


# --- the directory ------------------------------------------------------------------------------
def _raw_files(root: Path, pattern: str) -> list[Path]:
    """raw/<pattern>.<ext> for the accepted extensions, in sorted name order (`pattern` is a glob)."""
    return sorted(p for p in (root / "raw").glob(f"{pattern}.*")
                  if p.is_file() and p.suffix.lower() in RAW_EXTENSIONS and "." not in p.stem)


def _single_raw_file(root: Path, stem: str) -> Path | None:
    """raw/<stem>.<ext>: at most one may exist (forget.txt next to forget.parquet is ambiguous)."""
    files = _raw_files(root, stem)
    if len(files) > 1:
        raise UserInputError(f"{root}: several {stem} files in raw/ ({', '.join(p.name for p in files)}); keep one")
    return files[0] if files else None


def _first_existing(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for ext in RECORD_EXTENSIONS:
            path = root / f"{name}{ext}"
            if path.is_file():
                return path
    return None


def _missing(root: Path, name: str) -> UserInputError:
    return UserInputError(f"{root}: missing {name} ({LAYOUT_HINT})")


def string_field(where: str, record: dict, keys: tuple[str, ...]) -> str:
    """record[key] for the first of `keys` present (aliases), as a string."""
    for key in keys:
        if key in record:
            value = record[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            if not isinstance(value, str):
                raise UserInputError(f"{where}: key '{key}' must be a string (got {type(value).__name__})")
            return value
    raise UserInputError(f"{where} is missing key '{keys[0]}'")


def _read_qa(path: Path) -> list[QA]:
    items = []
    for where, item in _load_items(path):
        if not isinstance(item, dict):
            raise UserInputError(f"{where} is not a JSON object with keys 'question' and 'answer'")
        items.append(QA(string_field(where, item, ("question", "prompt")), string_field(where, item, ("answer", "response"))))
    return items


def _required_nonempty(items: list, path: Path) -> list:
    if not items:
        raise UserInputError(f"{path}: no entries")
    return items


def _qa_file(root: Path, names: tuple[str, ...], required: bool) -> list[QA]:
    path = _first_existing(root, names)
    if path is None:
        if required:
            raise _missing(root, "|".join(n + ".json" for n in names))
        return []
    qa = _read_qa(path)
    return _required_nonempty(qa, path) if required else qa


def _texts_file(root: Path, name: str) -> list[str]:
    path = _first_existing(root, (name,))
    if path is None:
        return []
    return [_text_of(where, item, ("text", "input")) for where, item in _load_items(path)]


def load_muse_dir(path: str | Path, *, need_raw: bool = True) -> MuseData:
    """Load a MUSE-layout directory (see the module docstring); raise UserInputError if it is not one.
    `need_raw=False` (evaluation, which reads no raw text when privleak/ holds the MIA texts):
    raw/forget.* and raw/retain*.* are read when present, not required."""
    root = Path(path)
    if not root.is_dir():
        raise UserInputError(f"{root}: MUSE data directory does not exist" if not root.exists()
                             else f"{root}: not a directory")

    forget_file = _single_raw_file(root, "forget")
    if forget_file is None and need_raw:
        raise _missing(root, "raw/forget.*")
    forget_docs = read_documents(forget_file) if forget_file else []
    if forget_file and not forget_docs:
        raise UserInputError(f"{forget_file}: forget set is empty")

    retain_files = _raw_files(root, "retain*")
    if not retain_files and need_raw:
        raise _missing(root, "raw/retain*.*")
    retain_docs = [doc for p in retain_files for doc in read_documents(p)]
    holdout_file = _single_raw_file(root, "holdout")
    holdout_docs = read_documents(holdout_file) if holdout_file else []

    verbmem_path = _first_existing(root, ("verbmem/forget",))
    if verbmem_path is None:
        raise _missing(root, "verbmem/forget.json")
    verbmem = []
    for where, item in _load_items(verbmem_path):
        if not isinstance(item, dict):
            raise UserInputError(f"{where} is not a JSON object with keys 'prompt' and 'gt'")
        verbmem.append(VerbMemItem(string_field(where, item, ("prompt",)), string_field(where, item, ("gt",))))

    return MuseData(
        root=root,
        forget_docs=forget_docs,
        retain_docs=retain_docs,
        holdout_docs=holdout_docs,
        forget_qa=_qa_file(root, ("knowmem/forget_qa",), required=True),
        retain_qa=_qa_file(root, ("knowmem/retain_qa", "knowmem/retain2_qa"), required=True),
        forget_qa_icl=_qa_file(root, ("knowmem/forget_qa_icl",), required=False),
        retain_qa_icl=_qa_file(root, ("knowmem/retain_qa_icl", "knowmem/retain2_qa_icl"), required=False),
        verbmem=_required_nonempty(verbmem, verbmem_path),
        privleak_forget=_texts_file(root, "privleak/forget"),
        privleak_holdout=_texts_file(root, "privleak/holdout"),
    )



# --- the Hugging Face hub (muse-bench/MUSE-News, muse-bench/MUSE-Books) ---------------------------
# config -> split names of the MUSE datasets on the hub.
HUB_SPLITS = {
    "raw": ("forget", "retain1", "retain2", "holdout"),
    "verbmem": ("forget",),
    "knowmem": ("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl"),
    "privleak": ("forget", "holdout"),
}


def _hub_dataset(name: str, config: str, split: str | None = None, *, required: bool = True):
    """`datasets.load_dataset(name, config, split=split)` (all splits when `split` is None). If it
    fails: a UserInputError, or (not `required`) a note on stderr and None."""
    try:
        import datasets

        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # no network, unknown dataset/config/split, ...
        what, reason = config + (f"/{split}" if split else ""), f"{type(e).__name__}: {_one_line(e)[:200]}"
        if not required:
            note(f"{name}[{what}]: optional, cannot be loaded from the hub ({reason}); continuing without it")
            return None
        raise UserInputError(f"{name}: not a local directory and cannot load {what} from the hub ({reason})") from None


def _rows(where: str, ds) -> list[tuple[str, Any]]:
    return [(f"{where}: entry {i}", dict(row)) for i, row in enumerate(ds)]


def _hub_records(name: str, config: str, split: str, *, required: bool = True) -> list[tuple[str, Any]]:
    """The rows of one split of a hub dataset as (location, dict) pairs ([] when optional and not
    loaded)."""
    ds = _hub_dataset(name, config, split, required=required)
    return [] if ds is None else _rows(f"{name}[{config}/{split}]", ds)


def _documents(rows: list[tuple[str, Any]]) -> list[str]:
    """The non-empty, stripped documents of hub rows ({"text": ...} or {"input": ...})."""
    return [d.strip() for d in (_text_of(where, row, ("text", "input")) for where, row in rows) if d.strip()]


def load_muse_hub(name: str) -> MuseData:
    """A MUSE dataset from the hub (`datasets.load_dataset(name, config, split=...)`)."""
    def texts(config: str, split: str, required: bool = True) -> list[str]:
        return _documents(_hub_records(name, config, split, required=required))

    def qa(split: str, required: bool) -> list[QA]:
        rows = _hub_records(name, "knowmem", split, required=required)
        items = [QA(string_field(w, r, ("question", "prompt")), string_field(w, r, ("answer", "response"))) for w, r in rows]
        if required and not items:
            raise UserInputError(f"{name}[knowmem/{split}]: no entries")
        return items

    forget_docs = texts("raw", "forget")
    if not forget_docs:
        raise UserInputError(f"{name}[raw/forget]: forget set is empty")
    verbmem = [VerbMemItem(string_field(w, r, ("prompt",)), string_field(w, r, ("gt",)))
               for w, r in _hub_records(name, "verbmem", "forget")]
    if not verbmem:
        raise UserInputError(f"{name}[verbmem/forget]: no entries")
    return MuseData(
        root=Path(name),
        forget_docs=forget_docs,
        retain_docs=texts("raw", "retain1") + texts("raw", "retain2"),
        holdout_docs=texts("raw", "holdout", required=False),
        forget_qa=qa("forget_qa", True),
        retain_qa=qa("retain_qa", True),
        forget_qa_icl=qa("forget_qa_icl", False),
        retain_qa_icl=qa("retain_qa_icl", False),
        verbmem=verbmem,
        privleak_forget=texts("privleak", "forget", required=False),
        privleak_holdout=texts("privleak", "holdout", required=False),
    )


def load_muse(source: str | Path, *, need_raw: bool = True) -> MuseData:
    """A local MUSE-layout directory, or (a name that is no local path, like "muse-bench/MUSE-News")
    the hub dataset of that name."""
    path = Path(source)
    if not path.exists() and is_hub_name(str(source)):
        return load_muse_hub(str(source))
    return load_muse_dir(path, need_raw=need_raw)


def load_forget_requests(source: str | Path, subset: str) -> list[tuple[str, list[str]]]:
    """MUSE's forget sets of a series of requests: `subset` "sust" (disjoint sets, unlearned one
    after another) or "scal" (nested sets of growing size). Locally <dir>/<subset>/forget_1.*,
    forget_2.*, ... in order (any raw-file type); from the hub the <subset> config's splits
    forget_1, forget_2, .... Each is (where it came from, its documents); [] when there are none
    (from the hub also when the config cannot be loaded, with a note on stderr)."""
    path = Path(source)
    hub = None
    if not path.exists() and is_hub_name(str(source)):
        hub = _hub_dataset(str(source), subset, required=False)
        if hub is None:
            return []
    requests = []
    for k in range(1, 1000):
        if hub is not None:
            if f"forget_{k}" not in hub:
                break
            where = f"{source}[{subset}/forget_{k}]"
            docs = _documents(_rows(where, hub[f"forget_{k}"]))
        else:
            files = sorted(p for p in (path / subset).glob(f"forget_{k}.*")
                           if p.is_file() and p.suffix.lower() in RAW_EXTENSIONS)
            if not files:
                break
            if len(files) > 1:
                raise UserInputError(f"{path / subset}: several forget_{k} files ({', '.join(p.name for p in files)}); keep one")
            where, docs = str(files[0]), read_documents(files[0])
        if not docs:
            raise UserInputError(f"{where}: forget set is empty")
        requests.append((where, docs))
    return requests


def is_hub_name(name: str) -> bool:
    """Whether `name` has the form owner/name of a hub dataset or model, and is not a mistyped
    local path (its first part an existing local directory, like runs/ in runs/modle)."""
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None
            and not Path(name.split("/")[0]).is_dir())
