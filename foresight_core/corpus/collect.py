"""Corpus step 2, collection: the behaviour policy plays each work item in environments with a
transposition table (``MemoEnv``), chosen steps get a hindsight world-model block (``annotate``) and a
Monte Carlo q label (``Rollouts``). Pure given (items, cfg): every draw is seeded from the item or the state."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from foresight_core.agent import play_episode
from foresight_core.config.corpus import CorpusConfig, ExpertNoiseConfig
from foresight_core.config.pipeline import PipelineConfig
from foresight_core.corpus.annotate import annotate_step
from foresight_core.envs import env_for_task
from foresight_core.envs.base import Env
from foresight_core.policies import LLMPolicy, Policy, expert_for
from foresight_core.types import Action, CorpusRow, Step, StepResult, Task, Trajectory, Turn


# ---------------------------------------------------------------------------------------------
# 2a. Behaviour policy and environments with a transposition table

_LLM_POLICIES: dict[str, LLMPolicy] = {}


def behaviour_policy(task: Task, cfg: CorpusConfig) -> Policy:
    """The scripted expert of the task's environment, or the configured LLM (loaded once per process)."""
    if cfg.behaviour == "expert":
        return expert_for(task, cfg.noise)
    assert cfg.llm is not None  # CorpusConfig checks this at construction
    key = cfg.llm.model_dump_json()
    if key not in _LLM_POLICIES:
        _LLM_POLICIES[key] = LLMPolicy.from_config(cfg.llm)
    return _LLM_POLICIES[key]


class MemoEnv:
    """An environment whose step results are memoised by (task, actions so far).

    Environments are deterministic given the task and the actions, so the table is pure caching:
    replaying a prefix, or a re-rollout that repeats the recorded actions, costs no real step
    (for maths: no sandbox process). On a miss the real environment is brought to the state by
    replaying the path, then stepped once.
    """

    def __init__(self, task: Task, make: Callable[[Task], Env], table: dict, stats: "CollectStats"):
        self._task, self._make, self._table, self._stats = task, make, table, stats
        self._inner: Env | None = None
        self._inner_path: tuple | None = None
        self._path: tuple = ()
        self._task_key = (task.env, task.id, task.question)
        self.name = task.env
        self.max_turns = self._real().max_turns

    def _real(self) -> Env:
        if self._inner is None:
            self._inner = self._make(self._task)
        return self._inner

    def reset(self, task: Task) -> str:
        if (task.env, task.id, task.question) != self._task_key:
            raise ValueError(f"this MemoEnv plays task {self._task.id}, not {task.id}")
        self._path = ()
        return task.question

    def step(self, action: Action) -> StepResult:
        path = self._path + ((action.kind, action.content),)
        key = (self._task_key, path)
        if key not in self._table:
            env = self._real()
            if self._inner_path != self._path:  # bring the real env to s_t by replaying the path
                env.reset(self._task)
                for kind, content in self._path:
                    env.step(Action(kind, content))
                    self._stats.env_steps += 1
            self._table[key] = env.step(action)
            self._stats.env_steps += 1
            self._inner_path = path
        else:
            self._stats.memo_hits += 1
        self._path = path
        res = self._table[key]
        return dataclasses.replace(res, info=dict(res.info))

    def reward(self, prediction: str, task: Task) -> float:
        return self._real().reward(prediction, task)


