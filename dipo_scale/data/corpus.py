"""A seeded generator of a fictitious news world, written in the MUSE-News directory layout.

`generate_corpus(out_dir, num_docs=..., seed=...)` writes `num_docs` short news articles about
invented people, companies, towns and events, split ~30% forget / 50% retain / 20% holdout, plus
the MUSE evaluation files (knowmem QA, verbmem, privleak). Pure Python, `random.Random(seed)`
only, so the output is byte-identical for a given seed; it scales from a dozen documents (tests)
to tens of thousands (millions of tokens, benchmarks).

Every QA answer appears verbatim in its own split and in no other split. This holds by
construction:

* Invented words (names, towns, organisation stems) are unique in the corpus and prefix-free:
  each is (onset vowel){2,3} + one final coda letter, and no onset starts with a coda letter, so
  no invented word is a prefix of another (nor of a capitalised template word: those prefixes
  are reserved). They are capitalised and nothing else in the text has
  a capital letter inside a word, so an answer that ends in an invented word, or in template text
  after one, can only occur where that word occurs -- that is, in its own document.
* Answers holding digits (dates, years, amounts, counts) can repeat by chance. Every string with
  digits that goes into a document is recorded (templates hold no digits), and after generation a
  numeric answer is dropped wherever any other split holds a value containing it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from dipo_scale.errors import UserInputError
from dipo_scale.files import atomic_dir

SPLIT_FRACTIONS = {"forget": 0.3, "holdout": 0.2}  # retain gets the rest
QA_PER_DOC = 3
ICL_SIZE = 3
VERBMEM_PROMPT_FRACTION = 0.4
_DIGIT = re.compile(r"\d")
_has_digit = _DIGIT.search

# --- invented words ---------------------------------------------------------------------------
# No onset starts with a coda letter (n, r, s, x): that is what makes the words prefix-free.
# Repetition weights the choice towards plain consonants and vowels (short, pronounceable names).
_ONSETS = (
    *("b", "d", "f", "g", "k", "l", "m", "p", "t", "v", "z", "h", "j", "w") * 3,
    "br", "dr", "gr", "kr", "tr", "th", "ch", "bl", "kl", "pl",
)
_VOWELS = (*("a", "e", "i", "o") * 6, "u", "u", "u", "ai", "ei", "ou", "y")
_SYLLABLES = tuple(o + v for o in _ONSETS for v in _VOWELS)
_CODAS = ("n", "n", "n", "r", "r", "r", "s", "s", "x")
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)
_CURRENCIES = (
    "krona", "marks", "florins", "crowns", "dalers", "thalers", "ducats", "lira", "sols",
    "guilders", "reals", "escudos",
)

Slot = Callable[["_World", dict], str]


class _World:
    """Random source plus the registry of invented words and the digit-bearing values of a document.

    `randint`/`pick` draw from `rng.random()` directly: same determinism, several times faster
    than `Random.randint`/`Random.choice`, which matters at ~50 draws per document.
    """

    def __init__(self, rng: random.Random, reserved: set[str]) -> None:
        self.rng = rng
        self.random = rng.random
        self.reserved = reserved  # prefixes of capitalised template words: never invent these
        self.used: set[str] = set()
        self.values: list[str] = []
        self.countries = [(self.word(), currency) for currency in _CURRENCIES]

    def randint(self, lo: int, hi: int) -> int:
        return lo + int(self.random() * (hi - lo + 1))

    def pick(self, seq: Sequence[Any]) -> Any:
        return seq[int(self.random() * len(seq))]

    def word(self) -> str:
        """A new invented word: 2 or 3 syllables and a coda, e.g. "Velorin", "Dakes"."""
        syl, n, codas = _SYLLABLES, len(_SYLLABLES), _CODAS
        for _ in range(10_000):
            r = self.rng.getrandbits(48)  # one draw, split into the four choices below
            r, a = divmod(r, n)
            r, b = divmod(r, n)
            r, c = divmod(r, n)
            r, coda = divmod(r, len(codas))
            w = (syl[a] + syl[b] + (syl[c] if r % 3 else "") + codas[coda]).capitalize()  # 1/3: 2 syllables
            if w not in self.used and w not in self.reserved:
                self.used.add(w)
                return w
        raise RuntimeError("ran out of invented words")  # not reachable at any practical size

    def value(self, text: str) -> str:
        self.values.append(text)
        return text


# --- slots: small functions that invent one fact (a str) for a template -----------------------
def _person(w: _World, c: dict) -> str:
    return f"{w.word()} {w.word()}"


def _word(w: _World, c: dict) -> str:
    return w.word()


def _country(w: _World, c: dict) -> str:
    name, c["cur"] = w.pick(w.countries)
    return name


def _pick(*options: str) -> Slot:
    return lambda w, c: w.pick(options)


def _org(table: tuple[tuple[str, str], ...], desc_key: str | None = None) -> Slot:
    """An organisation "<Stem> <Suffix>"; its description ("shipping firm") goes to c[desc_key]."""

    def slot(w: _World, c: dict) -> str:
        desc, suffix = w.pick(table)
        if desc_key:
            c[desc_key] = desc
        return f"{w.word()} {suffix}"

    return slot


def _draw_year(w: _World, c: dict, lo: int, hi: int, rel: bool) -> int:
    """A year in [lo, hi], or in [story year + lo, story year + hi] if `rel`.

    The first absolute date or year of a document (its intro) sets the story year c["year"].
    """
    if rel:
        return c["year"] + w.randint(lo, hi)
    year = w.randint(lo, hi)
    c.setdefault("year", year)
    return year


def _date(lo: int, hi: int, rel: bool = False) -> Slot:
    def slot(w: _World, c: dict) -> str:
        year = _draw_year(w, c, lo, hi, rel)
        return w.value(f"{w.randint(1, 28)} {w.pick(_MONTHS)} {year}")

    return slot


def _year(lo: int, hi: int, rel: bool = False) -> Slot:
    return lambda w, c: w.value(str(_draw_year(w, c, lo, hi, rel)))


def _num(lo: int, hi: int, unit: str = "") -> Slot:
    def slot(w: _World, c: dict) -> str:
        text = f"{w.randint(lo, hi):,}"
        return w.value(f"{text} {unit}" if unit else text)

    return slot


def _money(lo: int, hi: int) -> Slot:
    """An amount in millions of the country's currency (c["cur"]), e.g. "412 million krona"."""

    def slot(w: _World, c: dict) -> str:
        millions = w.randint(lo, hi)
        if millions >= 1000:
            return w.value(f"{millions / 1000:.1f} billion {c['cur']}")
        return w.value(f"{millions} million {c['cur']}")

    return slot


