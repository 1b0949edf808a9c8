"""The agent loop: a policy plays one episode of an environment.

    traj = play_episode(env, task, policy, random.Random(0))
    # Monte Carlo: continue from the state s_t reached after the first t steps of traj
    again = play_episode(env, task, policy, random.Random(1), prefix=traj.steps[:t])

With a prefix, the prefix's actions are replayed into a fresh ``env.reset(task)`` and each
replayed observation is checked against the recorded one (environments are deterministic
given the task and the actions; a mismatch raises ``ReplayError`` rather than silently
estimating q from a different state). The policy then continues until the episode is done or
``env.max_turns`` turns have been taken; running out of turns is a failure with score 0.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from foresight_core.envs.base import Env
from foresight_core.policies import InvalidTurn, Policy
from foresight_core.types import Step, Task, Trajectory, Turn


class ReplayError(RuntimeError):
    """Replaying a recorded prefix did not reproduce its observations."""


def play_episode(env: Env, task: Task, policy: Policy, rng: random.Random,
                 prefix: Sequence[Step] = ()) -> Trajectory:
    env.reset(task)
    steps: list[Step] = []

    def finish(success: bool, score: float, **meta: object) -> Trajectory:
        return Trajectory(task=task, steps=steps, success=success, score=score, policy=policy.name,
                          meta={"prefix_len": len(prefix), **meta})

    # 1. rebuild s_t: replay the prefix's actions and check the environment says the same again
    for i, recorded in enumerate(prefix):
        res = env.step(recorded.turn.action)
        if res.observation != recorded.observation:
            raise ReplayError(f"task {task.id}: replaying step {i} ({recorded.turn.action.kind}) gave a different "
                              f"observation than recorded: {str(res.observation)[:80]!r} vs "
                              f"{str(recorded.observation)[:80]!r}")
        steps.append(Step(recorded.turn, res.observation))
        if res.done:
            return finish(bool(res.success), float(res.score or 0.0))

    # 2. the policy continues from s_t
    while len(steps) < env.max_turns:
        turn = policy.act(task, steps, rng)
        if isinstance(turn, InvalidTurn):  # unparsable model output: the episode ends as a failure
            steps.append(Step(Turn(think=turn.think, action=turn.action), None))
            return finish(False, 0.0, invalid_turn={"step": len(steps) - 1, "reason": turn.reason, "raw": turn.raw})
        res = env.step(turn.action)
        steps.append(Step(turn, res.observation))
        if res.done:
            return finish(bool(res.success), float(res.score or 0.0))
    return finish(False, 0.0, truncated=True)
