"""The layer boundary: ``foresight_core`` is the science and imports no orchestration library.

Every module of the package is imported (a subprocess, so that nothing the test session loaded counts),
function-level imports aside: those run only when a GPU engine or an adapter asks for them.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import foresight_core

ORCHESTRATION = ("prefect", "ray", "mlflow")


def core_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(foresight_core.__path__, prefix="foresight_core."))


def test_the_walk_sees_every_layer_of_the_core() -> None:
    mods = core_modules()
    for expected in ("foresight_core.sft", "foresight_core.fc_rl", "foresight_core.corpus",
                     "foresight_core.envs.search_world", "foresight_core.config.pipeline", "foresight_core.vllm_engine"):
        assert expected in mods


def test_importing_all_of_the_core_loads_no_orchestration_library() -> None:
    probe = (f"import importlib, sys\n"
             f"for m in {core_modules()!r}:\n"
             f"    importlib.import_module(m)\n"
             f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(ORCHESTRATION)!r}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