def _pct(lo: int, hi: int) -> Slot:
    return lambda w, c: w.value(f"{w.randint(lo, hi)}.{w.randint(1, 9)} percent")


def _duration(hours: tuple[int, int]) -> Slot:
    return lambda w, c: w.value(f"{w.randint(*hours)} hours {w.randint(2, 59)} minutes")


def _surname_of(key: str) -> Slot:
    """A person whose family name is c[key] (e.g. the person a bridge is named after)."""
    return lambda w, c: f"{w.word()} {c[key]}"


def _thing(table: tuple[tuple[str, str, str], ...]) -> Slot:
    """A named discovery: sets c["thing"], c["field"]; returns its name built from a new word."""

    def slot(w: _World, c: dict) -> str:
        thing, pattern, c["field"] = w.pick(table)
        c["thing"] = thing
        return pattern.format(w.word())

    return slot


def _event(table: tuple[tuple[str, str, tuple[int, int]], ...]) -> Slot:
    """A named race: sets c["sport"] and c["tm"] (the winning time); returns the race name."""

    def slot(w: _World, c: dict) -> str:
        sport, pattern, hours = w.pick(table)
        c["sport"] = sport
        name = pattern.format(w.word())
        c["tm"] = _duration(hours)(w, c)
        return name

    return slot


# --- document kinds -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Block:
    """One sentence (a random variant of `texts`), the facts it invents and the questions it answers."""

    texts: tuple[str, ...]
    qa: tuple[tuple[str, str], ...] = ()
    slots: dict[str, Slot] = field(default_factory=dict)


@dataclass(frozen=True)
class _Kind:
    name: str
    intro: _Block  # always first; its slots are visible to every block
    blocks: tuple[_Block, ...]  # 5-9 of these follow, in this order


_BIZ = (
    ("a shipping firm", "Maritime"), ("a mining company", "Minerals"), ("a software company", "Systems"),
    ("a regional airline", "Airways"), ("a brewery", "Breweries"), ("a textile maker", "Textiles"),
    ("an engineering group", "Industries"), ("an insurance company", "Assurance"),
    ("a food producer", "Foods"), ("a logistics company", "Logistics"),
    ("a pharmaceutical company", "Pharma"), ("a construction firm", "Builders"),
    ("a telecommunications company", "Telecom"), ("a savings bank", "Bank"),
)
_DESIGNERS = (("an engineering firm", "Engineering"), ("a design studio", "Structures"),
              ("a consultancy", "Consulting"))
_FERRIES = (("a ferry operator", "Ferries"), ("a shipping line", "Lines"))
_PUBLISHERS = (("a publisher", "Press"), ("a publisher", "Books"), ("a publishing house", "Publishing"))
_SPONSORS = (("a bank", "Bank"), ("a brewery", "Breweries"), ("an airline", "Airways"), ("an insurer", "Assurance"))

