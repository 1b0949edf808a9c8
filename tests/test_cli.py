"""The ``foresight`` command: instant help, config show, presets, deployments, and bad input that
fails with exit code 2 and a message naming the field, before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import cli

HEAVY = ("torch", "ray", "prefect", "mlflow", "transformers")


def _foresight(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_help_is_instant_and_imports_nothing_heavy() -> None:
    t0 = time.perf_counter()
    out = _foresight("--help")
    help_s = time.perf_counter() - t0
    assert out.returncode == 0
    for command in ("corpus", "wm-amt", "fe-sft", "fc-rl", "eval", "run", "config", "presets", "serve"):
        assert command in out.stdout
    # what makes it instant: parsing and config validation load none of the heavy libraries
    probe = ("import sys; from flows import cli; cli.build_parser().parse_args(['corpus']); "
             "from foresight_core.config import load_config; load_config('paper', env={}); "
             f"print([m for m in sys.modules if m.split('.')[0] in {HEAVY!r}])")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
    assert help_s < 10, f"foresight --help took {help_s:.1f}s"  # ~0.5 s on an idle 2-core machine


def test_config_show_resolves_and_masks(capsys, monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "cli-secret-value")
    monkeypatch.setenv("RAY_ADDRESS", "ray://127.0.0.1:10001")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://mlflow:db-pass-9@127.0.0.1/mlflow")
    assert cli.main(["config", "show", "--preset", "tiny", "--set", "corpus.mc_rollouts=7",
                     "--set", "envs.math.enabled=false"]) == 0
    out = capsys.readouterr().out
    assert "mc_rollouts: 7" in out and "address: ray://127.0.0.1:10001" in out
    assert "cli-secret-value" not in out and "secret: '**********'" in out
    assert "db-pass-9" not in out and "postgresql://mlflow:**********@127.0.0.1/mlflow" in out
    assert "name: tiny" in out


def test_config_file_round_trip(tmp_path: Path, capsys) -> None:
    assert cli.main(["config", "show", "--preset", "laptop"]) == 0
    path = tmp_path / "mine.yaml"
    path.write_text(capsys.readouterr().out)
    assert cli.main(["config", "show", "--config", str(path), "--set", "seed=3"]) == 0
    assert "seed: 3" in capsys.readouterr().out


def test_bad_set_exits_2_naming_the_field_before_any_work(tmp_path: Path) -> None:
    work = tmp_path / "work"
    out = _foresight("corpus", "--preset", "tiny", "--set", f"work_dir={work}", "--set", "corpus.mc_rollouts=0")
    assert out.returncode == 2
    assert "corpus.mc_rollouts" in out.stderr and "greater than or equal to 1" in out.stderr
    assert "Traceback" not in out.stderr and not work.exists()


@pytest.mark.parametrize("argv, words", [
    (["run", "--preset", "huge"], "unknown preset 'huge'"),
    (["run", "--set", "corpus.nope=1"], "corpus.nope"),
    (["run", "--set", "corpus"], "must look like key.path=value"),
    (["fc-rl", "--config", "/nonexistent.yaml"], "does not exist"),
])
def test_bad_config_exits_2(argv: list[str], words: str, capsys) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("foresight: error: ") and words in err


def test_usage_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["corpus", "--preset", "tiny", "--config", "x.yaml"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2


def test_presets(capsys) -> None:
    assert cli.main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == ["laptop", "paper", "tiny"]
    assert "Unit-test scale" in lines[2]


def test_stage_commands_run_the_pipeline_up_to_their_stage() -> None:
    cfg = cli.load_config("tiny", env={})
    assert cli.stages_for("fe-sft", cfg) == ["corpus", "wm_amt", "fe_sft"]
    assert cli.stages_for("corpus", cfg) == ["corpus"]
    assert cli.stages_for("run", cfg.model_copy(update={"stages": ["corpus", "eval"]})) == ["corpus", "eval"]
    # relabel (stage 2b) is on demand: in a stage command's chain only when the config's stages have it
    assert cli.stages_for("fc-rl", cfg) == ["corpus", "wm_amt", "fe_sft", "fc_rl"]
    assert cli.stages_for("relabel", cfg) == ["corpus", "wm_amt", "fe_sft", "relabel"]
    with_relabel = cli.load_config("tiny", overrides=["stages=[corpus,wm_amt,fe_sft,relabel,fc_rl,eval]"], env={})
    assert cli.stages_for("eval", with_relabel) == ["corpus", "wm_amt", "fe_sft", "relabel", "fc_rl", "eval"]
    for bad, why in (("[corpus,fc_rl,fe_sft]", "pipeline order"), ("[corpus,eval,eval]", "pipeline order"),
                     ("[corpus,wm_amt,relabel,fc_rl]", "relabel needs fe_sft")):
        with pytest.raises(cli.ConfigError, match=why):
            cli.load_config("tiny", overrides=[f"stages={bad}"], env={})


def test_every_stage_has_its_prefect_task_in_the_flow() -> None:
    """The DAG lives in flows/pipeline.py: every stage a config may name runs as a task defined there
    (this replaces the check for a stage module missing from the install, which the flow no longer has)."""
    import typing

    from flows import pipeline
    from foresight_core.config import PipelineConfig

    stage_names = set(typing.get_args(typing.get_args(PipelineConfig.model_fields["stages"].annotation)[0]))
    assert stage_names == set(pipeline.STAGE_TASKS)
    assert all(t.fn.__module__ == "flows.pipeline" for t in pipeline.STAGE_TASKS.values())


def test_serve_dry_run(capsys) -> None:
    assert cli.main(["serve", "--preset", "tiny", "--cron", "15 4 * * *", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "deployment retrain/tiny-retrain" in out and "15 4 * * *" in out
    assert "deployment pipeline/tiny-pipeline" in out and "deployment build_corpus/tiny-corpus" in out


def test_serve_without_a_prefect_server_refuses(capsys, monkeypatch) -> None:
    """Prefect's ephemeral server runs no scheduler: serving there would never fire the schedule."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert cli.main(["serve", "--preset", "tiny"]) == 2
    assert "needs a Prefect server" in capsys.readouterr().err


