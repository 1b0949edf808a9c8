"""The scripted noisy expert of the procedural search world: the corpus's default behaviour policy there.

    expert = ScriptedSearchExpert(noise)
    turn = expert.act(task, history, rng)     # follows task.meta["plan"], with configurable errors
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from foresight_core.config.corpus import ExpertNoiseConfig
from foresight_core.envs.search_world import plan_progress
from foresight_core.types import Action, Step, Task, Turn


def _number(text: str) -> int:
    return int(text.replace(",", ""))


class ScriptedSearchExpert:
    """A noisy expert that follows ``task.meta["plan"]``; a function of (task, history, rng) only.

    At each turn it works out how many hops are solved (``plan_progress``), then:
    all solved -> answer (for comparisons: compare the two found values);
    the last search missed -> retry the gold query with prob ``retry_after_miss``, else guess;
    otherwise -> guess with prob ``premature_answer``, else a wrong query (another entity of the
    same kind) with prob ``wrong_query``, else the gold query of the current hop.
    Guesses come from ``task.meta["guesses"]`` (plausible wrong answers; for a comparison, either name).
    """

    name = "scripted_search_expert"

    def __init__(self, noise: ExpertNoiseConfig | None = None):
        self.noise = noise or ExpertNoiseConfig()

    def act(self, task: Task, history: list[Step], rng: random.Random) -> Turn:
        plan = task.meta.get("plan")
        if not plan:
            raise ValueError(f"task {task.id} has no meta['plan']: the scripted search expert needs a "
                             "gold decomposition (procedural search world tasks); use an LLM policy instead")
        h, missed = plan_progress(plan, history)
        if h == len(plan):
            return self._final(task, plan)
        hop = plan[h]
        if missed:
            if rng.random() < self.noise.retry_after_miss:
                return Turn(think=f"The results did not answer this. I will search again: {hop['query']}",
                            action=Action("search", hop["query"]))
            return self._guess(task, rng)
        if rng.random() < self.noise.premature_answer:
            return self._guess(task, rng)
        if rng.random() < self.noise.wrong_query:
            query = rng.choice(task.meta["wrong_queries"][h])
            return Turn(think=self._lead(plan, h) + query, action=Action("search", query))
        return Turn(think=self._lead(plan, h) + hop["query"], action=Action("search", hop["query"]))

    @staticmethod
    def _lead(plan: Sequence[Mapping[str, str]], h: int) -> str:
        if h == 0:
            return "First I need to find out: "
        return f"I found {plan[h - 1]['answer']}. Next I need to find out: "

    @staticmethod
    def _guess(task: Task, rng: random.Random) -> Turn:
        guess = rng.choice(task.meta["guesses"])
        return Turn(think=f"I am not sure yet, but my best guess is {guess}.", action=Action("answer", guess))

    @staticmethod
    def _final(task: Task, plan: Sequence[Mapping[str, str]]) -> Turn:
        compare = task.meta.get("compare")
        if compare:
            (a, b), values = compare["entities"], [_number(plan[0]["answer"]), _number(plan[1]["answer"])]
            pick = values.index(min(values) if compare["better"] == "min" else max(values))
            answer = (a, b)[pick]
            think = f"{a}: {plan[0]['answer']}; {b}: {plan[1]['answer']}. So the answer is {answer}."
        else:
            answer = plan[-1]["answer"]
            think = f"The search results show that the answer is {answer}."
        return Turn(think=think, action=Action("answer", answer))
