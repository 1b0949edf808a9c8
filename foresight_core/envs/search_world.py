"""A procedural search world: fictional entities, encyclopedic passages, multi-hop questions.

    world = generate_world(seed=1, n_entities=120)     # people, organisations, cities, countries, works
    world.passages                                     # [{"id", "contents": '"Title"\\ntext'}] for SearchEnv
    tasks = make_search_world_tasks(world, n=200, mix={"one_hop": .3, "bridge": .3, ...}, seed=1, split="train")
    plan_progress(task.meta["plan"], history)          # hops solved so far (the scripted expert and the annotator)

Every name is made of fictional syllables and every name word is unique within a world, so an
answer cannot be known in advance and BM25 finds the entity by its name. Train and evaluation use
worlds of different seeds (``SearchWorldConfig.train_seed`` / ``eval_seed``); a worker rebuilds a
task's world with ``load_world(task.meta["world_seed"], task.meta["n_entities"])``.

Each passage states only its entity's own facts (a person's passage names the city of birth but
not that city's country), so a 2-hop question really needs two searches.

Question types (``task.meta["type"]``), each with its gold decomposition ``task.meta["plan"]``,
a list of hops ``{"query", "answer", "support"}`` (support: title of the passage that states the
fact; later queries embed earlier answers):

- ``one_hop`` (NQ-like):            "Where was Zorvan Kellid born?"
- ``bridge`` (HotpotQA-like):       "Where was the founder of the Velmor Institute born?"
- ``comparison`` (2Wiki-like):      "Who was born earlier, Zorvan Kellid or Amira Tolsen?"  (2 searches)
- ``compositional`` (MuSiQue-like): "In which country is the city where the author of The Ballad of
                                    Orvenna was born?"  (3 hops)

The scripted expert that follows the plan with configurable errors is a behaviour policy:
``foresight_core.policies.search_expert.ScriptedSearchExpert``.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from foresight_core.config.corpus import ExpertNoiseConfig
from foresight_core.envs.search import STOPWORDS, tokenize
from foresight_core.metrics import normalize_answer
from foresight_core.types import Action, Step, Task, Turn

QUESTION_TYPES: tuple[str, ...] = ("one_hop", "bridge", "comparison", "compositional")
KINDS: tuple[str, ...] = ("person", "organisation", "city", "country", "work")

# ---------------------------------------------------------------------------- vocabulary

OCCUPATIONS = ["engineer", "physician", "merchant", "teacher", "architect", "chemist", "lawyer", "sailor",
               "astronomer", "banker"]
ORG_SUFFIXES = ["Institute", "Company", "Guild", "Society", "Press", "Works", "Foundation", "Academy", "Bank"]
TITLE_NOUNS = ["Ballad", "Chronicle", "Garden", "Lantern", "Harbour", "Winter", "Tower", "River", "Song",
               "Voyage", "Mirror", "Orchard"]
# work type -> (noun, participle, creator noun, active verb)
WORK_TYPES: dict[str, tuple[str, str, str, str]] = {
    "novel": ("novel", "written", "author", "wrote"),
    "painting": ("painting", "painted", "painter", "painted"),
    "symphony": ("symphony", "composed", "composer", "composed"),
}
_CREATOR_OCCUPATION = {"novel": "writer", "painting": "painter", "symphony": "composer"}

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "pr", "r", "s", "st",
           "t", "tr", "v", "z", "sh", "th", "c", "j", "y"]
_VOWELS = ["a", "e", "i", "o", "u"] * 4 + ["ai", "ei", "ou", "ia"]
_CODAS = ["", "", "n", "r", "l", "s", "m", "th", "nd", "rn", "x"]

# ---------------------------------------------------------------------------- facts
# A fact is a relation (entity-valued) or an attribute (a year / a number) of one entity.
# query: how to ask for it, {x} being the entity's mention (its name or a description).
# describe: how to refer to the target entity through the relation ({m} = subject mention).

RELATIONS: dict[str, dict[str, str]] = {
    # relation: subject kind, target kind, query template, description template
    "born_in": {"subject": "person", "target": "city", "query": "Where was {x} born?",
                "describe": "the city where {m} was born"},
    "works_for": {"subject": "person", "target": "organisation", "query": "Which organisation does {x} work for?",
                  "describe": "the organisation that {m} works for"},
    "founded_by": {"subject": "organisation", "target": "person", "query": "Who founded {x}?",
                   "describe": "the founder of {m}"},
    "headquartered_in": {"subject": "organisation", "target": "city", "query": "In which city is {x} headquartered?",
                         "describe": "the city where {m} is headquartered"},
    "located_in": {"subject": "city", "target": "country", "query": "In which country is {x}?",
                   "describe": "the country of {m}"},
    "capital": {"subject": "country", "target": "city", "query": "What is the capital of {x}?",
                "describe": "the capital of {m}"},
    "created_by": {"subject": "work", "target": "person", "query": "Who {verb} {x}?",
                   "describe": "the {creator} of {m}"},
}
ATTRIBUTES: dict[str, dict[str, str]] = {
    # attribute: subject kind, answer kind, query template, comparison question (with better = min/max)
    "birth_year": {"subject": "person", "kind": "year", "query": "In which year was {x} born?",
                   "compare": "Who was born earlier, {a} or {b}?", "better": "min"},
    "founded_year": {"subject": "organisation", "kind": "year", "query": "In which year was {x} founded?",
                     "compare": "Which organisation was founded earlier, {a} or {b}?", "better": "min"},
    "population": {"subject": "city", "kind": "number", "query": "What is the population of {x}?",
                   "compare": "Which city has a larger population, {a} or {b}?", "better": "max"},
    "year": {"subject": "work", "kind": "year", "query": "In which year was {x} {participle}?",
             "compare": "Which work was created earlier, {a} or {b}?", "better": "min"},
}

# Every word the templates use: a fictional name word must not collide with one of them.
_TEMPLATE_TEXT = " ".join(
    [*OCCUPATIONS, *_CREATOR_OCCUPATION.values(), *ORG_SUFFIXES, *TITLE_NOUNS]
    + [" ".join(w) for w in WORK_TYPES.values()]
    + [" ".join(r.values()) for r in RELATIONS.values()] + [" ".join(a.values()) for a in ATTRIBUTES.values()]
    + ["is a born in city country population capital organisation founded by headquartered works for "
       "founder author the of"])
_RESERVED = frozenset(tokenize(_TEMPLATE_TEXT)) | STOPWORDS


# ---------------------------------------------------------------------------- the world

@dataclass
class Entity:
    """One fictional entity. ``rel`` maps a relation to the target's name; ``attrs`` holds years, numbers, types."""

    name: str
    kind: str
    attrs: dict[str, Any] = field(default_factory=dict)
    rel: dict[str, str] = field(default_factory=dict)
    text: str = ""  # the encyclopedic passage (without its title line)

    @property
    def mention(self) -> str:
        """How a sentence refers to it: organisations take "the" ("the Velmor Institute")."""
        return f"the {self.name}" if self.kind == "organisation" else self.name


