"""What an ablation will run, before it runs: the shared stages and an estimate of the GPU hours.

    plan = ablation_plan(cfg, table, seeds=[0, 1, 2])
    print(plan_text(plan))      # rows, what each changes, stage executions after sharing, GPU hours

Sharing follows the pipeline's own rule: a stage is reused when its config, its inputs and its starting
model agree, so two rows share a stage exactly when the chain of stage configs up to it is the same. The
fingerprints here hash those config chains (the real stage keys add the code version and the data,
which are the same for every row of one run).

The GPU-hour estimate is arithmetic on the config, stated with its assumptions: 6 N FLOPs per trained
token, 2 N per generated token, at ``train_mfu`` / ``gen_mfu`` of ``peak_tflops`` per GPU (defaults:
H100 dense bf16, 35% for training, 10% for generation, which is memory bound). The corpus's scripted
expert runs on CPUs and costs no GPU time. N comes from the model name (``3B``, ``135M``) or ``params``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from foresight_core.config.ablation import AblationConfig, row_configs
from foresight_core.config.pipeline import STAGES, PipelineConfig
from foresight_core.corpus.plan import benchmark_names
from foresight_core.metrics import cells_to_resolve

TRAIN_STAGES = ("wm_amt", "fe_sft", "relabel", "fc_rl")
_SIZE = re.compile(r"(?:^|[-_/ ])(\d+(?:\.\d+)?)([BM])(?=$|[-_/ ])", re.IGNORECASE)
_KNOWN = {"tiny": 2e5, "smollm2_gguf": 135e6}
OBS_TOKENS = 200
"""Assumed observation tokens per turn (top-3 passages or interpreter output) for the RL training context."""


def model_params(cfg: PipelineConfig) -> float | None:
    """Parameter count from the model's name (``Llama-3.2-3B-Instruct`` -> 3e9), None when it says nothing."""
    if cfg.model.source in _KNOWN:
        return _KNOWN[cfg.model.source]
    m = _SIZE.search(cfg.model.name_or_path or "")
    if m is None:
        return None
    return float(m.group(1)) * (1e9 if m.group(2).upper() == "B" else 1e6)


def _turns(cfg: PipelineConfig, max_turns: int | None) -> int:
    limits = [e.max_turns for e in (cfg.envs.search_world, cfg.envs.search_qa, cfg.envs.math)
              if getattr(e, "enabled", True) and hasattr(e, "max_turns")]
    return max_turns or (max(limits) if limits else 4)


