"""Load TOFU question/answer splits: a local directory laid out like `locuslab/TOFU`, or the hub.

A local TOFU directory holds one file per configuration of the Hugging Face dataset
`locuslab/TOFU`, named after it, as .json or .jsonl (one JSON array or JSON lines, whatever the
extension):

    forget01.json forget05.json forget10.json          the forget sets (question, answer)
    forget01_perturbed.json ...                         + paraphrased_answer, perturbed_answer (list)
    retain90.json retain95.json retain99.json          the retain sets (question, answer)
    retain_perturbed.json                               TOFU's evaluation subset of every retainXX
    real_authors(_perturbed).json, world_facts(_perturbed).json
                                                        answer + perturbed_answer (list)
    holdout01.json ...                                  optional: questions never trained on (MIA)

Entries use the keys `question`/`answer` or `prompt`/`response`. `perturbed_answer` may be a list of
strings or a single string. A name that is not a local directory (e.g. "locuslab/TOFU") is loaded
with `datasets.load_dataset(name, config)["train"]`.

Every problem raises `UserInputError` with a one-line message naming the file, the entry and the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dipo_scale.data.muse import RECORD_EXTENSIONS, _load_items, _one_line, is_hub_name
from dipo_scale.errors import UserInputError

HUB_NAME = "locuslab/TOFU"
QUESTION_KEYS = ("question", "prompt")
ANSWER_KEYS = ("answer", "response")
PARAPHRASE_KEY = "paraphrased_answer"
PERTURBED_KEY = "perturbed_answer"
# The top-level files whose presence marks a directory as TOFU-layout.
TOFU_FILE_RE = re.compile(
    r"^(forget\d+|retain\d+|retain|holdout\d+|real_authors|world_facts)(_perturbed)?\.jsonl?$"
)
LAYOUT_HINT = "TOFU layout needs files named like the locuslab/TOFU configs, e.g. forget10_perturbed.json"


@dataclass
class TofuItem:
    question: str
    answer: str
    paraphrased_answer: str | None = None
    perturbed_answers: list[str] = field(default_factory=list)


@dataclass
class TofuData:
    """The four evaluation sets of TOFU (retain, real_authors, world_facts may be None: absent)."""

    source: str
    forget_name: str
    forget: list[TofuItem]  # with paraphrased and perturbed answers
    retain: list[TofuItem] | None
    real_authors: list[TofuItem] | None
    world_facts: list[TofuItem] | None
    holdout: list[TofuItem] | None  # for the membership attack; may be None
    notes: list[str] = field(default_factory=list)


# --- parsing entries ----------------------------------------------------------------------------
def _string(where: str, record: dict, keys: tuple[str, ...]) -> str:
    for key in keys:
        if key in record:
            value = record[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            if not isinstance(value, str):
                raise UserInputError(f"{where}: key '{key}' must be a string (got {type(value).__name__})")
            return value
    raise UserInputError(f"{where} is missing key '{keys[0]}'")


def _string_list(where: str, record: dict, key: str) -> list[str]:
    if key not in record:
        raise UserInputError(f"{where} is missing key '{key}'")
    value = record[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise UserInputError(f"{where}: key '{key}' must be a non-empty list of strings")
    return list(value)


def parse_items(entries: list[tuple[str, Any]], *, paraphrased: bool, perturbed: bool) -> list[TofuItem]:
    """TofuItems from (location, entry) pairs; `paraphrased`/`perturbed` make those keys required."""
    items = []
    for where, entry in entries:
        if not isinstance(entry, dict):
            raise UserInputError(f"{where} is not a JSON object with keys 'question' and 'answer'")
        items.append(TofuItem(
            question=_string(where, entry, QUESTION_KEYS),
            answer=_string(where, entry, ANSWER_KEYS),
            paraphrased_answer=_string(where, entry, (PARAPHRASE_KEY,)) if paraphrased else None,
            perturbed_answers=_string_list(where, entry, PERTURBED_KEY) if perturbed else [],
        ))
    return items


def _has_keys(entries: list[tuple[str, Any]], keys: tuple[str, ...]) -> bool:
    return bool(entries) and all(isinstance(e, dict) and all(k in e for k in keys) for _, e in entries)


# --- finding splits -----------------------------------------------------------------------------
def is_tofu_dir(path: str | Path) -> bool:
    root = Path(path)
    return root.is_dir() and any(p.is_file() and TOFU_FILE_RE.match(p.name) for p in root.iterdir())


def _split_file(root: Path, name: str) -> Path | None:
    found = [root / f"{name}{ext}" for ext in RECORD_EXTENSIONS if (root / f"{name}{ext}").is_file()]
    if len(found) > 1:
        raise UserInputError(f"{root}: both {found[0].name} and {found[1].name}; keep one")
    return found[0] if found else None


class TofuSource:
    """Where the splits come from: a local directory, or a hub dataset name."""

    def __init__(self, source: str | Path):
        self.source = str(source)
        self.root = Path(source)
        self.local = self.root.is_dir()
        if not self.local and self.root.exists():
            raise UserInputError(f"{self.root}: not a directory")
        if not self.local and not is_hub_name(self.source):
            raise UserInputError(f"{self.root}: TOFU data directory does not exist")

    def entries(self, name: str) -> list[tuple[str, Any]] | None:
        """The (location, entry) pairs of split `name`, or None when it does not exist."""
        if self.local:
            path = _split_file(self.root, name)
            return None if path is None else _load_items(path)
        return self._hub_entries(name)

    def describe(self, name: str) -> str:
        if self.local:
            path = _split_file(self.root, name)
            return str(path) if path else str(self.root / f"{name}.json")
        return f"{self.source}[{name}]"

    def _hub_entries(self, name: str) -> list[tuple[str, Any]] | None:
        try:
            import datasets

            ds = datasets.load_dataset(self.source, name)["train"]
        except ValueError as e:  # an unknown config name
            if "config" in str(e).lower() or "builderconfig" in str(e).lower():
                return None
            raise UserInputError(f"{self.source}: cannot load config {name!r} from the hub: {_one_line(e)}") from None
        except Exception as e:  # no network, unknown dataset, ...
            raise UserInputError(
                f"{self.source}: not a local directory and cannot load config {name!r} from the hub "
                f"({type(e).__name__}: {_one_line(e)[:200]})"
            ) from None
        return [(f"{self.source}[{name}]: entry {i}", dict(row)) for i, row in enumerate(ds)]


def load_split(source: str | Path | TofuSource, name: str, *, paraphrased: bool = False,
               perturbed: bool = False, required: bool = True) -> list[TofuItem] | None:
    """One split by config name (`forget10_perturbed`, `retain90`, ...); None if absent and not required."""
    src = source if isinstance(source, TofuSource) else TofuSource(source)
    entries = src.entries(name)
    if entries is None:
        if required:
            raise UserInputError(f"{src.describe(name)}: missing ({LAYOUT_HINT})")
        return None
    if not entries:
        raise UserInputError(f"{src.describe(name)}: no entries")
    return parse_items(entries, paraphrased=paraphrased, perturbed=perturbed)


def _perturbed_split(src: TofuSource, name: str, *, paraphrased: bool, required: bool,
                     notes: list[str], fallback: str | None = None) -> list[TofuItem] | None:
    """`name`_perturbed if present, else `name` itself (then it must carry the perturbed keys).

    With `fallback` (used for retain: TOFU evaluates utility on `retain_perturbed`, the evaluation
    subset common to retain90/95/99), a plain `name` file without those keys is replaced by it.
    """
    keys = (PARAPHRASE_KEY, PERTURBED_KEY) if paraphrased else (PERTURBED_KEY,)
    base = name[: -len("_perturbed")] if name.endswith("_perturbed") else name
    for candidate in dict.fromkeys((f"{base}_perturbed", name)):
        entries = src.entries(candidate)
        if entries is None:
            continue
        if not entries:
            raise UserInputError(f"{src.describe(candidate)}: no entries")
        if fallback and candidate != fallback and not _has_keys(entries, keys):
            parse_items(entries, paraphrased=False, perturbed=False)  # still report a broken file
            if src.entries(fallback) is not None:
                notes.append(f"{candidate} has no {'/'.join(keys)}: its utility scores use {fallback}")
                return _perturbed_split(src, fallback, paraphrased=paraphrased, required=True, notes=notes)
        return parse_items(entries, paraphrased=paraphrased, perturbed=True)
    if required:
        raise UserInputError(f"{src.describe(base + '_perturbed')}: missing ({LAYOUT_HINT})")
    return None


def _holdout_name(forget: str) -> str | None:
    match = re.match(r"^forget(\d+)", forget)
    return f"holdout{match.group(1)}" if match else None


def load_tofu(source: str | Path, *, forget: str = "forget10", retain: str | None = None) -> TofuData:
    """The TOFU evaluation sets of a local directory or hub dataset (see the module docstring).

    forget: `forget01|05|10` (its `_perturbed` file is used; required).
    retain: the retain split for utility (default `retain_perturbed`, TOFU's evaluation subset);
    `retain99` etc. are used when they carry paraphrased/perturbed answers, else `retain_perturbed`.
    real_authors / world_facts / holdoutXX are optional (utility / MIA are skipped without them).
    """
    src = TofuSource(source)
    notes: list[str] = []
    forget_items = _perturbed_split(src, forget, paraphrased=True, required=True, notes=notes)
    retain_items = _perturbed_split(src, retain or "retain_perturbed", paraphrased=True,
                                    required=retain is not None, notes=notes, fallback="retain_perturbed")
    real = _perturbed_split(src, "real_authors", paraphrased=False, required=False, notes=notes)
    world = _perturbed_split(src, "world_facts", paraphrased=False, required=False, notes=notes)
    holdout_name = _holdout_name(forget)
    holdout = None
    if holdout_name is not None:
        try:
            holdout = load_split(src, holdout_name, required=False)
        except UserInputError:
            if src.local:
                raise
            notes.append(f"{holdout_name}: could not be loaded from the hub; no membership attack")
    for name, items in (("retain", retain_items), ("real_authors", real), ("world_facts", world)):
        if items is None:
            notes.append(f"no {name} split: model utility is not computed")
    return TofuData(source=src.source, forget_name=forget, forget=forget_items, retain=retain_items,
                    real_authors=real, world_facts=world, holdout=holdout, notes=notes)
