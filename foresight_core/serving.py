"""The trained agent, served: a question in, the answer and how sure the agent is out.

    agent = Agent(model, tokenizer, cfg.serve, cfg.envs, passages=rows, turn_format="foresight")
    out = agent.answer("Where was the founder of the Velmor Institute born?", env="search")
    out["answer"], out["confidence"], out["confidences"], out["turns"], out["abstained"], out["tokens"]
    outs = agent.predict([{"question": "...", "env": "math"}, ...], {"max_turns": 4, "plan_candidates": 4})

The loop is the evaluation's own (``rollout.play_group``), in served environments: search over a BM25
index of ``passages`` (the procedural world the agent was trained in, or any passages file), maths with
the sandboxed python interpreter. A served question has no gold answer, so nothing is scored.

Bad input never raises out of ``predict``: each bad row gets ``{"error": "..."}`` naming what is wrong
(an empty or oversized question, an unknown env, a setting out of range) and the other rows are answered.
Tool code the model writes runs in the sandbox like any other; what the sandbox refuses comes back as the
observation. With ``min_confidence`` the agent abstains below it: ``answer`` is "I don't know" and
``proposed_answer`` is what it would have guessed.

Pure: imports no Ray, Prefect or MLflow; the MLflow pyfunc around it is ``tasks.serving``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from foresight_core.config.envs import EnvsConfig
from foresight_core.config.serve import ServeConfig
from foresight_core.format import parse_turn
from foresight_core.rollout import Rollout, RolloutStep, SamplingParams, play_group
from foresight_core.types import Task

log = logging.getLogger(__name__)

ENVS = ("search", "math")
ABSTAIN = "I don't know."
SETTINGS = ("max_turns", "temperature", "plan_candidates", "min_confidence")
"""Per-request (or per-row) settings a caller may give."""


class RequestError(ValueError):
    """A request or row the agent refuses (the message names the field)."""


def turn_record(step: RolloutStep) -> dict[str, Any]:
    """One turn as the caller sees it: world-model block, policy span, observation, validity."""
    p = parse_turn(step.text, "any")
    action = step.action or p.action
    return {"imaginary": p.imaginary, "keywords": p.keywords, "analysis": p.analysis,
            "confidence": p.confidence, "think": p.think,
            "action": {"kind": action.kind, "content": action.content} if action else None,
            "observation": step.observation, "valid": step.valid, "reason": step.reason,
            **({} if step.valid else {"text": step.text})}


def _number(row: Mapping[str, Any], key: str, kind: type, lo: float, hi: float, default: Any) -> Any:
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):  # absent, or NaN from a DataFrame
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and float(value) != int(value)):
        raise RequestError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    value = kind(value)
    if not lo <= value <= hi:
        raise RequestError(f"{key} must be in [{lo}, {hi}], got {value}")
    return value


class Agent:
    """A causal LM playing the foresight format with its tools (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, serve: ServeConfig, envs: EnvsConfig,
                 passages: Sequence[Mapping[str, Any]] | None = None, turn_format: str = "foresight",
                 engine: Any = None) -> None:
        """``engine``: any ``rollout.RolloutEngine`` (default: Hugging Face generate on ``model``)."""
        from foresight_core.chat import ChatBridge
        from foresight_core.rollout import HFEngine

        self.serve, self.envs, self.turn_format = serve, envs, turn_format
        self.engine = engine or HFEngine(model, tokenizer, autocast_dtype=None, max_batch=serve.batch_size)
        self.bridge = ChatBridge(tokenizer)
        self._index = None
        if passages:
            from foresight_core.envs.search import index_for
            self._index = index_for(list(passages))

    # ---- one request

    def settings(self, row: Mapping[str, Any], params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The row's settings: the row's own, else the request's, else the config's; out of range -> RequestError."""
        s = self.serve
        merged = {**{k: v for k, v in (params or {}).items() if v is not None},
                  **{k: row[k] for k in SETTINGS if k in row and row[k] is not None}}
        unknown = sorted(set(params or {}) - set(SETTINGS))
        if unknown:
            raise RequestError(f"unknown settings {unknown}; known: {list(SETTINGS)}")
        return {"max_turns": _number(merged, "max_turns", int, 1, s.max_turns_limit, s.max_turns),
                "temperature": _number(merged, "temperature", float, 0.0, 2.0, s.temperature),
                "plan_candidates": _number(merged, "plan_candidates", int, 0, s.max_plan_candidates,
                                           s.plan_candidates),
                "min_confidence": _number(merged, "min_confidence", float, 0.0, 1.0, s.min_confidence)}

    def task(self, row: Mapping[str, Any], i: int) -> Task:
        """The row as a task (no gold answer); a bad question or env -> RequestError."""
        if not isinstance(row, Mapping):
            raise RequestError(f"a row must be an object with 'question' and 'env', got {type(row).__name__}")
        q, env = row.get("question"), row.get("env", "search")
        if not isinstance(q, str) or not q.strip():
            raise RequestError("question must be a non-empty string")
        if len(q) > self.serve.max_question_chars:
            raise RequestError(f"question has {len(q)} characters; the limit is {self.serve.max_question_chars} "
                               "(serve.max_question_chars)")
        if env not in ENVS:
            raise RequestError(f"env must be one of {list(ENVS)}, got {env!r}")
        if env == "search" and self._index is None:
            raise RequestError("this agent has no passages to search: load it with a passages file")
        return Task(id=f"q{i}", env=env, question=q.strip(), answers=[], meta={})

    def make_env(self, task: Task, max_turns: int) -> Any:
        if task.env == "search":
            from foresight_core.envs.search import SearchEnv
            return SearchEnv(self._index, top_k=self.envs.search_qa.top_k, max_turns=max_turns, scored=False)
        from foresight_core.envs.math import MathEnv
        return MathEnv(self.envs.math.sandbox, max_turns=max_turns, scored=False)

    def predict(self, rows: Sequence[Mapping[str, Any]], params: Mapping[str, Any] | None = None,
                on_turn: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """One result per row, in order; a bad row gets ``{"error": ...}`` and the others are answered.
        ``on_turn(row index, turn record)`` is called as each turn is played (``foresight ask``)."""
        if len(rows) > self.serve.max_rows:
            err = f"{len(rows)} questions in one request; the limit is {self.serve.max_rows} (serve.max_rows)"
            return [{"error": err} for _ in rows]
        out: list[dict[str, Any] | None] = [None] * len(rows)
        groups: dict[tuple, list[tuple[int, Task]]] = {}
        for i, row in enumerate(rows):
            try:
                task, st = self.task(row, i), self.settings(row, params)
            except RequestError as e:
                out[i] = {"error": str(e)}
                continue
            groups.setdefault(tuple(sorted(st.items())), []).append((i, task))
        for key, members in groups.items():
            st = dict(key)
            try:
                results = self._play([t for _, t in members], st, on_turn, [i for i, _ in members])
            except Exception as e:  # noqa: BLE001 -- a failure of the model or a tool answers these rows, not the server
                log.exception("serving failed for %d questions", len(members))
                results = [{"error": f"{type(e).__name__}: {e}"} for _ in members]
            for (i, _), r in zip(members, results):
                out[i] = r
        return [r or {"error": "not played"} for r in out]

    def answer(self, question: str, env: str = "search", **settings: Any) -> dict[str, Any]:
        """One question; raises ``RequestError`` on bad input (``predict`` returns it as the row's error)."""
        result = self.predict([{"question": question, "env": env, **settings}])[0]
        if "error" in result and len(result) == 1:
            raise RequestError(result["error"])
        return result

    # ---- playing

    def _play(self, tasks: list[Task], st: dict[str, Any], on_turn: Callable[[int, dict[str, Any]], None] | None,
              rows: list[int]) -> list[dict[str, Any]]:
        from foresight_core.evaluation import PlanSelectingEngine

        engine: Any = self.engine
        k = st["plan_candidates"]
        planner = None
        if k > 1 and self.turn_format == "foresight":
            planner = engine = PlanSelectingEngine(self.engine, self.bridge.tokenizer, k, self.serve.plan_temperature)
        params = SamplingParams(temperature=st["temperature"], max_new_tokens=self.serve.max_new_tokens)
        callback = None if on_turn is None else (lambda j, step: on_turn(rows[j], turn_record(step)))
        rollouts = play_group(engine, self.bridge, lambda t: self.make_env(t, st["max_turns"]), tasks, 1, params,
                              self.turn_format, max_turns=st["max_turns"],
                              max_context_tokens=self.serve.max_context_tokens, on_turn=callback)
        extra = (planner.candidates_generated / max(1, len(tasks))) if planner else 0.0
        return [self._result(r, st, extra) for r in rollouts]

    def _result(self, r: Rollout, st: dict[str, Any], candidate_tokens: float) -> dict[str, Any]:
        turns = [turn_record(s) for s in r.steps]
        confidences = [t["confidence"] for t in turns]
        stated = [q for q in confidences if q is not None]
        final = stated[-1] if stated else None
        last = r.steps[-1] if r.steps else None
        proposed = last.action.content if (r.finish == "answer" and last and last.action) else None
        threshold = st["min_confidence"]
        abstained = threshold is not None and (proposed is None or final is None or final < threshold)
        return {"answer": ABSTAIN if abstained else proposed, "proposed_answer": proposed,
                "confidence": final, "confidences": confidences, "abstained": abstained,
                "turns": turns, "finish": r.finish, "format_ok": r.format_ok,
                "tokens": r.generated_tokens, "candidate_tokens": candidate_tokens,
                "settings": st}
