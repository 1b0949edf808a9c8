"""agent.play_episode and the behaviour policies: replay, turn limit, invalid LLM turns."""

from __future__ import annotations

import random

import pytest

from foresight_core.agent import ReplayError, play_episode
from foresight_core.config import EnvsConfig, ExpertNoiseConfig
from foresight_core.envs import env_for_task, make_env
from foresight_core.envs.search_world import load_world, make_search_world_tasks
from foresight_core.format import render_turn
from foresight_core.policies import InvalidTurn, LLMPolicy, Policy, expert_for, invalid_turn
from foresight_core.types import Action, Step, Task, Turn

ENVS = EnvsConfig()
NO_NOISE = ExpertNoiseConfig(wrong_query=0, premature_answer=0, arithmetic_slip=0, retry_after_miss=1)
NOISY = ExpertNoiseConfig(wrong_query=0.5, premature_answer=0.2, retry_after_miss=0.5)


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    world = load_world(1, 24)
    return make_search_world_tasks(world, 12, {"bridge": 1.0, "compositional": 1.0}, seed=0, split="train")


def test_expert_without_noise_solves_every_task(tasks):
    for task in tasks:
        traj = play_episode(env_for_task(task, ENVS), task, expert_for(task, NO_NOISE), random.Random(0))
        assert traj.success and traj.score == 1.0, task.question
        assert traj.final_answer == task.answers[0]
        # a 2-hop question needs 2 searches and an answer (3 turns), a 3-hop one at most 4
        assert 2 <= len(traj.steps) <= len(task.meta["plan"]) + 1


def test_prefix_replay_continues_from_the_recorded_state(tasks):
    task = tasks[0]
    policy = expert_for(task, NOISY)
    traj = play_episode(env_for_task(task, ENVS), task, policy, random.Random(3))
    for t in range(len(traj.steps)):
        again = play_episode(env_for_task(task, ENVS), task, policy, random.Random(99), prefix=traj.steps[:t])
        assert again.steps[:t] == traj.steps[:t]  # the replayed part is the recorded part, observations included
        assert again.meta["prefix_len"] == t
    # the whole trajectory as prefix: replay only, same outcome
    full = play_episode(env_for_task(task, ENVS), task, policy, random.Random(5), prefix=traj.steps)
    assert full.steps == traj.steps and full.success == traj.success


def test_replay_mismatch_is_an_error(tasks):
    task = tasks[0]
    traj = play_episode(env_for_task(task, ENVS), task, expert_for(task, NO_NOISE), random.Random(0))
    forged = [Step(traj.steps[0].turn, "Doc 1 (Nowhere): something else")]
    with pytest.raises(ReplayError, match=f"task {task.id}: replaying step 0"):
        play_episode(env_for_task(task, ENVS), task, expert_for(task, NO_NOISE), random.Random(0), prefix=forged)


class AlwaysSearch:
    name = "always_search"

    def act(self, task, history, rng):
        return Turn(think="more", action=Action("search", f"query {len(history)}"))


class Garbage:
    name = "garbage"

    def act(self, task, history, rng):
        return invalid_turn("<think>half a turn <action><sea", "unclosed <action>")


def test_turn_limit_is_a_failure(tasks):
    task = tasks[0]
    env = make_env("search", ENVS, world=load_world(1, 24))
    assert isinstance(AlwaysSearch(), Policy)
    traj = play_episode(env, task, AlwaysSearch(), random.Random(0))
    assert len(traj.steps) == ENVS.search_world.max_turns and not traj.success and traj.score == 0.0


def test_invalid_turn_ends_the_episode_as_a_failure(tasks):
    task = tasks[0]
    traj = play_episode(env_for_task(task, ENVS), task, Garbage(), random.Random(0))
    assert len(traj.steps) == 1 and traj.steps[0].observation is None
    assert not traj.success and traj.score == 0.0
    assert traj.meta["invalid_turn"]["raw"].startswith("<think>half")
    # the stored turn is a plain, renderable answer turn without tag text
    assert type(traj.steps[0].turn) is Turn
    text = render_turn(traj.steps[0].turn)
    assert "<answer>half a turn sea</answer>" in text


def test_llm_policy_never_crashes():
    """A random tiny Llama writes junk; every turn is parsed or becomes an InvalidTurn."""
    from foresight_core.config import ModelConfig
    from foresight_core.models import load_model

    model, tok = load_model(ModelConfig(source="tiny"), train=False)
    policy = LLMPolicy(model, tok, temperature=1.0, max_new_tokens=12)
    task = Task(id="q1", env="search", question="Where was Zorvan Kellid born?", answers=["Tamsor"],
                meta={"world_seed": 1, "n_entities": 24})
    turn = policy.act(task, [], random.Random(0))
    assert isinstance(turn, InvalidTurn) or turn.action.kind in ("search", "python", "answer")
    # same rng state -> same sampled turn (the torch RNG is seeded from rng)
    assert policy.generate(policy.messages(task, []), random.Random(1)) == \
        policy.generate(policy.messages(task, []), random.Random(1))
    traj = play_episode(env_for_task(task, ENVS), task, policy, random.Random(0))
    assert not traj.success  # 12 random tokens do not answer "Tamsor"
    for step in traj.steps:
        render_turn(step.turn)
