"""Search environment (BM25), the procedural search world and its scripted noisy expert."""

from __future__ import annotations

import random
import re
import time
from collections import defaultdict

import pytest

from foresight_core.config.corpus import ExpertNoiseConfig
from foresight_core.config.envs import SearchWorldConfig
from foresight_core.envs.base import Env
from foresight_core.envs.search import (
    EMPTY_QUERY_OBSERVATION,
    NO_RESULTS_OBSERVATION,
    PYTHON_UNAVAILABLE_OBSERVATION,
    BM25Index,
    SearchEnv,
    index_for,
    split_contents,
    tokenize,
)
from foresight_core.envs.search_world import (
    QUESTION_TYPES,
    generate_world,
    load_world,
    make_search_world_tasks,
    mentions,
    plan_progress,
)
from foresight_core.metrics import normalize_answer
from foresight_core.policies.search_expert import ScriptedSearchExpert
from foresight_core.types import Action, Step, Task, Turn

PASSAGES = [
    {"id": "0", "contents": '"Zorvan Kellid"\nZorvan Kellid is a chemist born in 1874 in Tamsor.'},
    {"id": "1", "contents": '"Tamsor"\nTamsor is a city in the country of Veldria. Tamsor has a population of 48,200.'},
    {"id": "2",
     "contents": '"Velmor Institute"\nThe Velmor Institute is an organisation founded in 1902 by Zorvan Kellid.'},
    {"id": "3", "contents": '"Veldria"\nVeldria is a country. The capital of Veldria is Tamsor.'},
]
MIX = SearchWorldConfig().question_mix


def _task(answers: list[str]) -> Task:
    return Task(id="t0", env="search", question="Where was Zorvan Kellid born?", answers=answers)


def _play(env: SearchEnv, task: Task, policy: ScriptedSearchExpert, rng: random.Random) -> tuple[bool, list[Step]]:
    env.reset(task)
    history: list[Step] = []
    while True:
        turn = policy.act(task, history, rng)
        res = env.step(turn.action)
        history.append(Step(turn, res.observation))
        if res.done:
            return bool(res.success), history


@pytest.fixture(scope="module")
def world():
    return generate_world(seed=1, n_entities=120)


@pytest.fixture(scope="module")
def tasks(world):
    return make_search_world_tasks(world, n=400, mix={t: 1.0 for t in QUESTION_TYPES}, seed=1, split="train")


# ---------------------------------------------------------------------------- BM25 search env

def test_tokenize_drops_stopwords_and_question_words():
    assert tokenize("Who founded the Velmor Institute?") == ["founded", "velmor", "institute"]
    assert tokenize("the of") == []


def test_split_contents_search_r1_layout():
    assert split_contents('"Tamsor"\nTamsor is a\n city.') == ("Tamsor", "Tamsor is a city.")
    assert split_contents("no title line") == ("", "no title line")


def test_search_observation_lists_top_k_docs():
    env = SearchEnv(PASSAGES, top_k=2, max_turns=4)
    assert isinstance(env, Env)
    env.reset(_task(["Tamsor"]))
    res = env.step(Action("search", "Where was Zorvan Kellid born?"))
    lines = res.observation.split("\n")
    # "zorvan", "kellid", "born": passage 0 has all three (names twice), passage 2 names him once
    assert len(lines) == 2
    assert lines[0] == "Doc 1 (Zorvan Kellid): Zorvan Kellid is a chemist born in 1874 in Tamsor."
    assert lines[1].startswith("Doc 2 (Velmor Institute): ")
    assert res.info["doc_ids"] == ["0", "2"] and not res.done


def test_empty_unknown_and_python_actions_are_observations():
    env = SearchEnv(PASSAGES, top_k=3, max_turns=10)
    env.reset(_task(["Tamsor"]))
    assert env.step(Action("search", "  ")).observation == EMPTY_QUERY_OBSERVATION
    assert env.step(Action("search", "the of a")).observation == EMPTY_QUERY_OBSERVATION
    assert env.step(Action("search", "xylophone")).observation == NO_RESULTS_OBSERVATION
    res = env.step(Action("python", "print(1)"))
    assert res.observation == PYTHON_UNAVAILABLE_OBSERVATION and not res.done


def test_answer_scores_em_and_f1():
    env = SearchEnv(PASSAGES)
    env.reset(_task(["Tamsor City"]))
    res = env.step(Action("answer", "the tamsor"))
    # normalised "tamsor" vs "tamsor city": EM 0; F1: overlap 1, P = 1, R = 1/2 -> 2/3
    assert res.done and res.success is False and res.score == 0.0
    assert res.info["f1"] == pytest.approx(2 / 3)
    env.reset(_task(["Tamsor"]))
    res = env.step(Action("answer", "Tamsor."))
    assert res.success is True and res.score == 1.0 and res.observation is None
    assert env.reward("tamsor", _task(["Tamsor"])) == 1.0
    with pytest.raises(RuntimeError, match="over"):
        env.step(Action("answer", "again"))


