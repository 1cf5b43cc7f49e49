"""A seeded synthetic corpus of facts about people, with held-out questions.

Each person has a unique name and ``n_attributes`` attributes (five by default) whose
values are drawn from lists of about ten words. ``values_per_attribute`` sets every
list to one width: narrower lists keep their first words, wider ones continue with
invented words (``value_list``), so chance exact match can be made as low as needed.
The default arguments render the same text as before these knobs existed. The
training text holds every person's biography in ``n_bio_variants`` renderings
(templates and sentence order vary: this augmentation is what lets a model answer
questions about facts it only read in biographies), plus the question/answer form
for a fraction ``qa_train_fraction`` of the people. The other people's questions are
held out: answering them needs the facts from the biographies and the answer
format from the other people's QA lines. Every template ends with the value, so a
biography sentence cut before its value is also a cloze probe.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from memdist.config import MAX_VALUES_PER_ATTRIBUTE
from memdist.errors import ConfigError

FIRST_NAMES = (
    "Ada Ben Cal Dan Eve Fay Gus Hal Ivy Jon Kim Lea Max Ned Ola Pam Quin Ray Sam Tia "
    "Uma Vic Wes Xia Yan Zoe Abe Bea Cy Dee Eli Flo Gia Hugo Ike Jade Kai Liv Mia Noa "
    "Otto Pia Rex Sue Tom Una Val Wyn Yul Zed Amos Bo Cleo Dov Edda Finn Gil Hana Ida "
    "Jem "
).split()
LAST_NAMES = (
    "Smith Brown Clark Davis Evans Ford Green Hill Irwin Jones King Lopez Moore Nash "
    "Owen Price Reed Stone Tate Vance Wood Young Abbot Baker Cole Dunn Ellis Frost Gray "
    "Hale Ives Jett Knox Lane Marsh Noble Oakes Pike Quill Rowe Shaw Todd Upton Voss "
    "Webb Yates Zane Ames Bell Cruz Dale Eton Fox Gage Hart Ince Judd Kerr Lowe "
).split()


# Bumped whenever the same arguments would render different text, so that
# write_corpus does not reuse files cached by an older version.
CORPUS_FORMAT = 2


@dataclass(frozen=True, slots=True)
class Attribute:
    name: str
    values: tuple[str, ...]
    templates: tuple[str, ...]  # "{n}" is the name, "{v}" the value, always at the end
    question: str


ATTRIBUTES = (
    Attribute(
        "birth_city",
        (
            "Paris",
            "Tokyo",
            "Lima",
            "Oslo",
            "Cairo",
            "Delhi",
            "Rome",
            "Quito",
            "Seoul",
            "Perth",
            "Dakar",
            "Milan",
            "Osaka",
            "Lagos",
            "Kyiv",
            "Riga",
        ),
        (
            "{n} was born in {v}.",
            "{n} came into the world in {v}.",
            "The birthplace of {n} is {v}.",
        ),
        "Where was {n} born?",
    ),
    Attribute(
        "job",
        (
            "baker",
            "pilot",
            "nurse",
            "judge",
            "miner",
            "tailor",
            "farmer",
            "singer",
            "potter",
            "sailor",
            "writer",
            "dentist",
        ),
        ("{n} works as a {v}.", "{n} earns a living as a {v}.", "By trade, {n} is a {v}."),
        "What does {n} do for work?",
    ),
    Attribute(
        "pet",
        ("cat", "dog", "owl", "fox", "hen", "goat", "frog", "pony", "duck", "crab"),
        ("{n} keeps a pet {v}.", "{n} owns a pet {v}.", "The pet of {n} is a {v}."),
        "Which pet does {n} have?",
    ),
    Attribute(
        "color",
        ("red", "blue", "green", "amber", "violet", "teal", "gray", "pink", "gold", "white"),
        (
            "{n} likes the color {v}.",
            "The favorite color of {n} is {v}.",
            "Of all colors, {n} loves {v}.",
        ),
        "What color does {n} like?",
    ),
    Attribute(
        "sport",
        (
            "chess",
            "tennis",
            "rugby",
            "golf",
            "judo",
            "polo",
            "squash",
            "hockey",
            "rowing",
            "boxing",
        ),
        ("{n} plays {v}.", "{n} spends weekends at {v}.", "The sport of {n} is {v}."),
        "Which sport does {n} play?",
    ),
)


# More attributes for larger corpora (``n_attributes`` up to len(ALL_ATTRIBUTES)).
MORE_ATTRIBUTES = (
    Attribute(
        "food",
        ("rice", "soup", "figs", "plums", "bread", "pasta", "curry", "tacos", "sushi", "stew"),
        ("{n} likes to eat {v}.", "The favorite food of {n} is {v}.", "{n} often cooks {v}."),
        "What food does {n} like?",
    ),
    Attribute(
        "instrument",
        ("harp", "drums", "flute", "cello", "oboe", "banjo", "piano", "tuba", "viola", "lute"),
        ("{n} plays the {v}.", "The instrument of {n} is the {v}.", "{n} practices the {v}."),
        "Which instrument does {n} play?",
    ),
    Attribute(
        "language",
        ("Greek", "Hindi", "Malay", "Dutch", "Czech", "Irish", "Welsh", "Tamil", "Thai", "Zulu"),
        ("{n} speaks {v}.", "The second language of {n} is {v}.", "{n} is fluent in {v}."),
        "Which language does {n} speak?",
    ),
    Attribute(
        "car",
        ("van", "jeep", "truck", "coupe", "sedan", "wagon", "buggy", "cab", "bus", "scooter"),
        ("{n} drives a {v}.", "The vehicle of {n} is a {v}.", "To get around, {n} uses a {v}."),
        "What does {n} drive?",
    ),
    Attribute(
        "flower",
        ("rose", "lily", "iris", "tulip", "daisy", "lotus", "poppy", "aster", "peony", "orchid"),
        ("{n} grows {v}.", "The favorite flower of {n} is the {v}.", "{n} plants {v}."),
        "Which flower does {n} grow?",
    ),
)
ALL_ATTRIBUTES = ATTRIBUTES + MORE_ATTRIBUTES

# Invented words continue a value list past its built-in words: syllables from these
# letters, two or three of them, never one of the built-in words.
_ONSETS = "b d f g k l m n p r s t v z".split()
_VOWELS = "a e i o u".split()


def value_list(attr: Attribute, width: int) -> tuple[str, ...]:
    """The first ``width`` values of ``attr``: its built-in words, then invented words
    drawn from a generator seeded by the attribute's name (the same list in every
    corpus), capitalised where the built-in words are."""
    if width <= len(attr.values):
        return attr.values[:width]
    rng = random.Random(f"values-{attr.name}")
    capital = attr.values[0][:1].isupper()
    seen = {v.lower() for v in attr.values}
    out = list(attr.values)
    while len(out) < width:
        syllables = rng.choice((2, 2, 3))
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
        if word not in seen:
            seen.add(word)
            out.append(word.capitalize() if capital else word)
    return tuple(out)


def corpus_attributes(
    n_attributes: int = len(ATTRIBUTES), values_per_attribute: int | None = None
) -> tuple[Attribute, ...]:
    """The attributes a corpus uses, with their value lists (the built-in ones when
    ``values_per_attribute`` is None)."""
    if not 1 <= n_attributes <= len(ALL_ATTRIBUTES):
        raise ConfigError(
            f"data.n_attributes={n_attributes} must be between 1 and {len(ALL_ATTRIBUTES)} "
            "(the built-in attributes)"
        )
    if values_per_attribute is not None and not (
        2 <= values_per_attribute <= MAX_VALUES_PER_ATTRIBUTE
    ):
        raise ConfigError(
            f"data.values_per_attribute={values_per_attribute} must be between 2 and "
            f"{MAX_VALUES_PER_ATTRIBUTE} or null (the built-in lists of about 10 words)"
        )
    attrs = ALL_ATTRIBUTES[:n_attributes]
    if values_per_attribute is None:
        return attrs
    return tuple(replace(a, values=value_list(a, values_per_attribute)) for a in attrs)


@dataclass(frozen=True, slots=True)
class QAPair:
    """A prompt to complete and its answer; ``person`` and ``attribute`` say which fact."""

    prompt: str
    answer: str
    person: str
    attribute: str


@dataclass(frozen=True, slots=True)
class Person:
    name: str
    facts: dict[str, str]


def question_prompt(attr: Attribute, name: str) -> str:
    return f"Q: {attr.question.format(n=name)}\nA:"


def qa_line(attr: Attribute, name: str, value: str) -> str:
    return f"{question_prompt(attr, name)} {value}\n"


@dataclass(slots=True)
class FactCorpus:
    """Training documents and held-out probes of one generated corpus."""

    people: list[Person]
    train_docs: list[str]
    qa_eval: list[QAPair]
    cloze_eval: list[QAPair]
    qa_train_people: list[str]
    params: dict[str, Any] = field(default_factory=dict)
    attributes: tuple[Attribute, ...] = ATTRIBUTES

    def summary(self) -> dict[str, Any]:
        return {
            **self.params,
            "people": len(self.people),
            "train_docs": len(self.train_docs),
            "train_bytes": sum(len(d.encode("utf-8")) for d in self.train_docs),
            "qa_eval": len(self.qa_eval),
            "cloze_eval": len(self.cloze_eval),
            "qa_train_people": len(self.qa_train_people),
        }


def _unique_names(n: int, rng: random.Random, exclude: frozenset[str]) -> list[str]:
    pairs = [f"{f} {last}" for f in FIRST_NAMES for last in LAST_NAMES]
    if exclude:
        pairs = [p for p in pairs if p not in exclude]
    if n > len(pairs):
        excluded = f" ({len(exclude)} excluded)" if exclude else ""
        raise ConfigError(
            f"data.n_people={n} exceeds the {len(pairs)} unique built-in names{excluded}"
        )
    return rng.sample(pairs, n)


def generate_corpus(
    n_people: int = 200,
    n_bio_variants: int = 3,
    qa_train_fraction: float = 0.5,
    seed: int = 0,
    *,
    n_attributes: int = len(ATTRIBUTES),
    values_per_attribute: int | None = None,
    exclude_names: frozenset[str] = frozenset(),
) -> FactCorpus:
    """Deterministic in its arguments. ``exclude_names`` keeps those names out, so a
    batch of new people can be added to an existing corpus without a clash."""
    if n_people < 2:
        raise ConfigError(
            f"data.n_people={n_people} must be >= 2: one person's QA pairs train the "
            "answer format, another's are held out"
        )
    if n_bio_variants < 1:
        raise ConfigError(f"data.n_bio_variants={n_bio_variants} must be >= 1")
    if not 0.0 < qa_train_fraction < 1.0:
        raise ConfigError(f"data.qa_train_fraction={qa_train_fraction} must be in (0, 1)")
    attributes = corpus_attributes(n_attributes, values_per_attribute)
    rng = random.Random(seed)
    people = [
        Person(name, {a.name: rng.choice(a.values) for a in attributes})
        for name in _unique_names(n_people, rng, frozenset(exclude_names))
    ]
    n_qa_train = max(1, min(n_people - 1, round(n_people * qa_train_fraction)))
    docs: list[str] = []
    qa_eval: list[QAPair] = []
    cloze_eval: list[QAPair] = []
    for i, person in enumerate(people):
        first_templates: list[str] = []
        for _ in range(n_bio_variants):
            templates = [rng.choice(a.templates) for a in attributes]
            first_templates = first_templates or templates
            sentences = [
                t.format(n=person.name, v=person.facts[a.name])
                for t, a in zip(templates, attributes, strict=True)
            ]
            rng.shuffle(sentences)
            docs.append(" ".join(sentences))
        if i < n_qa_train:
            docs.append("".join(qa_line(a, person.name, person.facts[a.name]) for a in attributes))
            continue
        for a, template in zip(attributes, first_templates, strict=True):
            value = person.facts[a.name]
            qa_eval.append(QAPair(question_prompt(a, person.name), value, person.name, a.name))
            # A phrasing this person's first biography used: the cloze probe asks whether
            # the fact was memorised as read, separately from whether QA can extract it.
            prefix = template.replace("{n}", person.name).split("{v}")[0].rstrip()
            cloze_eval.append(QAPair(prefix, value, person.name, a.name))
    params: dict[str, Any] = {
        "format": CORPUS_FORMAT,
        "n_people": n_people,
        "n_bio_variants": n_bio_variants,
        "qa_train_fraction": qa_train_fraction,
        "seed": seed,
    }
    # Only knobs moved off their defaults are named, so a default corpus's summary (and
    # the cache that compares summaries) is what it was before they existed.
    if n_attributes != len(ATTRIBUTES):
        params["n_attributes"] = n_attributes
    if values_per_attribute is not None:
        params["values_per_attribute"] = values_per_attribute
    if exclude_names:
        params["excluded_names"] = len(exclude_names)
    return FactCorpus(
        people=people,
        train_docs=docs,
        qa_eval=qa_eval,
        cloze_eval=cloze_eval,
        qa_train_people=[p.name for p in people[:n_qa_train]],
        params=params,
        attributes=attributes,
    )


def chance_baseline(corpus: FactCorpus) -> float:
    """Exact match of always answering each attribute's most frequent value among the
    people whose QA form is trained on: what a model scores without knowing anyone."""
    trained = set(corpus.qa_train_people)
    counts: dict[str, Counter[str]] = {a.name: Counter() for a in corpus.attributes}
    for person in corpus.people:
        if person.name in trained:
            for attr, value in person.facts.items():
                counts[attr][value] += 1
    if not corpus.qa_eval:
        return 0.0
    guess = {attr: c.most_common(1)[0][0] for attr, c in counts.items() if c}
    hits = sum(guess.get(q.attribute) == q.answer for q in corpus.qa_eval)
    return hits / len(corpus.qa_eval)