def test_summary_table_from_refs_and_metrics() -> None:
    refs = {"pipeline.run_id": "p", "corpus.run_id": "c", "corpus.reused": "true", "corpus.wall_s": "3.2",
            "wm_amt.run_id": "w", "wm_amt.reused": "false", "wm_amt.wall_s": "61.5",
            "wm_amt.model_uri": "runs:/w/model",
            "fe_sft.run_id": "f", "fe_sft.reused": "true", "fe_sft.wall_s": "1.0", "fe_sft.model_uri": "runs:/f/model",
            "fc_rl.run_id": "r", "fc_rl.reused": "false", "fc_rl.wall_s": "125", "fc_rl.model_uri": "runs:/r/model",
            "eval.run_id": "e", "eval.reused": "false", "eval.wall_s": "40"}
    metrics = {
        "corpus": {"corpus.trajectories": 12, "corpus.success_rate": 0.5, "corpus.annotated_steps": 30},
        "wm_amt": {"eval_loss": 2.3456, "eval_wm_loss": 3.1, "loss": 2.0},
        "fe_sft": {"eval_loss": 1.2, "check/format_rate": 0.95, "check/success_rate": 0.1, "check/ece": 0.21,
                   "check/grounding_rate": 0.4},
        "fc_rl": {"eval_before/success_rate": 0.1, "eval_after/success_rate": 0.2, "eval_before/format_rate": 0.9,
                  "eval_after/format_rate": 1.0, "eval_before/calib/ece": 0.3, "eval_after/calib/ece": 0.2,
                  "eval_before/grounding_rate": 0.3, "eval_after/grounding_rate": 0.35},
        # search: ECE 0.31; maths: no confidence stated, so no ECE -> the mean is search's alone
        "eval": {"search_world/direct/score": 0.25, "search_world/direct/format_rate": 0.5,
                 "search_world/direct/ece": 0.31, "search_world/direct/grounding_rate": 0.12,
                 "gsm_symbolic/direct/score": 0.0, "gsm_symbolic/direct/format_rate": 1.0, "avg/direct/score": 0.125},
    }
    text = cli.summary_text("tiny", refs, metrics, "sqlite:////w/mlflow.db", "/w/mlartifacts/1/r/artifacts/model")
    # 3.2 + 61.5 + 1 + 125 + 40 = 230.7 s -> 3:51
    assert text.splitlines() == [
        "foresight tiny: 5 stages in 3:51",
        "  stage   wall  run      result",
        "  corpus  0:03  reused   12 trajectories, success 50%, 30 annotated steps",
        "  wm_amt  1:02  trained  held-out loss 2.346 | world-model loss 3.100",
        "  fe_sft  0:01  reused   held-out loss 1.200 | world-model loss - | check: format 95%, success 10%, "
        "ECE 0.210, grounding 40%",
        "  fc_rl   2:05  trained  success 10% -> 20% | format 90% -> 100% | ECE 0.300 -> 0.200 | grounding 30% -> 35%",
        "  eval    0:40  ran      gsm_symbolic/direct: score 0.000 | format 100% | ECE - | grounding -",
        "                         search_world/direct: score 0.250 | format 50% | ECE 0.310 | grounding 12%",
        "                         mean/direct: score 0.125 | format 75% | ECE 0.310 | grounding 12%",
        "final model: runs:/r/model",
        "  local folder: /w/mlartifacts/1/r/artifacts/model",
        "MLflow: mlflow ui --backend-store-uri sqlite:////w/mlflow.db",
    ]
    # a server: its URL; a corpus-only run: no model; FC-RL without a held-out set: its last step
    text = cli.summary_text("x", {"corpus.run_id": "c", "corpus.reused": "false", "fc_rl.run_id": "r",
                                  "fc_rl.model_uri": "runs:/r/model"},
                            {"fc_rl": {"success_rate": 0.5}}, "http://mlflow:5000")
    assert "  corpus  -     built    0 trajectories, success -, 0 annotated steps" in text
    assert "last step: success 50% | format - | ECE - | grounding -" in text
    assert text.endswith("final model: runs:/r/model\nMLflow: http://mlflow:5000\n")
    # a registered model: its version and whether it took the champion alias, and why
    text = cli.summary_text("x", {"fc_rl.run_id": "r", "fc_rl.model_uri": "runs:/r/model", "registry.version": "3",
                                  "registry.model_uri": "models:/foresight-x/3", "registry.promoted": "false",
                                  "registry.reason": "does not beat the champion by more than 0: -0.100"},
                            {}, "http://mlflow:5000")
    assert ("registered: models:/foresight-x/3, not promoted: does not beat the champion by more than 0: -0.100"
            in text.splitlines())


