"""Benchmark evaluation: a trained model plays held-out tasks; we score, calibrate and count.

    engine = HFEngine(model, tokenizer)                            # or vllm_engine.VLLMEngine on a GPU
    report = evaluate_sets(engine, ChatBridge(tokenizer), eval_sets, cfg.eval, envs_cfg=cfg.envs)
    report["search_world"]["direct"]["score"]                      # EM (search) / verified (maths), mean@k

Per benchmark and per decoding mode it reports:
- ``score`` (mean@k: the mean task score over k samples per task; EM for search, math-verify for maths),
  ``pass_at_k`` (share of tasks solved by any of the k samples), ``f1`` (search);
- ``ece`` / ``brier`` of every stated confidence against the episode outcome, and ``ece_first`` /
  ``brier_first`` for the first turn's q alone (the plan-conditioned success estimate before acting);
- ``grounding_rate``: the share of predicted keywords that appear in the episode's real future;
- ``format_rate``: episodes whose every turn is well formed (the paper's format adherence);
- ``gen_tokens`` per episode and ``turns`` (the token overhead of foresight).

Decoding modes:
- ``direct``: one sample per turn at ``cfg.temperature`` (0 = greedy);
- ``planning`` (``cfg.plan_candidates`` = K > 1, foresight format only): test-time planning with the
  internal world model -- at every turn K candidate turns are sampled and the episode acts on the
  well-formed one with the highest verbalised confidence. It is a ``RolloutEngine`` wrapper, so the
  agent loop is the same code. (METHOD.md: "sample K candidate plans, act on the one with the highest
  verbalised q; measured against greedy".)

Pure science: imports no Ray, Prefect or MLflow; the Ray Data adapter is ``tasks.evaluate``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from foresight_core.config.envs import EnvsConfig
from foresight_core.config.evaluation import EvalConfig
from foresight_core.envs.base import Env
from foresight_core.format import parse_turn
from foresight_core.metrics import pass_at_k
from foresight_core.scoring import episode_facts, first_confidence, summarise_episodes
from foresight_core.rollout import Generation, Rollout, RolloutEngine, SamplingParams, play_group
from foresight_core.types import Task

# ---------------------------------------------------------------------------------------------
# Test-time planning: act on the candidate with the highest verbalised q


class PlanSelectingEngine:
    """Wraps an engine: each prompt gets K sampled candidates; the best well-formed one by confidence is returned.

    Ties go to the earlier candidate; when no candidate is well formed the first one is returned, so a
    model that cannot write the format is scored as it is rather than rescued. ``selection="random"`` is
    the control: a uniform pick among the finished candidates (seeded), the same K and the same cost, so
    a gain of planning over it is the stated q's doing, not best-of-K sampling's.
    """

    def __init__(self, engine: RolloutEngine, tokenizer: Any, k: int, temperature: float,
                 selection: str = "confidence", seed: int = 0) -> None:
        if k < 2:
            raise ValueError(f"plan selection needs k >= 2 candidates, got {k}")
        if selection not in ("confidence", "random"):
            raise ValueError(f"plan selection is 'confidence' or 'random', got {selection!r}")
        self.engine, self.tokenizer, self.k, self.temperature = engine, tokenizer, k, temperature
        self.selection, self.rng = selection, random.Random(seed)
        self.shares_weights = getattr(engine, "shares_weights", True)
        self.candidates_generated = 0

    def load_weights(self, weights: Any) -> None:
        self.engine.load_weights(weights)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        sampled = replace(params, temperature=self.temperature)
        gens = self.engine.generate([p for p in prompts for _ in range(self.k)], sampled)
        self.candidates_generated += sum(len(g.token_ids) for g in gens)
        groups = [gens[i * self.k:(i + 1) * self.k] for i in range(len(prompts))]
        if self.selection == "random":
            return [self.rng.choice([g for g in group if g.finished] or group[:1]) for group in groups]
        return [select_plan(group, self.tokenizer) for group in groups]


def select_plan(candidates: Sequence[Generation], tokenizer: Any) -> Generation:
    """The finished, well-formed candidate with the highest stated confidence (else the first)."""
    best, best_q = candidates[0], -math.inf
    for g in candidates:
        if not g.finished:
            continue
        text = tokenizer.decode(g.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        p = parse_turn(text, "foresight")
        if p.valid and p.confidence is not None and p.confidence > best_q:
            best, best_q = g, p.confidence
    return best


# ---------------------------------------------------------------------------------------------
# One record per played episode


def episode_record(r: Rollout, benchmark: str, mode: str, sample: int) -> dict[str, Any]:
    """What evaluation keeps of an episode: ``scoring.episode_facts`` (outcome, stated confidences,
    grounding, format, length, how it ended) with the task, the answer and the F1."""
    answer = next((s.action.content for s in reversed(r.steps) if s.action and s.action.kind == "answer"), None)
    return {"benchmark": benchmark, "mode": mode, "task_id": r.task.id, "env": r.env, "sample": sample,
            "question": r.task.question, "gold": list(r.task.answers), "answer": answer,
            "f1": float(r.info.get("f1", r.score)), **episode_facts(r)}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summarise(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Aggregate episode records of one benchmark and mode: ``scoring.summarise_episodes`` plus the task
    score: ``score`` = mean@k (each task's mean, averaged over tasks), ``pass_at_k`` = the unbiased
    estimator at k = the fewest samples any task has (with n = k: solved by any sample), and ``f1``."""
    if not records:
        raise ValueError("summarise() needs at least one episode record")
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for rec in records:
        by_task.setdefault(rec["task_id"], []).append(rec)
    k = min(len(rs) for rs in by_task.values())  # every task has at least k samples
    return {**summarise_episodes(records), "tasks": float(len(by_task)), "k": float(k),
            # mean@k: each task's mean score, then the mean over tasks (a task weighs the same whatever its n)
            "score": _mean([_mean([r["score"] for r in rs]) for rs in by_task.values()]),
            # the unbiased estimator from each task's n samples (Chen et al., 2021), k = the fewest samples
            "pass_at_k": _mean([pass_at_k(len(rs), sum(bool(r["success"]) for r in rs), k) for rs in by_task.values()]),
            "f1": _mean([_mean([r["f1"] for r in rs]) for rs in by_task.values()])}


