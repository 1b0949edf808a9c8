"""Stage 0: corpus construction -- trajectories with hindsight world-model blocks and Monte Carlo q labels.

    manifest = build_corpus(load_config(preset="tiny"))      # plan -> collect -> write (reused if done)
    manifest.dataset_uri("wm_amt")                           # .../corpus/<key>/wm_amt.jsonl

What happens, in order (each step a function below, usable on its own; the Prefect flow wraps
them and hands ``collect_items`` to Ray Data):

1. ``plan_corpus(cfg)``: the training tasks (procedural search world, gsm_symbolic maths), one
   JSON-able work item per (task, rollout), and the held-out evaluation sets per benchmark.
2. ``collect_items(items, cfg)``: a behaviour policy (the scripted noisy expert, or an LLM) plays
   each item; sampled steps t get a hindsight world-model block z_t built from the *real* future
   of the same trajectory:
     - ``<imaginary>``: the future actions, abstracted (terms first found later become
       "[what step k finds]"; the final answer is never written unless the question names it);
     - ``<keyword>``: salient terms that really occur in the future tau_{>=t} (its actions and
       observations, as in scoring.future_texts), never an answer not yet seen;
     - ``<analysis>``: what is known at t and what is still missing (from the gold plan when the
       task has one);
     - ``<confidence>`` q_t: the success rate of ``mc_rollouts`` re-rollouts of the behaviour
       policy from s_t (the steps before t), each with its own rng (``q_label: action``: from s_t
       after the recorded action a_t).
   Pure given (items, cfg): every random draw is seeded from the item, or from the state s_t for
   the Monte Carlo rollouts, so any batching (in-process, Ray Data) gives the same rows.
3. ``write_corpus(rows, plan, cfg, out_uri)``: the WM-AMT corpus, the FE-SFT set, the RL tasks and
   ``eval/<benchmark>`` through ``storage.DatasetWriter`` (manifest.json last, with hashes, counts,
   token statistics, success rate and q-label statistics).
4. ``build_corpus(cfg)``: the local driver; returns the existing manifest when
   ``<work_dir>/corpus/<corpus_key(cfg)>`` is complete.
5. ``calibration_report(rows, cfg)``: ECE / Brier of the q labels against fresh rollouts.

Rows. wm_amt / fe_sft hold ``{"kind": "trajectory", "split": "wm_amt" | "fe_sft", "annotated": bool,
"trajectory": Trajectory.to_dict()}`` (``trajectory.meta``: item, rollout, seed, env, type, n_steps,
annotated_steps, q_labels = [{t, prefix, q, successes, rollouts}], mc_rollouts; plain copies add
``plain_copy``) and, in wm_amt, ``{"kind": "text", "split": "wm_amt", "text": ...}``; rl_tasks and
eval/<benchmark> hold ``Task.to_dict()`` rows.

Cost. Environments are deterministic given the task and the actions, so each batch keeps a
transposition table of step results (``MemoEnv``) and a table of q estimates per state: replayed
prefixes and re-rollouts that repeat known actions cost no real step (no sandbox process).

Our choices (the paper does not say): FE-SFT takes ``fe_sft_share`` of the *successful*
trajectories (``fe_sft_failures`` adds failures), every step annotated, and they are held out of
WM-AMT; failures all go to WM-AMT, where the world model learns what goes wrong. q_t is the raw
Monte Carlo estimate k/N (no prior), so a noise-free expert gets q = 1.0 everywhere.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from foresight_core import provenance
from foresight_core.agent import play_episode
from foresight_core.config.corpus import CorpusConfig
from foresight_core.config.pipeline import PipelineConfig
from foresight_core.envs import env_for_task
from foresight_core.envs.base import Env
from foresight_core.chat import trajectory_messages
from foresight_core.format import ALL_TAGS, render_wm
from foresight_core.policies import LLMPolicy, Policy, expert_for
from foresight_core.scoring import future_texts, occurs
from foresight_core.scoring import normalise_text as norm
from foresight_core.storage import DatasetWriter, join_uri, load_manifest, read_rows
from foresight_core.types import Action, Step, StepResult, Task, Trajectory, Turn, WorldModelBlock

MAX_KEYWORDS = 4
N_BINS = 10

# ---------------------------------------------------------------------------------------------
# 1. Plan: tasks, work items, evaluation sets


@dataclass
class CorpusPlan:
    """What ``collect_items`` and ``write_corpus`` need. ``items`` are flat and JSON-able (the task is
    JSON text in ``task_json``) so Ray Data can carry them as Arrow rows."""

    items: list[dict[str, Any]]
    rl_tasks: list[Task]
    eval_sets: dict[str, list[Task]]
    load_reports: dict[str, dict[str, Any]] = field(default_factory=dict)


def train_tasks(cfg: PipelineConfig) -> list[Task]:
    """Training tasks of every enabled procedural environment, ``n_train_tasks`` each."""
    tasks: list[Task] = []
    sw = cfg.envs.search_world
    if sw.enabled:
        from foresight_core.envs.search_world import load_world, make_search_world_tasks
        world = load_world(sw.train_seed, sw.n_entities)
        tasks += make_search_world_tasks(world, cfg.corpus.n_train_tasks, sw.question_mix, cfg.seed, "train")
    if cfg.envs.math.enabled:
        from foresight_core.envs.math import load_gsm_symbolic_tasks
        m = cfg.envs.math
        tasks += load_gsm_symbolic_tasks(cfg.corpus.n_train_tasks, m.seed, "train", m.eval_template_share)
    return tasks


def eval_sets(cfg: PipelineConfig) -> tuple[dict[str, list[Task]], dict[str, dict[str, Any]]]:
    """Held-out evaluation tasks per benchmark, and the loaders' reports (rows read / skipped)."""
    sets: dict[str, list[Task]] = {}
    reports: dict[str, dict[str, Any]] = {}
    sw = cfg.envs.search_world
    if sw.enabled:
        from foresight_core.envs.search_world import load_world, make_search_world_tasks
        world = load_world(sw.eval_seed, sw.n_entities)
        sets["search_world"] = make_search_world_tasks(world, cfg.corpus.n_eval_tasks, sw.question_mix, cfg.seed,
                                                       "eval")
    if cfg.envs.math.enabled:
        from foresight_core.envs.math import load_gsm_symbolic_tasks
        m = cfg.envs.math
        sets["gsm_symbolic"] = load_gsm_symbolic_tasks(cfg.corpus.n_eval_tasks, m.seed, "eval", m.eval_template_share)
    from foresight_core.envs.loaders import load_math_jsonl, load_search_qa
    opts = cfg.infra.storage.storage_options()
    for src in cfg.envs.search_qa.sources:
        if src.name in sets:
            raise ValueError(f"envs.search_qa.sources: benchmark name {src.name!r} is used twice")
        loader = load_search_qa if src.kind == "search_qa" else load_math_jsonl
        tasks, report = loader(src.path, src.name, limit=src.limit, skip_bad_rows=cfg.corpus.skip_bad_rows,
                               storage_options=opts if src.path.startswith("s3://") else None)
        for t in tasks:
            t.meta["benchmark"] = src.name
            if src.corpus_path:
                t.meta["corpus_path"] = src.corpus_path
        sets[src.name] = tasks
        reports[src.name] = {"path": report.path, "rows_read": report.rows_read,
                             "rows_skipped": report.rows_skipped, "reasons": report.reasons[:10]}
    return sets, reports