@dataclass
class World:
    """A seeded fictional world: entities by name (in generation order) and their passages."""

    seed: int
    n_entities: int
    entities: dict[str, Entity]
    passages: list[dict[str, str]]  # {"id", "contents"} in the Search-R1 layout '"Title"\ntext'

    @functools.cached_property
    def _by_kind(self) -> dict[str, list[Entity]]:
        by_kind: dict[str, list[Entity]] = {k: [] for k in KINDS}
        for e in self.entities.values():
            by_kind[e.kind].append(e)
        return by_kind

    @functools.cached_property
    def entity_list(self) -> list[Entity]:
        """All entities, in generation order."""
        return list(self.entities.values())

    def of_kind(self, kind: str) -> list[Entity]:
        """Entities of one kind, in generation order."""
        return self._by_kind[kind]

    def general_text(self) -> list[str]:
        """The passages as plain documents "Title\\ntext" (general text mixed into WM-AMT against forgetting)."""
        return [f"{e.name}\n{e.text}" for e in self.entities.values()]


class _Names:
    """Pronounceable fictional words (onset-vowel syllables, optional final coda), each used once per world."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, min_syll: int = 2, max_syll: int = 3, suffix: str = "") -> str:
        for _ in range(10_000):
            n = self.rng.randint(min_syll, max_syll)
            w = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n))
            w += suffix or self.rng.choice(_CODAS)
            if len(w) >= 4 and w not in self.used and w not in _RESERVED:
                self.used.add(w)
                return w.capitalize()
        raise RuntimeError("ran out of fictional names")  # ~10^6 words available; not reached in practice


def _counts(n_entities: int) -> dict[str, int]:
    """How many entities of each kind (at least 2 people, cities and organisations for comparisons)."""
    counts = {"country": max(1, round(0.05 * n_entities)), "city": max(2, round(0.2 * n_entities)),
              "organisation": max(2, round(0.15 * n_entities)), "work": max(1, round(0.15 * n_entities))}
    counts["person"] = n_entities - sum(counts.values())
    if counts["person"] < 2:
        raise ValueError(f"n_entities={n_entities} is too small for a world (need at least 8)")
    return counts


def generate_world(seed: int, n_entities: int = 120) -> World:
    """Build the world of ``seed``: entities, relations, attributes and one passage per entity."""
    rng = random.Random(seed)
    names = _Names(rng)
    counts = _counts(n_entities)
    countries = [Entity(names.word(2, 3, suffix=rng.choice(["ia", "and", "ar", "en"])), "country")
                 for _ in range(counts["country"])]
    cities = [Entity(names.word(), "city", attrs={"population": rng.randint(50, 20_000) * 100})
              for _ in range(counts["city"])]
    people = [Entity(f"{names.word(2, 2)} {names.word()}", "person",
                     attrs={"birth_year": rng.randint(1800, 1960), "occupation": rng.choice(OCCUPATIONS)})
              for _ in range(counts["person"])]
    orgs = [Entity(f"{names.word()} {rng.choice(ORG_SUFFIXES)}", "organisation") for _ in range(counts["organisation"])]
    works = []
    for _ in range(counts["work"]):
        wtype = rng.choice(list(WORK_TYPES))
        works.append(Entity(f"The {rng.choice(TITLE_NOUNS)} of {names.word()}", "work", attrs={"type": wtype}))

    # relations (each country gets at least one city; its first city is its capital)
    for i, c in enumerate(cities):
        c.rel["located_in"] = countries[i].name if i < len(countries) else rng.choice(countries).name
    for k, country in enumerate(countries):
        country.rel["capital"] = cities[k].name if k < len(cities) else rng.choice(cities).name
    for p in people:
        p.rel["born_in"] = rng.choice(cities).name
        p.rel["works_for"] = rng.choice(orgs).name
    for o in orgs:
        founder = rng.choice(people)
        o.rel["founded_by"] = founder.name
        o.rel["headquartered_in"] = rng.choice(cities).name
        o.attrs["founded_year"] = founder.attrs["birth_year"] + rng.randint(22, 60)
    for w in works:
        creator = rng.choice(people)
        w.rel["created_by"] = creator.name
        w.attrs["year"] = creator.attrs["birth_year"] + rng.randint(20, 60)
        creator.attrs["occupation"] = _CREATOR_OCCUPATION[w.attrs["type"]]

    entities = {e.name: e for e in [*people, *orgs, *cities, *countries, *works]}
    made_by: dict[str, list[Entity]] = {p.name: [] for p in people}  # person -> organisations founded, works made
    for e in [*orgs, *works]:
        made_by[e.rel["founded_by" if e.kind == "organisation" else "created_by"]].append(e)
    for e in entities.values():
        e.text = _passage_text(e, made_by.get(e.name, []))
    passages = [{"id": f"sw{seed}-{i}", "contents": f'"{e.name}"\n{e.text}'} for i, e in enumerate(entities.values())]
    return World(seed=seed, n_entities=n_entities, entities=entities, passages=passages)


@functools.lru_cache(maxsize=8)
def load_world(seed: int, n_entities: int) -> World:
    """``generate_world`` cached per process (workers rebuild a task's world from its meta)."""
    return generate_world(seed, n_entities)


def _passage_text(e: Entity, made: Sequence[Entity] = ()) -> str:
    """The encyclopedic passage of one entity: its own relations and attributes, in plain sentences.

    A person's passage also names what they ``made`` (organisations founded, works created), without dates.
    """
    if e.kind == "person":
        last = e.name.split()[-1]
        article = "an" if e.attrs["occupation"][0] in "aeiou" else "a"
        s = [f"{e.name} is {article} {e.attrs['occupation']} born in {e.attrs['birth_year']} in {e.rel['born_in']}.",
             f"{last} works for the {e.rel['works_for']}."]
        s += [f"{last} founded the {m.name}." if m.kind == "organisation"
              else f"{last} is the {WORK_TYPES[m.attrs['type']][2]} of {m.name}." for m in made]
        return " ".join(s)
    if e.kind == "organisation":
        return (f"The {e.name} is an organisation founded in {e.attrs['founded_year']} by {e.rel['founded_by']}. "
                f"The {e.name} is headquartered in {e.rel['headquartered_in']}.")
    if e.kind == "city":
        return (f"{e.name} is a city in the country of {e.rel['located_in']}. "
                f"{e.name} has a population of {e.attrs['population']:,}.")
    if e.kind == "country":
        return f"{e.name} is a country. The capital of {e.name} is {e.rel['capital']}."
    noun, participle, _, _ = WORK_TYPES[e.attrs["type"]]
    return f"{e.name} is a {noun} {participle} by {e.rel['created_by']} in {e.attrs['year']}."


# ---------------------------------------------------------------------------- questions

@dataclass
class _Question:
    type: str
    template: str  # the fact chain, e.g. "founded_by>born_in" or "compare:birth_year"
    question: str
    answer: str
    answer_kind: str  # person / organisation / city / country / work / year / number
    plan: list[dict[str, str]]
    wrong_queries: list[list[str]]
    guesses: list[str]
    compare: dict[str, Any] | None = None


def _fact_query(subject: Entity, fact: str, x: str) -> str:
    """The question asking ``fact`` of ``subject``, which is mentioned as ``x``."""
    if fact in RELATIONS:
        tpl = RELATIONS[fact]["query"]
        verb = WORK_TYPES[subject.attrs["type"]][3] if subject.kind == "work" else ""
        return tpl.format(x=x, verb=verb)
    participle = WORK_TYPES[subject.attrs["type"]][1] if subject.kind == "work" else ""
    return ATTRIBUTES[fact]["query"].format(x=x, participle=participle)


def _fact_answer(subject: Entity, fact: str) -> tuple[str, str]:
    """(answer text as the passage writes it, answer kind)."""
    if fact in RELATIONS:
        return subject.rel[fact], RELATIONS[fact]["target"]
    value = subject.attrs[fact]
    return (f"{value:,}" if fact == "population" else str(value)), ATTRIBUTES[fact]["kind"]


def _describe(subject: Entity, fact: str, m: str) -> str:
    """Refer to the target of relation ``fact`` through ``subject`` (mentioned as ``m``)."""
    creator = WORK_TYPES[subject.attrs["type"]][2] if subject.kind == "work" else ""
    return RELATIONS[fact]["describe"].format(m=m, creator=creator)


def _facts_of(kind: str, entity_valued: bool) -> list[str]:
    rel = [r for r, d in RELATIONS.items() if d["subject"] == kind]
    return rel if entity_valued else rel + [a for a, d in ATTRIBUTES.items() if d["subject"] == kind]


def _hop(world: World, subject: Entity, fact: str, rng: random.Random) -> tuple[dict[str, str], list[str]]:
    """The gold hop (query naming the subject) and two wrong queries (same fact, another entity of its kind)."""
    answer, _ = _fact_answer(subject, fact)
    hop = {"query": _fact_query(subject, fact, subject.mention), "answer": answer, "support": subject.name}
    same_kind = [e for e in world.of_kind(subject.kind) if e.name != subject.name]
    related = [e for e in same_kind if set(e.rel.values()) & set(subject.rel.values())]  # same city, employer...
    pool = related if len(related) >= 2 else same_kind
    wrong = [_fact_query(o, fact, o.mention) for o in rng.sample(pool, min(2, len(pool)))]
    if not wrong:  # the only entity of its kind (a one-country world): a distracted query about something else
        other = rng.choice([e for e in world.entities.values() if e.name != subject.name])
        wrong = [_fact_query(other, _facts_of(other.kind, entity_valued=True)[0], other.mention)]
    return hop, wrong


def _guesses(world: World, answer: str, kind: str, rng: random.Random) -> list[str]:
    """Plausible wrong final answers of the right kind."""
    if kind == "year":
        offsets = rng.sample([d for d in range(-15, 16) if d != 0], 4)
        return [str(int(answer) + d) for d in offsets]
    if kind == "number":
        pool = [f"{c.attrs['population']:,}" for c in world.of_kind("city")]
    else:
        pool = [e.name for e in world.of_kind(kind)]
    pool = sorted(set(pool) - {answer})
    return rng.sample(pool, min(4, len(pool))) or [answer + " (unknown)"]


def _chain_question(world: World, qtype: str, n_hops: int, rng: random.Random) -> _Question | None:
    """A random walk of ``n_hops`` facts; None when the walk revisits an entity or dead-ends."""
    start = rng.choice(world.entity_list)
    chain: list[tuple[Entity, str]] = []
    subject = start
    for i in range(n_hops):
        facts = _facts_of(subject.kind, entity_valued=i < n_hops - 1)
        if not facts:
            return None
        fact = rng.choice(facts)
        chain.append((subject, fact))
        if i < n_hops - 1:
            subject = world.entities[subject.rel[fact]]
    last_subject, last_fact = chain[-1]
    answer, kind = _fact_answer(last_subject, last_fact)
    names = [s.name for s, _ in chain] + ([answer] if kind not in ("year", "number") else [])
    if len(set(names)) != len(names):
        return None  # a cycle (e.g. the capital of the country of a capital): the answer would be in the question
    mention = chain[0][0].mention
    for s, f in chain[:-1]:
        mention = _describe(s, f, mention)
    question = _fact_query(last_subject, last_fact, mention)
    question = question[0].upper() + question[1:]
    if re.search(rf"\b{re.escape(normalize_answer(answer))}\b", normalize_answer(question)):
        return None
    hops, wrong = zip(*[_hop(world, s, f, rng) for s, f in chain])
    return _Question(type=qtype, template=">".join(f for _, f in chain), question=question, answer=answer,
                     answer_kind=kind, plan=list(hops), wrong_queries=list(wrong),
                     guesses=_guesses(world, answer, kind, rng))


def _comparison_question(world: World, rng: random.Random) -> _Question | None:
    """Two entities of one kind compared on a numeric attribute; the answer is the winner's name."""
    attr = rng.choice(list(ATTRIBUTES))
    spec = ATTRIBUTES[attr]
    candidates = world.of_kind(spec["subject"])
    if len(candidates) < 2:
        return None
    a, b = rng.sample(candidates, 2)
    if a.attrs[attr] == b.attrs[attr]:
        return None  # a tie has no answer
    pick = min if spec["better"] == "min" else max
    winner = pick((a, b), key=lambda e: e.attrs[attr])
    question = spec["compare"].format(a=a.mention, b=b.mention)
    question = question[0].upper() + question[1:]
    (hop_a, wrong_a), (hop_b, wrong_b) = _hop(world, a, attr, rng), _hop(world, b, attr, rng)
    return _Question(type="comparison", template=f"compare:{attr}", question=question, answer=winner.name,
                     answer_kind=a.kind, plan=[hop_a, hop_b], wrong_queries=[wrong_a, wrong_b],
                     guesses=[a.name, b.name], compare={"entities": [a.name, b.name], "better": spec["better"]})


def _make_question(world: World, qtype: str, rng: random.Random) -> _Question | None:
    if qtype == "one_hop":
        return _chain_question(world, qtype, 1, rng)
    if qtype == "bridge":
        return _chain_question(world, qtype, 2, rng)
    if qtype == "compositional":
        return _chain_question(world, qtype, 3, rng)
    if qtype == "comparison":
        return _comparison_question(world, rng)
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def _allocate(n: int, mix: Mapping[str, float]) -> dict[str, int]:
    """Split n into per-type counts proportional to ``mix`` (largest remainder, ties in QUESTION_TYPES order)."""
    unknown = set(mix) - set(QUESTION_TYPES)
    if unknown:
        raise ValueError(f"unknown question type(s) {sorted(unknown)} in mix; expected {QUESTION_TYPES}")
    total = sum(mix.values())
    if total <= 0 or any(v < 0 for v in mix.values()):
        raise ValueError(f"question mix needs non-negative shares with a positive sum, got {dict(mix)}")
    exact = {t: n * mix.get(t, 0.0) / total for t in QUESTION_TYPES}
    counts = {t: int(v) for t, v in exact.items()}
    by_remainder = sorted(QUESTION_TYPES, key=lambda t: -(exact[t] - counts[t]))
    for t in by_remainder[:n - sum(counts.values())]:
        counts[t] += 1
    return counts


def make_search_world_tasks(world: World, n: int, mix: Mapping[str, float], seed: int, split: str) -> list[Task]:
    """``n`` questions about ``world`` in the proportions of ``mix``; deterministic in (world, n, mix, seed, split).

    Questions are distinct while the world has enough of them (a tiny world may repeat one).
    Task ids are ``sw-{split}-{seed}-{i}``.
    """
    rng = random.Random(f"search_world/{world.seed}/{seed}/{split}")
    questions: list[_Question] = []
    for qtype, k in _allocate(n, mix).items():
        seen: set[str] = set()
        made: list[_Question] = []
        for _ in range(200 * k):
            if len(made) == k:
                break
            q = _make_question(world, qtype, rng)
            if q is not None and q.question not in seen:
                seen.add(q.question)
                made.append(q)
        if made and len(made) < k:  # a small world ran out of distinct questions of this type
            made += [made[i % len(made)] for i in range(k - len(made))]
        if len(made) < k:
            raise ValueError(f"world seed {world.seed} ({world.n_entities} entities) yields no {qtype} questions")
        questions += made
    rng.shuffle(questions)
    return [Task(id=f"sw-{split}-{seed}-{i}", env="search", question=q.question, answers=[q.answer],
                 meta={"type": q.type, "template": q.template, "plan": q.plan, "wrong_queries": q.wrong_queries,
                       "guesses": q.guesses, "answer_kind": q.answer_kind,
                       **({"compare": q.compare} if q.compare else {}),
                       "world_seed": world.seed, "n_entities": world.n_entities, "split": split})
            for i, q in enumerate(questions)]


# ---------------------------------------------------------------------------- progress along the plan

def mentions(observation: str, answer: str) -> bool:
    """Whether ``answer`` occurs in the observation as whole words (case-sensitive, as the passage writes it)."""
    return re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", observation) is not None


def plan_progress(plan: Sequence[Mapping[str, str]], history: Sequence[Step]) -> tuple[int, bool]:
    """(hops solved, whether the last step was a search that solved nothing).

    Hops are solved in order: an observation solves the current hop when it mentions its answer
    (and may then solve the next ones too, if it mentions theirs).
    """
    h, missed = 0, False
    for step in history:
        if step.turn.action.kind != "search" or step.observation is None:
            missed = False
            continue
        before = h
        while h < len(plan) and mentions(step.observation, plan[h]["answer"]):
            h += 1
        missed = h == before
    return h, missed
