"""The mini format-capability check of the supervised stages: free generation on held-out tasks.

    sets = load_task_sets(held_out_task_uris(corpus_uri, storage), storage)   # {"search_world": [...], ...}
    m = format_check(model, tokenizer, sets, cfg.envs, n_tasks=40, turn_format="foresight", temperature=0.7, seed=0)
    m["format_rate"], m["grounding_rate"], m["ece"], m["brier"], m["search_world/format_rate"]

After WM-AMT or FE-SFT (``<stage>.format_check_tasks`` > 0) the final model plays ``n_tasks``
held-out tasks, balanced across the corpus's ``eval/*`` sets (search and maths), once each, in
the stage's turn format (``foresight: true``: every turn must carry the world-model block). The
metrics say whether the stage taught the format (issue #3: FE-SFT must bring free-generation format
adherence above 95%) and how good the world model it elicited is, against the real environment:

- ``format_rate``: episodes whose every turn is well formed and ended; ``valid_turn_rate``: turns.
- ``success_rate``: episodes answered correctly.
- ``grounding_rate``: mean over well-formed turns with keywords of the share of predicted keywords
  found in the real future (``scoring.grounding`` over ``scoring.future_texts``, as FC-RL scores it).
- ``ece`` / ``brier`` / ``mean_confidence``: the stated confidence of every well-formed turn against
  the episode's outcome (10 equal-width bins for ECE).
- ``n_tasks``; per set ``<set>/format_rate`` and ``<set>/success_rate``.

Metrics without data (no well-formed turn stated a confidence or keywords) are left out, not NaN.
Scoring is ``foresight_core.scoring``'s, as FC-RL's and evaluation's; nothing here imports Ray,
Prefect or MLflow. ``run_format_check`` is the stage's entry: a saved model folder and task URIs in.
"""

from __future__ import annotations

import math
import os
import posixpath
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from foresight_core.config.envs import EnvsConfig
from foresight_core.envs.base import Env
from foresight_core.scoring import episode_facts, summarise_episodes
from foresight_core.rollout import Rollout, RolloutEngine, SamplingParams, play_group
from foresight_core.types import Task

TASK_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


# ---------------------------------------------------------------------------------------------
# Held-out tasks: where they are, which ones are played


def held_out_task_uris(source: str, storage: Any = None) -> list[str]:
    """The task files a check plays: ``source`` itself when it is a task file (JSONL / Parquet of
    ``Task.to_dict()`` rows), else the ``eval/*`` datasets of the corpus folder ``source`` by its
    manifest ([] when it has none)."""
    from foresight_core.storage import join_uri, load_manifest

    if source.endswith(TASK_FILE_SUFFIXES):
        return [source]
    manifest = load_manifest(source, storage)
    if manifest is None:
        return []
    return [join_uri(source, d["file"]) for name, d in sorted(manifest.get("datasets", {}).items())
            if name.startswith("eval/")]


def set_name(uri: str) -> str:
    """``.../eval/search_world.jsonl`` -> ``search_world``."""
    return posixpath.basename(uri.rstrip("/")).split(".")[0]


def read_tasks(uri: str, storage: Any = None) -> list[Task]:
    """The ``Task.to_dict()`` rows of one file; a row that is not a task raises ``ValueError`` naming it."""
    from foresight_core.storage import read_rows

    tasks = []
    for i, row in enumerate(read_rows(uri, storage)):
        try:
            tasks.append(Task.from_dict(row))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{uri}: row {i + 1} is not a task ({e!r})") from e
    return tasks


def load_task_sets(uris: Sequence[str], storage: Any = None) -> dict[str, list[Task]]:
    """Tasks per set, named by file (``set_name``); a row that is not a task raises ``ValueError``."""
    sets: dict[str, list[Task]] = {}
    for uri in uris:
        sets.setdefault(set_name(uri), []).extend(read_tasks(uri, storage))
    return sets


def select_tasks(task_sets: Mapping[str, Sequence[Task]], n: int, seed: int = 0) -> list[tuple[str, Task]]:
    """``n`` ``(set, task)`` pairs balanced across the sets: each set's tasks in a seeded order, taken
    round-robin in set-name order (a set that runs out leaves its turns to the others).

    >>> a, b = [Task(f"a{i}", "search", "?", ["x"]) for i in range(5)], [Task("b0", "math", "?", ["1"])]
    >>> [s for s, _ in select_tasks({"a": a, "b": b}, 4)]
    ['a', 'b', 'a', 'a']
    """
    queues = {}
    for name in sorted(task_sets):
        tasks = list(task_sets[name])
        random.Random(f"{seed}:{name}").shuffle(tasks)
        queues[name] = tasks
    out: list[tuple[str, Task]] = []
    while len(out) < n and any(queues.values()):
        for name, q in queues.items():
            if q and len(out) < n:
                out.append((name, q.pop(0)))
    return out


# ---------------------------------------------------------------------------------------------
# Metrics of played rollouts


