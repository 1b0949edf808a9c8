"""Configs: every preset parses; bad values, unknown keys and bad overrides fail naming the field;
environment overrides; credentials never appear in dumps, params or tags."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from foresight_core.config import ConfigError, PipelineConfig, dump_config, list_presets, load_config
from tasks.tracking import MASK, config_yaml, flatten, mask_text, stage_params

PRESET_DIR = Path(__file__).resolve().parents[1] / "foresight_core" / "config" / "presets"


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


# -- a section given as a mapping changes only what it names, at every depth -----------------------------

def _leaves(model: BaseModel, prefix: str = "") -> dict[str, typing.Any]:
    """Every non-section field of a config by dotted path (lists and mapping-valued fields are leaves)."""
    out: dict[str, typing.Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.update(_leaves(value, f"{prefix}{name}."))
        else:
            out[prefix + name] = value
    return out


def _named(data: dict, model: BaseModel, prefix: str = "") -> dict[str, typing.Any]:
    """The leaves a YAML mapping names (walked alongside the config it resolved to)."""
    out: dict[str, typing.Any] = {}
    for key, value in data.items():
        sub = getattr(model, key)
        if isinstance(value, dict) and isinstance(sub, BaseModel):
            out.update(_named(value, sub, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _covers(resolved: typing.Any, given: typing.Any) -> bool:
    """The YAML value ``given`` is what ``resolved`` holds (list items may leave fields at their defaults)."""
    if isinstance(given, dict):
        return isinstance(resolved, dict) and all(k in resolved and _covers(resolved[k], v) for k, v in given.items())
    if isinstance(given, list):
        return isinstance(resolved, list) and len(resolved) == len(given) and all(map(_covers, resolved, given))
    return resolved == given


def _diff(cfg: BaseModel, base: BaseModel) -> dict[str, typing.Any]:
    a, b = _leaves(cfg), _leaves(base)
    return {k: a[k] for k in a if a[k] != b[k]}


@pytest.mark.parametrize("preset", list_presets())
def test_preset_changes_only_the_fields_it_names(preset: str) -> None:
    from pydantic_core import to_jsonable_python

    cfg, default = load_config(preset, env={}), PipelineConfig()
    given = _named(yaml.safe_load((PRESET_DIR / f"{preset}.yaml").read_text()), cfg)
    given.setdefault("name", preset)
    base = _leaves(default)
    for path, value in _leaves(cfg).items():
        if path in given:
            assert _covers(to_jsonable_python(value), given[path]), (path, value, given[path])
        else:
            assert value == base[path], (path, value, base[path])


def test_laptop_keeps_the_stage_defaults_of_wm_amt_and_fe_sft() -> None:
    # laptop.yaml names neither loss_on; PipelineConfig's fe_sft default is SFTConfig(loss_on="assistant")
    cfg = load_config("laptop", env={})
    assert cfg.fe_sft.loss_on == "assistant" and cfg.fe_sft.format_check_tasks == 6
    assert cfg.wm_amt.loss_on == "all"
    assert "loss_on: assistant" in dump_config(cfg)


def test_config_file_with_one_nested_field(tmp_path: Path) -> None:
    path = tmp_path / "one.yaml"
    path.write_text("fc_rl: {scaling: {cpus_per_worker: 3}}\nfe_sft: {scaling: {num_workers: 2}}\n")
    cfg = load_config(file=path, env={})
    assert _diff(cfg, PipelineConfig()) == {"fc_rl.scaling.cpus_per_worker": 3, "fe_sft.scaling.num_workers": 2}
    assert cfg.fe_sft.loss_on == "assistant"


def test_set_a_mapping_merges_into_the_section() -> None:
    base = load_config("laptop", env={})
    cfg = load_config("laptop", overrides=["fc_rl={lr: 1.0e-3, scaling: {num_workers: 2}}",
                                           "fe_sft={max_steps: 9}"], env={})
    assert _diff(cfg, base) == {"fc_rl.lr": 1e-3, "fc_rl.scaling.num_workers": 2, "fe_sft.max_steps": 9}
    # a mapping-valued field is a value, replaced whole; the sections above it still merge
    from foresight_core.config.load import set_path
    data = {"envs": {"search_world": {"n_entities": 9, "question_mix": {"one_hop": 0.5, "bridge": 0.5}}}}
    set_path(data, "envs", {"search_world": {"question_mix": {"one_hop": 1.0}}})
    assert data == {"envs": {"search_world": {"n_entities": 9, "question_mix": {"one_hop": 1.0}}}}


def test_flow_parameter_mapping_keeps_field_defaults() -> None:
    # a Prefect deployment parameter or UI form is a partial mapping, validated as it is
    cfg = PipelineConfig.model_validate({"fe_sft": {"max_steps": 7}})
    assert cfg.fe_sft.loss_on == "assistant" and cfg.fe_sft.max_steps == 7
    assert _diff(cfg, PipelineConfig()) == {"fe_sft.max_steps": 7}
    # the deployments name a preset: it resolves field by field too (loss_on stays the FE-SFT default)
    deployments = yaml.safe_load((PRESET_DIR.parents[2] / "deployments" / "prefect.yaml").read_text())
    for d in deployments["deployments"]:
        assert load_config(d["parameters"]["preset"], env={}).fe_sft.loss_on == "assistant", d["name"]


def test_merge_over_defaults_three_levels_deep() -> None:
    from pydantic import Field, SecretStr

    from foresight_core.config.base import StrictModel

    class Leaf(StrictModel):
        a: int = 1
        b: int = 2
        tags: list[str] = ["x"]
        token: SecretStr | None = None

    class Mid(StrictModel):
        leaf: Leaf = Leaf(a=10, token="s3cr3t")
        c: int = 3
        opt: Leaf | None = None

    class Top(StrictModel):
        mid: Mid = Mid(leaf=Leaf(b=20, tags=["y", "z"]), c=30)
        other: Mid = Mid()

    # Top.mid's default holds leaf a=1 (Leaf's class default), b=20, tags [y, z], no token, and c=30. A shallow
    # merge would hand Mid {"leaf": {"a": 5}, "c": 30}: Mid rebuilds leaf over its own Leaf(a=10, token) -> b=2, token.
    t = Top(mid={"leaf": {"a": 5}})
    assert (t.mid.leaf.a, t.mid.leaf.b, t.mid.leaf.tags, t.mid.leaf.token, t.mid.c) == (5, 20, ["y", "z"], None, 30)
    assert Top(mid={"c": 4}).mid.leaf == Leaf(b=20, tags=["y", "z"])
    # Top.other is Mid's class default: leaf comes from Mid's field default Leaf(a=10, token), secret intact
    o = Top(other={"leaf": {"b": 7}}).other
    assert (o.leaf.a, o.leaf.b, o.c) == (10, 7, 3) and o.leaf.token.get_secret_value() == "s3cr3t"
    # lists are replaced, None replaces, a None default is not merged into
    assert Top(mid={"leaf": {"tags": ["q"]}}).mid.leaf.tags == ["q"]
    assert Top(other={"leaf": {"token": None}}).other.leaf == Leaf(a=10)
    assert Top(other={"opt": {"a": 4}}).other.opt == Leaf(a=4)
    # a full dump round-trips (how a deployment stores a config)
    t = Top(mid={"leaf": {"a": 5}}, other={"c": 8})
    assert Top.model_validate(t.model_dump()) == t

    class Adam(StrictModel):
        type: typing.Literal["adam"] = "adam"
        lr: float = 1e-3
        beta: float = 0.9

    class Sgd(StrictModel):
        type: typing.Literal["sgd"] = "sgd"
        lr: float = 1e-2

    class Opt(StrictModel):
        opt: Adam | Sgd = Field(default=Adam(beta=0.5), discriminator="type")

    assert Opt(opt={"lr": 1.0}).opt == Adam(lr=1.0, beta=0.5)
    assert Opt(opt={"type": "adam", "lr": 2.0}).opt == Adam(lr=2.0, beta=0.5)
    assert Opt(opt={"type": "sgd"}).opt == Sgd()  # another member: the default's beta is not carried over


# -- evaluation: k samples per task must be able to differ ----------------------------------------------

def test_repeated_greedy_evaluation_is_refused() -> None:
    from foresight_core.config.evaluation import EvalConfig

    with pytest.raises(ValueError, match=r"eval\.samples_per_task 30 needs eval\.temperature > 0"):
        EvalConfig(samples_per_task=30)
    assert EvalConfig(samples_per_task=30, temperature=0.6).samples_per_task == 30
    assert EvalConfig(samples_per_task=1).temperature == 0  # one greedy sample is fine
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=["eval.samples_per_task=4"], env={})
    assert "eval.samples_per_task" in str(e.value) and "eval.temperature" in str(e.value)


def test_paper_preset_samples_its_k_answers() -> None:
    ev = load_config("paper", env={}).eval
    assert ev.samples_per_task == 30 and ev.temperature > 0


def test_a_saved_model_is_loaded_with_adapters_to_train_and_without_to_play() -> None:
    from foresight_core.config.model import LoRAConfig, ModelConfig

    base = ModelConfig(source="smollm2_gguf", lora=LoRAConfig(r=4), dtype="float32")
    train, play = base.saved("/m/fe_sft", train=True), base.saved("/m/fe_sft")
    assert (train.source, train.name_or_path, train.lora.r, train.dtype) == ("hf", "/m/fe_sft", 4, "float32")
    assert (play.source, play.name_or_path, play.lora, play.dtype) == ("hf", "/m/fe_sft", None, "float32")
    assert base.source == "smollm2_gguf" and base.lora.r == 4  # the original is untouched
