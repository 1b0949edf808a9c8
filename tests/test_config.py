"""Configs: every preset parses; bad values, unknown keys and bad overrides fail naming the field;
environment overrides; credentials never appear in dumps, params or tags."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from foresight_core.config import ConfigError, PipelineConfig, dump_config, list_presets, load_config
from foresight_tasks.tracking import MASK, config_yaml, flatten, mask_text, stage_params

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "presets"


def test_every_preset_parses() -> None:
    names = list_presets()
    assert {"tiny", "laptop", "paper"} <= set(names)
    assert names == sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    for name in names:
        cfg = load_config(name, env={})
        assert cfg.name == name
        # the YAML dump of a resolved config is itself a valid config file (config show | --config)
        assert PipelineConfig.model_validate(yaml.safe_load(dump_config(cfg))) == cfg


def test_every_field_has_a_description() -> None:
    """The Prefect UI builds its form from these; STYLE.md: a docstring under every field."""
    missing: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(prefix + name)
            for t in (field.annotation, *typing.get_args(field.annotation)):
                for inner in (t, *typing.get_args(t)):
                    if isinstance(inner, type) and issubclass(inner, BaseModel):
                        walk(inner, f"{prefix}{name}.")

    walk(PipelineConfig, "")
    assert missing == []


@pytest.mark.parametrize("override, field, words", [
    ("corpus.mc_rollouts=0", "corpus.mc_rollouts", "greater than or equal to 1"),
    ("corpus.bogus=1", "corpus.bogus", "Extra inputs are not permitted"),
    ("envs.search_world.question_mix={one_hop: -1}", "envs.search_world", "non-negative"),
    ("stages=[corpus, pretrain]", "stages.1", "pretrain"),
    ("fc_rl.engine=vllm", "fc_rl", "use_gpu"),
    ("model.source=hf", "model", "name_or_path"),
])
def test_bad_value_names_the_field(override: str, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=[override], env={})
    msg = str(e.value)
    assert f"  {field}" in msg and words in msg, msg
    assert "with overrides" in msg


@pytest.mark.parametrize("override, words", [
    ("corpus.mc_rollouts", "must look like key.path=value"),
    ("corpus..mc_rollouts=3", "has an empty part"),
    ("corpus.mc_rollouts.n=3", "corpus.mc_rollouts is a value, not a section"),
    ("corpus.mc_rollouts=[1", "not valid YAML"),
])
def test_bad_override_syntax(override: str, words: str) -> None:
    with pytest.raises(ConfigError, match="override") as e:
        load_config("tiny", overrides=[override], env={})
    assert words in str(e.value)


def test_bad_file_and_preset(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncorpus:\n  n_train_tasks: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(file=bad, env={})
    assert str(bad) in str(e.value) and "corpus.n_train_tasks" in str(e.value) and "'many'" in str(e.value)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(file=tmp_path / "list.yaml", env={})
    with pytest.raises(ConfigError, match="unknown preset 'huge'; presets: laptop, paper, tiny"):
        load_config("huge", env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(file=tmp_path / "missing.yaml", env={})
    with pytest.raises(ConfigError, match="not both"):
        load_config("tiny", file=bad, env={})


def test_environment_overrides_then_set_wins() -> None:
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "RAY_ADDRESS": "ray://127.0.0.1:10001",
           "PREFECT_API_URL": "http://127.0.0.1:4200/api", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
           "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI", "AWS_DEFAULT_REGION": "eu-west-1",
           "FORESIGHT_WORK_DIR": "s3://bucket/work"}
    cfg = load_config("tiny", env=env)
    infra = cfg.infra
    assert infra.tracking.tracking_uri == "http://127.0.0.1:5000"
    assert infra.ray.address == "ray://127.0.0.1:10001"
    assert infra.prefect.api_url == "http://127.0.0.1:4200/api"
    assert cfg.work_dir == "s3://bucket/work"
    opts = infra.storage.storage_options()
    assert opts == {"key": "AKIDEXAMPLE", "secret": "wJalrXUtnFEMI",
                    "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"}}
    # --set is applied after the environment
    cfg = load_config("tiny", overrides=["infra.ray.address=auto"], env=env)
    assert cfg.infra.ray.address == "auto"
    # an empty variable is no override
    assert load_config("tiny", env={"RAY_ADDRESS": ""}).infra.ray.address is None


def test_credentials_are_masked_everywhere() -> None:
    env = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI",
           "MLFLOW_TRACKING_URI": "postgresql://mlflow:pg-pass-123@127.0.0.1:5432/mlflow"}
    cfg = load_config("tiny", env=env)
    dumped = dump_config(cfg)
    assert "AKIDEXAMPLE" not in dumped and "wJalrXUtnFEMI" not in dumped and dumped.count(MASK) == 2
    for text in (config_yaml(cfg), str(flatten(cfg)), str(stage_params(cfg, "infra", "corpus"))):
        for secret in ("AKIDEXAMPLE", "wJalrXUtnFEMI", "pg-pass-123"):
            assert secret not in text
    params = flatten(cfg)
    assert params["infra.storage.key"] == MASK and params["infra.storage.secret"] == MASK
    assert params["infra.tracking.tracking_uri"] == f"postgresql://mlflow:{MASK}@127.0.0.1:5432/mlflow"
    # fields named like credentials are masked whatever their type; None stays visible as null
    assert flatten({"s3": {"secret": "plain", "token": None, "keywords": ["a"]}}) == {
        "s3.secret": MASK, "s3.token": "null", "s3.keywords": '["a"]'}
    assert mask_text("http://127.0.0.1:5000 and s3://bucket/x") == "http://127.0.0.1:5000 and s3://bucket/x"


def test_flatten_params() -> None:
    cfg = load_config("tiny", env={})
    params = stage_params(cfg, "seed", "corpus")
    # seed 0 and corpus.mc_rollouts 4 in tiny.yaml; nested noise flattened; a dict-valued field as JSON
    assert params["seed"] == "0" and params["corpus.mc_rollouts"] == "4"
    assert params["corpus.noise.wrong_query"] == "0.15"
    assert params["corpus.llm"] == "null" and params["corpus.behaviour"] == "expert"
    assert all(len(v) <= 6000 for v in flatten({"x": "y" * 7000}).values())
