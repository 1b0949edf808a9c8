"""Corpus step 4, the key and the build: a complete folder with the config's key is reused, else
plan -> collect -> write."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from foresight_core.config.pipeline import PipelineConfig
from foresight_core.corpus.collect import CollectStats, sequential_map
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
