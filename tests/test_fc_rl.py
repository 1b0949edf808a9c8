"""The FC-RL stage (foresight_core/fc_rl.py): advantages of played rollouts, reward going up, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from foresight_core.config import FCRLConfig, ModelConfig
from foresight_core.fc_rl import CHECKPOINT_FILE, TrainItem, compute_advantages, micro_batches, rollout_metrics, \
    score_rollout, train_fc_rl, train_items
from foresight_core.models import load_model, load_tokenizer
from foresight_core.rollout import Rollout, RolloutStep
from foresight_core.tracking import MemoryTracker
from foresight_core.types import Action, StepResult, Task

TASK = Task(id="t", env="search", question="Where was Zorvan born?", answers=["Tamsor"])


def _rollout(success: bool, steps: list[tuple[float, list[str], Action, str | None]], info=None) -> Rollout:
    """Two turns of 4 generated tokens with one 2-token observation between them:
    turn 0 = tokens 0-3 (wm 0-1, policy 2, eos 3), observation 4-5, turn 1 = tokens 6-9 (wm 6, policy 7-8, eos 9)."""
    rs = [RolloutStep(text="", start=0, end=4, valid=True, confidence=steps[0][0], keywords=steps[0][1],
                      action=steps[0][2], observation=steps[0][3]),
          RolloutStep(text="", start=6, end=10, valid=True, confidence=steps[1][0], keywords=steps[1][1],
                      action=steps[1][2], observation=steps[1][3])]
    return Rollout(task=TASK, env="search", group=0, prompt_ids=[5, 6, 7], response_ids=list(range(100, 110)),
                   logprobs=[0.0] * 10, obs_mask=[0, 0, 0, 0, 1, 1, 0, 0, 0, 0],
                   wm_mask=[1, 1, 0, 0, 0, 0, 1, 0, 0, 0], policy_mask=[0, 0, 1, 0, 0, 0, 0, 1, 1, 0],
                   steps=rs, format_ok=True, success=success, score=float(success), info=info or {}, finish="answer",
                   done=True)


OBS = "Zorvan was born in Tamsor"
GOOD = _rollout(True, [(0.4, ["Tamsor", "Velmor"], Action("search", "Zorvan"), OBS),
                       (0.9, ["Tamsor"], Action("answer", "Tamsor"), None)], info={"f1": 1.0})
BAD = _rollout(False, [(0.8, ["Paris"], Action("search", "Zorvan"), OBS),
                       (0.6, ["Paris"], Action("answer", "Paris"), None)], info={"f1": 0.0})


def test_rewards_of_a_rollout():
    s = score_rollout(GOOD, FCRLConfig(format_weight=0.1))
    # R_E = 1 + 0.1 = 1.1 ; R_calib = [1 - 0.6^2, 1 - 0.1^2] = [0.64, 0.99]
    # R_ground: step 0 future "Zorvan / Zorvan was born in Tamsor / Tamsor": Tamsor yes, Velmor no -> 0.5 ; step 1 -> 1
    # A_S = [0.9 - 0.4, 1 - 0.9] = [0.5, 0.1]
    assert s.r_episode == pytest.approx(1.1)
    assert s.r_calib == pytest.approx([0.64, 0.99])
    assert s.r_ground == pytest.approx([0.5, 1.0])
    assert s.a_step == pytest.approx([0.5, 0.1])
    # F1 as the task score, when configured
    half = _rollout(False, [(0.5, ["x"], Action("search", "q"), "o"), (0.5, ["x"], Action("answer", "a"), None)],
                    info={"f1": 0.5})
    assert score_rollout(half, FCRLConfig(search_score="f1", format_weight=0.0)).r_episode == pytest.approx(0.5)


def test_per_token_advantages_full_method():
    good, bad = compute_advantages([GOOD, BAD], FCRLConfig(format_weight=0.1, omega_search=0.2, adv_eps=1e-12))
    # A_E: R_E = [1.1, 0.1] -> mean 0.6, std 0.5 -> [1, -1]
    # R_WM = R_calib + R_ground: GOOD [0.64+0.5, 0.99+1] = [1.14, 1.99]; BAD: calib [-0.64, -0.36],
    #   ground [1, 1] (Paris is in each step's future: its own answer) -> [0.36, 0.64]
    # group of 4 steps: mean 1.0325, deviations [0.1075, 0.9575, -0.6725, -0.3925], std sqrt(0.38366875) = 0.619410
    #   -> A_WM = [0.173552, 1.545826, -1.085710, -0.633667]
    # policy: A_E + 0.2 * A_S: GOOD [1 + 0.1, 1 + 0.02] = [1.1, 1.02]; BAD A_S [-0.2, -0.6] -> [-1.04, -1.12]
    assert good.advantages == pytest.approx([0.173552, 0.173552, 1.1, 1.0, 0, 0, 1.545826, 1.02, 1.02, 1.0], abs=1e-5)
    assert bad.advantages == pytest.approx([-1.085710, -1.085710, -1.04, -1.0, 0, 0, -0.633667, -1.12, -1.12, -1.0],
                                           abs=1e-5)


def test_per_token_advantages_baselines():
    # plain GRPO: no world-model reward, omega 0 -> every generated token A_E, observation tokens 0
    plain = FCRLConfig(format_weight=0.1, use_calibration=False, use_grounding=False, omega_search=0.0, adv_eps=1e-12)
    good, bad = compute_advantages([GOOD, BAD], plain)
    assert good.advantages == pytest.approx([1, 1, 1, 1, 0, 0, 1, 1, 1, 1])
    assert bad.advantages == pytest.approx([-1, -1, -1, -1, 0, 0, -1, -1, -1, -1])
    # no grounding: R_WM = R_calib = [0.64, 0.99, -0.64, -0.36], mean 0.1575, std sqrt(0.45741875) = 0.676327
    #   -> A_WM GOOD [0.713412, 1.230915]
    good, _ = compute_advantages([GOOD, BAD], FCRLConfig(format_weight=0.1, use_grounding=False, adv_eps=1e-12))
    assert good.advantages[0] == pytest.approx(0.713412, abs=1e-5) and good.advantages[6] == pytest.approx(1.230915,
                                                                                                         abs=1e-5)
    # Dr.GRPO: A_E centred only -> [0.5, -0.5]
    good, _ = compute_advantages([GOOD, BAD], FCRLConfig(format_weight=0.1, std_normalise=False, omega_search=0.0))
    assert good.advantages[2] == pytest.approx(0.5)


def test_rollout_metrics():
    m = rollout_metrics(compute_advantages([GOOD, BAD], FCRLConfig()))
    # stated q vs outcome: (0.4, 1), (0.9, 1), (0.8, 0), (0.6, 0)
    # Brier = (0.36 + 0.01 + 0.64 + 0.36) / 4 = 0.3425 ; ECE, one q per bin: (0.6 + 0.1 + 0.8 + 0.6) / 4 = 0.525
    assert m["calib/brier"] == pytest.approx(0.3425) and m["calib/ece"] == pytest.approx(0.525)
    # grounding [0.5, 1] and [1, 1] -> 0.875 ; half the episodes succeed, all well formed, 8 generated tokens each
    assert m["grounding_rate"] == pytest.approx(0.875)
    assert (m["success_rate"], m["format_rate"], m["len/response_tokens_mean"]) == (0.5, 1.0, 8.0)
    assert m["finish/answer"] == 1.0 and m["len/turns_mean"] == 2.0


def test_train_items_and_packing():
    (good,) = compute_advantages([GOOD], FCRLConfig())
    (it,) = train_items([good])
    # 3 prompt tokens + 10 response tokens; trained = the 8 generated ones (observation tokens 4, 5 left out)
    assert it.trained == [0, 1, 2, 3, 6, 7, 8, 9] and len(it) == 13
    assert it.targets == [100, 101, 102, 103, 106, 107, 108, 109]
    assert it.advantages == [good.advantages[j] for j in it.trained]
    # micro-batches hold rows x (longest prompt + longest response) <= budget, longest items first:
    # a 13-token item and a 5-token one, budget 30: [13, 13] (2 x 13 = 26), then [13, 5] (2 x 13 = 26)
    short = TrainItem(prompt_ids=[1, 2], response_ids=[3, 4, 5], trained=[0, 1, 2], advantages=[0.0] * 3, seq=3)
    mbs = micro_batches([short, it, it, it], 30)
    assert [[len(x) for x in mb] for mb in mbs] == [[13, 13], [13, 5]]


# ---------------------------------------------------------------------------------------------
# A toy task the tiny random model can learn: the answer must start with a letter a-m.


class FirstLetterEnv:
    """Reward 1 when the answer's first character is a letter from a to m (about half of all tokens)."""

    name = "toy"
    max_turns = 1

    def reset(self, task):
        return task.question

    def step(self, action):
        s = self.reward(action.content, None)
        return StepResult(observation=None, done=True, success=s == 1.0, score=s)

    def reward(self, prediction, task):
        t = prediction.strip().lower()
        return float(bool(t) and "a" <= t[0] <= "m")


