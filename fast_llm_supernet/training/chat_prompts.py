"""`fast_llm_supernet.training.chat_prompts`: chat prompts made offline from what ships with Python, for the text the
teacher writes (distillation), the teacher's answers (SFT) and the chat evaluation (`toolkit.chat_eval`).

Subjects, by source (deterministic for a Python version and its time-zone database; nothing is downloaded):

* `things`: the names of pictographic characters in Python's `unicodedata` (Unicode's emoji blocks: "volcano",
  "ear of maize", "bicycle", ...: food, plants, animals, objects, weather, places), ~850;
* `places`: the cities of the IANA time-zone database (`zoneinfo.available_timezones()`: "Addis Ababa",
  "Lisbon", ...), ~400;
* `python`: the language reference's topics (`pydoc_data.topics`, by title: 'The "with" statement'), the
  public functions and classes of the stdlib modules of `corpus.STDLIB_FILES` (`textwrap.dedent`), and the
  lines of the Zen of Python.

Each subject gets one task of its source (`TASKS`: "Tell me three interesting facts about the {}.", "What is {}
known for?", "What does the function `{}` do?", ...), drawn with a seeded RNG per subject, so the prompts vary
in form as well as in subject.

The held-out split is by subject: a subject is held out when a hash of (source, subject) falls in 1 of
`held_out_every` buckets, so a held-out prompt asks about something no training prompt names, not only in
other words. Language-reference topics are split as `examples/smollm2/make_data.py` splits the documentation
(every `held_out_every`-th topic in sorted order), so no teacher text is written about a topic whose text is
held out for the documentation evaluation.

`FACTUAL_PROMPTS`: 18 hand-written general factual questions (capitals, authors, science basics), each with the
words a right answer holds: evaluation only, and no training prompt is about their answers ("Tokyo", "Paris").
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
import sysconfig
import unicodedata
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from fast_llm_supernet.training.corpus import STDLIB_FILES, _zen_of_python, pydoc_topics


class ChatPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str
    source: str = "given"
    subject: str = ""
    # Words (any one, case-insensitive) a right answer holds; only hand-written factual prompts have them.
    keywords: tuple[str, ...] = Field(default_factory=tuple)


def _factual(text: str, *keywords: str) -> ChatPrompt:
    return ChatPrompt(text=text, source="factual", subject=keywords[0], keywords=keywords)


FACTUAL_PROMPTS: tuple[ChatPrompt, ...] = (
    _factual("What is the capital of France?", "Paris"),
    _factual("What is the capital of Japan?", "Tokyo"),
    _factual("What is the capital of Italy?", "Rome"),
    _factual("What is the capital of Canada?", "Ottawa"),
    _factual("Who wrote Romeo and Juliet?", "Shakespeare"),
    _factual("Who wrote Pride and Prejudice?", "Austen"),
    _factual("Who painted the Mona Lisa?", "Leonardo", "da Vinci"),
    _factual("What is the chemical formula of water?", "H2O", "H₂O"),
    _factual("Which planet is known as the Red Planet?", "Mars"),
    _factual("What is the largest planet in our solar system?", "Jupiter"),
    _factual("How many days are there in a week?", "seven", "7"),
    _factual("Which gas do plants take in from the air to make their food?", "carbon dioxide", "CO2", "CO₂"),
    _factual("At what temperature in degrees Celsius does water freeze?", "0", "zero"),
    _factual("What is the largest ocean on Earth?", "Pacific"),
    _factual("Who developed the theory of relativity?", "Einstein"),
    _factual("How many legs does a spider have?", "eight", "8"),
    _factual("What is the tallest mountain in the world?", "Everest"),
    _factual("What is the closest star to the Earth?", "Sun"),
)

TASKS: dict[str, tuple[str, ...]] = {
    "things": (
        "Tell me three interesting facts about the {}.",
        "Describe the {} in two or three sentences.",
        "Write a short story for children about the {}.",
        "Write a short poem about the {}.",
        "Explain to a ten-year-old what the {} is.",
        "Write a short informative paragraph about the {}.",
    ),
    "places": (
        "Tell me about {}.",
        "In which country is {}?",
        "What is {} known for?",
        "Describe the climate of {}.",
        "Write a short travel guide for one day in {}.",
    ),
    "topics": (
        "Explain {} in Python, with a short example.",
        "What should a beginner know about {} in Python?",
        "Summarize {} in Python in a few sentences.",
    ),
    "stdlib": (
        "What does `{}` do in Python?",
        "Show a short example that uses `{}`.",
        "When would you use `{}` in Python?",
    ),
    "zen": (
        'What does the Zen of Python mean by "{}"?',
        'Explain the Python principle "{}" with an example.',
    ),
}
SOURCES = tuple(TASKS)

# Unicode character names that are not things (marks, styles, directions, faces, hands, letters).
_NOT_A_THING = re.compile(
    r"\b(SIGN|SYMBOL|BLACK|WHITE|FACE|WITH|SQUARED|LEFT|RIGHT|UP|DOWN|HAND|MARK|OF THE|EMOJI|MODIFIER|LATIN|"
    r"DIGIT|CIRCLED|SUIT|CARD|TAG|COMPONENT|REGIONAL|SKIN|KEYCAP|BUTTON|ARROW|HEAVY|LIGHT|DOUBLE|SMALL|LARGE)\b"
)
_EMOJI_BLOCKS = ((0x1F300, 0x1F650), (0x1F680, 0x1F700), (0x1F900, 0x1FA00), (0x2600, 0x2700))
_CONTINENTS = ("Africa", "America", "Asia", "Atlantic", "Australia", "Europe", "Indian", "Pacific")


def things() -> list[str]:
    """Everyday things named by pictographic characters in `unicodedata`, lower case, in code-point order."""
    names = []
    for first, last in _EMOJI_BLOCKS:
        for code_point in range(first, last):
            name = unicodedata.name(chr(code_point), "")
            if re.fullmatch(r"[A-Z]+( [A-Z]+){0,2}", name) and not _NOT_A_THING.search(name):
                names.append(name.lower())
    return list(dict.fromkeys(names))


def places() -> list[str]:
    """City names of the time-zone database ("America/New_York" -> "New York"), sorted; empty where it is missing."""
    import zoneinfo

    cities = set()
    for zone in zoneinfo.available_timezones():
        parts = zone.split("/")
        if len(parts) == 2 and parts[0] in _CONTINENTS and parts[1][:1].isupper() and not parts[1].isupper():
            cities.add(parts[1].replace("_", " "))
    return sorted(cities)


def topic_titles() -> list[tuple[str, str]]:
    """(topic, title) of the language reference's topics, sorted by topic (`corpus.pydoc_topics`' order):
    'with' -> 'the "with" statement'."""
    titles = []
    for name, text in pydoc_topics():
        title = text.split("\n", 1)[0].strip()
        titles.append((name, title[0].lower() + title[1:] if title[1:2].islower() else title))
    return titles


def stdlib_names() -> list[str]:
    """`module.name` of the public top-level functions and classes with a docstring, in `STDLIB_FILES`' order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = []
    for relative in STDLIB_FILES:
        path = stdlib / relative
        if not path.is_file() or relative == "this.py":
            continue
        module = relative.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_") and ast.get_docstring(node):
                names.append(f"{module}.{node.name}")
    return names