@dataclass
class CollectStats:
    """Counters of one collection (for the benchmark and the manifest's timing section)."""

    episodes: int = 0
    mc_rollouts: int = 0
    mc_cache_hits: int = 0
    env_steps: int = 0
    memo_hits: int = 0
    play_s: float = 0.0
    mc_s: float = 0.0
    annotate_s: float = 0.0

    def add(self, other: "CollectStats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def state_key(task: Task, prefix: Sequence[Step]) -> str:
    """Identity of the state s_t: the task and the actions taken so far."""
    path = [task.env, task.id, task.question, [(s.turn.action.kind, s.turn.action.content) for s in prefix]]
    return hashlib.sha256(json.dumps(path).encode()).hexdigest()[:24]


class Rollouts:
    """Plays episodes for one batch of items, sharing the memo tables (a batch never nests episodes)."""

    def __init__(self, cfg: PipelineConfig, stats: CollectStats | None = None):
        self.cfg = cfg
        self.stats = stats or CollectStats()
        self._steps: dict = {}
        self._envs: dict[tuple, MemoEnv] = {}
        self._q: dict[str, tuple[int, int]] = {}

    def env(self, task: Task) -> MemoEnv:
        k = (task.env, task.id, task.question)
        if k not in self._envs:
            self._envs[k] = MemoEnv(task, lambda t: env_for_task(t, self.cfg.envs), self._steps, self.stats)
        return self._envs[k]

    def play(self, task: Task, rng: random.Random, prefix: Sequence[Step] = (),
             policy: Policy | None = None) -> Trajectory:
        return play_episode(self.env(task), task, policy or behaviour_policy(task, self.cfg.corpus), rng, prefix)

    def outcomes(self, task: Task, prefix: Sequence[Step], n: int, salt: str) -> list[bool]:
        """Successes of ``n`` rollouts from s_t by the policy q describes (``corpus.q_noise``'s expert when
        set, else the behaviour policy); rollout i's rng is seeded by (seed, salt, s_t, i)."""
        key = state_key(task, prefix)
        q_noise = self.cfg.corpus.q_noise
        policy = expert_for(task, q_noise) if q_noise is not None else None
        return [self.play(task, random.Random(f"{self.cfg.seed}/{salt}/{key}/{i}"), prefix, policy).success
                for i in range(n)]

    def q_estimate(self, task: Task, prefix: Sequence[Step]) -> tuple[int, int]:
        """(successes k, rollouts N) of the Monte Carlo estimate q_t = k / N, cached per state."""
        key = state_key(task, prefix)
        if key in self._q:
            self.stats.mc_cache_hits += 1
            return self._q[key]
        n = self.cfg.corpus.mc_rollouts
        k = sum(self.outcomes(task, prefix, n, "mc"))
        self.stats.mc_rollouts += n
        self._q[key] = (k, n)
        return k, n


# ---------------------------------------------------------------------------------------------
# 2b'. A labelling policy matched to the student


def weakened(noise: ExpertNoiseConfig, w: float) -> ExpertNoiseConfig:
    """The expert's noise moved a share ``w`` in [0, 1] of the way to a hopeless expert (every query wrong,
    every step a premature guess, every sum slipped, no retry): w = 0 is ``noise``, w = 1 almost never wins."""
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"weakening must be in [0, 1], got {w}")
    return ExpertNoiseConfig(wrong_query=noise.wrong_query + w * (1 - noise.wrong_query),
                             premature_answer=noise.premature_answer + w * (1 - noise.premature_answer),
                             arithmetic_slip=noise.arithmetic_slip + w * (1 - noise.arithmetic_slip),
                             retry_after_miss=noise.retry_after_miss * (1 - w))


def match_weakness(cfg: PipelineConfig, tasks: Sequence[Task], target: float, episodes: int = 2,
                   iterations: int = 10) -> dict[str, float]:
    """Bisect the weakening w of ``cfg.corpus.noise`` until the expert's success rate on ``tasks`` (``episodes``
    seeded episodes each, the same draws for every w) is closest to ``target``. Success falls as w grows;
    the result is ``{"weakness": w, "success": its rate, "target": target, "episodes": n}``."""
    if not tasks:
        raise ValueError("match_weakness: no training tasks to measure the labelling policy on")
    ro = Rollouts(cfg)

    def success(w: float) -> float:
        noise = weakened(cfg.corpus.noise, w)
        wins = [ro.play(t, random.Random(f"{cfg.seed}/match/{t.env}/{t.id}/{i}"), policy=expert_for(t, noise)).success
                for t in tasks for i in range(episodes)]
        return sum(wins) / len(wins)

    lo, hi = 0.0, 1.0
    at_lo, at_hi = success(lo), success(hi)
    best = min(((lo, at_lo), (hi, at_hi)), key=lambda p: abs(p[1] - target))
    if at_lo > target > at_hi:
        for _ in range(iterations):
            mid = (lo + hi) / 2
            s = success(mid)
            if abs(s - target) < abs(best[1] - target):
                best = (mid, s)
            lo, hi = (mid, hi) if s > target else (lo, mid)
    return {"weakness": best[0], "success": best[1], "target": target, "episodes": float(len(tasks) * episodes)}