def item_seed(cfg: PipelineConfig, task: Task, rollout: int) -> int:
    return int(hashlib.sha256(f"{cfg.seed}/{task.env}/{task.id}/{rollout}".encode()).hexdigest()[:12], 16)


def plan_corpus(cfg: PipelineConfig) -> CorpusPlan:
    """Work items in task order (the rollouts of one task are neighbours, so a batch shares prefixes)."""
    tasks = train_tasks(cfg)
    items = [{"item": i * cfg.corpus.rollouts_per_task + r, "task_json": json.dumps(task.to_dict()),
              "env": task.env, "rollout": r, "seed": item_seed(cfg, task, r), "split": "train"}
             for i, task in enumerate(tasks) for r in range(cfg.corpus.rollouts_per_task)]
    sets, reports = eval_sets(cfg)
    return CorpusPlan(items=items, rl_tasks=tasks, eval_sets=sets, load_reports=reports)


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

    def play(self, task: Task, rng: random.Random, prefix: Sequence[Step] = ()) -> Trajectory:
        return play_episode(self.env(task), task, behaviour_policy(task, self.cfg.corpus), rng, prefix)

    def outcomes(self, task: Task, prefix: Sequence[Step], n: int, salt: str) -> list[bool]:
        """Successes of ``n`` rollouts from s_t; rollout i's rng is seeded by (seed, salt, s_t, i)."""
        key = state_key(task, prefix)
        return [self.play(task, random.Random(f"{self.cfg.seed}/{salt}/{key}/{i}"), prefix).success
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
# 2b. Hindsight annotation: z_t from the real future of the same trajectory

# A name: capitalised words, possibly joined by "of" / "the" ("The Ballad of Orvenna", "Velmor Institute").
_ENTITY = re.compile(r"\b[A-Z][\w'-]*(?:\s+(?:(?:of|the|de|von|van)\s+)*[A-Z][\w'-]*)*")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?![\w])")
_QUESTION_WORDS = frozenset("where who whom whose what which when why how in on at the a an is was does did do "
                            "for from of first next then doc".split())  # "Doc 1 (Title)" heads search results