def check_metrics(rollouts: Sequence[Rollout], sets: Sequence[str] | None = None) -> dict[str, float]:
    """The check's flat metrics (see the module docstring) of one rollout per task; ``sets[i]`` names
    the set of ``rollouts[i]`` (per-set format and success rates)."""
    if sets is not None and len(sets) != len(rollouts):
        raise ValueError(f"{len(rollouts)} rollouts but {len(sets)} set names")
    ep = summarise_episodes([episode_facts(r) for r in rollouts]) if rollouts else {}
    m: dict[str, float] = {"n_tasks": float(len(rollouts))}
    for key in ("format_rate", "valid_turn_rate", "success_rate", "grounding_rate", "ece", "brier",
                "mean_confidence"):
        m[key] = ep.get(key, math.nan)
    for name in sorted(set(sets or ())):
        mine = [r for r, s in zip(rollouts, sets or ()) if s == name]
        m[f"{name}/format_rate"] = sum(r.format_ok for r in mine) / len(mine)
        m[f"{name}/success_rate"] = sum(r.success for r in mine) / len(mine)
    return {k: float(v) for k, v in m.items() if not math.isnan(v)}


# ---------------------------------------------------------------------------------------------
# Playing the check


def play_check(engine: RolloutEngine, bridge: Any, make_env: Callable[[Task], Env],
               task_sets: Mapping[str, Sequence[Task]], *, n_tasks: int, turn_format: str = "foresight",
               temperature: float = 0.7, max_new_tokens: int = 256, max_turns: int | None = None,
               max_context_tokens: int = 4096, seed: int = 0,
               on_progress: Callable[[int, int, int], None] | None = None) -> dict[str, float]:
    """Play one episode of each of ``n_tasks`` held-out tasks (``select_tasks``) with ``engine`` and
    return ``check_metrics``. The same seed gives the same tasks and the same samples.
    ``on_progress(episodes done, episodes, turn)``: after every turn (``rollout.play_group``)."""
    import torch

    chosen = select_tasks(task_sets, n_tasks, seed)
    if not chosen:
        return {"n_tasks": 0.0}
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rollouts = play_group(engine, bridge, make_env, [t for _, t in chosen], 1, params,
                              turn_format, max_turns, max_context_tokens,
                              on_progress=on_progress)
    return check_metrics(rollouts, [s for s, _ in chosen])


def format_check(model: Any, tokenizer: Any, task_sets: Mapping[str, Sequence[Task]], envs: EnvsConfig, *,
                 n_tasks: int, turn_format: str = "foresight", temperature: float = 0.7, max_new_tokens: int = 256,
                 max_turns: int | None = None, max_context_tokens: int = 4096, max_batch: int = 64,
                 seed: int = 0, on_progress: Callable[[int, int, int], None] | None = None) -> dict[str, float]:
    """``play_check`` with a transformers causal LM (Hugging Face ``generate``) in the real environments."""
    from foresight_core.chat import ChatBridge
    from foresight_core.envs import env_for_task
    from foresight_core.rollout import HFEngine

    engine = HFEngine(model, tokenizer, max_batch=max_batch)
    return play_check(engine, ChatBridge(tokenizer), lambda t: env_for_task(t, envs), task_sets,
                      n_tasks=n_tasks, turn_format=turn_format, temperature=temperature,
                      max_new_tokens=max_new_tokens, max_turns=max_turns, max_context_tokens=max_context_tokens,
                      seed=seed, on_progress=on_progress)


def run_format_check(cfg: Any, stage: str, model_dir: str | os.PathLike, task_uris: Sequence[str],
                     device: str = "cpu",
                     on_progress: Callable[[int, int, int], None] | None = None) -> dict[str, float]:
    """The check of stage ``stage`` ("wm_amt" | "fe_sft") of the ``PipelineConfig`` ``cfg``: the model
    saved in ``model_dir`` (Hugging Face format, whatever the training strategy) plays
    ``<stage>.format_check_tasks`` tasks of the files ``task_uris``, with the stage's settings and the
    evaluation's context limit and batch size. ``on_progress(episodes done, episodes, turn)``: after every turn."""
    from foresight_core.models import load_model

    stage_cfg = getattr(cfg, stage)
    task_sets = load_task_sets(task_uris, cfg.infra.storage)
    model_cfg = cfg.model.saved(str(model_dir))
    model, tokenizer = load_model(model_cfg, device, train=False, seed=cfg.seed)
    return format_check(model, tokenizer, task_sets, cfg.envs, n_tasks=stage_cfg.format_check_tasks,
                        turn_format=stage_cfg.turn_format, temperature=stage_cfg.format_check_temperature,
                        max_new_tokens=stage_cfg.format_check_max_new_tokens,
                        max_turns=stage_cfg.format_check_max_turns, max_context_tokens=cfg.eval.max_context_tokens, max_batch=cfg.eval.batch_size,
                        seed=cfg.seed, on_progress=on_progress)


def summary_line(metrics: Mapping[str, float]) -> str:
    """One printable line: ``format 95.0% | valid turns 98.1% | success 40.0% | ...``."""
    parts = [f"{int(metrics.get('n_tasks', 0))} tasks"]
    for key, label, pct in (("format_rate", "format", True), ("valid_turn_rate", "valid turns", True),
                            ("success_rate", "success", True), ("grounding_rate", "grounding", True),
                            ("ece", "ECE", False), ("brier", "Brier", False),
                            ("mean_confidence", "mean q", False)):
        if key in metrics:
            parts.append(f"{label} {metrics[key]:.1%}" if pct else f"{label} {metrics[key]:.3f}")
    return " | ".join(parts)
