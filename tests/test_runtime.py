"""Workers use the machine: CPUs per worker resolved from the Ray nodes, unless set."""

from __future__ import annotations

import os

import pytest

from foresight_core.config import load_config
from tasks.runtime import cpus_per_worker


@pytest.mark.parametrize("workers, nodes, want", [
    (1, [2], 2),          # one worker on a 2-core laptop: both cores
    (2, [2], 1),          # two workers share them
    (3, [2], 1),          # more workers than CPUs: 1 each, Ray queues the rest
    (4, [8, 8], 4),       # two per node: 8 // 4 = 2 workers per node with 4 CPUs each
    (3, [8, 4], 4),       # 8 // 4 + 4 // 4 = 3 workers fit with 4 CPUs; 5 CPUs would fit only 1 + 0
    (1, [8, 16], 16),     # one worker: the biggest node
    (1, [], 1),           # no node reported: at least 1
])
def test_cpus_per_worker_packs_the_workers_onto_the_nodes(workers, nodes, want) -> None:
    assert cpus_per_worker(workers, nodes) == want


def test_an_explicit_count_wins() -> None:
    assert cpus_per_worker(1, [16], explicit=3) == 3


def test_every_laptop_stage_gets_every_cpu_of_the_machine() -> None:
    cfg = load_config("laptop", env={})
    n = os.cpu_count()
    for stage in ("wm_amt", "fe_sft", "fc_rl"):
        scaling = getattr(cfg, stage).scaling
        assert cpus_per_worker(scaling.num_workers, [n], scaling.cpus_per_worker) == n, stage
    assert cpus_per_worker(cfg.eval.num_actors, [n]) == n
    assert cfg.num_threads is None  # nothing caps the threads below the CPUs


def test_a_stage_share_caps_what_each_stage_takes_of_a_node(monkeypatch) -> None:
    import tasks.runtime as runtime

    monkeypatch.setattr(runtime, "node_cpus", lambda: [2])
    cfg = load_config("laptop", env={})
    assert runtime.worker_threads(cfg, 1, None) == (2, 2)  # alone: the whole node
    shared = load_config("laptop", overrides=["infra.ray.cpus_per_stage=1"], env={})
    assert runtime.worker_threads(shared, 1, None) == (1, 1)  # two rows side by side: one core each
    assert runtime.worker_threads(shared, 2, None) == (1, 1)
    monkeypatch.setattr(runtime, "node_cpus", lambda: [16, 16])
    quarter = load_config("laptop", overrides=["infra.ray.cpus_per_stage=4"], env={})
    assert runtime.worker_threads(quarter, 1, None) == (4, 4)
    assert runtime.worker_threads(quarter, 2, None) == (4, 4)  # 2 workers of 4 CPUs fit the 4 of each node
    assert runtime.worker_threads(quarter, 1, 8) == (8, 8)  # a stage's explicit cpus_per_worker still wins

