"""The ablation table's arithmetic on hand-built evaluations, and the plan of `foresight ablate`."""

from __future__ import annotations

import pytest

from foresight_core.budget import ablation_plan, model_params, plan_text, stage_chain
from foresight_core.config import load_config
from foresight_core.config.ablation import AblationConfig, Variant, apply_variant, load_ablation
from foresight_core.evidence import RowRun, RowSpec, evidence_table, pooled_pairs, table_markdown


def run(variant: str, seed: int, scores: dict[str, float], tokens: float = 100.0, planning=None, chance=None,
        cand: float = 0.0) -> RowRun:
    metrics = {"sw/direct/gen_tokens": tokens, "sw/direct/ece_first": 0.1 * (seed + 1), "sw/direct/format_rate": 1.0}
    ts = {"direct": {f"sw/{k}": v for k, v in scores.items()}}
    if planning is not None:
        ts["planning"] = {f"sw/{k}": v for k, v in planning.items()}
        ts["planning_random"] = {f"sw/{k}": v for k, v in chance.items()}
        metrics["sw/planning/candidate_tokens"] = cand
    return RowRun(variant, seed, metrics, ts)


SPECS = [RowSpec("plain", "SFT & RL"), RowSpec("full", "full", "nothing", plain_twin="plain")]


def test_scores_intervals_and_paired_differences_by_hand():
    runs = [run("full", 0, {"a": 1, "b": 1, "c": 0}, tokens=120), run("full", 1, {"a": 1, "b": 0, "c": 0}, tokens=130),
            run("plain", 0, {"a": 1, "b": 0, "c": 0}), run("plain", 1, {"a": 0, "b": 0, "c": 0})]
    rows = {r["variant"]: r for r in evidence_table(runs, SPECS, n_boot=500)}
    full, plain = rows["full"]["benchmarks"]["sw"], rows["plain"]["benchmarks"]["sw"]
    # full: seed means 2/3 and 1/3 -> 0.5; plain: 1/3 and 0 -> 1/6
    assert full["score"]["mean"] == pytest.approx(0.5) and plain["score"]["mean"] == pytest.approx(1 / 6)
    assert full["score"]["n"] == 6 and full["score"]["lo"] <= 0.5 <= full["score"]["hi"]
    # plain - full on the same (seed, task) cells: seed 0 (0, -1, 0), seed 1 (-1, 0, 0) -> -1/3
    assert plain["vs_reference"]["mean"] == pytest.approx(-1 / 3) and "vs_reference" not in full
    assert plain["vs_reference"]["hi"] <= 0.0
    assert full["ece_first"] == pytest.approx(0.15)  # mean over seeds of 0.1 and 0.2
    assert full["token_overhead"] == pytest.approx(125 / 100 - 1)  # against its plain twin
    assert plain["token_overhead"] is None and rows["full"]["seeds"] == [0, 1]
    md = table_markdown(list(rows.values()))
    assert "### sw" in md and "| full | full | 2 | 0.500 [" in md and "| -0.333 [" in md and "+25.0%" in md


def test_calibration_columns_pool_every_seed_of_a_row():
    """ECE, Brier and AUROC come from the row's episodes of all seeds together, not the mean of per-seed
    values: seed 0 states (0.9 won, 0.9 won), seed 1 (0.9 lost, 0.1 lost)."""
    from sklearn.metrics import brier_score_loss, roc_auc_score

    cal0 = {"direct": {"sw": [["a", 0.9, 1.0], ["b", 0.9, 1.0]]}}
    cal1 = {"direct": {"sw": [["a", 0.9, 0.0], ["b", 0.1, 0.0]]}, "planning": {"sw": [["a", 0.5, 1.0]]}}
    runs = [RowRun("full", 0, {}, {"direct": {"sw/a": 1.0, "sw/b": 1.0}}, cal0),
            RowRun("full", 1, {}, {"direct": {"sw/a": 0.0, "sw/b": 0.0}}, cal1)]
    b = evidence_table(runs, SPECS[1:], n_boot=100)[0]["benchmarks"]["sw"]
    qs, ys = [0.9, 0.9, 0.9, 0.1], [1, 1, 0, 0]
    # 10 bins: bin [0.9, 1.0] holds three at mean q 0.9 with accuracy 2/3; bin [0.1, 0.2) one at 0.1, accuracy 0
    assert b["ece_first"] == pytest.approx(3 / 4 * abs(0.9 - 2 / 3) + 1 / 4 * 0.1)
    assert b["brier_first"] == pytest.approx(brier_score_loss(ys, qs)) == pytest.approx((0.01 * 2 + 0.81 + 0.01) / 4)
    assert b["auroc_first"] == pytest.approx(roc_auc_score(ys, qs)) == pytest.approx(0.75)
    assert b["n_q"] == 4
    assert pooled_pairs(runs)["planning"] == {"sw": [["a", 0.5, 1.0]]}
    assert "| 4 |" in table_markdown(evidence_table(runs, SPECS[1:], n_boot=100))
    # a row without any stated q: undefined, not perfect; runs logged without pairs keep the seed means
    none = [RowRun("full", 0, {}, {"direct": {"sw/a": 0.0}}, {})]
    assert evidence_table(none, SPECS[1:], n_boot=50)[0]["benchmarks"]["sw"]["ece_first"] is None
    old = [RowRun("full", 0, {"sw/direct/ece_first": 0.4}, {"direct": {"sw/a": 0.0}})]
    assert evidence_table(old, SPECS[1:], n_boot=50)[0]["benchmarks"]["sw"]["ece_first"] == 0.4


