"""Packaging: a wheel built from the repo carries the presets and ablation tables, and loads them by name
from any working directory (no checkout next to it)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_loads_presets_from_anywhere(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("foresight-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for preset in ("tiny", "laptop", "paper"):
        assert f"foresight_core/config/presets/{preset}.yaml" in names
    assert "foresight_core/config/ablations/paper_table.yaml" in names
    sources = {str(f.relative_to(ROOT)) for top in ("foresight_core", "tasks", "flows") for f in (ROOT / top).rglob("*.py")}
    assert sources - set(names) == set()  # every module of the three layers ships, under its folder's name
    # a pure-Python wheel installs by unpacking: put it first on the path, run from an unrelated directory
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import foresight_core, flows.cli as cli; "
             "print(foresight_core.__file__); raise SystemExit(cli.main(['config', 'show', '--preset', 'laptop']))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert run.stdout.splitlines()[0].startswith(str(site))  # the wheel's code, not the checkout's
    assert "loss_on: assistant" in run.stdout and "format_check_tasks: 6" in run.stdout
