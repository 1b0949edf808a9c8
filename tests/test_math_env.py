"""Maths environment: math-verify scoring, the template split, worked solution -> program, the
sandboxed python tool inside MathEnv, and the scripted noisy expert."""

from __future__ import annotations

import random
import threading

import pytest

from foresight_core.agent import play_episode
from foresight_core.config.corpus import ExpertNoiseConfig
from foresight_core.config.envs import SandboxConfig
from foresight_core.envs.base import Env
from foresight_core.envs.math import (SEARCH_UNAVAILABLE_OBSERVATION, MathEnv, format_number,
                                      load_gsm_symbolic_tasks, run_program, solution_program, template_split,
                                      verify_answer)
from foresight_core.policies.math_expert import ScriptedMathExpert, printed_number, slip
from foresight_core.envs.sandbox import bwrap_available
from foresight_core.types import Action, Step, Task, Turn


@pytest.fixture(scope="module")
def sandbox_cfg() -> SandboxConfig:
    return SandboxConfig(backend="bwrap" if bwrap_available() else "rlimit")


@pytest.fixture(scope="module")
def train_tasks() -> list[Task]:
    return load_gsm_symbolic_tasks(60, seed=3, split="train", eval_template_share=0.25)


def _task(answer: str = "18") -> Task:
    return Task(id="t", env="math", question="What is 3 * 6?", answers=[answer],
                meta={"code": "step1 = 3 * 6\nprint(round(step1, 6))", "guesses": ["3", "6"]})


# ---------------------------------------------------------------------------------------------
# Scoring


@pytest.mark.parametrize("pred", ["18", "$18", "18.0", "\\boxed{18}", "$18$", "The answer is 18", " 18 ",
                                  "\\frac{36}{2}", "36/2"])
def test_verify_accepts_equal_forms(pred):
    assert verify_answer(pred, ["18"])


@pytest.mark.parametrize("pred", ["17", "18.5", "", "   ", "abc", "\\boxed{}", "x" * 600, "$$"])
def test_verify_rejects_wrong_or_junk(pred):
    assert not verify_answer(pred, ["18"])


def test_verify_numbers_with_thousands_separators_and_several_golds():
    assert verify_answer("1,800", ["1800"])  # GSM8K-style gold, model writes a separator
    assert verify_answer("$1,800.00", ["1800"])
    assert not verify_answer("1,801", ["1800"])
    assert verify_answer("0.5", ["7", "\\frac{1}{2}"])  # any gold counts
    assert MathEnv().reward("\\boxed{18}", _task()) == 1.0 and MathEnv().reward("19", _task()) == 0.0


def test_verify_off_the_main_thread_has_no_alarm_but_refuses_towers():
    out = {}

    def run():
        out["ok"] = verify_answer("18.0", ["18"])
        out["tower"] = verify_answer("9^9^9^9", ["18"])  # without SIGALRM, sympy could work for ever
    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=60)
    assert out == {"ok": True, "tower": False}


# ---------------------------------------------------------------------------------------------
# Tasks


def test_template_split_is_disjoint_and_seed_free():
    train, held_out = template_split(0.25)
    assert not set(train) & set(held_out)
    assert len(train) + len(held_out) == 85  # reasoning-gym's tasks_ok
    assert len(held_out) == 21  # round(0.25 * 85) = round(21.25)
    assert template_split(0.25) == (train, held_out)


def test_tasks_follow_the_split(train_tasks):
    train, held_out = template_split(0.25)
    eval_tasks = load_gsm_symbolic_tasks(40, seed=3, split="eval", eval_template_share=0.25)
    assert {t.meta["template"] for t in train_tasks} <= set(train)
    assert {t.meta["template"] for t in eval_tasks} <= set(held_out)
    assert len({t.id for t in train_tasks + eval_tasks}) == 100


def test_tasks_are_deterministic_and_prefix_stable(train_tasks):
    again = load_gsm_symbolic_tasks(10, seed=3, split="train", eval_template_share=0.25)
    assert [t.to_dict() for t in again] == [t.to_dict() for t in train_tasks[:10]]
    other = load_gsm_symbolic_tasks(10, seed=4, split="train", eval_template_share=0.25)
    assert [t.question for t in other] != [t.question for t in again]


