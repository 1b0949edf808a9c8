"""Any model on benchmark files given at eval time: no corpus build, no training; bad input named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from foresight_core.config.envs import parse_benchmark
from foresight_core.envs.loaders import LoaderError
from flows import cli


def test_parse_benchmark_specs():
    src = parse_benchmark("nq=data/nq.jsonl,corpus=wiki.jsonl,limit=5")
    assert (src.name, src.path, src.corpus_path, src.kind, src.limit) == ("nq", "data/nq.jsonl", "wiki.jsonl",
                                                                          "search_qa", 5)
    assert parse_benchmark("aime=s3://b/aime.parquet,kind=math").kind == "math"
    for bad, match in (("nq", "expected NAME=PATH"), ("nq=x.jsonl,corpse=w", "unknown option 'corpse=w'"),
                       ("nq=x.jsonl,kind=chess", "kind"), ("nq=x.jsonl,limit=0", "limit")):
        with pytest.raises(ValueError, match=match):
            parse_benchmark(bad)


def test_the_cli_refuses_a_bad_spec_before_any_work(capsys):
    assert cli.main(["eval", "--preset", "tiny", "--benchmark", "nq"]) == 2
    assert "expected NAME=PATH" in capsys.readouterr().err
    assert cli.main(["eval", "--preset", "tiny", "--model", "base"]) == 2
    assert "needs at least one --benchmark" in capsys.readouterr().err


def _files(root: Path) -> tuple[Path, Path]:
    passages = root / "wiki.jsonl"
    passages.write_text("\n".join(json.dumps({"id": str(i), "contents": f'"Town {i}"\nTown {i} lies on river R{i}.'})
                                  for i in range(6)) + "\n")
    questions = root / "nq.jsonl"
    questions.write_text("\n".join(json.dumps({"question": f"On which river does Town {i} lie?",
                                               "golden_answers": [f"R{i}"]}) for i in range(3)) + "\n")
    return questions, passages


@pytest.mark.slow
def test_a_model_is_scored_on_a_search_r1_file_with_nothing_trained(prefect_server, ray_local, tiny_cfg,
                                                                      tmp_path: Path):
    from mlflow import MlflowClient

    from flows.pipeline import evaluate_model

    questions, passages = _files(tmp_path)
    refs = evaluate_model(model="base", benchmarks=[f"nq={questions},corpus={passages}"], cfg=tiny_cfg)
    client = MlflowClient(tiny_cfg.infra.tracking.tracking_uri)
    run = client.get_run(refs["eval.run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["nq/direct/episodes"] >= 1
    assert run.data.tags["foresight.input.init_model"] == "base:tiny"  # linked to the model it scored
    stages = {r.data.tags.get("foresight.stage") for r in client.search_runs([run.info.experiment_id])}
    assert stages == {"pipeline", "eval"}  # no corpus, no training
    # the same model and files again: the evaluation is reused
    assert evaluate_model(model="base", benchmarks=[f"nq={questions},corpus={passages}"],
                          cfg=tiny_cfg)["eval.reused"] == "true"
    # a malformed row: the file, the row and the field, before any model is loaded
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a?", "golden_answers": ["x"]}\n{"question": "b?"}\n')
    with pytest.raises(LoaderError, match=r"bad.jsonl:2: missing 'golden_answers'"):
        evaluate_model(model="base", benchmarks=[f"bad={bad},corpus={passages}"], cfg=tiny_cfg)