def zen_lines() -> list[str]:
    """The aphorisms of the Zen of Python (read from `this.py`, not imported: importing it prints them)."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "this.py"
    text = _zen_of_python(path.read_text(encoding="utf-8")) if path.is_file() else ""
    return [line.strip() for line in text.splitlines()[1:] if line.strip()]  # after the title line


def _held_out_by_hash(source: str, subject: str, every: int) -> bool:
    return int(hashlib.sha256(f"{source}:{subject}".encode()).hexdigest(), 16) % every == 0


def build_prompts(seed: int = 0, held_out_every: int = 8) -> tuple[list[ChatPrompt], list[ChatPrompt]]:
    """(training prompts, held-out prompts): every subject of every source once, with a task drawn per subject;
    each list in a seeded order that interleaves the sources (take the first N for a mix of all of them)."""
    reserved = {keyword.casefold() for prompt in FACTUAL_PROMPTS for keyword in prompt.keywords}
    subjects: dict[str, list[tuple[str, bool]]] = {
        "things": [(s, _held_out_by_hash("things", s, held_out_every)) for s in things()],
        "places": [(s, _held_out_by_hash("places", s, held_out_every)) for s in places()],
        "topics": [(title, index % held_out_every == 0) for index, (_, title) in enumerate(topic_titles())],
        "stdlib": [(s, _held_out_by_hash("stdlib", s, held_out_every)) for s in stdlib_names()],
        "zen": [(s, _held_out_by_hash("zen", s, held_out_every)) for s in zen_lines()],
    }
    train: dict[str, list[ChatPrompt]] = {source: [] for source in SOURCES}
    held_out: dict[str, list[ChatPrompt]] = {source: [] for source in SOURCES}
    for source, entries in subjects.items():
        for subject, is_held_out in entries:
            if subject.casefold() in reserved:
                continue
            task = random.Random(f"{seed}:{source}:{subject}").choice(TASKS[source])
            prompt = ChatPrompt(text=task.format(subject), source=source, subject=subject)
            (held_out if is_held_out else train)[source].append(prompt)
    return _interleave(train, seed), _interleave(held_out, seed)


def _interleave(by_source: dict[str, list[ChatPrompt]], seed: int) -> list[ChatPrompt]:
    """Each source shuffled (seeded), then taken in turn, so any prefix holds every source about equally
    (a source that runs out leaves the turn to the others)."""
    queues = []
    for source in SOURCES:
        prompts = list(by_source[source])
        random.Random(f"{seed}:order:{source}").shuffle(prompts)
        queues.append(prompts)
    ordered = []
    for position in range(max(map(len, queues), default=0)):
        ordered += [queue[position] for queue in queues if position < len(queue)]
    return ordered


def evaluation_prompts(count: int = 12, seed: int = 0, held_out_every: int = 8) -> list[ChatPrompt]:
    """The chat evaluation's prompts: the hand-written factual questions, then the first `count` held-out prompts."""
    return [*FACTUAL_PROMPTS, *build_prompts(seed, held_out_every)[1][:count]]
