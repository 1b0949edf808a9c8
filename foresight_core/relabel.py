"""Stage 2b (on demand, ``relabel`` in ``stages``): q labels fit for the learner, from its own rollouts.

The corpus labels q_t with the success rate of the policy that collected it: the scripted expert, which
wins ~85% of its episodes. The 135M student wins a few percent. FE-SFT therefore teaches it to state a
value that is not its own, and FC-RL starts badly overconfident (issue #11). This stage, between FE-SFT
and FC-RL, asks the FE-SFT model instead:

1. choose: ``relabel.n_trajectories`` annotated trajectories of the FE-SFT set (a seeded draw).
2. starts: each annotated step t is a start state s_t, the expert's turns before it its prefix (steps
   the turn limit leaves no room to play from keep their corpus label).
3. values: from every s_t the model plays ``rollouts_per_step`` episodes at FC-RL's temperature, the
   prefix replayed in the environment and shown as the context (``rollout.play_group(prefixes=...)``):
   k wins of n make q_t = k / n, the Monte Carlo value of the policy that will state it.
4. relabel: only q_t changes; the rows record the old and new label (``meta["q_relabel"]``).
5. train: a short SFT on the relabelled trajectories (``relabel``'s SFT fields, assistant tokens), from
   the FE-SFT model: ``sft.run_sft(cfg, "relabel", ...)``.

On several ranks, rank 0 labels and the others wait; a stage resumed after its labels were written
reuses them (``run_relabel``).

    python -m foresight_core.relabel --preset tiny --data corpus/fe_sft.jsonl --model ./fe_sft_model --out ./relabel
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from foresight_core.types import CorpusRow, Step, Task


@dataclass(frozen=True)
class Start:
    """A state to play from: annotated step ``step`` of chosen row ``row``, after ``prefix``."""

    row: int
    step: int
    task: Task
    prefix: tuple[Step, ...]


# ---------------------------------------------------------------------------------------------
# 1-2. Which labels: pure functions of the rows


def choose_rows(rows: Sequence[dict[str, Any]], n: int, seed: int, source: str = "<rows>") -> list[CorpusRow]:
    """``n`` annotated trajectory rows (all of them when fewer), a draw fixed by ``seed``; a bad row raises
    ``ValueError`` naming ``source``, the row and its field."""
    annotated: list[CorpusRow] = []
    for i, raw in enumerate(rows):
        try:
            row = CorpusRow.from_dict(raw)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{source}: row {i + 1}: {e}") from None
        if row.trajectory is not None and any(s.turn.wm is not None for s in row.trajectory.steps):
            annotated.append(row)
    order = list(range(len(annotated)))
    random.Random(f"{seed}:relabel").shuffle(order)
    return [annotated[i] for i in sorted(order[:n])]


def starts(rows: Sequence[CorpusRow], turn_limit: Callable[[Task], int]) -> list[Start]:
    """One start per annotated step t < the task's turn limit (at least one turn is left to play)."""
    out: list[Start] = []
    for i, row in enumerate(rows):
        assert row.trajectory is not None
        steps = row.trajectory.steps
        for t, step in enumerate(steps):
            if step.turn.wm is not None and t < turn_limit(row.trajectory.task):
                out.append(Start(i, t, row.trajectory.task, tuple(steps[:t])))
    return out


# ---------------------------------------------------------------------------------------------
# 3. The model's value from each start