def test_task_meta(train_tasks):
    for t in train_tasks:
        assert t.env == "math" and t.question.endswith("Do not include units.")
        assert set(t.meta) >= {"template", "solution", "code", "answer", "guesses"}
        assert "####" in t.meta["solution"]
        assert abs(run_program(t.meta["code"]) - t.meta["answer"]) < 1e-6, t.meta["code"]
        assert verify_answer(format_number(t.meta["answer"]), t.answers)
        assert not any(verify_answer(g, t.answers) for g in t.meta["guesses"])


def test_bad_split_is_a_clear_error():
    with pytest.raises(ValueError, match="split"):
        load_gsm_symbolic_tasks(1, seed=0, split="test", eval_template_share=0.25)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Worked solution -> program (hand-worked)


def test_program_from_a_chain_reuses_step_names_named_by_unit():
    solution = ("Robert dropped his pebbles and was left with 72*0.5=36 pebbles.\n"
                "He searched and found some of his lost pebbles, getting him back to 36+17=53 pebbles.\n"
                "He went home and removed coins, leaving him with 53-9=44 pebbles.\n#### 44")
    code, values = solution_program(solution, 44)
    assert code == ("pebbles = 72 * 0.5\npebbles_2 = pebbles + 17\npebbles_3 = pebbles_2 - 9\n"
                    "print(round(pebbles_3, 6))")
    assert values == [36.0, 53.0, 44.0]


def test_program_handles_units_currency_x_percent_and_floor():
    solution = ("The brokerage fee is $400,000 x 8/100 = $32,000.\n"         # 400000 * 8 / 100 = 32000
                "First find the ride: 300 meters / 60 meters/minute = 5 minutes\n"  # units dropped
                "So he writes 1188/60=19 hours a week\n"                       # 19.8 rounded down: //
                "#### 19")
    code, values = solution_program(solution, 19)
    # no word after $32,000 -> step1; "= 5 minutes" -> minutes; "= 19 hours" -> hours
    assert code == ("step1 = 400000 * 8 / 100\nminutes = 300 / 60\nhours = 1188 // 60\nprint(round(hours, 6))")
    pct = ("The chance of rolling two odd numbers in a row is 50% * 50% = 25%.\n#### 25")
    code, _ = solution_program(pct, 25)  # (50/100) * (50/100) = 0.25; the question asks for 25 (percent)
    assert code == "step1 = (50 / 100) * (50 / 100)\nprint(round(step1 * 100, 6))"
    assert run_program(code) == 25.0


def test_program_is_none_when_the_solution_does_not_compute():
    words = "Let x be the fence. We divide each side by two, leaving x=81.\n#### 81"
    assert solution_program(words, 81) is None


def test_slip_changes_the_result():
    code = "step1 = 3 * 6\nstep2 = step1 + 2\nprint(round(step2, 6))"  # 3 * 6 + 2 = 20
    for seed in range(20):
        slipped = slip(code, random.Random(seed))
        assert slipped != code and run_program(slipped) != 20.0


def test_only_plain_arithmetic_is_evaluated_in_process():
    assert run_program("x = 2 * (3 + 4)\nprint(round(x, 6))") == 14.0
    assert run_program("import os\nprint(os.getcwd())") is None  # not an assignment: not ours
    assert run_program("x = ().__class__\nprint(x)") is None  # attribute access is refused
    assert run_program("x = open('f')\nprint(x)") is None  # no builtins


@pytest.mark.parametrize("obs,expected", [("18\n", "18"), ("12.0", "12"), ("x\n14.960000000001", "14.96"),
                                          ("-3", "-3"), ("ZeroDivisionError: division by zero", None),
                                          ("(no output)", None), ("", None)])
def test_printed_number(obs, expected):
    assert printed_number(obs) == expected


# ---------------------------------------------------------------------------------------------
# The environment


def test_env_protocol_and_episode(sandbox_cfg):
    env = MathEnv(sandbox_cfg, max_turns=4)
    assert isinstance(env, Env)
    assert env.reset(_task()) == "What is 3 * 6?"
    r = env.step(Action("python", "print(3 * 6)"))
    assert (r.observation, r.done, r.info["ok"]) == ("18", False, True)
    r = env.step(Action("search", "3 times 6"))
    assert r.observation == SEARCH_UNAVAILABLE_OBSERVATION and not r.done
    r = env.step(Action("answer", "\\boxed{18}"))
    assert (r.observation, r.done, r.success, r.score) == (None, True, True, 1.0)
    with pytest.raises(RuntimeError, match="over"):
        env.step(Action("answer", "18"))