def stage_flops(cfg: PipelineConfig, stage: str) -> dict[str, float]:
    """``{"train": FLOPs/N, "gen": FLOPs/N}`` of one execution of ``stage`` (multiply by N)."""
    if stage in ("wm_amt", "fe_sft", "relabel"):
        s = getattr(cfg, stage)
        tokens = s.max_steps * s.batch_size * s.grad_accum * s.scaling.num_workers * s.seq_len
        gen = s.format_check_tasks * _turns(cfg, s.format_check_max_turns) * s.format_check_max_new_tokens
        if stage == "relabel":  # first k episodes from every annotated step of n trajectories (~half the turns left)
            turns = _turns(cfg, s.max_turns)
            gen += s.n_trajectories * turns * s.rollouts_per_step * max(1, turns // 2) * s.max_new_tokens
        return {"train": 6.0 * tokens, "gen": 2.0 * gen}
    if stage == "fc_rl":
        r = cfg.fc_rl
        turns = _turns(cfg, r.max_turns)
        episodes = r.max_steps * r.tasks_per_step * r.group_size
        gen = episodes * turns * r.max_new_tokens
        context = min(r.max_context_tokens, turns * (r.max_new_tokens + OBS_TOKENS))
        held_out = r.n_eval_tasks * turns * r.max_new_tokens * (2 + (r.max_steps // r.eval_every if r.eval_every else 0))
        return {"train": 6.0 * episodes * context * r.ppo_epochs, "gen": 2.0 * (gen + held_out)}
    if stage == "eval":
        e = cfg.eval
        n_sets = max(1, len(benchmark_names(cfg)))
        per_mode = n_sets * _eval_tasks(cfg) * e.samples_per_task * _turns(cfg, e.max_turns) * e.max_new_tokens
        planning = 2 * e.plan_candidates if e.plan_candidates > 1 and e.turn_format == "foresight" else 0
        return {"train": 0.0, "gen": 2.0 * per_mode * (1 + planning)}
    return {"train": 0.0, "gen": 0.0}  # the corpus: the scripted expert on CPUs


def _eval_tasks(cfg: PipelineConfig) -> int:
    """Held-out tasks evaluated per benchmark."""
    return min(cfg.corpus.n_eval_tasks, cfg.eval.max_tasks or cfg.corpus.n_eval_tasks)


def _fingerprint(parts: Sequence[Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def stage_chain(cfg: PipelineConfig, stages: Sequence[str]) -> list[tuple[str, str]]:
    """``[(stage, fingerprint)]`` for a variant's stages: each fingerprint hashes the seed, the corpus's
    config and every config of the stages up to it (a stage that is off passes its input on)."""
    base = [cfg.seed, cfg.envs.model_dump(mode="json"), cfg.corpus.model_dump(mode="json"),
            cfg.model.model_dump(mode="json")]
    chain, out = list(base), []
    for stage in stages:
        section = getattr(cfg, stage, None)
        if stage == "corpus":
            out.append((stage, _fingerprint(base)))
            continue
        if section is not None and getattr(section, "enabled", True) is False:
            continue
        dump = section.model_dump(mode="json") if section is not None else {}
        if isinstance(dump, dict):
            dump.pop("scaling", None)  # speed, not results
        chain.append([stage, dump])
        out.append((stage, _fingerprint(chain)))
    return out


@dataclass
class AblationPlan:
    rows: list[dict[str, Any]]
    """Per variant: name, paper row, changes, stages."""
    seeds: list[int]
    executions: dict[str, int]
    """Stage -> executions after sharing, all rows and seeds."""
    without_sharing: dict[str, int]
    """Stage -> executions if every row ran alone."""
    gpu_hours: dict[str, float] = field(default_factory=dict)
    """Stage -> estimated GPU hours of its executions (empty when N is unknown)."""
    params: float | None = None
    assumptions: str = ""
    cells: dict[str, int] = field(default_factory=dict)
    """Benchmark -> (seed, task) cells each row is scored on: seeds x held-out tasks."""
    level: float = 0.95
    lanes: int = 1
    """(row, seed) pipelines in flight at once."""


def ablation_plan(cfg: PipelineConfig, table: AblationConfig, seeds: Sequence[int] | None = None,
                  params: float | None = None, peak_tflops: float = 989.0, train_mfu: float = 0.35,
                  gen_mfu: float = 0.10) -> AblationPlan:
    """The plan of ``foresight ablate``: every (row, seed) chain, shared stages counted once, GPU hours."""
    seeds = list(seeds if seeds is not None else table.seeds)
    n = params or model_params(cfg)
    unique: dict[str, dict[str, float]] = {}  # fingerprint -> its stage and FLOPs per parameter
    stage_of: dict[str, str] = {}
    naive: dict[str, int] = {}
    rows = [{"name": v.name, "paper_row": v.paper_row, "changes": v.changes, "stages": list(v.stages)}
            for v in table.variants]
    for v, _, vcfg in row_configs(cfg, table, seeds):
        for stage, fp in stage_chain(vcfg, v.stages):
            naive[stage] = naive.get(stage, 0) + 1
            if fp not in unique:
                unique[fp], stage_of[fp] = stage_flops(vcfg, stage), stage
    executions: dict[str, int] = {}
    hours: dict[str, float] = {}
    for fp, flops in unique.items():
        stage = stage_of[fp]
        executions[stage] = executions.get(stage, 0) + 1
        if n is not None:
            seconds = n * (flops["train"] / (peak_tflops * 1e12 * train_mfu) + flops["gen"] / (peak_tflops * 1e12 * gen_mfu))
            hours[stage] = hours.get(stage, 0.0) + seconds / 3600
    assumptions = (f"N = {n:.3g} parameters; 6N FLOPs per trained token at {train_mfu:.0%} MFU, 2N per generated "
                   f"token at {gen_mfu:.0%}, of {peak_tflops:g} TFLOP/s per GPU; the corpus runs on CPUs"
                   if n is not None else "N unknown (give --params): no GPU-hour estimate")
    cells = {name: len(seeds) * _eval_tasks(cfg) for name in benchmark_names(cfg)}  # a task: the mean of its samples
    return AblationPlan(rows, seeds, executions, naive, hours, n, assumptions, cells, table.level, table.lanes)


def plan_text(plan: AblationPlan) -> str:
    """The plan as the terminal shows it."""
    at_once = f", {plan.lanes} at a time" if plan.lanes > 1 else ""
    lines = [f"{len(plan.rows)} rows x {len(plan.seeds)} seeds {plan.seeds}{at_once}", ""]
    width = max(len(r["name"]) for r in plan.rows)
    for r in plan.rows:
        lines.append(f"  {r['name']:<{width}}  {' > '.join(r['stages'])}")
        if r["changes"]:
            lines.append(f"  {'':<{width}}  changes: {r['changes']}")
    lines += ["", "stage executions (shared stages run once):"]
    for stage in STAGES:
        if stage in plan.without_sharing:
            gpu = f"  ~{plan.gpu_hours[stage]:.{1 if plan.gpu_hours[stage] >= 1 else 3}f} GPU h" if stage in plan.gpu_hours else ""
            lines.append(f"  {stage:<7} {plan.executions.get(stage, 0):>3} of {plan.without_sharing[stage]:>3}{gpu}")
    if plan.gpu_hours:
        lines.append(f"  total   ~{sum(plan.gpu_hours.values()):.{1 if sum(plan.gpu_hours.values()) >= 1 else 3}f} GPU h")
    if plan.cells:
        lines += ["", f"resolution of a paired difference against the reference row ({plan.level:.0%} interval without 0):"]
        for name, n in plan.cells.items():
            d = cells_to_resolve(n, plan.level)
            lines.append(f"  {name}: {n} (seed, task) cells per row; at best >= {d} cells won, none lost (>= {d / n:.3f} "
                         f"in score); rows that disagree on 20% of cells both ways: about +-{1.96 * (0.2 / n) ** 0.5:.3f}")
    lines += ["", f"assumptions: {plan.assumptions}"]
    return "\n".join(lines)