def first_confidences(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[list[Any]]]]:
    """``{mode: {benchmark: [[task id, first stated q, success 0/1], ...]}}``: every episode whose first turn
    stated a confidence, in record order. What the ``*_first`` metrics and the calibration plots are computed
    from, kept per episode so that evaluations can be pooled (a row's seeds in the ablation table)."""
    out: dict[str, dict[str, list[list[Any]]]] = {}
    for r in records:
        if (q := first_confidence(r)) is not None:
            out.setdefault(r["mode"], {}).setdefault(r["benchmark"], []).append(
                [r.get("task_id"), q, float(bool(r["success"]))])
    return out


# ---------------------------------------------------------------------------------------------
# Playing benchmarks


def play_tasks(engine: RolloutEngine, bridge: Any, make_env: Callable[[Task], Env],
               tasks: Sequence[tuple[str, Task]], cfg: EvalConfig, mode: str = "direct",
               on_progress: Callable[[int, int, int], None] | None = None) -> list[dict[str, Any]]:
    """k samples of every (benchmark, task), ``cfg.batch_size`` episodes at a time; one record per episode,
    with its benchmark. Benchmarks share batches: on a CPU one batch of 2n episodes costs ~1.3x one of n.
    ``on_progress(episodes done, episodes, turn)``: after every turn (a progress display)."""
    planner = None
    if mode in ("planning", "planning_random"):
        planner = engine = PlanSelectingEngine(engine, bridge.tokenizer, cfg.plan_candidates, cfg.plan_temperature,
                                               selection="random" if mode == "planning_random" else "confidence")
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
    k = cfg.samples_per_task
    per_batch = max(1, cfg.batch_size // k)
    records: list[dict[str, Any]] = []
    for b in range(0, len(tasks), per_batch):
        chunk = list(tasks[b:b + per_batch])
        report = None if on_progress is None else \
            (lambda done, _, turn, before=len(records): on_progress(before + done, len(tasks) * k, turn))
        before = planner.candidates_generated if planner else 0
        rollouts = play_group(engine, bridge, make_env, [t for _, t in chunk], k, params, cfg.turn_format,
                              max_turns=cfg.max_turns, max_context_tokens=cfg.max_context_tokens, on_progress=report)
        batch = [episode_record(r, chunk[i // k][0], mode, i % k) for i, r in enumerate(rollouts)]
        if planner is not None:  # every candidate's tokens, kept or not: the cost of planning, per episode
            share = (planner.candidates_generated - before) / max(1, len(batch))
            for record in batch:
                record["candidate_tokens"] = share
        records += batch
    return records


def modes(cfg: EvalConfig) -> list[str]:
    """Decoding modes this config asks for: direct always; with K > 1 in the foresight format, planning (act on
    the candidate with the highest stated q) and its control, planning_random (a random one of the K)."""
    planning = cfg.plan_candidates > 1 and cfg.turn_format == "foresight"
    return ["direct"] + (["planning", "planning_random"] if planning else [])


def evaluate_sets(engine: RolloutEngine, bridge: Any, eval_sets: Mapping[str, Sequence[Task]], cfg: EvalConfig,
                  envs_cfg: EnvsConfig | None = None, make_env: Callable[[Task], Env] | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every benchmark in ``eval_sets`` in every mode: ``{benchmark: {mode: metrics}}`` plus ``"records"``."""
    if make_env is None:
        from foresight_core.envs import env_for_task
        envs_cfg = envs_cfg or EnvsConfig()
        make_env = lambda task: env_for_task(task, envs_cfg)  # noqa: E731
    report: dict[str, Any] = {"records": []}
    sets = {name: list(tasks)[:cfg.max_tasks] if cfg.max_tasks else list(tasks) for name, tasks in eval_sets.items()}
    sets = {name: tasks for name, tasks in sets.items() if tasks}
    for mode in modes(cfg):  # every benchmark in the same batches
        t0 = time.perf_counter()
        recs = play_tasks(engine, bridge, make_env, [(name, t) for name, tasks in sets.items() for t in tasks],
                          cfg, mode)
        seconds = time.perf_counter() - t0
        report["records"] += recs
        for name in sets:
            metrics = summarise([r for r in recs if r["benchmark"] == name])
            metrics["seconds"] = seconds  # the mode's play time, all benchmarks together
            report.setdefault(name, {})[mode] = metrics
            if progress:
                progress(f"{name}/{mode}: score {metrics['score']:.3f} format {metrics['format_rate']:.2f} "
                         f"ece {metrics['ece']:.3f} ({seconds:.0f}s for all benchmarks)")
    return report


def flat_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """``{"<benchmark>/<mode>/<metric>": value}`` for a tracker, NaNs dropped; plus the mean over benchmarks."""
    out: dict[str, float] = {}
    per_mode: dict[str, list[float]] = {}
    for name, by_mode in report.items():
        if name == "records":
            continue
        for mode, metrics in by_mode.items():
            for k, v in metrics.items():
                if isinstance(v, float) and not math.isnan(v):
                    out[f"{name}/{mode}/{k}"] = v
            per_mode.setdefault(mode, []).append(metrics["score"])
    for mode, scores in per_mode.items():
        out[f"avg/{mode}/score"] = _mean(scores)
    return out