def future_text(steps: Sequence[Step], t: int) -> str:
    """tau_{>=t}: the action of step t and every later action and observation (no think, no wm), exactly
    the text FC-RL's grounding reward and evaluation match keywords in (``scoring.future_texts``)."""
    return future_texts([s.turn.action.content for s in steps], [s.observation for s in steps])[t]


def known_text(task: Task, steps: Sequence[Step], t: int) -> str:
    """What the agent has seen before acting at step t: the question, past actions and observations."""
    return "\n".join([task.question, *(p for s in steps[:t] for p in (s.turn.action.content, s.observation) if p)])


def final_answers(traj: Trajectory) -> list[str]:
    """The gold answers and the trajectory's own final answer: never written before they are seen."""
    out = [a for a in traj.task.answers if norm(a)]
    if traj.final_answer and norm(traj.final_answer):
        out.append(traj.final_answer)
    return out


def entities(text: str) -> list[str]:
    """Capitalised names in ``text`` (leading question words dropped), in order of appearance."""
    out = []
    for m in _ENTITY.finditer(text):
        words = m.group(0).split()
        while words and words[0].lower() in _QUESTION_WORDS:
            words = words[1:]
        if words and not all(w.lower() in _QUESTION_WORDS for w in words):
            out.append(" ".join(words))
    return out


def numbers(text: str) -> list[str]:
    return _NUMBER.findall(text)


def first_seen(term: str, steps: Sequence[Step]) -> int | None:
    """Index of the first step whose observation contains ``term``."""
    return next((i for i, s in enumerate(steps) if s.observation and occurs(term, s.observation)), None)