@pytest.mark.slow
def test_foresight_corpus_tiny_end_to_end(tmp_path: Path) -> None:
    """The real command on the embedded default: ephemeral Prefect with its home under the work
    dir, a local Ray, sqlite MLflow. (Reuse on a second run is tested in test_flows.py.)"""
    work = tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_HOME"}  # let the CLI place it
    args = [sys.executable, "-m", "flows.cli", "corpus", "--preset", "tiny", "--set", f"work_dir={work}"]
    t0 = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "  corpus.reused        false" in lines and f"MLflow: mlflow ui --backend-store-uri sqlite:///{work}/mlflow.db" in lines
    # the summary table: one row, the corpus built, with its wall time and statistics
    assert "foresight tiny: 1 stage in " in out.stdout
    assert any(ln.startswith("  corpus  ") and " built " in ln and "trajectories, success" in ln for ln in lines)
    (manifest,) = work.glob("corpus/*/manifest.json")
    data = json.loads(manifest.read_text())
    assert data["successes"] >= 1 and data["failures"] >= 1 and data["annotated_steps"] >= 1
    assert (work / "prefect").is_dir() and (work / "mlflow.db").is_file()
    print(f"\nforesight corpus --preset tiny: {time.perf_counter() - t0:.1f}s")


def test_ablate_plan_paper_preset_on_a_cpu() -> None:
    out = _foresight("ablate", "--preset", "paper", "--plan")
    assert out.returncode == 0, out.stderr
    assert "15 rows x 3 seeds [0, 1, 2], 2 at a time" in out.stdout and "state_sft_rl" in out.stdout
    assert "GPU h" in out.stdout and "stage executions (shared stages run once):" in out.stdout
    bad = _foresight("ablate", "--preset", "paper", "--seeds", "0,zero")
    assert bad.returncode == 2 and "--seeds: expected comma-separated integers" in bad.stderr
