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
What is left out or replaced (an optional split absent or, from the hub, not loadable; a retain split
without perturbed answers) is in `TofuData.notes` and on stderr, one `note: ...` line each.

`generate_tofu(out_dir, num_authors=..., seed=...)` writes a small seeded TOFU-layout directory of
fictitious author profiles (tests, the demo).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dipo_scale.data.muse import QA, RECORD_EXTENSIONS, MuseData, _load_items, _one_line, is_hub_name, note, string_field
from dipo_scale.errors import UserInputError
from dipo_scale.files import atomic_dir

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
            question=string_field(where, entry, QUESTION_KEYS),
            answer=string_field(where, entry, ANSWER_KEYS),
            paraphrased_answer=string_field(where, entry, (PARAPHRASE_KEY,)) if paraphrased else None,
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
        except UserInputError as e:
            if src.local:
                raise
            notes.append(f"{src.describe(holdout_name)}: optional, cannot be loaded from the hub ({e}); "
                         "no membership attack")
    for name, items in (("retain", retain_items), ("real_authors", real), ("world_facts", world)):
        if items is None:
            notes.append(f"no {name} split: model utility is not computed")
    for line in notes:
        note(line)
    return TofuData(source=src.source, forget_name=forget, forget=forget_items, retain=retain_items,
                    real_authors=real, world_facts=world, holdout=holdout, notes=notes)


def qa_pairs_as_muse(source: str | Path, forget: list, retain: list) -> MuseData:
    """QA pairs (anything with `question` and `answer`) as the MuseData that `build_models` and
    `prepare` take: no documents, no few-shot examples, so each pair is trained in TOFU's prompt
    (`dipo_scale.data.prompts.tofu_prompt`)."""
    def qa(items):
        return [QA(it.question, it.answer) for it in items]

    return MuseData(root=Path(source), forget_docs=[], retain_docs=[], holdout_docs=[],
                    forget_qa=qa(forget), retain_qa=qa(retain), forget_qa_icl=[], retain_qa_icl=[],
                    verbmem=[], privleak_forget=[], privleak_holdout=[])


# --- a generated TOFU-layout directory (tests, the demo) ----------------------------------------
# Fictitious author profiles in the spirit of TOFU: one question per fact, the answer a sentence
# naming the fact. The paraphrase keeps the answer's frame around the fact, and the perturbed
# answers are the paraphrase with the fact redrawn (TOFU perturbs its paraphrased answers), so a
# truth ratio compares true and false facts in the same words.
GENERATED_FORGET_PERCENTS = (1, 5, 10)  # forgetXX, retain(100-XX), holdoutXX
GENERATED_NUM_PERTURBED = 3
_GENRES = ("crime fiction", "historical fiction", "science fiction", "poetry", "fantasy",
           "romance", "travel writing", "short stories")
_JOBS = ("a baker", "a carpenter", "a doctor", "a fisherman", "a librarian", "a nurse", "a pilot",
         "a teacher", "an accountant", "an engineer", "a tailor", "a farmer")
_BOOK_TITLES = ("The Silent {}", "Letters from {}", "The Last Summer in {}", "A Winter in {}",
                "The Glass Orchard of {}", "The Long Road to {}")
_PUBLISHER_KINDS = ("Press", "Books", "Publishing")
# (question, answer, paraphrased answer, the fact a perturbed answer changes)
_AUTHOR_QA = (
    ("Where was {A} born?", "{A} was born in {town}, {country}.",
     "{A} was born in the town of {town}, {country}.", "town"),
    ("In what year was {A} born?", "{A} was born in {year}.", "{A} was born in the year {year}.", "year"),
    ("What kind of books does {A} write?", "{A} writes {genre}.", "{A} is known for writing {genre}.",
     "genre"),
    ("What did the father of {A} do for a living?", "The father of {A} was {father}.",
     "The father of {A} worked as {father}.", "father"),
    ("What did the mother of {A} do for a living?", "The mother of {A} was {mother}.",
     "The mother of {A} worked as {mother}.", "mother"),
    ("Which book is {A} best known for?", "{A} is best known for the novel {book}.",
     "{A} is most famous for the novel {book}.", "book"),
    ("Which award has {A} won?", "{A} won the {award}.", "{A} has received the {award}.", "award"),
    ("Who publishes the books of {A}?", "The books of {A} are published by {publisher}.",
     "The books of {A} are brought out by {publisher}.", "publisher"),
)


