"""Corpus step 1, the plan: the training tasks, one JSON-able work item per (task, rollout), and the
held-out evaluation sets per benchmark (``foresight_core.corpus`` says how the steps fit together)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from foresight_core.config.envs import BenchmarkSource
from foresight_core.config.pipeline import PipelineConfig
from foresight_core.types import Task


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


def data_seed(seed: int, data_version: str) -> int:
    """The seed of the training data: ``seed`` itself for the unversioned corpus, else a hash of both."""
    if not data_version:
        return seed
    return int(hashlib.sha256(f"{seed}/data/{data_version}".encode()).hexdigest()[:8], 16)


def train_tasks(cfg: PipelineConfig) -> list[Task]:
    """Training tasks of every enabled procedural environment, ``n_train_tasks`` each (drawn with the
    data version's seed; the held-out templates and the evaluation world are never drawn)."""
    tasks: list[Task] = []
    sw = cfg.envs.search_world
    if sw.enabled:
        from foresight_core.envs.search_world import load_world, make_search_world_tasks
        world = load_world(sw.train_seed, sw.n_entities)
        tasks += make_search_world_tasks(world, cfg.corpus.n_train_tasks, sw.question_mix,
                                         data_seed(cfg.seed, cfg.corpus.data_version), "train")
    if cfg.envs.math.enabled:
        from foresight_core.envs.math import load_gsm_symbolic_tasks
        m = cfg.envs.math
        tasks += load_gsm_symbolic_tasks(cfg.corpus.n_train_tasks, data_seed(m.seed, cfg.corpus.data_version), "train",
                                         m.eval_template_share)
    return tasks


SEARCH_WORLD, GSM_SYMBOLIC = "search_world", "gsm_symbolic"  # the built-in benchmarks' names


def benchmark_names(cfg: PipelineConfig) -> list[str]:
    """The held-out benchmarks ``eval_sets`` builds, by name, without building them."""
    return (([SEARCH_WORLD] if cfg.envs.search_world.enabled else []) + ([GSM_SYMBOLIC] if cfg.envs.math.enabled else [])
            + [src.name for src in cfg.envs.search_qa.sources])


def eval_sets(cfg: PipelineConfig) -> tuple[dict[str, list[Task]], dict[str, dict[str, Any]]]:
    """Held-out evaluation tasks per benchmark (``benchmark_names``), and the loaders' reports (rows read /
    skipped)."""
    sets: dict[str, list[Task]] = {}
    reports: dict[str, dict[str, Any]] = {}
    sw = cfg.envs.search_world
    if sw.enabled:
        from foresight_core.envs.search_world import load_world, make_search_world_tasks
        world = load_world(sw.eval_seed, sw.n_entities)
        sets[SEARCH_WORLD] = make_search_world_tasks(world, cfg.corpus.n_eval_tasks, sw.question_mix, cfg.seed, "eval")
    if cfg.envs.math.enabled:
        from foresight_core.envs.math import load_gsm_symbolic_tasks
        m = cfg.envs.math
        sets[GSM_SYMBOLIC] = load_gsm_symbolic_tasks(cfg.corpus.n_eval_tasks, m.seed, "eval", m.eval_template_share)
    for src in cfg.envs.search_qa.sources:
        if src.name in sets:
            raise ValueError(f"envs.search_qa.sources: benchmark name {src.name!r} is used twice")
        sets[src.name], reports[src.name] = benchmark_tasks(src, cfg)
    return sets, reports


def benchmark_tasks(src: BenchmarkSource, cfg: PipelineConfig) -> tuple[list[Task], dict[str, Any]]:
    """The tasks of one benchmark file in its public format (Search-R1 QA or AIME-style maths), tagged with
    their benchmark and passage corpus, and the loader's report. A malformed row raises ``LoaderError``
    naming the file, the row and the field (``corpus.skip_bad_rows`` skips and counts them instead)."""
    from foresight_core.envs.loaders import load_math_jsonl, load_search_qa

    opts = cfg.infra.storage.storage_options()
    loader = load_search_qa if src.kind == "search_qa" else load_math_jsonl
    tasks, report = loader(src.path, src.name, limit=src.limit, skip_bad_rows=cfg.corpus.skip_bad_rows,
                           storage_options=opts if src.path.startswith("s3://") else None)
    for t in tasks:
        t.meta["benchmark"] = src.name
        if src.corpus_path:
            t.meta["corpus_path"] = src.corpus_path
    return tasks, {"path": report.path, "rows_read": report.rows_read, "rows_skipped": report.rows_skipped,
                   "reasons": report.reasons[:10]}


def item_seed(cfg: PipelineConfig, task: Task, rollout: int) -> int:
    """The behaviour policy's seed for one rollout of one task (the data version draws other rollouts)."""
    version = f"/{cfg.corpus.data_version}" if cfg.corpus.data_version else ""
    return int(hashlib.sha256(f"{cfg.seed}{version}/{task.env}/{task.id}/{rollout}".encode()).hexdigest()[:12], 16)


def plan_corpus(cfg: PipelineConfig) -> CorpusPlan:
    """Work items in task order (the rollouts of one task are neighbours, so a batch shares prefixes)."""
    tasks = train_tasks(cfg)
    items = [{"item": i * cfg.corpus.rollouts_per_task + r, "task_json": json.dumps(task.to_dict()),
              "env": task.env, "rollout": r, "seed": item_seed(cfg, task, r), "split": "train"}
             for i, task in enumerate(tasks) for r in range(cfg.corpus.rollouts_per_task)]
    sets, reports = eval_sets(cfg)
    return CorpusPlan(items=items, rl_tasks=tasks, eval_sets=sets, load_reports=reports)