def test_planning_gain_is_claimed_only_above_the_random_control():
    tasks = {f"t{i}": 0.0 for i in range(40)}
    better = {k: 1.0 for k in tasks}
    same = dict(tasks)
    # q picks solve every task; the random pick of the same K solves none: claimed
    r = evidence_table([run("full", 0, tasks, planning=better, chance=same, cand=400.0)], SPECS[1:], n_boot=300)
    p = r[0]["benchmarks"]["sw"]["planning"]
    assert p["gain_claimed"] and p["vs_random"]["mean"] == 1.0 and p["token_cost"] == pytest.approx(4.0)
    assert p["vs_direct"]["mean"] == 1.0
    # q picks no better than random picks (both solve everything): no claim, though it beats greedy
    r = evidence_table([run("full", 0, tasks, planning=better, chance=better, cand=400.0)], SPECS[1:], n_boot=300)
    p = r[0]["benchmarks"]["sw"]["planning"]
    assert not p["gain_claimed"] and p["vs_direct"]["mean"] == 1.0
    assert "| full | sw | 0.000 | 1.000 | 1.000 |" in table_markdown(r)


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="unknown variant 'x'"):
        evidence_table([run("x", 0, {"a": 1})], SPECS)


def test_model_params_from_names():
    assert model_params(load_config("paper")) == 3e9  # Llama-3.2-3B-Instruct: 3B, not 3.2
    assert model_params(load_config("laptop")) == 135e6
    cfg = load_config("tiny", overrides=["model.source=hf", "model.name_or_path=org/Qwen2.5-0.5B-Instruct"])
    assert model_params(cfg) == 0.5e9
    cfg = load_config("tiny", overrides=["model.source=hf", "model.name_or_path=./my-model"])
    assert model_params(cfg) is None


def test_plan_counts_shared_stages():
    table = load_ablation("paper_table")
    plan = ablation_plan(load_config("laptop"), table, seeds=[0, 1, 2])
    per_seed = {"corpus": 1, "wm_amt": 2, "fe_sft": 5, "fc_rl": 11, "eval": 15}
    # wm_amt: WM-AMT and IWM; fe_sft: plain, FE-SFT, state, after WM-AMT, plain after IWM
    assert plan.executions == {k: 3 * v for k, v in per_seed.items()}
    assert plan.without_sharing["corpus"] == 45 and plan.without_sharing["fe_sft"] == 42
    # laptop: 3 held-out tasks per benchmark x 3 seeds = 9 cells; a difference resolves at >= 4 of them
    assert plan.cells == {"search_world": 9, "gsm_symbolic": 9}
    assert "9 (seed, task) cells per row; at best >= 4 cells won, none lost (>= 0.444 in score)" in plan_text(plan)
    paper = ablation_plan(load_config("paper"), table)
    assert paper.gpu_hours["wm_amt"] > 10 and paper.gpu_hours["corpus"] == 0.0
    text = plan_text(paper)
    assert "15 rows x 3 seeds" in text and "GPU h" in text and "iwm_rl" in text and "changes:" in text


def test_stage_chain_shares_exactly_when_configs_agree():
    cfg = load_config("tiny")
    full = dict(stage_chain(cfg, ["corpus", "wm_amt", "fe_sft", "fc_rl", "eval"]))
    omega0 = apply_variant(cfg, Variant(name="o", stages=["corpus", "wm_amt", "fe_sft", "fc_rl", "eval"],
                                        overrides={"fc_rl.omega_search": 0.0}))
    other = dict(stage_chain(omega0, ["corpus", "wm_amt", "fe_sft", "fc_rl", "eval"]))
    assert [full[s] == other[s] for s in ("corpus", "wm_amt", "fe_sft", "fc_rl", "eval")] == [True] * 3 + [False] * 2
    seed1 = dict(stage_chain(cfg.model_copy(update={"seed": 1}), ["corpus", "wm_amt"]))
    assert seed1["corpus"] != full["corpus"]
    faster = load_config("tiny", overrides=["wm_amt.scaling.cpus_per_worker=2"])
    assert dict(stage_chain(faster, ["corpus", "wm_amt"]))["wm_amt"] == full["wm_amt"]  # speed is not identity


def test_table_validation(tmp_path):
    from foresight_core.config import ConfigError

    bad = tmp_path / "t.yaml"
    bad.write_text("variants:\n  - {name: a, stages: [corpus], plain_twin: nope}\n")
    with pytest.raises(ConfigError, match="plain_twin 'nope'"):
        load_ablation(str(bad))
    AblationConfig(variants=[Variant(name="a", stages=["corpus"], plain_twin="nope")])  # a subset may leave it out
    with pytest.raises(ValueError, match="seeds must be distinct"):
        AblationConfig(variants=[Variant(name="a", stages=["corpus"])], seeds=[1, 1])


def test_paper_table_new_rows_configure_what_they_say():
    t = {v.name: v for v in load_ablation("paper_table").variants}
    cfg = load_config("laptop")
    state = apply_variant(cfg, t["state_sft_rl"])
    assert (state.fe_sft.turn_format, state.fc_rl.turn_format, state.eval.turn_format) == ("state",) * 3
    assert not state.fc_rl.use_calibration and state.fe_sft.loss_on == "assistant"
    iwm = apply_variant(cfg, t["iwm_rl"])
    assert iwm.wm_amt.loss_on == "observation" and iwm.wm_amt.turn_format == "plain"
    assert iwm.fe_sft.turn_format == "plain" and iwm.eval.turn_format == "plain"
    assert apply_variant(cfg, t["prompting"]).stages == ["corpus", "eval"]
    assert apply_variant(cfg, t["full_omega0.5"]).fc_rl.omega_search == 0.5
    assert not apply_variant(cfg, t["full_no_calibration"]).fc_rl.use_calibration
