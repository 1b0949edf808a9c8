"""Stage keys carry the code version: editing what a stage runs retrains it, and only it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from foresight_core import provenance
from foresight_core.config import load_config
from tasks import evaluate, rl, train
from tasks.stage import StageInput, StageSpec, stage_key

# the core modules each stage runs, as the adapters declare them in their specs
STAGE_ENTRY = {"corpus": ("foresight_core.corpus",), "wm_amt": train.ENTRIES, "fe_sft": train.ENTRIES,
               "fc_rl": rl.ENTRIES, "eval": evaluate.ENTRIES}


@pytest.fixture
def copy_roots(tmp_path: Path) -> dict[str, Path]:
    """A temporary copy of the science and its adapters, to edit."""
    real = provenance.package_roots()
    roots = {}
    for name, src in real.items():
        dst = tmp_path / name
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        roots[name] = dst
    return roots


def versions(roots: dict[str, Path]) -> dict[str, str]:
    return {stage: provenance.source_hash(entries, roots) for stage, entries in STAGE_ENTRY.items()}


def edit(path: Path) -> None:
    path.write_text(path.read_text() + "\n_EDITED = True\n")


def test_the_copy_hashes_like_the_install(copy_roots) -> None:
    assert versions(copy_roots) == versions(provenance.package_roots())


def test_editing_the_sft_loop_changes_the_supervised_stages_only_where_they_reach_it(copy_roots) -> None:
    before = versions(copy_roots)
    edit(copy_roots["foresight_core"] / "sft.py")
    after = versions(copy_roots)
    assert after["wm_amt"] != before["wm_amt"] and after["fe_sft"] != before["fe_sft"]
    assert after["corpus"] == before["corpus"]  # the corpus never runs the SFT loop: reused


def test_editing_an_environment_changes_every_stage_that_plays_it(copy_roots) -> None:
    before = versions(copy_roots)
    edit(copy_roots["foresight_core"] / "envs" / "math.py")  # imported inside a function of envs/__init__
    after = versions(copy_roots)
    assert all(after[s] != before[s] for s in STAGE_ENTRY)


def test_config_sources_and_adapters_do_not_count(copy_roots) -> None:
    """A config's values are in every key already; the adapters move references."""
    before = versions(copy_roots)
    edit(copy_roots["foresight_core"] / "config" / "train.py")
    edit(copy_roots["tasks"] / "train.py")
    assert versions(copy_roots) == before


def test_the_stage_key_follows_the_code(copy_roots, monkeypatch) -> None:
    """The runner's ``stage_key``: same code, same key (the finished run is reused); edited code, new key
    (no finished run matches, so the stage trains again)."""
    cfg = load_config("tiny", env={})

    def keys() -> dict[str, str]:
        provenance.code_version.cache_clear()
        return {s: stage_key(StageSpec(stage=s, cfg=cfg, entries=STAGE_ENTRY[s], launch=None,  # type: ignore[arg-type]
                                       inputs=[StageInput("data", "file:///data.jsonl", "sha", context=s)]))
                for s in ("wm_amt", "fe_sft", "fc_rl", "eval")}

    monkeypatch.setattr(provenance, "package_roots", lambda: copy_roots)
    try:
        before = keys()
        assert keys() == before
        edit(copy_roots["foresight_core"] / "grpo.py")  # FC-RL's rewards and loss: FC-RL alone retrains
        after = keys()
        assert after["fc_rl"] != before["fc_rl"]
        assert all(after[s] == before[s] for s in ("wm_amt", "fe_sft", "eval"))
        edit(copy_roots["foresight_core"] / "scoring.py")  # scoring is shared: every stage that plays episodes
        after = keys()
        assert all(after[s] != before[s] for s in before)
        edit(copy_roots["foresight_core"] / "fsdp.py")  # the supervised stages' sharding: FC-RL does not shard
        again = keys()
        assert again["wm_amt"] != after["wm_amt"]
    finally:
        provenance.code_version.cache_clear()


def test_relative_and_function_level_imports_are_followed(tmp_path: Path) -> None:
    pkg = tmp_path / "foresight_core"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n    return b\n")
    (pkg / "sub" / "b.py").write_text("import foresight_core.c\n")
    (pkg / "c.py").write_text("")
    (pkg / "d.py").write_text("")  # never imported
    reached = provenance.reached_modules(["foresight_core.a"], {"foresight_core": pkg})
    assert set(reached) == {"foresight_core", "foresight_core.a", "foresight_core.sub", "foresight_core.sub.b",
                            "foresight_core.c"}
    h = provenance.source_hash(["foresight_core.a"], {"foresight_core": pkg})
    (pkg / "d.py").write_text("x = 1\n")
    assert provenance.source_hash(["foresight_core.a"], {"foresight_core": pkg}) == h
    (pkg / "c.py").write_text("x = 1\n")
    assert provenance.source_hash(["foresight_core.a"], {"foresight_core": pkg}) != h