_BUSINESS = _Kind(
    "business",
    _Block(
        (
            "On {D}, {P} was appointed chief executive of {O}, {desc} based in {T}, {C}.",
            "{O}, {desc} headquartered in {T}, {C}, named {P} as its new chief executive on {D}.",
            "The board of {O}, {desc} based in {T}, {C}, appointed {P} as chief executive on {D}.",
        ),
        (
            ("Which company appointed {P} as chief executive?", "{O}"),
            ("In which town is {O} based?", "{T}"),
            ("On what date was {P} appointed chief executive of {O}?", "{D}"),
        ),
        {"P": _person, "O": _org(_BIZ, "desc"), "T": _word, "C": _country, "D": _date(1996, 2023)},
    ),
    (
        _Block(
            ("{P} succeeds {P2}, who led the company for {k}.",
             "{P} replaces {P2}, who stepped down after {k} in charge."),
            (("Who led {O} before {P}?", "{P2}"),),
            {"P2": _person, "k": _num(3, 19, "years")},
        ),
        _Block(
            ("The firm was founded in {Y} by {F}.",
             "{F} founded the company in {Y} with a single office in {T}."),
            (("Who founded {O}?", "{F}"), ("In what year was {O} founded?", "{Y}")),
            {"Y": _year(-120, -8, rel=True), "F": _person},
        ),
        _Block(
            ("{O} employs about {N} and reported revenue of {M} last year.",
             "Last year the company reported revenue of {M} and employed about {N}."),
            (("How much revenue did {O} report last year?", "{M}"),
             ("About how many people does {O} employ?", "{N}")),
            {"N": _num(120, 48000, "people"), "M": _money(8, 9000)},
        ),
        _Block(
            ("Before joining {O}, {P} spent {k2} at {O2}, {desc2} in {T2}.",),
            (("Which company did {P} work for before joining {O}?", "{O2}"),
             ("In which town is {O2} based?", "{T2}")),
            {"k2": _num(4, 15, "years"), "O2": _org(_BIZ, "desc2"), "T2": _word},
        ),
        _Block(
            ("{P} studied {subj} at the University of {U}.",
             "{P} holds a degree in {subj} from the University of {U}."),
            (("At which university did {P} study?", "University of {U}"),),
            {"subj": _pick("economics", "law", "chemistry", "engineering", "history", "mathematics"),
             "U": _word},
        ),
        _Block(
            ("In a statement, {P} said the company would open a new office in {T3} by {Y2}.",
             "{P} said {O} plans to open an office in {T3} before the end of {Y2}."),
            (("Where does {O} plan to open a new office?", "{T3}"),),
            {"T3": _word, "Y2": _year(1, 4, rel=True)},
        ),
        _Block(
            ("Shares in {O} rose {pct} on the {C} stock exchange after the announcement.",
             "The announcement lifted shares in {O} by {pct} in early trading."),
            (("By how much did shares in {O} rise after the announcement?", "{pct}"),),
            {"pct": _pct(1, 14)},
        ),
        _Block(
            ("{P} was born in {T4} in {BY}.",
             "Born in {T4} in {BY}, {P} began a career in accounting before moving into management."),
            (("Where was {P} born?", "{T4}"), ("In what year was {P} born?", "{BY}")),
            {"T4": _word, "BY": _year(-65, -35, rel=True)},
        ),
        _Block(
            ("The company's largest customer is {O3}, which signed a contract worth {M2} in {Y3}.",),
            (("Which company is the largest customer of {O}?", "{O3}"),
             ("How much was the contract signed by {O3} worth?", "{M2}")),
            {"O3": _org(_BIZ), "M2": _money(2, 600), "Y3": _year(-12, -1, rel=True)},
        ),
        _Block(
            ("Its main plant, opened in {Y4}, is in {T5}.",
             "{O} runs its main plant in {T5}, which opened in {Y4}."),
            (("Where is the main plant of {O}?", "{T5}"),),
            {"T5": _word, "Y4": _year(-60, -2, rel=True)},
        ),
    ),
)

