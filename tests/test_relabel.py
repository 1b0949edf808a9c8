"""The relabel stage (foresight_core/relabel.py): q re-labelled with the model's own Monte Carlo value.
Pure pieces against hand-worked numbers; the labelling with a real (tiny) model on a real tiny corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from foresight_core.relabel import choose_rows, label_stats, relabelled, starts
from foresight_core.types import Action, CorpusRow, Step, Task, Trajectory, Turn, WorldModelBlock


def _turn(kind: str, content: str, q: float | None) -> Turn:
    wm = WorldModelBlock("plan", ["K"], "analysis", q) if q is not None else None
    return Turn("think", Action(kind, content), wm)


def _row(task_id: str, turns: list[Turn]) -> CorpusRow:
    steps = [Step(t, None if t.action.kind == "answer" else "obs") for t in turns]
    traj = Trajectory(Task(task_id, "search", "q?", ["a"]), steps, True, 1.0, "expert")
    return CorpusRow("trajectory", "fe_sft", annotated=True, trajectory=traj)


A = _row("A", [_turn("search", "x", 0.9), _turn("answer", "a", 0.95)])
B = _row("B", [_turn("search", "x", None), _turn("search", "y", 0.8), _turn("answer", "a", 0.9)])


def test_starts_relabel_and_stats_by_hand():
    chosen = starts([A, B], turn_limit=lambda task: 2)
    # every annotated step with a turn left to play: A0, A1, B1 (B2 is the third turn of a 2-turn limit)
    assert [(s.row, s.step, len(s.prefix)) for s in chosen] == [(0, 0, 0), (0, 1, 1), (1, 1, 1)]
    assert chosen[2].prefix[0].turn.action.content == "x"
    wins = [1, 4, 0]  # of n = 4 episodes each
    rows = relabelled([A, B], chosen, wins, 4)
    qs = [[s["turn"]["wm"]["confidence"] if s["turn"]["wm"] else None for s in r["trajectory"]["steps"]] for r in rows]
    assert qs == [[0.25, 1.0], [None, 0.0, 0.9]]  # B2 keeps its corpus label
    assert rows[1]["trajectory"]["meta"]["q_relabel"] == [{"step": 1, "old": 0.8, "new": 0.0, "wins": 0, "episodes": 4}]
    assert A.trajectory.steps[0].turn.wm.confidence == 0.9  # the given rows are not changed
    assert [CorpusRow.from_dict(r).split for r in rows] == ["fe_sft", "fe_sft"]  # still corpus rows
    stats = label_stats([A, B], chosen, wins, 4)
    assert stats["relabel/starts"] == 3 and stats["relabel/episodes"] == 12
    assert stats["relabel/self_success"] == pytest.approx(5 / 12)
    assert stats["relabel/old_q_mean"] == pytest.approx((0.9 + 0.95 + 0.8) / 3)
    assert stats["relabel/new_q_mean"] == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    assert stats["relabel/mean_abs_change"] == pytest.approx((0.65 + 0.05 + 0.8) / 3)
    with pytest.raises(ValueError, match="3 starts but 2 values"):
        relabelled([A, B], chosen, [1, 2], 4)


def test_choose_rows_is_a_seeded_draw_of_annotated_trajectories_and_names_a_bad_row():
    plain = _row("P", [_turn("answer", "a", None)])
    text = {"kind": "text", "split": "fe_sft", "text": "general text"}
    rows = [A.to_dict(), plain.to_dict(), text, B.to_dict()]
    assert [r.trajectory.task.id for r in choose_rows(rows, 5, seed=0)] == ["A", "B"]  # annotated only, file order
    one = [choose_rows(rows, 1, seed=s)[0].trajectory.task.id for s in range(8)]
    assert set(one) == {"A", "B"} and one == [choose_rows(rows, 1, seed=s)[0].trajectory.task.id for s in range(8)]
    with pytest.raises(ValueError, match=r"fe_sft.jsonl: row 2: corpus row: split must be one of"):
        choose_rows([A.to_dict(), {**B.to_dict(), "split": "train"}], 2, 0, source="fe_sft.jsonl")


def test_label_with_model_plays_from_the_corpus_states_and_writes_corpus_rows(tmp_path: Path, tiny_cfg):
    """A tiny random model on the tiny corpus's FE-SFT set: every annotated step of the chosen trajectories gets
    q = wins / n of its own episodes (a random model wins nothing: 0.0), and the rows still train."""
    from foresight_core.corpus.build import build_corpus
    from foresight_core.models import load_model, save_model
    from foresight_core.sft import prepare_data
    from foresight_core.storage import join_uri, read_rows
    from foresight_core.relabel import label_with_model

    manifest = build_corpus(tiny_cfg, progress=False)
    data_uri = join_uri(manifest.uri, manifest.data["datasets"]["fe_sft"]["file"])
    model, tok = load_model(tiny_cfg.model, "cpu", train=False, seed=0)
    model_dir = save_model(model, tok, tmp_path / "fe_sft_model")
    out = str(tmp_path / "labels" / "self_labelled.jsonl")
    stats = label_with_model(tiny_cfg, data_uri, str(model_dir), out)
    rows = read_rows(out)
    rc = tiny_cfg.relabel
    assert len(rows) == min(rc.n_trajectories, stats["relabel/trajectories"]) == 2
    changes = [c for r in rows for c in r["trajectory"]["meta"]["q_relabel"]]
    assert len(changes) == stats["relabel/starts"] > 0 and stats["relabel/episodes"] == len(changes) * rc.rollouts_per_step
    assert all(c["episodes"] == rc.rollouts_per_step and c["new"] == c["wins"] / c["episodes"] for c in changes)
    for r in rows:
        steps = r["trajectory"]["steps"]
        for c in r["trajectory"]["meta"]["q_relabel"]:
            assert steps[c["step"]]["turn"]["wm"]["confidence"] == c["new"]
    assert stats["relabel/self_success"] == sum(c["wins"] for c in changes) / stats["relabel/episodes"]
    data = prepare_data(rows, tok, rc, seed=0, source=out)  # the relabelled rows are FE-SFT rows
    assert data.info["train_samples"] + data.info["eval_samples"] == len(rows)


@pytest.mark.slow
def test_relabel_stage_on_ray_records_labels_and_a_model_and_fc_rl_starts_from_it(tmp_path: Path, tiny_cfg, ray_local):
    """FE-SFT then relabel as Ray Train stages in MLflow: the label metrics and file are the run's, its model
    is the next stage's input (``flows.pipeline.starting_model``), and a second call reuses the run."""
    from mlflow import MlflowClient

    from flows.pipeline import starting_model
    from foresight_core.corpus.build import build_corpus
    from foresight_core.storage import read_rows
    from tasks.train import run_relabel_stage, run_sft_stage

    cfg = tiny_cfg.model_copy(update={"stages": ["corpus", "fe_sft", "relabel", "fc_rl", "eval"]})
    corpus = build_corpus(cfg, progress=False).uri
    fe = run_sft_stage("fe_sft", cfg, corpus)
    ref = run_relabel_stage(cfg, corpus, fe["model_uri"])
    run = MlflowClient(cfg.infra.tracking.tracking_uri).get_run(ref["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["foresight.stage"] == "relabel"
    assert run.data.tags["foresight.input.init_run_id"] == fe["run_id"]
    assert ref["metrics"]["relabel/starts"] > 0 and 0.0 <= ref["metrics"]["relabel/new_q_mean"] <= 1.0
    labels = read_rows(run.data.tags["foresight.output.labels"])
    assert len(labels) == cfg.relabel.n_trajectories and all(r["trajectory"]["meta"]["q_relabel"] for r in labels)
    assert [m.step for m in MlflowClient(cfg.infra.tracking.tracking_uri).get_metric_history(ref["run_id"], "loss")] \
        == list(range(1, cfg.relabel.max_steps + 1))
    refs = {"fe_sft.model_uri": fe["model_uri"], "relabel.model_uri": ref["model_uri"]}
    assert starting_model("fc_rl", refs) == ref["model_uri"] and starting_model("relabel", refs) == fe["model_uri"]
    again = run_relabel_stage(cfg, corpus, fe["model_uri"])
    assert again["reused"] and again["run_id"] == ref["run_id"]
    with pytest.raises(ValueError, match="no FE-SFT model"):
        run_relabel_stage(cfg, corpus, None)
