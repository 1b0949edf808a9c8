"""Maths with a code interpreter: GSM8K-style problems (reasoning-gym ``gsm_symbolic``), a sandboxed
``<python>`` tool, answers checked with math-verify.

    tasks = load_gsm_symbolic_tasks(100, seed=3, split="train", eval_template_share=0.25)
    env = MathEnv(SandboxConfig(), max_turns=4)
    env.reset(tasks[0])                                   # -> the question
    env.step(Action("python", tasks[0].meta["code"]))     # -> observation: what the program printed
    env.step(Action("answer", "18"))                      # -> done, success, score 1.0 / 0.0

The problems: reasoning-gym's gsm_symbolic has one generator per GSM8K *template* (85 usable of
100, its ``tasks_ok``); each draw instantiates the template with new names and numbers and comes
with GSM8K's worked solution (``answer_cot``). We split by template: a fixed share of template ids
(chosen by a hash, the same for every seed) is held out for ``eval``; ``train`` never sees them.

The scripted expert needs a program, so each task carries ``meta["code"]``, a straight-line python
program derived from the worked solution: every ``a op b = c unit`` equation in it becomes a line
``unit = a op b`` (``step3 = ...`` when no word follows c) whose numbers reuse earlier steps' names
where the values match, ending with ``print(round(name, 6))`` for the step equal to the answer:

    "... 180 carrot / 15 carrot/minute = 12 minutes ... 4 batches * 5 minutes/batch = 20 minutes"
    -> minutes = 180 / 15; batches = 180 / 45; minutes_2 = batches * 5; ...

A draw whose solution does not reproduce the answer that way (templates 66 and 83 solve an
equation in words; template 99 sometimes states a wrong sum) is replaced by another draw, so every
task has a program that really prints its answer.

Simplifications, said out loud: a step that reaches ``max_turns`` without an answer ends the
episode as a failure (its observation is still returned); ``<search>`` is answered with an
observation saying the tool is not available (it still uses up a turn).
"""

from __future__ import annotations

import builtins
import hashlib
import keyword
import math
import random
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

from foresight_core.config.corpus import ExpertNoiseConfig
from foresight_core.config.envs import SandboxConfig
from foresight_core.envs.sandbox import SandboxResult, run_python
from foresight_core.types import Action, Step, StepResult, Task, Turn

SEARCH_UNAVAILABLE_OBSERVATION = ("The search tool is not available in this environment. Use "
                                  "<python>code</python> to compute, or <answer>...</answer> to answer.")
QUESTION_SUFFIX = " Give the result as your final answer. Do not include units."
"""What reasoning-gym appends to every gsm_symbolic question (we keep its wording)."""
MAX_ANSWER_CHARS = 500
"""Longer final answers are wrong without being parsed."""


# ---------------------------------------------------------------------------------------------
# Scoring: math-verify


def verify_answer(prediction: str, golds: Sequence[str]) -> bool:
    r"""True when math-verify finds ``prediction`` equal to any gold answer ("18", "$18", "18.0",
    "\boxed{18}", "1,800" for 1800 all count). Never raises: anything unparsable is wrong.

    math-verify's timeouts use SIGALRM, which only the main thread may set; elsewhere (Prefect or
    Ray threads) it runs without them, so predictions that could keep sympy busy for ever (two or
    more powers, a power or factorial of a 4-digit number) count as wrong there.
    """
    pred = prediction.strip()
    if not pred or len(pred) > MAX_ANSWER_CHARS:
        return False
    main = threading.current_thread() is threading.main_thread()
    if not main and _COSTLY.search(pred):
        return False
    timeout = 5 if main else None
    from math_verify import parse, verify  # imports sympy: only when first needed

    for gold in golds:
        # GSM8K writes 1800, models often 1,800: drop thousands separators when the gold is a plain number
        p = _THOUSANDS.sub("", pred) if _PLAIN_NUMBER.fullmatch(gold.strip()) else pred
        try:
            gold_parsed = parse(gold, parsing_timeout=timeout)
            pred_parsed = parse(p, parsing_timeout=timeout)
            if gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=timeout):
                return True
        except Exception:  # noqa: BLE001 -- math-verify/sympy may raise anything on odd input; it is a wrong answer
            continue
    return False