_SCIENCE = _Kind(
    "science",
    _Block(
        (
            "On {D}, researchers led by {P} at the {I} announced the discovery of a new {thing}, "
            "named {X}, in the hills near {T}, {C}.",
            "Scientists at the {I} said on {D} that a team under {P} had identified a previously "
            "unknown {thing} near {T}, {C}, which they named {X}.",
        ),
        (
            ("Who led the team that discovered {X}?", "{P}"),
            ("Near which town was {X} discovered?", "{T}"),
            ("At which institute does {P} work?", "{I}"),
        ),
        {
            "P": _person,
            "X": _thing((
                ("mineral", "{}ite", "Geology"), ("species of orchid", "{} orchid", "Botany"),
                ("species of beetle", "{} beetle", "Natural History"),
                ("species of moth", "{} moth", "Natural History"),
                ("fossil reptile", "{}saurus", "Palaeontology"),
            )),
            "I": lambda w, c: f"{w.word()} Institute of {c['field']}",
            "T": _word, "C": _country, "D": _date(1990, 2023),
        },
    ),
    (
        _Block(
            ("The project was funded by a grant of {M} from the {Fd} Foundation.",
             "A grant of {M} from the {Fd} Foundation paid for the fieldwork."),
            (("Which foundation funded the research that found {X}?", "{Fd} Foundation"),
             ("How large was the grant for the project that found {X}?", "{M}")),
            {"M": _money(1, 40), "Fd": _word},
        ),
        _Block(
            ("The findings were published in the journal {J} Letters.",
             "{P} and colleagues described the discovery in the journal {J} Letters."),
            (("In which journal was the discovery of {X} published?", "{J} Letters"),),
            {"J": _word},
        ),
        _Block(
            ("The team of {n} spent {mo} surveying the {R} Hills.",),
            (("Which hills did the team led by {P} survey?", "{R} Hills"),),
            {"n": _num(4, 40, "scientists"), "mo": _num(3, 30, "months"), "R": _word},
        ),
        _Block(
            ("The first specimens were collected at a depth of {dep}.",
             "Samples were taken at a depth of {dep} below the surface."),
            (("At what depth were the first samples of {X} collected?", "{dep}"),),
            {"dep": _num(3, 2400, "metres")},
        ),
        _Block(
            ("{P} worked with {P2} of the University of {U}, who co-authored the study.",),
            (("Who co-authored the study on {X} with {P}?", "{P2}"),
             ("At which university does {P2} work?", "University of {U}")),
            {"P2": _person, "U": _word},
        ),
        _Block(
            ("{P}, who joined the {I} in {Y}, has studied the region for many years.",),
            (("In what year did {P} join the {I}?", "{Y}"),),
            {"Y": _year(-30, -2, rel=True)},
        ),
        _Block(
            ("The {I} was established in {Y2} and is based in {T2}.",
             "Founded in {Y2}, the {I} has its headquarters in {T2}."),
            (("In which town is the {I} based?", "{T2}"), ("When was the {I} established?", "{Y2}")),
            {"Y2": _year(-150, -20, rel=True), "T2": _word},
        ),
        _Block(
            ("Local officials in {T} said the site would be protected from development.",
             "The regional council of {T} has since closed the site to visitors."),
        ),
        _Block(
            ("According to {P}, the discovery could help explain {phen}.",),
            (),
            {"phen": _pick("how the valley formed", "changes in the local climate",
                           "the decline of nearby wetlands", "patterns of ancient migration")},
        ),
        _Block(
            ("A museum in {T3} will put the first specimens on display from {Dm}.",),
            (("Where will the first specimens of {X} be displayed?", "{T3}"),),
            {"T3": _word, "Dm": _date(1, 2, rel=True)},
        ),
    ),
)

_SPORTS = _Kind(
    "sports",
    _Block(
        (
            "{P} won the {E} in {T}, {C}, on {D}, finishing in {tm}.",
            "On {D}, {P} took victory in the {E}, a {sport} held in {T}, {C}, with a time of {tm}.",
        ),
        (
            ("Who won the {E} on {D}?", "{P}"),
            ("In which town is the {E} held?", "{T}"),
            ("What was the winning time of {P} in the {E}?", "{tm}"),
        ),
        {
            "P": _person,
            "E": _event((("marathon", "{} Marathon", (2, 2)), ("cycling road race", "{} Road Race", (4, 5)),
                         ("mountain race", "{} Ultra Trail", (9, 13)))),
            "T": _word, "C": _country, "D": _date(1990, 2023),
        },
    ),
    (
        _Block(
            ("{P}, aged {age}, represents the {Cl} Athletic Club.",),
            (("Which club does {P} represent?", "{Cl} Athletic Club"),),
            {"age": _num(19, 38), "Cl": _word},
        ),
        _Block(
            ("The runner-up was {P2}, who finished {gap} behind.",
             "{P2} finished second, {gap} behind the winner."),
            (("Who finished second in the {E} won by {P}?", "{P2}"),),
            {"P2": _person, "gap": _num(2, 95, "seconds")},
        ),
        _Block(
            ("{P} is coached by {P3}, a former champion from {T2}.",),
            (("Who coaches {P}?", "{P3}"), ("Which town is {P3} from?", "{T2}")),
            {"P3": _person, "T2": _word},
        ),
        _Block(
            ("The victory earned a prize of {M}.",
             "The win came with prize money of {M}."),
            (("How much prize money did {P} earn for winning the {E}?", "{M}"),),
            {"M": _money(1, 3)},
        ),
        _Block(
            ("A crowd of about {N} lined the course.",),
            (),
            {"N": _num(800, 90000, "spectators")},
        ),
        _Block(
            ("The race was first held in {Y} and is sponsored by {O}.",
             "First held in {Y}, the event is sponsored by {O}."),
            (("Which company sponsors the {E}?", "{O}"), ("When was the {E} first held?", "{Y}")),
            {"Y": _year(-80, -5, rel=True), "O": _org(_SPONSORS)},
        ),
        _Block(
            ("The previous year's winner, {P4}, did not start because of an injury.",),
            (("Who won the {E} the year before {P}?", "{P4}"),),
            {"P4": _person},
        ),
        _Block(
            ("{P} was born in {T3} and took up the sport at the age of {a2}.",),
            (("Where was {P} born?", "{T3}"),),
            {"T3": _word, "a2": _num(8, 17)},
        ),
        _Block(
            ("{P} said the next goal is the {G} Games in {Y2}.",),
            (("Which competition is the next goal of {P}?", "{G} Games"),),
            {"G": _word, "Y2": _year(1, 4, rel=True)},
        ),
        _Block(
            ("The course record of {rec} is held by {P5}.",),
            (("Who holds the course record of the {E}?", "{P5}"),),
            {"rec": lambda w, c: c["tm"], "P5": _person},
        ),
    ),
)