def test_turn_limit_ends_episode_as_failure():
    env = SearchEnv(PASSAGES, max_turns=2)
    env.reset(_task(["Tamsor"]))
    assert not env.step(Action("search", "Tamsor")).done
    res = env.step(Action("search", "Tamsor"))
    assert res.done and res.success is False and res.score == 0.0 and res.info["reason"] == "max_turns"
    assert res.observation.startswith("Doc 1 (Tamsor)")  # the last observation is still returned


def test_step_before_reset_and_bad_passages_fail_clearly():
    with pytest.raises(RuntimeError, match="reset"):
        SearchEnv(PASSAGES).step(Action("search", "x"))
    with pytest.raises(ValueError, match="passage #1"):
        BM25Index([PASSAGES[0], {"id": "x", "text": "no contents"}])
    with pytest.raises(ValueError, match="empty passage list"):
        BM25Index([])


def test_index_is_built_once_per_passage_set():
    assert SearchEnv(PASSAGES).index is SearchEnv(list(PASSAGES), top_k=1).index
    changed = [dict(p) for p in PASSAGES]
    changed[0]["contents"] += " More."
    assert index_for(changed) is not index_for(PASSAGES)


def test_indexing_10k_passages_is_fast():
    big = generate_world(seed=7, n_entities=10_000)
    start = time.perf_counter()
    index = BM25Index(big.passages)
    elapsed = time.perf_counter() - start
    assert len(index) == 10_000
    assert elapsed < 15.0, f"indexing 10k passages took {elapsed:.1f}s"  # ~0.3 s on an idle 2-core CPU


# ---------------------------------------------------------------------------- the world

def test_world_is_seeded_and_names_are_fictional_and_unique(world):
    assert generate_world(seed=1, n_entities=120).passages == world.passages
    other = generate_world(seed=2, n_entities=120)
    assert not set(world.entities) & set(other.entities)
    assert len(world.entities) == len(world.passages) == 120
    # the fictional words: both of a person's names, an organisation's first word ("Velmor" Institute),
    # a city or country, the last word of a work ("The Ballad of Orvenna")
    fictional = {"person": slice(0, 2), "organisation": slice(0, 1), "city": slice(0, 1), "country": slice(0, 1),
                 "work": slice(-1, None)}
    words = [w for e in world.entities.values() for w in e.name.split()[fictional[e.kind]]]
    assert len(words) == len(set(words))  # every fictional name word is used once in a world
    assert all(re.fullmatch(r"[A-Z][a-z]{3,}", w) and re.search(r"[aeiou]", w) for w in words)
    counts = defaultdict(int)
    for e in world.entities.values():
        counts[e.kind] += 1
    assert counts == {"country": 6, "city": 24, "organisation": 18, "work": 18, "person": 54}


def test_world_general_text_and_load_world(world):
    text = world.general_text()
    assert len(text) == 120 and text[0].split("\n")[0] == next(iter(world.entities))
    assert load_world(1, 120) is load_world(1, 120)
    assert load_world(1, 120).passages == world.passages
    with pytest.raises(ValueError, match="too small"):
        generate_world(seed=0, n_entities=5)


def test_tasks_ids_mix_and_meta(world, tasks):
    assert len({t.id for t in tasks}) == 400
    assert tasks[0].id.startswith("sw-train-1-")
    by_type = defaultdict(int)
    for t in tasks:
        by_type[t.meta["type"]] += 1
        assert t.env == "search" and t.meta["world_seed"] == 1 and t.meta["n_entities"] == 120
    assert by_type == {t: 100 for t in QUESTION_TYPES}
    # laptop mix 0.3/0.3/0.2/0.2 of 10 -> 3/3/2/2
    few = make_search_world_tasks(world, n=10, mix=MIX, seed=3, split="eval")
    assert sorted(t.meta["type"] for t in few) == sorted(["one_hop"] * 3 + ["bridge"] * 3 + ["comparison"] * 2
                                                         + ["compositional"] * 2)
    assert [t.to_dict() for t in few] == [t.to_dict() for t in make_search_world_tasks(world, 10, MIX, 3, "eval")]
    with pytest.raises(ValueError, match="unknown question type"):
        make_search_world_tasks(world, 4, {"trivia": 1.0}, 0, "train")