def _assigned_names(code: str) -> list[str]:
    """Variables a python action assigns, in order (what it computes)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id not in names:
            names.append(node.id)
    return names


def _scrub(text: str, traj: Trajectory, allowed: str) -> str:
    """Replace every final answer that does not occur in ``allowed`` by "[the answer]"."""
    for ans in sorted(final_answers(traj), key=len, reverse=True):
        if not occurs(ans, allowed):
            text = re.sub(rf"(?<!\w){re.escape(ans)}(?!\w)", "[the answer]", text, flags=re.IGNORECASE)
    return text


def roadmap(traj: Trajectory, t: int) -> str:
    """The future actions from step t on, abstracted: a term the trajectory first finds in the
    observation of a later step j becomes "[what step k finds]" (k = j - t + 1, steps counted from
    t); answers are described by where they come from, never written."""
    steps, task = traj.steps, traj.task
    known = known_text(task, steps, t)
    parts = []
    for j in range(t, len(steps)):
        action = steps[j].turn.action
        k = j - t + 1
        if action.kind == "search":
            query = action.content
            terms = entities(query) + numbers(query) + [h["answer"] for h in task.meta.get("plan", [])]
            for term in sorted(set(terms), key=len, reverse=True):
                seen = first_seen(term, steps)
                if not occurs(term, known) and seen is not None and t <= seen < j and term in query:
                    query = query.replace(term, f"[what step {seen - t + 1} finds]")
            parts.append(f"{k}. search: {query}")
        elif action.kind == "python":
            names = _assigned_names(action.content)
            if names and all(re.fullmatch(r"step\d+", n) for n in names):  # the scripted expert's programs
                parts.append(f"{k}. run a {len(names)}-step python computation that prints the result")
            elif names:
                parts.append(f"{k}. run python that computes {', '.join(names[:4])}")
            else:
                parts.append(f"{k}. run python code")
        else:
            seen = first_seen(action.content, steps[:j])
            if seen is None:
                where = "a guess, not found in any result"
            elif seen < t:
                where = "what is already known"
            else:
                where = f"what step {seen - t + 1} finds"
            parts.append(f"{k}. answer with {where}")
    if not steps or steps[-1].turn.action.kind != "answer":
        parts.append(f"{len(steps) - t + 1}. the turn limit ends the episode without an answer")
    return _scrub(" ".join(parts), traj, allowed=task.question)


def top_result(observation: str) -> str:
    """The first line of a search observation ("Doc 1 (Title): text"), the most relevant passage."""
    return observation.split("\n", 1)[0]


def keywords(traj: Trajectory, t: int, k: int = MAX_KEYWORDS) -> list[str]:
    """Up to k salient terms that occur in tau_{>=t}; never a final answer unseen at t.

    Search: the gold plan's hop answers, names in future queries, in the top result of future
    searches and in the answer -- terms new at t first. Maths: numbers printed by future runs, then
    the numbers future code computes with (not its print line), then the answer, then the names
    the code assigns -- in order of appearance. A term inside a chosen one is skipped.
    """
    steps, task = traj.steps, traj.task
    future, known = future_text(steps, t), known_text(task, steps, t)
    fut = steps[t:]
    answers = [s.turn.action.content for s in fut if s.turn.action.kind == "answer"]
    if task.env == "math":
        code = [s.turn.action.content for s in fut if s.turn.action.kind == "python"]
        cands = [n for s in fut if s.turn.action.kind == "python" and s.observation for n in numbers(s.observation)]
        cands += [n for c in code for line in c.splitlines() if not line.lstrip().startswith("print(")
                  for n in numbers(line)]
        cands += [n for a in answers for n in numbers(a)]
        cands += [v for c in code for v in _assigned_names(c)]
    else:
        cands = [h["answer"] for h in task.meta.get("plan", [])]
        cands += [e for s in fut if s.turn.action.kind == "search" for e in entities(s.turn.action.content)]
        cands += [e for s in fut if s.observation for e in entities(top_result(s.observation))]
        cands += answers
    spoilers = [a for a in final_answers(traj) if not occurs(a, known)]
    chosen: list[str] = []
    for c in cands:
        c = c.strip()
        if (";" in c or not occurs(c, future) or any(occurs(c, x) for x in chosen)
                or any(occurs(a, c) for a in spoilers)):
            continue
        chosen.append(c)
    if task.env != "math":
        chosen.sort(key=lambda c: occurs(c, known))  # stable: names new at t first
    return chosen[:k]


def gap_analysis(traj: Trajectory, t: int) -> str:
    """What is known before step t and what is still missing to answer."""
    steps, task = traj.steps, traj.task
    past = steps[:t]
    plan = task.meta.get("plan")
    if task.env == "search" and plan:
        from foresight_core.envs.search_world import plan_progress
        h, _ = plan_progress(plan, past)
        known = " ".join(f"({i + 1}) {hop['query']} -> {hop['answer']}" for i, hop in enumerate(plan[:h]))
        missing = []
        for i in range(h, len(plan)):
            q = plan[i]["query"]
            for j in range(h, i):
                q = q.replace(plan[j]["answer"], f"[answer {j + 1}]")
            missing.append(f"({i + 1}) {q}")
        gap = " ".join(missing) if missing else "nothing; every fact the question needs is found, so answer."
        text = f"Known: {known or 'only the question'}. Missing: {gap}"
    elif task.env == "search":
        n = sum(s.turn.action.kind == "search" for s in past)
        seen = [e for s in past if s.observation for e in entities(s.observation)][:4]
        known = f"{n} searches so far" + (f", mentioning {', '.join(seen)}" if seen else "")
        text = f"Known: {known}. Missing: the facts that answer the question."
    else:
        given = numbers(task.question)[:6]
        outputs = [s.observation for s in past if s.turn.action.kind == "python" and s.observation]
        known = f"the problem gives {', '.join(given)}" if given else "the problem statement"
        if outputs:
            last = " ".join(outputs[-1].split())[:80]
            known += f"; the last run printed: {last}"
        missing = "a checked result to answer with" if outputs else "a computation that combines these quantities"
        text = f"Known: {known}. Missing: {missing}."
    return _scrub(text, traj, allowed=known_text(task, steps, t))


_FORMAT_TAG = re.compile(r"</?(?:" + "|".join(ALL_TAGS) + r")>")


def annotate_step(traj: Trajectory, t: int, q: float) -> WorldModelBlock:
    """z_t of step t of ``traj``, with the Monte Carlo estimate ``q``. Format tags quoted from tool
    output or model-written queries are dropped, so every block renders."""
    def clean(text: str) -> str:
        return _FORMAT_TAG.sub(" ", text)
    kws = [k for k in keywords(traj, t) if not _FORMAT_TAG.search(k)]
    return WorldModelBlock(imaginary=clean(roadmap(traj, t)), keywords=kws, analysis=clean(gap_analysis(traj, t)),
                           confidence=q)


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
    rows = [{"kind": "trajectory", "split": "fe_sft" if fe_sft else "wm_amt", "annotated": bool(chosen),
             "trajectory": annotated.to_dict()}]
    if not fe_sft and chosen and _uniform("plain", seed) < c.plain_share:
        plain = dataclasses.replace(traj, meta={**meta, "annotated_steps": [], "q_labels": [], "plain_copy": True})
        rows.append({"kind": "trajectory", "split": "wm_amt", "annotated": False, "trajectory": plain.to_dict()})
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


# ---------------------------------------------------------------------------------------------
# 3. Write: datasets + manifest (last)


@dataclass
class Manifest:
    """A finished corpus: its folder URI and the contents of its manifest.json."""

    uri: str
    data: dict[str, Any]
    reused: bool = False

    @property
    def key(self) -> str:
        return self.data["key"]

    @property
    def datasets(self) -> list[str]:
        return list(self.data["datasets"])

    def dataset_uri(self, name: str) -> str:
        if name not in self.data["datasets"]:
            raise KeyError(f"corpus {self.uri} has no dataset {name!r}; it has {self.datasets}")
        return join_uri(self.uri, self.data["datasets"][name]["file"])

    def read(self, name: str, storage: Any = None) -> list[dict[str, Any]]:
        return read_rows(self.dataset_uri(name), storage)


def general_text_rows(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """Plain text for WM-AMT against forgetting: the training world's passages or wiki summaries."""
    from foresight_core.envs.search import split_contents
    c = cfg.corpus
    if c.general_text == "none" or c.general_text_max_rows == 0:
        return []
    if c.general_text == "world_passages":
        if not cfg.envs.search_world.enabled:
            return []
        from foresight_core.envs.search_world import load_world
        passages = load_world(cfg.envs.search_world.train_seed, cfg.envs.search_world.n_entities).passages
    else:
        from foresight_core.envs.loaders import load_wiki_offline
        passages = load_wiki_offline(limit=c.general_text_max_rows)
    rows = []
    for p in passages[:c.general_text_max_rows]:
        title, text = split_contents(p["contents"])
        rows.append({"kind": "text", "split": "wm_amt", "text": f"{title}\n{text}" if title else text})
    return rows