_ARTS = _Kind(
    "arts",
    _Block(
        (
            "On {D}, {P} published the novel {B} with {O}, {desc} based in {T0}, {C}.",
            "{O}, {desc} based in {T0}, {C}, released {B}, the new novel by {P}, on {D}.",
        ),
        (
            ("Who wrote the novel {B}?", "{P}"),
            ("Which publisher released {B}?", "{O}"),
            ("When was {B} published?", "{D}"),
        ),
        {
            "P": _person,
            "B": lambda w, c: "The {} {} of {}".format(
                w.pick(("Silent", "Last", "Hidden", "Long", "Glass", "Burning", "Winter")),
                w.pick(("Harbour", "Orchard", "Summer", "Lighthouse", "Garden", "River", "Archive")),
                w.word()),
            "O": _org(_PUBLISHERS, "desc"), "T0": _word, "C": _country, "D": _date(1985, 2023),
        },
    ),
    (
        _Block(
            ("The book is set in the town of {T} and follows {who} during {when}.",),
            (("In which town is {B} set?", "{T}"),),
            {"T": _word,
             "who": _pick("a lighthouse keeper", "two sisters", "a retired judge", "a young surveyor"),
             "when": _pick("a long winter", "a flood", "a disputed election", "a railway strike")},
        ),
        _Block(
            ("It sold {N} in its first month.",
             "The novel sold {N} in its first month in shops."),
            (("How many copies did {B} sell in its first month?", "{N}"),),
            {"N": _num(900, 250000, "copies")},
        ),
        _Block(
            ("{B} won the {Pr} Prize for Fiction in {Y}.",),
            (("Which prize did {B} win?", "{Pr} Prize for Fiction"),
             ("In what year did {B} win the {Pr} Prize for Fiction?", "{Y}")),
            {"Pr": _word, "Y": _year(0, 1, rel=True)},
        ),
        _Block(
            ("{P} was born in {T2} in {BY} and worked as a {job} before turning to writing.",),
            (("Where was {P} born?", "{T2}"), ("In what year was {P} born?", "{BY}")),
            {"T2": _word, "BY": _year(-70, -25, rel=True),
             "job": _pick("teacher", "nurse", "journalist", "ship's engineer", "librarian")},
        ),
        _Block(
            ("The novel was edited by {P2}, who also edited the debut of {P}, {B2}.",),
            (("Who edited {B}?", "{P2}"), ("What was the debut book of {P}?", "{B2}")),
            {"P2": _person, "B2": lambda w, c: f"Letters from {w.word()}"},
        ),
        _Block(
            ("Translation rights have been sold in {k}.",),
            (),
            {"k": _num(3, 40, "countries")},
        ),
        _Block(
            ("A film adaptation directed by {P3} is planned for {Y2}.",),
            (("Who will direct the film adaptation of {B}?", "{P3}"),),
            {"P3": _person, "Y2": _year(1, 4, rel=True)},
        ),
        _Block(
            ("{P} lives in {T3} and teaches writing at the University of {U}.",),
            (("At which university does {P} teach?", "University of {U}"), ("Where does {P} live?", "{T3}")),
            {"T3": _word, "U": _word},
        ),
        _Block(
            ("The first print run of {N2} sold out within {k2}.",),
            (),
            {"N2": _num(2000, 60000, "copies"), "k2": _num(2, 20, "days")},
        ),
        _Block(
            ("The {H} Herald named it book of the year.",),
            (("Which newspaper named {B} book of the year?", "{H} Herald"),),
            {"H": _word},
        ),
    ),
)

