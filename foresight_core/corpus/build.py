"""Corpus step 4, the key and the build: a complete folder with the config's key is reused, else
plan -> collect -> write."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from foresight_core.config.pipeline import PipelineConfig
from foresight_core.corpus.collect import CollectStats, match_weakness, sequential_map, weakened
from foresight_core.corpus.key import corpus_key, corpus_uri
from foresight_core.corpus.plan import plan_corpus
from foresight_core.corpus.write import Manifest, write_corpus
from foresight_core.storage import load_manifest


# ---------------------------------------------------------------------------------------------
# 4. Build: reuse a finished corpus with the same key, else plan -> collect -> write

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
    cfg, q_policy = labelling_policy(cfg, plan)
    t1 = time.perf_counter()
    stats = CollectStats()
    if map_fn is None:
        rows = sequential_map(plan.items, cfg, progress, stats)
    else:
        rows = map_fn(plan.items, cfg)
    t2 = time.perf_counter()
    timing = {"plan_s": t1 - t0, "collect_s": t2 - t1, "map": "sequential" if map_fn is None else "custom",
              **({"collect_stats": dataclasses.asdict(stats)} if map_fn is None else {})}
    return write_corpus(rows, plan, cfg, out_uri, timing, q_policy, key)  # the key of the config as asked


MATCH_TASKS = 48
"""Training tasks (evenly spread) the matched labelling policy is measured on."""


def labelling_policy(cfg: PipelineConfig, plan: Any) -> tuple[PipelineConfig, dict[str, Any]]:
    """The config whose ``corpus.q_noise`` is the expert that labels q, and what the manifest records of it.
    ``q_policy: matched`` (with no ``q_noise`` given) bisects the weakening here, once, before collection."""
    c = cfg.corpus
    if c.q_noise is not None:
        return cfg, {"policy": "expert", "noise": c.q_noise.model_dump(), "source": "corpus.q_noise"}
    if c.q_policy == "behaviour":
        return cfg, {"policy": c.behaviour, "source": "behaviour"}
    tasks = plan.rl_tasks[::max(1, len(plan.rl_tasks) // MATCH_TASKS)][:MATCH_TASKS]
    match = match_weakness(cfg, tasks, c.q_target_success)
    noise = weakened(c.noise, match["weakness"])
    cfg = cfg.model_copy(update={"corpus": c.model_copy(update={"q_noise": noise})})
    return cfg, {"policy": "expert", "noise": noise.model_dump(), "source": "matched", **match}