def self_values(engine: Any, bridge: Any, make_env: Callable[[Task], Any], chosen: Sequence[Start], *, n: int,
                params: Any, max_turns: int | None, max_context_tokens: int, batch: int,
                on_progress: Callable[[int, int, int], None] | None = None) -> list[int]:
    """Wins of ``n`` episodes played by ``engine``'s model from each start, ``batch`` episodes at a time."""
    from foresight_core.rollout import play_group

    wins: list[int] = []
    per_call = max(1, batch // n)
    for a in range(0, len(chosen), per_call):
        part = chosen[a:a + per_call]
        rollouts = play_group(engine, bridge, make_env, [s.task for s in part], n, params, "foresight", max_turns,
                              max_context_tokens, prefixes=[s.prefix for s in part])
        wins += [sum(r.success for r in rollouts[g * n:(g + 1) * n]) for g in range(len(part))]
        if on_progress is not None:
            on_progress(len(wins) * n, len(chosen) * n, 0)
    return wins


# ---------------------------------------------------------------------------------------------
# 4. The relabelled rows and what changed


def relabelled(rows: Sequence[CorpusRow], chosen: Sequence[Start], wins: Sequence[int], n: int) -> list[dict[str, Any]]:
    """The rows with q_t := wins / n at every start (the rows given are not changed)."""
    if len(wins) != len(chosen):
        raise ValueError(f"{len(chosen)} starts but {len(wins)} values")
    out = [copy.deepcopy(r) for r in rows]
    for s, k in zip(chosen, wins):
        traj = out[s.row].trajectory
        assert traj is not None
        wm = traj.steps[s.step].turn.wm
        assert wm is not None
        traj.meta.setdefault("q_relabel", []).append({"step": s.step, "old": wm.confidence, "new": k / n,
                                                      "wins": k, "episodes": n})
        wm.confidence = k / n
    return [r.to_dict() for r in out]


def label_stats(rows: Sequence[CorpusRow], chosen: Sequence[Start], wins: Sequence[int], n: int) -> dict[str, float]:
    """``relabel/*`` metrics: starts, episodes, the model's win rate, the mean old and new q, the mean |change|."""
    old = []
    for s in chosen:
        traj = rows[s.row].trajectory
        assert traj is not None and traj.steps[s.step].turn.wm is not None
        old.append(traj.steps[s.step].turn.wm.confidence)
    new = [k / n for k in wins]
    m = max(len(chosen), 1)
    return {"relabel/trajectories": float(len(rows)), "relabel/starts": float(len(chosen)),
            "relabel/episodes": float(len(chosen) * n), "relabel/self_success": sum(wins) / (m * n),
            "relabel/old_q_mean": sum(old) / m, "relabel/new_q_mean": sum(new) / m,
            "relabel/mean_abs_change": sum(abs(a - b) for a, b in zip(old, new)) / m}


# ---------------------------------------------------------------------------------------------
# Entry point: label with the model, then train (the Ray worker, the CLI)


def label_with_model(cfg: Any, data_uri: str, model_dir: str, out_uri: str, device: str = "cpu",
                     on_progress: Callable[[int, int, int], None] | None = None) -> dict[str, float]:
    """Steps 1-4 with the HF model in ``model_dir``: the relabelled rows are written to ``out_uri``; returns
    ``label_stats``. ``cfg`` is the ``PipelineConfig`` (its ``relabel``, ``envs``, ``model``, ``seed``)."""
    import torch

    from foresight_core.chat import ChatBridge
    from foresight_core.envs import env_for_task
    from foresight_core.models import load_model
    from foresight_core.rollout import HFEngine, SamplingParams
    from foresight_core.storage import read_rows, write_rows

    rc = cfg.relabel
    rows = choose_rows(read_rows(data_uri, storage=cfg.infra.storage), rc.n_trajectories, cfg.seed, data_uri)
    if not rows:
        raise ValueError(f"{data_uri}: no annotated trajectory to relabel")

    def make_env(task: Task) -> Any:
        return env_for_task(task, cfg.envs)

    limits: dict[str, int] = {}

    def turn_limit(task: Task) -> int:
        if task.env not in limits:
            limits[task.env] = min(rc.max_turns or 10**9, make_env(task).max_turns)
        return limits[task.env]

    chosen = starts(rows, turn_limit)
    model_cfg = cfg.model.saved(str(model_dir))
    model, tokenizer = load_model(model_cfg, device, train=False, seed=cfg.seed)
    engine = HFEngine(model, tokenizer, max_batch=rc.rollout_batch)
    params = SamplingParams(temperature=rc.temperature, max_new_tokens=rc.max_new_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        wins = self_values(engine, ChatBridge(tokenizer), make_env, chosen, n=rc.rollouts_per_step, params=params,
                           max_turns=rc.max_turns, max_context_tokens=rc.max_context_tokens,
                           batch=rc.rollout_batch, on_progress=on_progress)
    write_rows(out_uri, relabelled(rows, chosen, wins, rc.rollouts_per_step), storage=cfg.infra.storage)
    return label_stats(rows, chosen, wins, rc.rollouts_per_step)


def run_relabel(cfg: Any, data_uri: str, labels_uri: str, out_dir: Any, *, init_model: str, tracker: Any = None,
                on_checkpoint: Any = None, resume_from: Any = None, verbose: bool = True) -> Any:
    """The stage: rank 0 labels with ``init_model`` (the FE-SFT model's folder) into ``labels_uri`` unless an
    earlier attempt of this stage wrote it, every rank waits, then all train on it from ``init_model``
    (``sft.run_sft``). Returns the ``SFTResult``; the label metrics are logged at step 0."""
    import torch.distributed as dist

    from foresight_core.sft import run_sft, stage_device
    from foresight_core.storage import exists
    from foresight_core.tracking import Progress

    if not dist.is_initialized() or dist.get_rank() == 0:
        if not exists(labels_uri, cfg.infra.storage):
            progress = Progress.of(tracker)
            progress.phase("relabelling q with the model's own rollouts", unit="episodes")
            stats = label_with_model(cfg, data_uri, init_model, labels_uri, str(stage_device(cfg.relabel)),
                                     on_progress=progress.episodes())
            if tracker is not None:
                tracker.log_metrics(stats, step=0)
            if verbose:
                print("relabel: " + " | ".join(f"{k.split('/')[1]} {v:.3g}" for k, v in stats.items()))
    if dist.is_initialized():
        dist.barrier()
    return run_sft(cfg, "relabel", labels_uri, out_dir, init_model=init_model, tracker=tracker,
                   on_checkpoint=on_checkpoint, resume_from=resume_from, verbose=verbose)


def main(argv: list[str] | None = None) -> int:
    """Run the stage on one process: label and train, outputs under ``--out``."""
    import argparse
    from pathlib import Path

    from foresight_core.config import load_config

    ap = argparse.ArgumentParser(prog="python -m foresight_core.relabel", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    ap.add_argument("--data", required=True, help="the FE-SFT rows (jsonl or parquet)")
    ap.add_argument("--model", required=True, help="the FE-SFT model's Hugging Face folder")
    ap.add_argument("--out", required=True, help="a folder for the labels and the trained model")
    args = ap.parse_args(argv)
    cfg = load_config(args.preset, overrides=args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run_relabel(cfg, args.data, str(out / "self_labelled.jsonl"), out / "train", init_model=args.model)
    print(f"relabel: model in {result.model_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
