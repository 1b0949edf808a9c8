"""The ablation table: checked-in tables parse and apply to every preset; the table's columns."""

from __future__ import annotations

import pytest

from foresight_core.config import ConfigError, list_presets, load_config
from foresight_core.config.ablation import ABLATION_DIR, AblationConfig, Variant, apply_variant, load_ablation


@pytest.mark.parametrize("table", sorted(p.stem for p in ABLATION_DIR.glob("*.yaml")))
@pytest.mark.parametrize("preset", list_presets())
def test_every_table_applies_to_every_preset(table, preset):
    t = load_ablation(table)
    cfg = load_config(preset)
    for v in t.variants:
        vcfg = apply_variant(cfg, v, t.overrides)
        assert vcfg.stages == v.stages and vcfg.name == f"{cfg.name}-{v.name}"


def test_table_overrides_apply_to_every_row_and_a_row_wins():
    from foresight_core.config.ablation import row_configs
    cfg = load_config("laptop")
    assert cfg.fe_sft.format_check_tasks == 6  # a lone pipeline run checks FE-SFT's format itself
    table = AblationConfig(overrides={"fe_sft.format_check_tasks": 0, "fc_rl.lr": 3e-5}, seeds=[0, 1], variants=[
        Variant(name="a", stages=["corpus", "fe_sft", "eval"]),
        Variant(name="b", stages=["corpus", "fe_sft", "fc_rl", "eval"], overrides={"fc_rl.lr": 2e-5})])
    rows = row_configs(cfg, table)
    assert [(v.name, seed) for v, seed, _ in rows] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert all(c.fe_sft.format_check_tasks == 0 for _, _, c in rows)
    assert [c.fc_rl.lr for _, _, c in rows] == [3e-5, 2e-5, 3e-5, 2e-5]
    with pytest.raises(ConfigError, match="fe_sft.bogus"):
        row_configs(cfg, AblationConfig(overrides={"fe_sft.bogus": 1}, variants=table.variants))
    # the checked-in method table leaves the format to the eval stage, which measures it for every row
    assert load_ablation("paper_table").overrides == {"fe_sft.format_check_tasks": 0}


def test_paper_table_rows():
    t = {v.name: v for v in load_ablation("paper_table").variants}
    cfg = load_config("tiny")
    full, plain = apply_variant(cfg, t["full"]), apply_variant(cfg, t["fe_sft_rl"])
    assert full.fc_rl.use_calibration and full.fc_rl.use_grounding and full.fc_rl.omega_search == 0.2
    assert not plain.fc_rl.use_calibration and not plain.fc_rl.use_grounding and plain.fc_rl.omega_math == 0
    sft = apply_variant(cfg, t["sft_rl"])
    assert sft.fe_sft.turn_format == "plain" and sft.fc_rl.turn_format == "plain" and sft.eval.turn_format == "plain"
    assert "wm_amt" not in plain.stages and "wm_amt" in full.stages


def test_bad_variants_name_the_field(tmp_path):
    cfg = load_config("tiny")
    with pytest.raises(ConfigError, match="fc_rl.omega_math"):
        apply_variant(cfg, Variant(name="x", stages=["corpus"], overrides={"fc_rl.omega_math": -1}))
    with pytest.raises(ConfigError, match="fc_rl.bogus"):
        apply_variant(cfg, Variant(name="x", stages=["corpus"], overrides={"fc_rl.bogus": 1}))
    with pytest.raises(ValueError, match="unique"):
        AblationConfig(variants=[Variant(name="a", stages=["corpus"]), Variant(name="a", stages=["corpus"])])
    bad = tmp_path / "t.yaml"
    bad.write_text("variants:\n  - name: a\n    stages: [corpus, nonsense]\n")
    with pytest.raises(ConfigError, match="variants.0.stages.1"):
        load_ablation(str(bad))


def test_apply_variant_keeps_credentials():
    cfg = load_config("tiny", overrides=["infra.storage.key=AKIA", "infra.storage.secret=s3cr3t"])
    v = apply_variant(cfg, Variant(name="x", stages=["corpus"]))
    assert v.infra.storage.secret.get_secret_value() == "s3cr3t"


def _leaves(model, prefix=""):
    """Every non-section field of a config by dotted path (lists and mapping-valued fields are leaves)."""
    from pydantic import BaseModel

    out = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        out.update(_leaves(value, f"{prefix}{name}.") if isinstance(value, BaseModel) else {prefix + name: value})
    return out


@pytest.mark.parametrize("table", sorted(p.stem for p in ABLATION_DIR.glob("*.yaml")))
@pytest.mark.parametrize("preset", list_presets())
def test_variant_changes_only_its_overrides(table, preset):
    cfg = load_config(preset, env={})
    base = _leaves(cfg)
    for v in load_ablation(table).variants:
        got = _leaves(apply_variant(cfg, v))
        changed = {k for k in base if got[k] != base[k]} - {"stages", "name"}
        named = {k for k in changed if any(k == d or k.startswith(d + ".") for d in v.overrides)}
        assert changed == named, (v.name, changed - named)