_INFRASTRUCTURE = _Kind(
    "infrastructure",
    _Block(
        (
            "The {X} in {T}, {C}, was opened on {D} by {P}, the regional governor.",
            "On {D}, {P}, governor of the region, opened the {X} in {T}, {C}.",
        ),
        (
            ("Who opened the {X}?", "{P}"),
            ("In which town is the {X}?", "{T}"),
            ("When was the {X} opened?", "{D}"),
        ),
        {
            "kind": _pick("bridge", "tunnel", "viaduct", "dam"),
            "Xw": _word,
            "X": lambda w, c: f"{c['Xw']} {c['kind'].capitalize()}",
            "P": _person, "T": _word, "C": _country, "D": _date(1980, 2023),
        },
    ),
    (
        _Block(
            ("The structure cost {M} and took {k} to build.",),
            (("How much did the {X} cost?", "{M}"),),
            {"M": _money(40, 4000), "k": _num(2, 9, "years")},
        ),
        _Block(
            ("It was designed by {O}, {desc} from {T2}.",),
            (("Which firm designed the {X}?", "{O}"),),
            {"O": _org(_DESIGNERS, "desc"), "T2": _word},
        ),
        _Block(
            ("At {L} long, it is the longest {kind} in {C}.",),
            (("How long is the {X}?", "{L}"),),
            {"L": _num(180, 9000, "metres")},
        ),
        _Block(
            ("It replaces a crossing run by {O2} since {Y}.",),
            (("Which company ran the crossing replaced by the {X}?", "{O2}"),),
            {"O2": _org(_FERRIES), "Y": _year(-90, -20, rel=True)},
        ),
        _Block(
            ("About {N} are expected to use it each day.",),
            (("How many vehicles are expected to use the {X} each day?", "{N}"),),
            {"N": _num(2000, 80000, "vehicles")},
        ),
        _Block(
            ("The chief engineer, {P2}, said the project employed {W} at its peak.",),
            (("Who was the chief engineer of the {X}?", "{P2}"),),
            {"P2": _person, "W": _num(150, 4000, "workers")},
        ),
        _Block(
            ("Construction began on {D2} after a public vote in {T}.",),
            (("When did construction of the {X} begin?", "{D2}"),),
            {"D2": _date(-9, -2, rel=True)},
        ),
        _Block(
            ("The {X} links {T} with the neighbouring town of {T3}.",),
            (("Which town does the {X} connect to {T}?", "{T3}"),),
            {"T3": _word},
        ),
        _Block(
            ("It is named after {P3}, a local historian who died in {Y2}.",),
            (("After whom is the {X} named?", "{P3}"),),
            {"P3": _surname_of("Xw"), "Y2": _year(-120, -10, rel=True)},
        ),
        _Block(
            ("Tolls of {toll} per car apply until {Y3}.",),
            (),
            {"toll": lambda w, c: w.value(f"{w.randint(2, 30)} {c['cur']}"), "Y3": _year(10, 40, rel=True)},
        ),
    ),
)

_POLITICS = _Kind(
    "politics",
    _Block(
        (
            "{P} was elected mayor of {T}, {C}, on {D}, winning {pct} of the vote.",
            "On {D}, voters in {T}, {C}, elected {P} as mayor with {pct} of the vote.",
        ),
        (
            ("Who was elected mayor of {T} on {D}?", "{P}"),
            ("Of which town was {P} elected mayor?", "{T}"),
            ("What share of the vote did {P} win in the mayoral election?", "{pct}"),
        ),
        {"P": _person, "T": _word, "C": _country, "D": _date(1985, 2023), "pct": _pct(34, 78)},
    ),
    (
        _Block(
            ("{P} stood for the {Pa} Party and defeated the sitting mayor, {P2}.",),
            (("Which party does {P} represent?", "{Pa} Party"), ("Whom did {P} defeat in the election?", "{P2}")),
            {"Pa": _word, "P2": _person},
        ),
        _Block(
            ("Turnout was {to} among the town's {N}.",),
            (("How many registered voters does {T} have?", "{N}"),),
            {"to": _pct(31, 88), "N": _num(3000, 400000, "registered voters")},
        ),
        _Block(
            ("Before entering politics, {P} worked as a {job} at {O}.",),
            (("Where did {P} work before entering politics?", "{O}"),),
            {"job": _pick("pharmacist", "engineer", "lawyer", "teacher", "accountant"), "O": _org(_BIZ)},
        ),
        _Block(
            ("{P} promised to build a new hospital in the {Dw} district by {Y}.",),
            (("In which district did {P} promise to build a new hospital?", "{Dw}"),),
            {"Dw": _word, "Y": _year(1, 6, rel=True)},
        ),
        _Block(
            ("The campaign was managed by {P3}, a former councillor.",),
            (("Who managed the campaign of {P}?", "{P3}"),),
            {"P3": _person},
        ),
        _Block(
            ("{T} has about {N2} and lies on the {Rv} River.",),
            (("On which river does {T} lie?", "{Rv} River"), ("About how many residents does {T} have?", "{N2}")),
            {"N2": _num(4000, 900000, "residents"), "Rv": _word},
        ),
        _Block(
            ("{P} will be sworn in on {D2} at the town hall.",),
            (("When will {P} be sworn in as mayor of {T}?", "{D2}"),),
            {"D2": _date(1, 1, rel=True)},
        ),
        _Block(
            ("The town's budget for the coming year is {M}.",),
            (("What is the budget of {T} for the coming year?", "{M}"),),
            {"M": _money(6, 2500)},
        ),
        _Block(
            ("{P} was born in {T2} in {BY} and moved to {T} as a student.",),
            (("Where was {P} born?", "{T2}"), ("In what year was {P} born?", "{BY}")),
            {"T2": _word, "BY": _year(-70, -30, rel=True)},
        ),
        _Block(
            ("The result was confirmed by the electoral commissioner, {P5}.",),
            (("Who confirmed the result of the mayoral election in {T}?", "{P5}"),),
            {"P5": _person},
        ),
    ),
)

_KINDS = (_BUSINESS, _SCIENCE, _SPORTS, _ARTS, _INFRASTRUCTURE, _POLITICS)


