"""The model registry on a real MLflow store (sqlite): the first model becomes champion, a better one
takes the alias, a worse one is registered with the reason it was not promoted; registering is idempotent."""

from __future__ import annotations

import pytest

from foresight_core.config import load_config
from tasks.evaluate import TASK_SCORES
from tasks.registry import PROMOTED_TAG, REASON_TAG, RegistryError, register_and_promote
from tasks.tracking import mlflow_client, start_run


@pytest.fixture
def cfg(tmp_path):
    return load_config("tiny", overrides=[f"work_dir={tmp_path / 'work'}", "registry.promote_margin=0.1"], env={})


def trained_and_evaluated(cfg, tmp_path, scores: dict[str, float], name: str) -> tuple[str, str]:
    """A stage run with a model folder, and an eval run with per-task scores: (model_uri, eval_run_id)."""
    model_dir = tmp_path / name
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    train = start_run(cfg, f"fc_rl-{name}", "fc_rl")
    train.log_artifacts(str(model_dir), "model")
    train.finish()
    ev = start_run(cfg, f"eval-{name}", "eval")
    ev.log_dict({"direct": scores}, TASK_SCORES)
    ev.finish()
    return f"runs:/{train.run_id}/model", ev.run_id


def test_first_better_worse(cfg, tmp_path):
    client = mlflow_client(cfg)
    lineage = {"foresight.corpus.key": "abc", "prefect.flow_run_id": "f-1"}

    first = register_and_promote(cfg, *trained_and_evaluated(cfg, tmp_path, {"sw/a": 0.0, "sw/b": 0.0}, "m1"), lineage)
    assert first["registry.promoted"] == "true" and first["registry.version"] == "1"
    assert "first model" in first["registry.reason"]
    assert str(client.get_model_version_by_alias("foresight-tiny", "champion").version) == "1"
    v1 = client.get_model_version("foresight-tiny", "1")
    assert v1.tags["foresight.corpus.key"] == "abc" and v1.tags["prefect.flow_run_id"] == "f-1"
    assert v1.source.endswith("/agent") and v1.tags[PROMOTED_TAG] == "true"  # the servable agent, beside the weights
    files = {f.path for f in client.list_artifacts(v1.run_id, "agent")}
    assert {"agent/MLmodel", "agent/artifacts"} <= files

    # better by 0.5 on the paired tasks (> margin 0.1): takes the alias
    better = register_and_promote(cfg, *trained_and_evaluated(cfg, tmp_path, {"sw/a": 1.0, "sw/b": 0.0}, "m2"), lineage)
    assert better["registry.promoted"] == "true" and better["registry.version"] == "2"
    assert "beats the champion by +0.500" in better["registry.reason"] and "version 1" in better["registry.reason"]
    assert str(client.get_model_version_by_alias("foresight-tiny", "champion").version) == "2"

    # worse: registered, not promoted, and the version says why
    model_uri, eval_id = trained_and_evaluated(cfg, tmp_path, {"sw/a": 0.0, "sw/b": 1.0, "sw/c": 1.0}, "m3")
    worse = register_and_promote(cfg, model_uri, eval_id, lineage)
    assert worse["registry.promoted"] == "false" and worse["registry.version"] == "3"
    assert str(client.get_model_version_by_alias("foresight-tiny", "champion").version) == "2"
    v3 = client.get_model_version("foresight-tiny", "3")
    assert v3.tags[PROMOTED_TAG] == "false" and "does not beat the champion" in v3.tags[REASON_TAG]
    assert "+0.000 on 2 paired tasks" in v3.tags[REASON_TAG]  # sw/c is not in the champion's evaluation

    # the same model and evaluation again (a pipeline re-run with every stage reused): no new version
    again = register_and_promote(cfg, model_uri, eval_id, lineage)
    assert again == worse and len(client.search_model_versions("name = 'foresight-tiny'")) == 3


def test_an_evaluation_without_task_scores_cannot_be_registered(cfg, tmp_path):
    model_uri, _ = trained_and_evaluated(cfg, tmp_path, {}, "m")
    bare = start_run(cfg, "eval-old", "eval")
    bare.finish()
    with pytest.raises(RegistryError, match=f"has no {TASK_SCORES}"):
        register_and_promote(cfg, model_uri, bare.run_id, {})
    with pytest.raises(RegistryError, match="only a model logged by a stage"):
        register_and_promote(cfg, "/some/folder", bare.run_id, {})