# ---------------------------------------------------------------------------------------------
# 2c. Collect: play, choose the steps to annotate, label them


def _uniform(*key: object) -> float:
    return random.Random("/".join(map(str, key))).random()


def collect_item(item: dict[str, Any], ro: Rollouts) -> list[dict[str, Any]]:
    """The rows of one work item: its trajectory (wm_amt or fe_sft), plus maybe a plain copy."""
    c = ro.cfg.corpus
    task = Task.from_dict(json.loads(item["task_json"]))
    seed = item["seed"]

    t0 = time.perf_counter()
    traj = ro.play(task, random.Random(seed))
    ro.stats.episodes += 1
    t1 = time.perf_counter()
    ro.stats.play_s += t1 - t0

    fe_sft = (traj.success or c.fe_sft_failures) and _uniform("fe_sft", seed) < c.fe_sft_share
    n = len(traj.steps)
    if fe_sft:
        chosen = list(range(n))
    else:
        chosen = [t for t in range(n) if _uniform("annotate", seed, t) < c.annotate_share]
        if not chosen and c.annotate_share > 0 and n:
            chosen = [int(_uniform("annotate-one", seed) * n)]

    labels = []
    for t in chosen:
        prefix = t if c.q_label == "state" else t + 1  # s_t, or s_t followed by the recorded a_t
        k, big_n = ro.q_estimate(task, traj.steps[:prefix])
        labels.append({"t": t, "prefix": prefix, "q": k / big_n, "successes": k, "rollouts": big_n})
    t2 = time.perf_counter()
    ro.stats.mc_s += t2 - t1

    steps = list(traj.steps)
    for lab in labels:
        t = lab["t"]
        steps[t] = Step(Turn(think=steps[t].turn.think, action=steps[t].turn.action,
                             wm=annotate_step(traj, t, lab["q"])), steps[t].observation)
    ro.stats.annotate_s += time.perf_counter() - t2

    meta = {**{k: v for k, v in traj.meta.items() if k != "prefix_len"}, "item": item["item"],
            "rollout": item["rollout"], "seed": seed, "env": task.env, "type": task.meta.get("type"),
            "n_steps": n, "annotated_steps": chosen, "q_labels": labels, "mc_rollouts": c.mc_rollouts}
    annotated = dataclasses.replace(traj, steps=steps, meta=meta)
    rows = [CorpusRow("trajectory", "fe_sft" if fe_sft else "wm_amt", annotated=bool(chosen),
                      trajectory=annotated).to_dict()]
    if not fe_sft and chosen and _uniform("plain", seed) < c.plain_share:
        plain = dataclasses.replace(traj, meta={**meta, "annotated_steps": [], "q_labels": [], "plain_copy": True})
        rows.append(CorpusRow("trajectory", "wm_amt", annotated=False, trajectory=plain).to_dict())
    return rows


def collect_items(items: list[dict[str, Any]], cfg: PipelineConfig,
                  stats: CollectStats | None = None) -> list[dict[str, Any]]:
    """Rows of a batch of work items (what Ray Data's map_batches runs). Pure given (items, cfg)."""
    ro = Rollouts(cfg, stats)
    return [row for item in items for row in collect_item(item, ro)]


def batches_by_task(items: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Consecutive items of one task in one batch, so its rollouts share the memo tables."""
    batches: list[list[dict[str, Any]]] = []
    for it in items:
        if not batches or batches[-1][0]["task_json"] != it["task_json"]:
            batches.append([])
        batches[-1].append(it)
    return batches


def sequential_map(items: list[dict[str, Any]], cfg: PipelineConfig, progress: bool = True,
                   stats: CollectStats | None = None) -> list[dict[str, Any]]:
    """The default map: batches of one task each, in this process, with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    batches = batches_by_task(items)
    rows: list[dict[str, Any]] = []
    with Progress(TextColumn("corpus"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress, transient=True) as bar:
        job = bar.add_task("collect", total=len(items))
        for batch in batches:
            rows += collect_items(batch, cfg, stats)
            bar.advance(job, len(batch))
    return rows