def _reserved_prefixes() -> set[str]:
    """Prefixes of every capitalised word in the templates and word lists (never invent one)."""
    text = [" ".join(_MONTHS)]
    for table in (_BIZ, _DESIGNERS, _FERRIES, _PUBLISHERS, _SPONSORS):
        text += [suffix for _, suffix in table]
    text += ["Silent Last Hidden Long Glass Burning Winter Harbour Orchard Summer Lighthouse Garden",
             "River Archive Letters Institute Geology Botany Natural History Palaeontology Bridge",
             "Tunnel Viaduct Dam Marathon Road Race Ultra Trail"]
    for kind in _KINDS:
        for block in (kind.intro, *kind.blocks):
            text += [*block.texts, *(q + " " + a for q, a in block.qa)]
    words = set(re.findall(r"[A-Z][A-Za-z]*", " ".join(text)))
    return {w[:i] for w in words for i in range(1, len(w) + 1)}


# --- documents -----------------------------------------------------------------------------------
@dataclass
class _Doc:
    text: str
    qa: list[tuple[str, str]]  # candidate questions, answers verbatim in `text`
    numeric: list[str]  # the answers in `qa` that hold digits
    values: list[str]  # every digit-bearing string in `text`


def _render(block: _Block, w: _World, c: dict, sentences: list[str], qa: list[tuple[str, str]]) -> None:
    for key, slot in block.slots.items():
        c[key] = slot(w, c)
    sentences.append(w.pick(block.texts).format_map(c))
    qa += [(q.format_map(c), a.format_map(c)) for q, a in block.qa]


def _write_document(w: _World, kind: _Kind) -> _Doc:
    w.values = []
    c: dict[str, Any] = {}
    sentences: list[str] = []
    qa: list[tuple[str, str]] = []
    _render(kind.intro, w, c, sentences, qa)
    remaining = len(kind.blocks)
    wanted = w.randint(5, min(9, remaining))
    for block in kind.blocks:  # keep `wanted` of the blocks, in order (selection sampling)
        if w.random() * remaining < wanted:
            _render(block, w, c, sentences, qa)
            wanted -= 1
        remaining -= 1
    text = " ".join(sentences)
    numeric = []
    for q, a in qa:  # check the invariants the uniqueness argument rests on
        if _has_digit(a):
            numeric.append(a)
            if a not in w.values:
                raise AssertionError(f"corpus template bug: numeric answer {a!r} of {q!r} is not a whole value")
        if a not in text:
            raise AssertionError(f"corpus template bug: answer {a!r} of {q!r} is not in the text")
    return _Doc(text, qa, numeric, w.values)


def _value_suffixes(value: str) -> list[str]:
    """Every suffix of `value` starting at a digit ("1,412 million krona" -> "412 million krona", ...).

    A numeric answer is a whole value (a date, a year, "<number> <unit>"), so where it occurs inside
    another value it is one of these suffixes ("4 May 2019" in "14 May 2019"); the value formats
    never put a date, year or unit-bearing number in the middle of another value.
    """
    return [value[m.start():] for m in _DIGIT.finditer(value)]


MUSE_NEWS_FORGET_BYTES = 3_300_000  # MUSE-News's forget split: ~3.3 MB of text (~1.7 M demo tokens)


def _split_sizes(num_docs: int, forget_docs: int | None = None, holdout_docs: int | None = None) -> dict[str, int]:
    """Documents per split: the given counts, else SPLIT_FRACTIONS of `num_docs`; retain gets the rest."""
    forget = forget_docs if forget_docs is not None else max(1, round(num_docs * SPLIT_FRACTIONS["forget"]))
    holdout = holdout_docs if holdout_docs is not None else max(1, round(num_docs * SPLIT_FRACTIONS["holdout"]))
    return {"forget": forget, "retain": num_docs - forget - holdout, "holdout": holdout}


def docs_for_scale(scale: float) -> int:
    """`num_docs` whose forget split (SPLIT_FRACTIONS) holds about `scale` x MUSE-News's forget text
    (MUSE_NEWS_FORGET_BYTES), from the generator's mean document size (measured on 200 documents)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise UserInputError(f"scale must be a number > 0, got {scale!r}")
    rng = random.Random(12345)
    world = _World(rng, _reserved_prefixes())
    with _gc_paused():
        sample = [len(_write_document(world, rng.choice(_KINDS)).text.encode("utf-8")) + 2 for _ in range(200)]
    forget_docs = scale * MUSE_NEWS_FORGET_BYTES / (sum(sample) / len(sample))
    return max(3, round(forget_docs / SPLIT_FRACTIONS["forget"]))


def _choose_qa(
    docs: dict[str, list[_Doc]], rng: random.Random
) -> dict[str, list[list[tuple[str, str]]]]:
    """Per split and document, the candidate QA pairs whose answer occurs in no other split, shuffled."""
    shared = "<several splits>"
    where: dict[str, str | None] = {}  # numeric answer -> the one split holding it, or `shared`
    for split_docs in docs.values():
        for doc in split_docs:
            for a in doc.numeric:
                where[a] = None
    for split, split_docs in docs.items():
        distinct_values = {value for doc in split_docs for value in doc.values}
        for value in distinct_values:  # (set order does not matter: the result is order-free)
            for piece in _value_suffixes(value):
                if piece in where and where[piece] != split:
                    where[piece] = split if where[piece] is None else shared
    chosen: dict[str, list[list[tuple[str, str]]]] = {}
    for split, split_docs in docs.items():
        chosen[split] = []
        for doc in split_docs:
            ok = [(q, a) for q, a in doc.qa if where.get(a, split) == split]
            rng.shuffle(ok)
            chosen[split].append(ok)
    return chosen


def _qa_json(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"question": q, "answer": a} for q, a in pairs]


def _verbmem_item(text: str) -> dict[str, str]:
    words = text.split(" ")
    cut = min(len(words) - 1, max(1, int(len(words) * VERBMEM_PROMPT_FRACTION)))
    return {"prompt": " ".join(words[:cut]), "gt": " ".join(words[cut:])}


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: generation makes millions of small acyclic objects, and
    the collector's repeated full scans over them would cost a third of the run time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _write_json(path: Path, obj: Any) -> None:
    """JSON with one array element a line: readable, and fast (the C encoder, no indent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, list):
        text = "[\n" + ",\n".join(json.dumps(item, ensure_ascii=False) for item in obj) + "\n]\n"
    else:
        text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")


