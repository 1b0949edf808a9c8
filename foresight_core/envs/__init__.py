"""Environments and the one factory that builds them from config.

    env = make_env("search", cfg.envs, world=load_world(1, 120))   # the procedural search world
    env = make_env("search", cfg.envs, passages=rows)              # search QA over a passage corpus
    env = make_env("math", cfg.envs)                               # maths with the sandboxed python tool
    env = env_for_task(task, cfg.envs)                              # whatever the task needs (Ray workers, RL)

``env_for_task`` rebuilds what a task needs from its own ``meta``: a search-world task carries
``world_seed`` and ``n_entities`` (the world is regenerated, once per process), a benchmark
search task carries ``corpus_path`` (the passages are loaded and indexed once per process).
So a task dict is all a remote worker needs. Every call returns a fresh, stateful environment;
only the world and the BM25 index behind it are shared.
"""

from __future__ import annotations

import functools
from typing import Any

from foresight_core.config.envs import EnvsConfig
from foresight_core.envs.base import Env
from foresight_core.types import Task

__all__ = ["Env", "make_env", "env_for_task"]


@functools.lru_cache(maxsize=4)
def _index_of_corpus(path: str) -> Any:
    """The BM25 index of a passage corpus file, loaded and built once per process."""
    from foresight_core.envs.loaders import load_passages
    from foresight_core.envs.search import BM25Index
    return BM25Index(load_passages(path))


def make_env(task_env: str, cfg: EnvsConfig, world: Any = None, passages: Any = None) -> Env:
    """A fresh environment of kind ``task_env`` ("search" | "math").

    Search needs ``world`` (a search_world.World: the procedural world's passages, the world's
    turn limit) or ``passages`` (a list of ``{"id", "contents"}`` or a BM25Index: the benchmark
    turn limit).
    """
    if task_env == "search":
        from foresight_core.envs.search import SearchEnv
        if world is not None:
            sw = cfg.search_world
            return SearchEnv(world.passages, top_k=sw.top_k, max_turns=sw.max_turns)
        if passages is None:
            raise ValueError("make_env('search', ...) needs world= (procedural world) or passages= (a corpus)")
        return SearchEnv(passages, top_k=cfg.search_qa.top_k, max_turns=cfg.search_qa.max_turns)
    if task_env == "math":
        from foresight_core.envs.math import MathEnv
        return MathEnv(cfg.math.sandbox, max_turns=cfg.math.max_turns)
    raise ValueError(f"unknown environment {task_env!r}; expected 'search' or 'math'")


def env_for_task(task: Task, cfg: EnvsConfig) -> Env:
    """A fresh environment for ``task``, its world or passage corpus rebuilt from ``task.meta`` (cached)."""
    if task.env == "math":
        return make_env("math", cfg)
    if task.env != "search":
        raise ValueError(f"task {task.id}: unknown environment {task.env!r}; expected 'search' or 'math'")
    if "world_seed" in task.meta:
        from foresight_core.envs.search_world import load_world
        n_entities = int(task.meta.get("n_entities", cfg.search_world.n_entities))
        return make_env("search", cfg, world=load_world(int(task.meta["world_seed"]), n_entities))
    if task.meta.get("corpus_path"):
        return make_env("search", cfg, passages=_index_of_corpus(str(task.meta["corpus_path"])))
    raise ValueError(f"search task {task.id} names neither meta['world_seed'] (procedural world) nor "
                     "meta['corpus_path'] (a passage corpus), so no search environment can be built for it")