def test_variant_mapping_override_merges():
    # laptop's fe_sft default keeps loss_on: assistant; a mapping override names two fields of two sections
    cfg = load_config("laptop", env={})
    v = Variant(name="m", stages=["corpus", "fc_rl"], overrides={"fc_rl": {"lr": 1e-3}, "fe_sft.scaling": {"num_workers": 2}})
    base, got = _leaves(cfg), _leaves(apply_variant(cfg, v))
    assert {k: got[k] for k in base if got[k] != base[k]} == {
        "stages": ["corpus", "fc_rl"], "name": "laptop-m", "fc_rl.lr": 1e-3, "fe_sft.scaling.num_workers": 2}
    assert apply_variant(cfg, v).fe_sft.loss_on == "assistant"


def test_lanes_split_a_local_ray_and_leave_a_cluster_to_its_scheduler(monkeypatch):
    import ray

    import tasks.runtime
    from flows.pipeline import lane_share
    from foresight_core.config.ablation import row_configs

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # the Ray a stage will start: infra.ray.num_cpus

    t = AblationConfig(lanes=2, overrides={"fc_rl.lr": 3e-5}, variants=[Variant(name="a", stages=["corpus", "eval"])])
    four = load_config("laptop", overrides=["infra.ray.num_cpus=4"], env={})
    shared = lane_share(four, t)
    assert shared.overrides == {"fc_rl.lr": 3e-5, "infra.ray.cpus_per_stage": 2}  # 4 CPUs / 2 lanes
    assert [c.infra.ray.cpus_per_stage for _, _, c in row_configs(four, shared)] == [2, 2, 2]
    assert lane_share(four, t.model_copy(update={"lanes": 3})).overrides["infra.ray.cpus_per_stage"] == 1
    assert lane_share(four, t.model_copy(update={"lanes": 8})).overrides["infra.ray.cpus_per_stage"] == 1
    assert lane_share(four, t.model_copy(update={"lanes": 1})) == t.model_copy(update={"lanes": 1})
    cluster = load_config("laptop", overrides=["infra.ray.address=ray://head:10001"], env={})
    assert lane_share(cluster, t) == t  # a cluster places the stages by their own resource requests
    own = load_config("laptop", overrides=["infra.ray.num_cpus=4", "infra.ray.cpus_per_stage=3"], env={})
    assert lane_share(own, t) == t  # the user's share stands
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # a Ray already running: its CPUs count
    monkeypatch.setattr(tasks.runtime, "node_cpus", lambda: [2])
    assert lane_share(four, t).overrides["infra.ray.cpus_per_stage"] == 1
    assert load_ablation("paper_table").lanes == 2  # the method table: two rows at once
    with pytest.raises(ValueError, match="lanes"):
        AblationConfig(lanes=0, variants=t.variants)


def test_in_lanes_runs_every_item_side_by_side_in_the_flow_context():
    import contextvars
    import threading

    from flows.pipeline import in_lanes

    var = contextvars.ContextVar("flow_run", default=None)
    var.set("run-1")
    seen, lock = [], threading.Lock()
    both = threading.Barrier(2, timeout=10)  # items 0 and 1 wait for each other: only lanes that overlap pass

    def work(i):
        if i < 2:
            both.wait()
        with lock:
            seen.append((i, var.get()))

    in_lanes(work, 5, lanes=2)
    assert sorted(seen) == [(i, "run-1") for i in range(5)]
    order = []
    in_lanes(order.append, 4, lanes=1)
    assert order == [0, 1, 2, 3]  # one lane: the rows in order, in this thread


def test_in_lanes_raises_the_first_failure_after_the_rows_in_flight_end():
    import threading
    import time

    from flows.pipeline import in_lanes

    started, finished = [], []
    failing = threading.Event()

    def work(i):
        started.append(i)
        if i == 1:
            failing.set()
            raise RuntimeError("row 1 failed")
        if i == 0:
            failing.wait(10)
            time.sleep(0.2)  # still in flight when row 1 fails: it ends, it is not cut short
        finished.append(i)

    with pytest.raises(RuntimeError, match="row 1 failed"):
        in_lanes(work, 6, lanes=2)
    assert 0 in finished and 1 not in finished
    assert len(started) <= 3  # nothing new starts once a row has failed (at most the one already taken)


def test_ctrl_c_stops_the_lanes_at_once_and_starts_no_other_row():
    import _thread
    import signal
    import threading
    import time

    from flows.pipeline import in_lanes

    started, release = [], threading.Event()

    def work(i):
        started.append(i)
        release.wait(10)  # a long stage

    # Python's own Ctrl-C handler (an earlier test's Prefect or Ray may have installed another one)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Timer(0.3, _thread.interrupt_main).start()  # Ctrl-C while two rows are in flight
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            in_lanes(work, 6, lanes=2)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - t0 < 5  # not after the rows in flight
    release.set()
    time.sleep(0.2)
    assert sorted(started) == [0, 1]  # the rows in flight; none after the interrupt