def _token_counter(cfg: PipelineConfig) -> tuple[Callable[[list[str]], list[int]], str]:
    """Tokens per text with the configured model's tokenizer, else whitespace words (and which)."""
    try:
        from foresight_core.models import load_tokenizer
        tok = load_tokenizer(cfg.model)
    except Exception as e:  # no tokenizer available offline: fall back, and say so in the manifest
        return (lambda texts: [len(t.split()) for t in texts]), f"whitespace words (no tokenizer: {type(e).__name__})"
    return (lambda texts: [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]), \
        f"tokens ({type(tok).__name__} of model.source={cfg.model.source})"


def row_text(row: dict[str, Any]) -> str:
    """The text a row trains on: a trajectory as ChatML-like chat text, or the general text."""
    if row["kind"] == "text":
        return row["text"]
    msgs = trajectory_messages(Trajectory.from_dict(row["trajectory"]))
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)


def _stats(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    vs = sorted(values)
    mean = sum(vs) / len(vs)
    return {"n": len(vs), "mean": mean, "min": vs[0], "p50": vs[len(vs) // 2], "max": vs[-1],
            "std": (sum((v - mean) ** 2 for v in vs) / len(vs)) ** 0.5}


def corpus_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts, success rates and q-label statistics of collected trajectory rows (plain copies excluded)."""
    trajs = [r["trajectory"] for r in rows
             if r["kind"] == "trajectory" and not r["trajectory"]["meta"].get("plain_copy")]
    by_env: dict[str, list[bool]] = {}
    for tr in trajs:
        by_env.setdefault(tr["task"]["env"], []).append(tr["success"])
    qs = [lab["q"] for tr in trajs for lab in tr["meta"]["q_labels"]]
    hist = [0] * N_BINS
    for q in qs:
        hist[min(int(q * N_BINS), N_BINS - 1)] += 1
    n_succ = sum(tr["success"] for tr in trajs)
    return {
        "trajectories": len(trajs), "successes": n_succ, "failures": len(trajs) - n_succ,
        "success_rate": n_succ / len(trajs) if trajs else None,
        "success_rate_by_env": {e: sum(v) / len(v) for e, v in sorted(by_env.items())},
        "annotated_trajectories": sum(bool(tr["meta"]["annotated_steps"]) for tr in trajs),
        "annotated_steps": sum(len(tr["meta"]["annotated_steps"]) for tr in trajs),
        "steps": sum(len(tr["steps"]) for tr in trajs),
        "invalid_turns": sum("invalid_turn" in tr["meta"] for tr in trajs),
        "q_labels": {**_stats(qs), "histogram": hist,
                     "share_q0": (sum(q == 0 for q in qs) / len(qs)) if qs else None,
                     "share_q1": (sum(q == 1 for q in qs) / len(qs)) if qs else None},
    }


def write_corpus(rows: list[dict[str, Any]], plan: CorpusPlan, cfg: PipelineConfig, out_uri: str,
                 timing: dict[str, Any] | None = None) -> Manifest:
    """Write every dataset under ``out_uri`` and manifest.json last; returns the manifest."""
    ext = cfg.corpus.format
    rows = sorted(rows, key=lambda r: r["trajectory"]["meta"]["item"])  # stable: an item's rows keep their order
    datasets: dict[str, list[dict[str, Any]]] = {
        "wm_amt": [r for r in rows if r["split"] == "wm_amt"] + general_text_rows(cfg),
        "fe_sft": [r for r in rows if r["split"] == "fe_sft"],
        "rl_tasks": [t.to_dict() for t in plan.rl_tasks],
        **{f"eval/{name}": [t.to_dict() for t in tasks] for name, tasks in plan.eval_sets.items()},
    }
    count_tokens, unit = _token_counter(cfg)
    token_stats: dict[str, Any] = {"unit": unit}
    row_tokens: dict[int, int] = {}
    for name in ("wm_amt", "fe_sft"):
        counts = count_tokens([row_text(r) for r in datasets[name]]) if datasets[name] else []
        token_stats[name] = {**_stats(counts), "total": sum(counts)}
        row_tokens.update((id(r), n) for r, n in zip(datasets[name], counts))
    # the token overhead of foresight: world-model blocks / all tokens of annotated trajectories
    annotated = [r for r in rows if r["annotated"]]
    wm_texts = [wm_text(s) for r in annotated for s in r["trajectory"]["steps"] if s["turn"]["wm"]]
    wm_tokens = sum(count_tokens(wm_texts)) if wm_texts else 0
    traj_tokens = sum(row_tokens[id(r)] for r in annotated)
    token_stats["wm_share_of_annotated_tokens"] = wm_tokens / traj_tokens if traj_tokens else None

    summary = corpus_summary(rows)
    manifest = {
        "stage": "corpus", "key": corpus_key(cfg), "code_version": code_version(),
        "config": cfg.model_dump(mode="json"),  # SecretStr fields dump as "**********"
        "format": ext, "created_unix": time.time(), "timing": timing or {},
        "datasets": {name: {"file": f"{name}.{ext}", "rows": len(rs)} for name, rs in datasets.items()},
        "counts": {**{name: len(rs) for name, rs in datasets.items()}, "items": len(plan.items),
                   "text_rows": sum(r["kind"] == "text" for r in datasets["wm_amt"]),
                   "plain_rows": sum(r["kind"] == "trajectory" and not r["annotated"] for r in datasets["wm_amt"])},
        **summary,
        "token_stats": token_stats,
        "load_reports": plan.load_reports,
    }
    with DatasetWriter(out_uri, cfg.infra.storage) as w:
        for name, rs in datasets.items():
            w.write_rows(f"{name}.{ext}", rs)
        data = w.commit(manifest)
    return Manifest(uri=out_uri, data=data)


def wm_text(step: dict[str, Any]) -> str:
    """The rendered world-model block of a stored step (for the token overhead of foresight)."""
    return render_wm(WorldModelBlock(**step["turn"]["wm"]))


# ---------------------------------------------------------------------------------------------
# 4. Build: reuse a finished corpus with the same key, else plan -> collect -> write

def code_version() -> str:
    """The version of the code that shapes the corpus: ``foresight_core.provenance.code_version`` of this
    module (the package version and a hash of every ``foresight_core`` source it reaches)."""
    return provenance.code_version("foresight_core.corpus")


def corpus_key(cfg: PipelineConfig) -> str:
    """Hash of everything the corpus depends on: seed, envs, corpus config, tokenizer, code version.
    (Benchmark files are identified by their paths, not their contents.)"""
    relevant = {"seed": cfg.seed, "envs": cfg.envs.model_dump(mode="json"),
                "corpus": cfg.corpus.model_dump(mode="json"),
                "tokenizer": [cfg.model.source, cfg.model.name_or_path], "code": code_version()}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def corpus_uri(cfg: PipelineConfig) -> str:
    return join_uri(cfg.work_dir, "corpus", corpus_key(cfg))


MapFn = Callable[[list[dict[str, Any]], PipelineConfig], list[dict[str, Any]]]


def build_corpus(cfg: PipelineConfig, out_uri: str | None = None, map_fn: MapFn | None = None,
                 progress: bool = True) -> Manifest:
    """The whole stage. ``map_fn(items, cfg) -> rows`` runs the collection (default: in this process;
    the Ray adapter maps ``collect_items`` over Ray Data blocks of the items)."""
    out_uri = out_uri or corpus_uri(cfg)
    key = corpus_key(cfg)
    existing = load_manifest(out_uri, cfg.infra.storage)
    if existing is not None and existing.get("key") == key:
        return Manifest(uri=out_uri, data=existing, reused=True)
    t0 = time.perf_counter()
    plan = plan_corpus(cfg)
    t1 = time.perf_counter()
    stats = CollectStats()
    if map_fn is None:
        rows = sequential_map(plan.items, cfg, progress, stats)
    else:
        rows = map_fn(plan.items, cfg)
    t2 = time.perf_counter()
    timing = {"plan_s": t1 - t0, "collect_s": t2 - t1, "map": "sequential" if map_fn is None else "custom",
              **({"collect_stats": dataclasses.asdict(stats)} if map_fn is None else {})}
    return write_corpus(rows, plan, cfg, out_uri, timing)


# ---------------------------------------------------------------------------------------------
# 5. Calibration of the q labels against fresh rollouts from the same states


def calibration_pairs(rows: Iterable[dict[str, Any]], cfg: PipelineConfig, fresh: int = 4) -> list[dict[str, Any]]:
    """(q_t, outcome) pairs: ``fresh`` new rollouts from each labelled state (rng salt "fresh",
    independent of the labels' "mc" draws). States are deduplicated; plain copies carry no labels."""
    ro = Rollouts(cfg)
    seen: set[str] = set()
    pairs: list[dict[str, Any]] = []
    for row in rows:
        if row.get("kind") != "trajectory":
            continue
        traj = Trajectory.from_dict(row["trajectory"])
        for lab in traj.meta.get("q_labels", []):
            prefix = traj.steps[:lab["prefix"]]
            key = state_key(traj.task, prefix)
            if key in seen:
                continue
            seen.add(key)
            pairs += [{"state": key, "env": traj.task.env, "q": lab["q"], "outcome": float(ok)}
                      for ok in ro.outcomes(traj.task, prefix, fresh, "fresh")]
    return pairs


def summarize_calibration(pairs: Sequence[dict[str, Any]], n_bins: int = N_BINS) -> dict[str, Any]:
    """ECE, Brier and reliability bins of (q, outcome) pairs, overall and per environment."""
    from foresight_core.metrics import brier_score, expected_calibration_error, reliability_bins
    if not pairs:
        raise ValueError("no q labels to calibrate (no annotated trajectory rows)")

    def one(ps: Sequence[dict[str, Any]]) -> dict[str, Any]:
        qs, ys = [p["q"] for p in ps], [p["outcome"] for p in ps]
        return {"states": len({p["state"] for p in ps}), "pairs": len(ps),
                "ece": expected_calibration_error(qs, ys, n_bins=n_bins), "brier": brier_score(qs, ys)}

    qs, ys = [p["q"] for p in pairs], [p["outcome"] for p in pairs]
    envs = sorted({p["env"] for p in pairs})
    return {**one(pairs), "by_env": {e: one([p for p in pairs if p["env"] == e]) for e in envs},
            "bins": [dataclasses.asdict(b) for b in reliability_bins(qs, ys, n_bins=n_bins)]}


def calibration_report(rows: Iterable[dict[str, Any]], cfg: PipelineConfig, fresh: int = 4,
                       n_bins: int = N_BINS) -> dict[str, Any]:
    """ECE and Brier of the q labels in ``rows`` against ``fresh`` new rollouts from each labelled state."""
    return {"fresh_per_state": fresh, **summarize_calibration(calibration_pairs(rows, cfg, fresh), n_bins)}