def _tiny_model(seed: int = 0):
    model, _ = load_model(ModelConfig(source="tiny", tiny_hidden=32), "cpu", seed=seed)
    return model


TOY_TASKS = [Task(id=f"q{i}", env="toy", question=f"Say a word ({i}).", answers=["-"]) for i in range(8)]
# temperature 0.1 makes the random model's sampling peaked, so rewarded first tokens recur and get reinforced
TOY_CFG = dict(turn_format="raw", group_size=8, tasks_per_step=4, lr=1e-2, max_new_tokens=3, temperature=0.1,
               format_weight=0.0, n_eval_tasks=64)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(source="tiny"))


def test_reward_goes_up_on_toy_task(tok, tmp_path):
    tracker = MemoryTracker()
    res = train_fc_rl(FCRLConfig(max_steps=20, checkpoint_every=100, **TOY_CFG), _tiny_model(), tok, TOY_TASKS,
                      lambda t: FirstLetterEnv(), eval_tasks=TOY_TASKS * 8, tracker=tracker,
                      checkpoint_dir=tmp_path)
    succ = tracker.series("success_rate")
    assert len(succ) == 20
    # held-out evaluation (64 samples, same seed before and after): about a coin flip before, near 1 after
    assert res.eval_before["success_rate"] < 0.7
    assert res.eval_after["success_rate"] > 0.9
    assert sum(succ[-5:]) / 5 > sum(succ[:5]) / 5 + 0.2
    # the stage logs what the issue asks for
    last = tracker.metrics[-2][1]
    for key in ("reward/episode_mean", "reward/episode_std", "format_rate", "clip_frac", "approx_kl",
                "perf/rollout_tokens_per_s", "perf/learner_tokens_per_s", "len/response_tokens_mean"):
        assert key in last
    assert tracker.tables["fc_rl/samples.json"][0]["step"] == 1
    assert (tmp_path / CHECKPOINT_FILE).exists()