def test_env_errors_cache_and_turn_limit(sandbox_cfg):
    env = MathEnv(sandbox_cfg, max_turns=2)
    env.reset(_task())
    r = env.step(Action("python", "print('a')\nprint(1 / 0)"))
    assert r.observation == "a\nZeroDivisionError: division by zero" and not r.info["ok"]
    r = env.step(Action("python", "print('a')\nprint(1 / 0)"))  # same code: served from the cache
    assert r.info["cached"] and r.done and r.success is False and r.score == 0.0 and r.info["reason"] == "max_turns"
    env.reset(_task())
    assert env.step(Action("answer", "17")).score == 0.0


# ---------------------------------------------------------------------------------------------
# The scripted expert


def _success_rate(tasks, noise, sandbox_cfg, seed=0):
    env, expert = MathEnv(sandbox_cfg, max_turns=4), ScriptedMathExpert(noise)
    trajs = [play_episode(env, t, expert, random.Random(seed + i)) for i, t in enumerate(tasks)]
    return sum(t.success for t in trajs) / len(trajs), trajs


def test_noiseless_expert_always_succeeds(train_tasks, sandbox_cfg):
    rate, trajs = _success_rate(train_tasks[:25], ExpertNoiseConfig(premature_answer=0, arithmetic_slip=0), sandbox_cfg)
    assert rate == 1.0
    assert all([s.turn.action.kind for s in t.steps] == ["python", "answer"] for t in trajs)
    assert all(t.steps[0].turn.wm is None for t in trajs)


def test_noisy_expert_mixes_successes_and_failures(train_tasks, sandbox_cfg):
    rate, trajs = _success_rate(train_tasks, ExpertNoiseConfig(premature_answer=0.2, arithmetic_slip=0.3), sandbox_cfg)
    # about (1 - 0.2) * (1 - 0.3) = 0.56 (premature answers are drawn from wrong guesses)
    assert 0.3 < rate < 0.8, rate
    assert any(len(t.steps) == 1 for t in trajs)  # premature answers


def test_always_slipping_or_guessing_expert_always_fails(train_tasks, sandbox_cfg):
    rate, _ = _success_rate(train_tasks[:15], ExpertNoiseConfig(premature_answer=0, arithmetic_slip=1), sandbox_cfg)
    assert rate == 0.0  # a slip never prints the right number; failed runs end in a wrong guess
    rate, trajs = _success_rate(train_tasks[:15], ExpertNoiseConfig(premature_answer=1), sandbox_cfg)
    assert rate == 0.0 and all(len(t.steps) == 1 for t in trajs)


def test_expert_retries_a_failed_program_then_guesses():
    expert, task = ScriptedMathExpert(ExpertNoiseConfig(premature_answer=0, arithmetic_slip=0)), _task()
    failed = Step(Turn("run", Action("python", task.meta["code"])), "ZeroDivisionError: division by zero")
    again = expert.act(task, [failed], random.Random(0))
    assert again.action == Action("python", task.meta["code"]) and again.think.startswith("The program failed")
    guess = expert.act(task, [failed, failed], random.Random(0))
    assert guess.action.kind == "answer" and guess.action.content in task.meta["guesses"]
    done = Step(Turn("run", Action("python", task.meta["code"])), "18.0")
    assert expert.act(task, [done], random.Random(0)).action == Action("answer", "18")


def test_expert_is_a_function_of_task_history_and_rng(train_tasks):
    expert = ScriptedMathExpert(ExpertNoiseConfig(premature_answer=0.3, arithmetic_slip=0.5))
    for t in train_tasks[:10]:
        a = [expert.act(t, [], random.Random(s)) for s in range(5)]
        b = [expert.act(t, [], random.Random(s)) for s in range(5)]
        assert a == b


def test_expert_needs_code():
    with pytest.raises(ValueError, match="meta\\['code'\\]"):
        ScriptedMathExpert().act(Task(id="aime/1", env="math", question="?", answers=["1"]), [], random.Random(0))