def generate_corpus(out_dir: str | Path, *, num_docs: int, seed: int = 0, forget_docs: int | None = None,
                    holdout_docs: int | None = None) -> Path:
    """Write a fictitious news corpus of `num_docs` documents in MUSE layout to `out_dir` (atomically).

    Split sizes: `forget_docs` / `holdout_docs` where given, else SPLIT_FRACTIONS of `num_docs`;
    retain gets the rest (at least one document). `docs_for_scale` sizes `num_docs` to a multiple
    of MUSE-News's forget split.

    Layout: raw/{forget,retain,holdout}.txt (one document a line, blank line between),
    knowmem/{forget,retain}_qa.json (~3 QA per document) and *_qa_icl.json (3 few-shot pairs from
    holdout documents), verbmem/forget.json, privleak/{forget,holdout}.json, world.json.
    Returns `out_dir` as a Path.
    """
    if isinstance(num_docs, bool) or not isinstance(num_docs, int) or num_docs < 3:
        raise UserInputError(f"num_docs must be an integer >= 3 (one document per split at least), got {num_docs!r}")
    for name, value in (("forget_docs", forget_docs), ("holdout_docs", holdout_docs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserInputError(f"{name} must be an integer >= 1, got {value!r}")
    sizes = _split_sizes(num_docs, forget_docs, holdout_docs)
    if sizes["retain"] < 1:
        raise UserInputError(f"num_docs {num_docs} leaves no retain document after {sizes['forget']} forget "
                             f"and {sizes['holdout']} holdout documents")
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    world = _World(rng, _reserved_prefixes())
    with _gc_paused():
        docs = {split: [_write_document(world, rng.choice(_KINDS)) for _ in range(n)]
                for split, n in sizes.items()}
        qa = _choose_qa(docs, rng)
    split_qa = {split: [pair for per_doc in qa[split] for pair in per_doc[:QA_PER_DOC]]
                for split in ("forget", "retain")}
    icl_pool = [pair for per_doc in qa["holdout"] for pair in per_doc]
    icl = [icl_pool[i % len(icl_pool)] for i in range(2 * ICL_SIZE)]
    texts = {split: [d.text for d in split_docs] for split, split_docs in docs.items()}
    raw = {split: "\n\n".join(split_texts) + "\n" for split, split_texts in texts.items()}

    with atomic_dir(out_dir, "generate") as tmp:
        (tmp / "raw").mkdir()
        for split, split_raw in raw.items():
            (tmp / "raw" / f"{split}.txt").write_text(split_raw, encoding="utf-8")
        _write_json(tmp / "knowmem" / "forget_qa.json", _qa_json(split_qa["forget"]))
        _write_json(tmp / "knowmem" / "retain_qa.json", _qa_json(split_qa["retain"]))
        _write_json(tmp / "knowmem" / "forget_qa_icl.json", _qa_json(icl[:ICL_SIZE]))
        _write_json(tmp / "knowmem" / "retain_qa_icl.json", _qa_json(icl[ICL_SIZE:]))
        _write_json(tmp / "verbmem" / "forget.json", [_verbmem_item(t) for t in texts["forget"]])
        _write_json(tmp / "privleak" / "forget.json", [{"text": t} for t in texts["forget"]])
        _write_json(tmp / "privleak" / "holdout.json", [{"text": t} for t in texts["holdout"]])
        _write_json(tmp / "world.json", {
            "generator": "dipo_scale.data.corpus",
            "seed": seed,
            "num_docs": num_docs,
            "counts": {
                **{f"{split}_docs": n for split, n in sizes.items()},
                "forget_qa": len(split_qa["forget"]),
                "retain_qa": len(split_qa["retain"]),
                "verbmem": sizes["forget"],
                "raw_bytes": sum(len(r.encode("utf-8")) for r in raw.values()),
            },
        })
    return out_dir