def test_resume_matches_uninterrupted_run(tok, tmp_path):
    cfg = dict(TOY_CFG, n_eval_tasks=0, checkpoint_every=2, ppo_epochs=2, num_minibatches=2)
    straight = _tiny_model()
    train_fc_rl(FCRLConfig(max_steps=4, **cfg), straight, tok, TOY_TASKS, lambda t: FirstLetterEnv(),
                checkpoint_dir=tmp_path / "a")
    # stop after 2 steps, then a fresh process (a fresh model) picks up the checkpoint and runs to 4
    first = _tiny_model()
    train_fc_rl(FCRLConfig(max_steps=2, **cfg), first, tok, TOY_TASKS, lambda t: FirstLetterEnv(),
                checkpoint_dir=tmp_path / "b")
    resumed, tracker = _tiny_model(seed=1), MemoryTracker()
    res = train_fc_rl(FCRLConfig(max_steps=4, **cfg), resumed, tok, TOY_TASKS, lambda t: FirstLetterEnv(),
                      checkpoint_dir=tmp_path / "b", tracker=tracker)
    assert [s for s, _ in tracker.metrics] == [3, 4] and len(res.history) == 2
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(first.lm_head.weight, resumed.lm_head.weight)


def test_bad_checkpoint_is_named(tok, tmp_path):
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=CHECKPOINT_FILE):
        train_fc_rl(FCRLConfig(max_steps=1, **dict(TOY_CFG, n_eval_tasks=0)), _tiny_model(), tok, TOY_TASKS,
                    lambda t: FirstLetterEnv(), checkpoint_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# The Ray Train adapter (tasks.rl): two DDP workers, MLflow, reuse


@pytest.mark.slow
def test_ray_train_stage_two_workers(tmp_path, mlflow_uri, ray_local):
    from mlflow import MlflowClient

    from foresight_core.config import load_config
    from foresight_core.envs.search_world import generate_world, make_search_world_tasks
    from foresight_core.storage import DatasetWriter
    from tasks.rl import run_fc_rl_stage

    world = generate_world(1, 24)
    mix = {"one_hop": 1.0}
    corpus = str(tmp_path / "corpus")
    with DatasetWriter(corpus) as w:
        w.write_rows("rl_tasks.jsonl", [t.to_dict() for t in make_search_world_tasks(world, 8, mix, 0, "train")])
        w.write_rows("eval_search.jsonl", [t.to_dict() for t in make_search_world_tasks(world, 4, mix, 1, "eval")])
        w.commit({"stage": "corpus", "datasets": {"rl_tasks": {"file": "rl_tasks.jsonl"},
                                                   "eval/search_world": {"file": "eval_search.jsonl"}}})
    sets = {"work_dir": tmp_path / "work", "infra.tracking.tracking_uri": mlflow_uri, "model.tiny_hidden": 32,
            "envs.search_world.n_entities": 24, "fc_rl.max_steps": 2, "fc_rl.checkpoint_every": 1,
            "fc_rl.max_new_tokens": 16, "fc_rl.n_eval_tasks": 2, "fc_rl.scaling.num_workers": 2}
    cfg = load_config("tiny", overrides=[f"{k}={v}" for k, v in sets.items()], env={})
    ref = run_fc_rl_stage(cfg, None, corpus)
    client = MlflowClient(mlflow_uri)
    run = client.get_run(ref["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["foresight.stage"] == "fc_rl"
    assert [m.step for m in client.get_metric_history(ref["run_id"], "reward/episode_mean")] == [1, 2]
    for key in ("format_rate", "perf/rollout_tokens_per_s", "eval_after/format_rate", "eval_before/success_rate"):
        assert key in run.data.metrics, key
    assert {a.path for a in client.list_artifacts(ref["run_id"])} >= {"model", "fc_rl"}
    assert ref["checkpoint"] is None and not Path(run.data.tags["foresight.ray_run"]).exists()  # deleted once finished
    # the same config and inputs again: the finished run is reused, nothing runs
    again = run_fc_rl_stage(cfg, None, corpus)
    assert again["reused"] and again["run_id"] == ref["run_id"]