_PLAIN_NUMBER = re.compile(r"-?\d+(\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_COSTLY = re.compile(r"(\^|\*\*).*(\^|\*\*)|(\^|\*\*)\s*\{?\s*\d{4,}|\d{4,}\s*!")


# ---------------------------------------------------------------------------------------------
# The environment


class MathEnv:
    """Maths with a sandboxed python tool; follows the ``Env`` protocol (envs/base.py).

    Results of identical code are cached per process (``sandbox_cfg.cache_size``): the environment
    stays deterministic given the task and the actions, and replays cost no new process.
    """

    def __init__(self, sandbox_cfg: SandboxConfig | None = None, max_turns: int = 4, name: str = "math",
                 scored: bool = True):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.sandbox_cfg = sandbox_cfg or SandboxConfig()
        self.max_turns = max_turns
        self.name = name
        self.scored = scored  # False: a served question, no gold answer, the final answer is not scored
        self._task: Task | None = None
        self._turns = 0
        self._done = False

    def reset(self, task: Task) -> str:
        """Start an episode on ``task``; returns the question shown to the agent."""
        if self.scored and not task.answers:
            raise ValueError(f"task {task.id} has no gold answers")
        self._task, self._turns, self._done = task, 0, False
        return task.question

    def step(self, action: Action) -> StepResult:
        if self._task is None:
            raise RuntimeError("call reset(task) before step()")
        if self._done:
            raise RuntimeError(f"episode of task {self._task.id} is over; call reset(task)")
        self._turns += 1
        info: dict[str, Any] = {"turns": self._turns}
        if action.kind == "answer":
            self._done = True
            score = self.reward(action.content, self._task) if self.scored else 0.0
            return StepResult(observation=None, done=True, success=score == 1.0, score=score, info=info)
        if action.kind == "python":
            res, cached = run_python_cached(action.content, self.sandbox_cfg)
            observation = res.observation()
            info.update(ok=res.ok, timed_out=res.timed_out, wall_ms=round(res.wall_ms, 1), cached=cached)
        elif action.kind == "search":
            observation = SEARCH_UNAVAILABLE_OBSERVATION
        else:
            observation = f"Unknown action {action.kind!r}: use <python>code</python> or <answer>...</answer>."
        if self._turns >= self.max_turns:
            self._done = True
            info["reason"] = "max_turns"
            return StepResult(observation=observation, done=True, success=False, score=0.0, info=info)
        return StepResult(observation=observation, done=False, info=info)

    def reward(self, prediction: str, task: Task) -> float:
        """1.0 when math-verify finds the prediction equal to a gold answer, else 0.0."""
        return 1.0 if verify_answer(prediction, task.answers) else 0.0


_RESULTS: OrderedDict[tuple[str, str], SandboxResult] = OrderedDict()
_RESULTS_LOCK = threading.Lock()


def run_python_cached(code: str, cfg: SandboxConfig) -> tuple[SandboxResult, bool]:
    """``run_python`` behind a per-process LRU cache keyed by (code, sandbox config); -> (result, was cached)."""
    if cfg.cache_size == 0:
        return run_python(code, cfg), False
    key = (code, cfg.model_dump_json())
    with _RESULTS_LOCK:
        if key in _RESULTS:
            _RESULTS.move_to_end(key)
            return _RESULTS[key], True
    res = run_python(code, cfg)
    with _RESULTS_LOCK:
        _RESULTS[key] = res
        while len(_RESULTS) > cfg.cache_size:
            _RESULTS.popitem(last=False)
    return res, False


# ---------------------------------------------------------------------------------------------
# Tasks: reasoning-gym gsm_symbolic, split by template


def template_split(eval_template_share: float) -> tuple[list[int], list[int]]:
    """(train, eval) template ids: the eval share is the templates first in sha256 order (seed-free)."""
    if not 0 < eval_template_share < 1:
        raise ValueError(f"eval_template_share must be in (0, 1), got {eval_template_share}")
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok

    ids = sorted(tasks_ok, key=lambda t: hashlib.sha256(f"gsm_symbolic/{t}".encode()).hexdigest())
    n_eval = min(len(ids) - 1, max(1, round(eval_template_share * len(ids))))
    return sorted(ids[n_eval:]), sorted(ids[:n_eval])


def load_gsm_symbolic_tasks(n: int, seed: int, split: Literal["train", "eval"],
                            eval_template_share: float = 0.25) -> list[Task]:
    """``n`` gsm_symbolic problems from the ``split``'s templates, generated offline.

    Task ``i`` depends only on (seed, split, i), so a larger ``n`` extends a smaller one.
    ``meta``: template (id), solution (the worked solution), code (a program printing the answer),
    answer (its value), guesses (plausible wrong answers: intermediate results, question numbers).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import GSMSymbolicDataset, GSMSymbolicDatasetConfig

    generators = GSMSymbolicDataset(GSMSymbolicDatasetConfig(seed=seed, size=1)).generators
    train, held_out = template_split(eval_template_share)
    pool = train if split == "train" else held_out
    tasks = []
    for i in range(n):
        rng = random.Random(f"gsm_symbolic/{split}/{seed}/{i}")
        templates = list(pool)
        while True:
            template = rng.choice(templates)
            drawn = _draw(generators[template], rng)
            if drawn is not None:
                break
            templates.remove(template)  # its solutions do not compute (an equation solved in words)
            if not templates:
                raise RuntimeError(f"no gsm_symbolic template of the {split} split yields a program")
        example, code, values = drawn
        meta = example["metadata"]
        answer = float(meta["answer_value"])
        tasks.append(Task(
            id=f"gsm_symbolic/{split}/{seed}/{i}", env="math", question=example["question"] + QUESTION_SUFFIX,
            answers=[str(example["answer"])],
            meta={"template": template, "solution": meta["answer_cot"], "code": code, "answer": answer,
                  "guesses": _guesses(example["question"], values, answer), "source": "reasoning_gym/gsm_symbolic"}))
    return tasks


def _draw(generator: Any, rng: random.Random, attempts: int = 8) -> tuple[dict, str, list[float]] | None:
    """A generated example whose worked solution turns into a program printing its answer."""
    for _ in range(attempts):
        example = generator(random.Random(rng.randrange(2**31)), 1.0)
        meta = example["metadata"]
        program = solution_program(meta["answer_cot"], float(meta["answer_value"]))
        if program is not None:
            return example, *program
    return None


# ---------------------------------------------------------------------------------------------
# Worked solution -> program


_TOKEN = re.compile(r"\d+(?:\.\d+)?|//|[-+*/()]")
_WORD_NUMBERS = {"half": "0.5", "twice": "2", "double": "2", "triple": "3", "thrice": "3"}
_DELIMITER = re.compile(r"[,:;?!=]|\.(?!\d)")  # where the left side of an equation starts


def _normalise(line: str) -> str:
    """GSM8K prose -> arithmetic the tokenizer can read (units, currency, x, %, implicit products)."""
    line = line.replace("×", "*").replace("÷", "/").replace("−", "-").replace("–", "-")
    line = _THOUSANDS.sub("", line)  # 400,000 -> 400000
    line = re.sub(r"[$€£¥]", "", line)
    line = re.sub(r"(?<=[\d)])\s*x\s*(?=[\d(])|(?<=[\d)])\s+x\s+", " * ", line)  # 9 x 12
    line = re.sub(r"\b(half|twice|double|triple|thrice)\b", lambda m: _WORD_NUMBERS[m.group(1).lower()], line,
                  flags=re.IGNORECASE)
    line = re.sub(r"/\s*[A-Za-z]+", " ", line)  # units: 15 carrot/minute -> 15 carrot
    line = re.sub(r"(\d+(?:\.\d+)?)\s*%", r"(\1 / 100)", line)
    line = re.sub(r"(?<=[\d)])\s*\(", " * (", line)  # 2(20) -> 2 * (20)
    return re.sub(r"\)\s*(?=\d)", ") * ", line)


def _join(tokens: Sequence[str]) -> str:
    """["(", "50", "/", "100", ")"] -> "(50 / 100)"."""
    return " ".join(tokens).replace("( ", "(").replace(" )", ")")


def _evaluate(expr: str, names: dict[str, Any]) -> float | None:
    """The value of an arithmetic expression over ``names``; None if it fails or is not plain arithmetic."""
    if not _ARITHMETIC.fullmatch(expr):  # numbers, names, + - * / //, parentheses, commas: no attributes
        return None
    try:
        return float(eval(compile(expr, "<step>", "eval"), {"__builtins__": {}}, names))  # noqa: S307
    except (ArithmeticError, NameError, SyntaxError, TypeError, ValueError, RecursionError, MemoryError):
        return None


_ARITHMETIC = re.compile(r"(?:[A-Za-z_]\w*|\d+(?:\.\d+)?|//|[-+*/(),\s])*")


def _close(a: float, b: float) -> bool:
    # the solutions print rounded values (34 * 0.44 = 14.96): accept cents and relative noise
    return abs(a - b) <= max(0.006, 1e-6 * abs(b))


def solution_equations(solution: str) -> list[tuple[list[str], float, str | None]]:
    """The ``a op b = c unit`` equations of a worked solution whose arithmetic checks out:
    (left-side tokens, c, the word after c or None).

    The left side is the longest tail of the text before ``=`` (from the last comma, colon, full
    stop or ``=``) that evaluates to c: ``"so 116 students - 89 girls = 27 boys"`` ->
    ``(["116", "-", "89"], 27.0, "boys")``. A division whose solution rounds down
    (``1188/60 = 19``) becomes ``//``.
    """
    found = []
    for raw in solution.splitlines():
        if raw.startswith("####"):
            continue
        line = _normalise(raw)
        for eq in re.finditer("=", line):
            left = line[: eq.start()]
            start = max((d.end() for d in _DELIMITER.finditer(left)), default=0)
            lhs = _TOKEN.findall(left[start:])
            rhs_match = re.match(r"\s*\(?\s*(\d+(?:\.\d+)?)(\s*/\s*100\s*\))?\s*([A-Za-z]+)?", line[eq.end():])
            if not lhs or not rhs_match:
                continue
            rhs = float(rhs_match.group(1)) / (100 if rhs_match.group(2) else 1)
            for i in range(len(lhs)):
                toks = lhs[i:]
                if not any(t in ("+", "-", "*", "/") for t in toks):
                    continue
                variants = [toks, ["//" if t == "/" else t for t in toks]] if "/" in toks else [toks]
                hit = next((v for v in variants if (x := _evaluate(_join(v), {})) is not None and _close(x, rhs)),
                           None)
                if hit is not None:
                    found.append((hit, rhs, rhs_match.group(3)))
                    break
    return found


_NOT_NAMES = frozenset("""a an and are as at be by each for from in is it of on or per so than that the then this to
was were which with more less left total times""".split()) | frozenset(dir(builtins)) | frozenset(keyword.kwlist)


def _name(unit: str | None, used: set[str]) -> str:
    """A variable name for a step: the unit after its result ("= 12 minutes" -> minutes, then
    minutes_2, ...), or step1, step2, ... when there is no usable word."""
    base = unit.lower() if unit and len(unit) > 2 and unit.lower() not in _NOT_NAMES else None
    k = 1
    name = base or "step1"
    while name in used:
        k += 1
        name = f"{base}_{k}" if base else f"step{k}"
    used.add(name)
    return name


def solution_program(solution: str, answer: float) -> tuple[str, list[float]] | None:
    """A straight-line program printing ``answer``, derived from the worked solution; with the values
    of its steps. None when the solution's equations never reach the answer.

    Each equation becomes ``name = expr``, named after the unit of its result; a number equal to an
    earlier step's result is written as that step's name, so the program is a real chain.
    """
    names: list[str] = []
    steps: list[str] = []
    values: list[float] = []
    used: set[str] = set()
    for toks, _, unit in solution_equations(solution):
        expr = []
        for t in toks:
            j = next((k for k in range(len(values) - 1, -1, -1) if abs(values[k] - float(t)) < 1e-9), None) \
                if t[0].isdigit() else None
            expr.append(names[j] if j is not None else t)
        value = _evaluate(_join(expr), dict(zip(names, values)))
        if value is None:
            return None
        names.append(_name(unit, used))
        steps.append(_join(expr))
        values.append(value)
    for scale in ("", " * 100"):  # "* 100": the question asks for a percentage, the steps hold a fraction
        factor = 100 if scale else 1
        last = next((k for k in range(len(values) - 1, -1, -1) if _close(values[k] * factor, answer)), None)
        if last is not None:
            lines = [f"{names[k]} = {steps[k]}" for k in range(last + 1)]
            lines.append(f"print(round({names[last]}{scale}, 6))")
            return "\n".join(lines), values[: last + 1]
    return None


def format_number(x: float) -> str:
    """18.0 -> "18", 14.960000001 -> "14.96" (how the expert writes a printed number)."""
    if not math.isfinite(x):
        return str(x)
    x = round(x, 6)
    return str(int(x)) if x == int(x) else f"{x:.6f}".rstrip("0").rstrip(".")


def _guesses(question: str, values: Sequence[float], answer: float) -> list[str]:
    """Plausible wrong answers: intermediate results of the solution, then numbers of the question."""
    numbers = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", _THOUSANDS.sub("", question))]
    cands = [format_number(v) for v in [*values, *numbers]]
    out: list[str] = []
    for c in cands:
        if c not in out and not _close(float(c), answer):
            out.append(c)
    return out or [format_number(answer + 1)]


_ASSIGNMENT = re.compile(r"[A-Za-z_]\w* = ")


def run_program(code: str) -> float | None:
    """The value a derived program prints, computed in-process (its lines are plain arithmetic);
    None when it fails or is not of that form."""
    names: dict[str, Any] = {"round": round}
    for line in code.splitlines():
        if line.startswith("print(") and line.endswith(")"):
            return _evaluate(line[len("print("):-1], names)
        if not _ASSIGNMENT.match(line):
            return None
        name, expr = line.split(" = ", 1)
        value = _evaluate(expr, names)
        if value is None:
            return None
        names[name] = value
    return None
