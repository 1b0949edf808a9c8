"""benchmarks/gpu_check.py on a machine without a GPU: the dry run plans every check and names what is
missing; every foresight name the checks import exists; the configs they build validate."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_dry_run_plans_every_check_and_says_what_is_missing():
    out = run("--dry-run")
    assert out.returncode == 0, out.stderr
    for check in ("rollouts", "logprob_gap", "fc_rl_step", "fsdp_sft", "sft_mfu"):
        assert f"  {check}" in out.stdout
    import torch
    if not torch.cuda.is_available():
        assert "cannot run here: no CUDA device" in out.stdout
        real = run()  # without --dry-run on a CPU machine: a clear refusal, nothing run
        assert real.returncode == 2 and "no CUDA device: nothing run" in real.stderr
    bad = run("--dry-run", "--only", "rollouts,warp_drive")
    assert bad.returncode == 2 and "unknown checks ['warp_drive']" in bad.stderr


def test_every_foresight_name_the_checks_import_exists():
    tree = ast.parse(SCRIPT.read_text())
    names = [(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             and node.module and node.module.startswith("foresight_core") for alias in node.names]
    assert len(names) > 10
    for module, name in names:
        assert hasattr(importlib.import_module(module), name), f"{module}.{name}"


def test_the_configs_the_checks_build_validate():
    import importlib.util

    from foresight_core.config import load_config

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    args = gpu_check.parser().parse_args([])
    rl = gpu_check.fc_rl_config(args)
    assert rl.engine == "vllm" and rl.max_steps == 1
    cfg = load_config("laptop", overrides=gpu_check.fsdp_overrides(args, 2), env={})
    assert cfg.wm_amt.scaling.strategy == "fsdp" and cfg.wm_amt.scaling.num_workers == 2