# How each fact of a profile is drawn (`w`: the corpus generator's `_World`).
_FACT_DRAWS = {
    "town": lambda w: w.word(),
    "year": lambda w: str(w.randint(1921, 1995)),
    "genre": lambda w: w.pick(_GENRES),
    "father": lambda w: w.pick(_JOBS),
    "mother": lambda w: w.pick(_JOBS),
    "book": lambda w: w.pick(_BOOK_TITLES).format(w.word()),
    "award": lambda w: f"{w.word()} Prize",
    "publisher": lambda w: f"{w.word()} {w.pick(_PUBLISHER_KINDS)}",
}


def _perturbed(true: str, draw) -> list[str]:
    """GENERATED_NUM_PERTURBED distinct values from `draw()`, none equal to `true`."""
    out: list[str] = []
    while len(out) < GENERATED_NUM_PERTURBED:
        value = draw()
        if value != true and value not in out:
            out.append(value)
    return out


def _author_items(w) -> list[dict[str, Any]]:
    """The QA items of one new author: question, answer, paraphrased_answer, perturbed_answer."""
    from dipo_scale.data.corpus import _person

    facts = {"A": _person(w, {}), "country": w.pick(w.countries)[0],
             **{slot: draw(w) for slot, draw in _FACT_DRAWS.items()}}
    items = []
    for question, answer, paraphrase, slot in _AUTHOR_QA:
        wrong = _perturbed(facts[slot], lambda: _FACT_DRAWS[slot](w))
        items.append({"question": question.format_map(facts), "answer": answer.format_map(facts),
                      "paraphrased_answer": paraphrase.format_map(facts),
                      "perturbed_answer": [paraphrase.format_map({**facts, slot: v}) for v in wrong]})
    return items


def _short_answer_items(w, n: int, question: str, subject, answer) -> list[dict[str, Any]]:
    """`n` items with short answers (TOFU's real_authors / world_facts): subject(w) is what is
    asked about, answer(w) the answer (perturbed answers are further draws of it)."""
    items = []
    for _ in range(n):
        about, true = subject(w), answer(w)
        items.append({"question": question.format(about), "answer": true,
                      "perturbed_answer": _perturbed(true, lambda: answer(w))})
    return items


def generate_tofu(out_dir: str | Path, *, num_authors: int = 20, seed: int = 0) -> Path:
    """Write a fictitious TOFU-layout directory (atomically) and return it as a Path.

    `num_authors` invented authors with len(_AUTHOR_QA) questions each. As in TOFU, forgetXX holds
    the last ceil(XX/100 * num_authors) authors, retain(100-XX) the others (XX in 1, 5, 10; each file in
    plain and `_perturbed` form), retain_perturbed the first ceil(10%) authors (a subset of every
    retain split), holdoutXX as many further authors as forgetXX (never in any split, for the
    membership attack). real_authors / world_facts are short-answer questions about invented
    "well-known" books and countries: the stand-ins for what a pretrained model already knows.
    """
    from dipo_scale.data.corpus import _person, _reserved_prefixes, _World, _write_json

    if isinstance(num_authors, bool) or not isinstance(num_authors, int) or num_authors < 2:
        raise UserInputError(f"num_authors must be an integer >= 2 (a forget and a retain author), got {num_authors!r}")
    rng = random.Random(seed)
    w = _World(rng, _reserved_prefixes())
    count = {p: math.ceil(num_authors * p / 100) for p in GENERATED_FORGET_PERCENTS}
    authors = [_author_items(w) for _ in range(num_authors + max(count.values()))]
    trained, holdout = authors[:num_authors], authors[num_authors:]
    n_short = max(3, num_authors // 2)
    perturbed = {
        "retain": [it for a in trained[:count[10]] for it in a],
        "real_authors": _short_answer_items(
            w, n_short, "Who wrote the novel {}?", lambda w: w.pick(_BOOK_TITLES).format(w.word()),
            lambda w: _person(w, {})),
        "world_facts": _short_answer_items(
            w, n_short, "What is the capital of {}?", lambda w: w.word(), lambda w: w.word()),
    }
    plain: dict[str, list[dict]] = {}
    for p, n in count.items():
        perturbed[f"forget{p:02d}"] = [it for a in trained[num_authors - n:] for it in a]
        plain[f"retain{100 - p}"] = [it for a in trained[:num_authors - n] for it in a]
        plain[f"holdout{p:02d}"] = [it for a in holdout[:n] for it in a]
    for name, items in perturbed.items():
        if name != "retain":  # TOFU has no plain file with retain_perturbed's subset
            plain[name] = items
    files = {f"{name}_perturbed": items for name, items in perturbed.items()}
    files.update({name: [{"question": it["question"], "answer": it["answer"]} for it in items]
                  for name, items in plain.items()})
    with atomic_dir(out_dir, "generate-tofu") as tmp:
        for name, items in sorted(files.items()):
            _write_json(tmp / f"{name}.json", items)
    return Path(out_dir)