def test_plans_are_gold_decompositions(world, tasks):
    n_hops = {"one_hop": 1, "bridge": 2, "comparison": 2, "compositional": 3}
    for t in tasks:
        plan = t.meta["plan"]
        assert len(plan) == n_hops[t.meta["type"]]
        for i, hop in enumerate(plan):
            assert mentions(world.entities[hop["support"]].text, hop["answer"])  # the support passage states it
            assert len(t.meta["wrong_queries"][i]) >= 1
        if t.meta["type"] == "comparison":
            assert t.answers[0] in t.meta["compare"]["entities"]
            assert not any(hop["answer"] in t.question for hop in plan)  # the values must be searched for
        else:
            assert t.answers == [plan[-1]["answer"]]
            for prev, nxt in zip(plan, plan[1:]):
                assert prev["answer"] in nxt["query"]  # later hops embed earlier answers
            # not answerable from the question text: the answer (and intermediate answers) are not in it
            for hop in plan:
                assert not re.search(rf"\b{re.escape(normalize_answer(hop['answer']))}\b",
                                     normalize_answer(t.question)), (t.question, hop)


def test_bm25_recall_at_3_of_gold_queries(world, tasks):
    index = index_for(world.passages)
    hops = [hop for t in tasks for hop in t.meta["plan"]]
    found = sum(hop["support"] in [h.title for h in index.search(hop["query"], 3)] for hop in hops)
    assert found / len(hops) >= 0.99, f"recall@3 {found}/{len(hops)}"  # 100% when written


# ---------------------------------------------------------------------------- the scripted expert

def _success_by_type(world, tasks, noise, seed=0, max_turns=6):
    env = SearchEnv(world.passages, top_k=3, max_turns=max_turns)
    expert, rng = ScriptedSearchExpert(noise), random.Random(seed)
    out = defaultdict(list)
    for t in tasks:
        out[t.meta["type"]].append(_play(env, t, expert, rng)[0])
    return {k: sum(v) / len(v) for k, v in out.items()}


def test_noiseless_expert_solves_every_type(world, tasks):
    rates = _success_by_type(world, tasks, ExpertNoiseConfig(wrong_query=0, premature_answer=0))
    assert rates == {t: 1.0 for t in QUESTION_TYPES}


def test_noisy_expert_succeeds_and_fails(world, tasks):
    rates = _success_by_type(world, tasks, ExpertNoiseConfig())
    for qtype, rate in rates.items():
        assert 0.4 < rate < 0.98, (qtype, rate)  # measured: one_hop ~.9, bridge ~.8, comparison ~.9, 3-hop ~.7
    assert rates["compositional"] < rates["one_hop"]  # more hops, more chances to go wrong


def test_expert_is_a_function_of_task_history_and_rng(world, tasks):
    env, expert = SearchEnv(world.passages, max_turns=6), ScriptedSearchExpert(ExpertNoiseConfig(wrong_query=0.5))
    task = next(t for t in tasks if t.meta["type"] == "compositional")
    _, hist = _play(env, task, expert, random.Random(3))
    _, again = _play(env, task, expert, random.Random(3))
    assert [s.turn for s in hist] == [s.turn for s in again]
    for k in range(len(hist)):  # from any prefix the same rng state gives the same turn
        assert expert.act(task, hist[:k], random.Random(k)) == expert.act(task, list(hist[:k]), random.Random(k))


def test_expert_tracks_hops_and_retries_after_miss(world, tasks):
    task = next(t for t in tasks if t.meta["type"] == "bridge")
    plan = task.meta["plan"]
    miss = Step(Turn("t", Action("search", task.meta["wrong_queries"][0][0])), observation="Doc 1 (X): nothing useful")
    assert plan_progress(plan, [miss]) == (0, True)
    always_retry = ScriptedSearchExpert(ExpertNoiseConfig(retry_after_miss=1.0))
    assert always_retry.act(task, [miss], random.Random(0)).action == Action("search", plan[0]["query"])
    never_retry = ScriptedSearchExpert(ExpertNoiseConfig(retry_after_miss=0.0))
    guess = never_retry.act(task, [miss], random.Random(0)).action
    assert guess.kind == "answer" and guess.content in task.meta["guesses"]
    hit = Step(Turn("t", Action("search", plan[0]["query"])), observation=f"Doc 1 (Y): ... {plan[0]['answer']} ...")
    assert plan_progress(plan, [miss, hit]) == (1, False)
    noiseless = ScriptedSearchExpert(ExpertNoiseConfig(wrong_query=0, premature_answer=0))
    turn = noiseless.act(task, [miss, hit], random.Random(0))
    assert turn.action == Action("search", plan[1]["query"]) and plan[0]["answer"] in turn.think


def test_expert_compares_found_values(tasks):
    task = next(t for t in tasks if t.meta["type"] == "comparison")
    plan = task.meta["plan"]
    history = [Step(Turn("t", Action("search", h["query"])), observation=f"Doc 1 (Z): {h['answer']}.") for h in plan]
    turn = ScriptedSearchExpert().act(task, history, random.Random(0))
    assert turn.action == Action("answer", task.answers[0])


def test_expert_needs_a_plan():
    with pytest.raises(ValueError, match="plan"):
        ScriptedSearchExpert().act(_task(["x"]), [], random.Random(0))
