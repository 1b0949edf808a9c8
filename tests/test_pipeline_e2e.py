"""The whole method on the tiny preset through Prefect, Ray and MLflow: corpus -> WM-AMT -> FE-SFT ->
FC-RL -> eval, every stage a nested MLflow run linked by references; then a two-row ablation table
that reuses the stages it shares with that run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_tiny_pipeline_end_to_end_then_ablation(prefect_server, ray_local, tiny_cfg, capsys) -> None:
    import mlflow

    from foresight_core.config.ablation import load_ablation
    from flows.pipeline import ablation, pipeline

    refs = pipeline(cfg=tiny_cfg)
    for stage in ("corpus", "wm_amt", "fe_sft", "fc_rl", "eval"):
        assert refs[f"{stage}.run_id"], stage
    client = mlflow.MlflowClient(tiny_cfg.infra.tracking.tracking_uri)
    parent = refs["pipeline.run_id"]
    runs = {s: client.get_run(refs[f"{s}.run_id"]) for s in ("corpus", "wm_amt", "fe_sft", "fc_rl", "eval")}
    for stage, run in runs.items():
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent, stage
    for stage in ("wm_amt", "fe_sft", "fc_rl", "eval"):  # one worker each: every CPU of ray_local (2)
        assert runs[stage].data.tags["foresight.worker.torch_threads"] == "2", stage
        assert runs[stage].data.metrics["compute_s"] > 0, stage
    # each stage names its input by reference: FE-SFT starts from WM-AMT's model, FC-RL from FE-SFT's,
    # eval plays FC-RL's model
    assert runs["fe_sft"].data.tags["foresight.input.init_model"] == refs["wm_amt.model_uri"]
    assert runs["fc_rl"].data.tags["foresight.input.init_model"] == refs["fe_sft.model_uri"]
    assert runs["eval"].data.tags["foresight.input.init_model"] == refs["fc_rl.model_uri"]
    # FE-SFT's format-capability check (tiny preset: 2 held-out tasks) is in its run and in the refs
    fe = runs["fe_sft"].data.metrics
    assert fe["check/n_tasks"] == 2 and 0.0 <= fe["check/format_rate"] <= 1.0
    assert {"check/search_world/format_rate", "check/gsm_symbolic/format_rate"} <= set(fe)
    assert float(refs["fe_sft.check/format_rate"]) == pytest.approx(fe["check/format_rate"], abs=1e-3)
    assert not any(k.startswith("check/") for k in runs["wm_amt"].data.metrics)
    # the evaluation report covers both held-out sets in both modes
    m = runs["eval"].data.metrics
    for bench in ("search_world", "gsm_symbolic"):
        for mode in ("direct", "planning"):
            assert 0.0 <= m[f"{bench}/{mode}/score"] <= 1.0 and m[f"{bench}/{mode}/episodes"] >= 1
    report_dir = client.download_artifacts(runs["eval"].info.run_id, "eval_report.json")
    assert set(json.loads(Path(report_dir).read_text())) == {"search_world", "gsm_symbolic"}
    # the evaluated model is a registered version with its lineage; the first one is the champion
    assert refs["registry.version"] == "1" and refs["registry.promoted"] == "true"
    version = client.get_model_version("foresight-tiny", "1")
    assert version.run_id == runs["fc_rl"].info.run_id and version.tags["foresight.eval.run_id"] == refs["eval.run_id"]
    assert version.tags["foresight.corpus.key"] == refs["corpus.key"] and version.tags["prefect.flow_run_id"]
    assert str(client.get_model_version_by_alias("foresight-tiny", "champion").version) == "1"
    # the version is the servable agent, beside the weights in the FC-RL run (served in test_serving_mlflow.py)
    assert version.source.endswith("/agent")
    agent_files = {f.path for f in client.list_artifacts(version.run_id, "agent")}
    assert "agent/MLmodel" in agent_files
    # the end-of-run summary `foresight run` prints: one row per stage with its wall time, the final model
    from flows import cli
    from tasks.progress import clock

    assert {f"{s}.wall_s" for s in runs} <= set(client.get_run(parent).data.metrics)
    capsys.readouterr()
    cli._summary(tiny_cfg, refs)
    lines = capsys.readouterr().out.splitlines()
    assert "foresight tiny: 5 stages in " in "\n".join(lines)
    for stage in runs:
        assert any(ln.startswith(f"  {stage}  ") and ln.split()[1] == clock(float(refs[f"{stage}.wall_s"]))
                   for ln in lines), stage
    assert f"final model: {refs['fc_rl.model_uri']}" in lines

    # a tiny method table: three rows at two seeds; seed 0's full row reuses every stage of the run above
    table = load_ablation("paper_table")
    rows_kept = ("full", "full_omega0", "fe_sft_only")
    # without test-time planning (the full row's own included): three decoding modes would triple every
    # evaluation (CI time)
    no_planning = [v.model_copy(update={"overrides": {k: x for k, x in v.overrides.items() if k != "eval.plan_candidates"}})
                   for v in table.variants if v.name in rows_kept]
    # the table's own override turns FE-SFT's format check off; the check only measures, so it is not in FE-SFT's
    # key, and the rows still reuse the run's FE-SFT (which made its check)
    assert table.overrides == {"fe_sft.format_check_tasks": 0}
    table = table.model_copy(update={"variants": no_planning, "seeds": [0, 1], "n_boot": 200})
    ablation_cfg = tiny_cfg.model_copy(update={"eval": tiny_cfg.eval.model_copy(update={"plan_candidates": 0})})
    out = ablation(ablation_cfg, table)
    rows = {r["variant"]: r for r in out["rows"]}
    assert set(rows) == set(rows_kept) and all(r["seeds"] == [0, 1] for r in rows.values())
    for name, row in rows.items():
        for bench, b in row["benchmarks"].items():
            assert b["score"]["lo"] <= b["score"]["mean"] <= b["score"]["hi"], (name, bench)
            assert b["score"]["n"] == 2 * tiny_cfg.eval.max_tasks  # (seed, task) cells: 2 seeds x the tasks
            assert ("vs_reference" in b) == (name != "full")
    assert set(rows["full"]["benchmarks"]) == {"search_world", "gsm_symbolic"}
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{out['ablation.run_id']}'")
    assert sorted((r.data.tags["foresight.variant"], r.data.tags["foresight.seed"]) for r in children) == \
        sorted((v, s) for v in rows_kept for s in ("0", "1"))
    full = next(r for r in children if r.data.tags["foresight.variant"] == "full" and r.data.tags["foresight.seed"] == "0")
    full_refs = json.loads(Path(client.download_artifacts(full.info.run_id, "refs.json")).read_text())
    assert full_refs["fc_rl.reused"] == "true" and full_refs["fc_rl.run_id"] == refs["fc_rl.run_id"]
    assert full_refs["eval.reused"] == "false"  # the evaluation without planning is another stage
    omega0 = next(r for r in children if r.data.tags["foresight.variant"] == "full_omega0"
                  and r.data.tags["foresight.seed"] == "0")
    omega0_refs = json.loads(Path(client.download_artifacts(omega0.info.run_id, "refs.json")).read_text())
    assert omega0_refs["fe_sft.run_id"] == refs["fe_sft.run_id"]  # shared: only FC-RL and eval differ
    assert omega0_refs["fe_sft.reused"] == "true"  # though the table turns the check off: it is not in the key
    fe_only = next(r for r in children if r.data.tags["foresight.variant"] == "fe_sft_only"
                   and r.data.tags["foresight.seed"] == "1")
    fe_only_refs = json.loads(Path(client.download_artifacts(fe_only.info.run_id, "refs.json")).read_text())
    assert fe_only_refs["fe_sft.reused"] == "false"  # trained by the table (from the base model) without the check
    assert not any(k.startswith("check/") for k in client.get_run(fe_only_refs["fe_sft.run_id"]).data.metrics)
    # two rows at a time (the table's lanes), each stage on its share of ray_local's 2 CPUs: one thread
    assert table.lanes == 2
    spans = sorted((r.info.start_time, r.info.end_time) for r in children)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans  # rows overlapped
    for stage in ("fc_rl", "eval"):  # trained and evaluated by the table itself, not reused from the run
        assert client.get_run(omega0_refs[f"{stage}.run_id"]).data.tags["foresight.worker.torch_threads"] == "1"
    table_md = Path(client.download_artifacts(out["ablation.run_id"], "ablation_table.md")).read_text()
    assert "### search_world" in table_md and "| full |" in table_md and "| fe_sft_only |" in table_md
    logged = json.loads(Path(client.download_artifacts(out["ablation.run_id"], "ablation_table.json")).read_text())
    assert logged["reference"] == "full" and [r["variant"] for r in logged["rows"]] == [v.name for v in table.variants]
    # calibration pooled over each row's seeds, and its plots per row on the ablation run
    assert all(b["n_q"] is not None for r in rows.values() for b in r["benchmarks"].values())  # pooled, not means
    assert "eval_calibration.json" in {a.path for a in client.list_artifacts(refs["eval.run_id"])}
    plotted = {a.path for a in client.list_artifacts(out["ablation.run_id"], "plots")}
    assert plotted <= {f"plots/{name}" for name in rows_kept}
    # ablation variants are evidence, not candidates: nothing more in the registry
    assert len(client.search_model_versions("name = 'foresight-tiny'")) == 1
