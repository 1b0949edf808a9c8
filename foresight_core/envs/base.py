"""The one small protocol every environment follows.

    env = make_env(...); obs0 = env.reset(task)      # obs0: the question text shown to the agent
    res = env.step(Action("search", "..."))          # -> StepResult(observation, done, success, score)

``reward(prediction, task)`` is the benchmark's own scoring function (EM/F1, math-verify),
so the RL reward and the evaluation metric are the same code.
Environments are deterministic given the task and the actions, so any state s_t can be
rebuilt by replaying the actions of a trajectory prefix (Monte Carlo q labels rely on it).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from foresight_core.types import Action, StepResult, Task


@runtime_checkable
class Env(Protocol):
    name: str
    max_turns: int

    def reset(self, task: Task) -> str: ...

    def step(self, action: Action) -> StepResult: ...

    def reward(self, prediction: str, task: Task) -> float: ...
