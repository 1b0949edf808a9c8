"""The scripted noisy expert of the maths environment: the corpus's default behaviour policy there.

    expert = ScriptedMathExpert(noise)
    turn = expert.act(task, history, rng)     # runs task.meta["code"] (sometimes with a slip), answers what it prints
"""

from __future__ import annotations

import random
import re

from foresight_core.config.corpus import ExpertNoiseConfig
from foresight_core.envs.math import _ASSIGNMENT, _join, _close, format_number, run_program
from foresight_core.types import Action, Step, Task, Turn


class ScriptedMathExpert:
    """A noisy expert that runs ``task.meta["code"]`` and answers what it prints; a function of
    (task, history, rng) only.

    At each turn: the last program printed a number -> answer it; otherwise (first turn, or the
    last program failed -- the expert allows itself ``max_programs`` runs) guess with prob
    ``premature_answer`` (from ``meta["guesses"]``), else run the program, which with prob
    ``arithmetic_slip`` carries a slip (one constant or operator changed, so it prints a wrong
    number or fails). Out of runs: guess.
    """

    name = "scripted_math_expert"
    max_programs = 2

    def __init__(self, noise: ExpertNoiseConfig | None = None):
        self.noise = noise or ExpertNoiseConfig()

    def act(self, task: Task, history: list[Step], rng: random.Random) -> Turn:
        code = task.meta.get("code")
        if not code:
            raise ValueError(f"task {task.id} has no meta['code']: the scripted math expert needs a program "
                             "(gsm_symbolic tasks); use an LLM policy instead")
        runs = [s for s in history if s.turn.action.kind == "python"]
        if history and history[-1].turn.action.kind == "python":
            printed = printed_number(history[-1].observation or "")
            if printed is not None:
                return Turn(think=f"The program printed {printed}, which answers the question.",
                            action=Action("answer", printed))
            if len(runs) >= self.max_programs:
                return self._guess(task, rng)
        if rng.random() < self.noise.premature_answer:
            return self._guess(task, rng)
        if rng.random() < self.noise.arithmetic_slip:
            code = slip(code, rng)
        n_steps = sum(bool(_ASSIGNMENT.match(line)) for line in code.splitlines())
        think = (f"The program failed. I will run the computation again: {n_steps} steps, then print the result."
                 if runs else f"I will compute this in python: {n_steps} steps, then print the result.")
        return Turn(think=think, action=Action("python", code))

    @staticmethod
    def _guess(task: Task, rng: random.Random) -> Turn:
        guess = rng.choice(task.meta.get("guesses") or ["0"])
        return Turn(think=f"I am not sure, but my best guess is {guess}.", action=Action("answer", guess))


def printed_number(observation: str) -> str | None:
    """The number on the last line of an observation ("19.8" -> "19.8", "12.0" -> "12"), else None."""
    lines = observation.strip().splitlines()
    if not lines:
        return None
    try:
        return format_number(float(lines[-1].strip()))
    except ValueError:
        return None


def slip(code: str, rng: random.Random, attempts: int = 20) -> str:
    """``code`` with one arithmetic slip in an assignment line: a constant off by a little or
    tenfold, or + / - and * / / swapped. The slipped program prints another number or fails."""
    lines = code.splitlines()
    steps = [i for i, line in enumerate(lines) if _ASSIGNMENT.match(line)]
    right = run_program(code)
    for _ in range(attempts if steps else 0):
        i = rng.choice(steps)
        name, expr = lines[i].split(" = ", 1)
        toks = _STEP_TOKEN.findall(expr)
        nums = [j for j, t in enumerate(toks) if t[0].isdigit()]
        ops = [j for j, t in enumerate(toks) if t in _SWAP]
        if not nums and not ops:
            continue
        if nums and (not ops or rng.random() < 0.5):
            j = rng.choice(nums)
            v = float(toks[j])
            toks[j] = format_number(rng.choice([v + 1, v + 2, v * 10] + ([v - 1, v / 10] if v > 2 else [])))
        else:
            j = rng.choice(ops)
            toks[j] = _SWAP[toks[j]]
        slipped = "\n".join(lines[:i] + [f"{name} = {_join(toks)}"] + lines[i + 1:])
        out = run_program(slipped)
        if out is None or right is None or not _close(out, right):
            return slipped
    return code.replace("print(round(", "print(1 + round(", 1)  # no step slip changed the result


_STEP_TOKEN = re.compile(r"[A-Za-z_]\w*|\d+(?:\.\d+)?|//|[-+*/()]")
_SWAP = {"+": "-", "-": "+", "*": "/", "/": "*", "//": "*"}


