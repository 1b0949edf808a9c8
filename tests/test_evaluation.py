"""Evaluation: metric aggregation on hand-worked records, plan selection, and a real tiny-model run."""

from __future__ import annotations

import math

import pytest

from foresight_core.config import EvalConfig, ModelConfig
from foresight_core.evaluation import PlanSelectingEngine, flat_metrics, modes, select_plan, summarise
from foresight_core.rollout import Generation, SamplingParams


def rec(task, success, confs, grounding=(), fmt=True, tokens=10, turns=1, sample=0, f1=None):
    return {"task_id": task, "success": success, "score": float(success), "f1": float(success) if f1 is None else f1,
            "format_ok": fmt, "gen_tokens": tokens, "turns": turns, "confidences": list(confs),
            "grounding": list(grounding), "sample": sample}


def test_summarise_worked_example():
    # task a: samples (success, q=0.9) and (fail, q=0.8); task b: (fail, q=0.2) and (fail, q=None: malformed)
    records = [rec("a", True, [0.9], [1.0, 0.5], sample=0), rec("a", False, [0.8], [0.0], sample=1),
               rec("b", False, [0.2], [], fmt=True, tokens=20, sample=0), rec("b", False, [None], fmt=False, sample=1)]
    m = summarise(records)
    assert m["score"] == pytest.approx(0.25)  # mean@2: 1 success of 4 episodes
    assert m["pass_at_k"] == pytest.approx(0.5)  # task a solved by some sample, b not
    assert m["format_rate"] == pytest.approx(0.75)
    assert m["gen_tokens"] == pytest.approx(12.5)  # (10 + 10 + 20 + 10) / 4
    assert m["grounding_rate"] == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3
    # Brier over stated q: ((0.9-1)^2 + 0.8^2 + 0.2^2) / 3 = (0.01 + 0.64 + 0.04) / 3 = 0.23
    assert m["brier"] == pytest.approx(0.23)
    # ECE, 10 bins: bin [0.9,1.0]: conf .9 acc 1 -> .1; bin [0.8,0.9): conf .8 acc 0 -> .8; bin [0.2,0.3): .2
    # weighted: (0.1 + 0.8 + 0.2) / 3 = 0.3667
    assert m["ece"] == pytest.approx(1.1 / 3)
    assert m["confidence_rate"] == pytest.approx(3 / 4)
    # AUROC over the 3 stated q: the success (0.9) ranks above both failures (0.8, 0.2)
    assert m["auroc"] == 1.0 and m["k"] == 2


def test_summarise_with_unequal_samples_weighs_tasks_and_estimates_pass_at_k_without_bias():
    # task a: 4 samples, 1 solved; task b: 2 samples, none solved -> k = 2
    records = [rec("a", True, [0.9]), rec("a", False, [0.5]), rec("a", False, [0.5]), rec("a", False, [0.5]),
               rec("b", False, [0.1]), rec("b", False, [0.1])]
    m = summarise(records)
    assert m["k"] == 2
    assert m["score"] == pytest.approx((1 / 4 + 0) / 2)  # per task, then over tasks (not 1 of 6 episodes)
    assert m["pass_at_k"] == pytest.approx((1 - 3 / 6) / 2)  # a: 1 - C(3,2)/C(4,2) = 0.5; b: 0


def test_summarise_without_confidence_is_nan_not_perfect():
    m = summarise([rec("a", True, [None])])
    assert math.isnan(m["ece"]) and math.isnan(m["brier_first"])
    with pytest.raises(ValueError):
        summarise([])


@pytest.fixture(scope="module")
def tokenizer():
    from foresight_core.models import load_tokenizer
    return load_tokenizer(ModelConfig(source="tiny"))


def turn_text(q: float, answer: str) -> str:
    return (f"<imaginary>look it up</imaginary>\n<keyword>x</keyword>\n<analysis>none</analysis>\n"
            f"<confidence>{q:.2f}</confidence>\n<think>t</think>\n<action><answer>{answer}</answer></action>")


def gen(tokenizer, text, finished=True):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if finished else [])
    return Generation(token_ids=ids, logprobs=[0.0] * len(ids), finished=finished)


def test_select_plan_takes_highest_valid_confidence(tokenizer):
    cands = [gen(tokenizer, turn_text(0.4, "a")), gen(tokenizer, "garbage <think>"),
             gen(tokenizer, turn_text(0.9, "b"), finished=False),  # cut off: never chosen
             gen(tokenizer, turn_text(0.7, "c")), gen(tokenizer, turn_text(0.7, "d"))]
    chosen = select_plan(cands, tokenizer)
    assert chosen is cands[3]  # 0.7 beats 0.4; the unfinished 0.9 is skipped; tie goes to the earlier
    assert select_plan([cands[1], cands[2]], tokenizer) is cands[1]  # nothing valid: the first


def test_plan_selecting_engine_batches_k_candidates(tokenizer):
    calls = []

    class Scripted:  # stands in for a sampler; returns candidates with confidences 0.1 .. 0.k per prompt
        shares_weights = True

        def generate(self, prompts, params):
            calls.append((len(prompts), params.temperature))
            return [gen(tokenizer, turn_text(0.1 * (i % 3 + 1), str(i))) for i in range(len(prompts))]

    eng = PlanSelectingEngine(Scripted(), tokenizer, k=3, temperature=0.9)
    out = eng.generate([[1], [2]], SamplingParams(temperature=0.0))
    assert calls == [(6, 0.9)]  # one batched call: 2 prompts x 3 candidates, at the plan temperature
    texts = [tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in out]
    assert "<answer>2</answer>" in texts[0] and "<answer>5</answer>" in texts[1]  # q 0.3 is the best of each three
    with pytest.raises(ValueError):
        PlanSelectingEngine(Scripted(), tokenizer, k=1, temperature=1.0)
    # the control: a seeded uniform pick among the same K candidates, blind to q
    picks = {tokenizer.decode(PlanSelectingEngine(Scripted(), tokenizer, k=3, temperature=1.0, selection="random",
                                                  seed=s).generate([[1], [2]], SamplingParams())[0].token_ids,
                              skip_special_tokens=True).split("<answer>")[1][0] for s in range(12)}
    assert len(picks) > 1  # not always the best by q
    with pytest.raises(ValueError, match="'confidence' or 'random'"):
        PlanSelectingEngine(Scripted(), tokenizer, k=2, temperature=1.0, selection="best")


def test_modes():
    assert modes(EvalConfig(plan_candidates=4)) == ["direct", "planning", "planning_random"]
    assert modes(EvalConfig(plan_candidates=1)) == ["direct"]
    assert modes(EvalConfig(plan_candidates=4, turn_format="plain")) == ["direct"]


def test_tiny_model_plays_held_out_search_and_math():
    """A real (random) tiny model plays real environments end to end; the report is complete."""
    import torch

    from foresight_core.chat import ChatBridge
    from foresight_core.config import EnvsConfig
    from foresight_core.envs.search_world import generate_world, make_search_world_tasks
    from foresight_core.evaluation import evaluate_sets
    from foresight_core.models import load_model
    from foresight_core.rollout import HFEngine

    torch.manual_seed(0)
    model, tok = load_model(ModelConfig(source="tiny"), train=False)
    envs_cfg = EnvsConfig()
    world = generate_world(2, 24)
    search = make_search_world_tasks(world, 2, envs_cfg.search_world.question_mix, seed=2, split="eval")
    cfg = EvalConfig(max_new_tokens=16, plan_candidates=2, samples_per_task=2, temperature=1.0, batch_size=8)
    report = evaluate_sets(HFEngine(model, tok), ChatBridge(tok), {"search_world": search}, cfg, envs_cfg)
    assert set(report["search_world"]) == {"direct", "planning", "planning_random"}
    m = report["search_world"]["direct"]
    assert m["episodes"] == 4 and m["tasks"] == 2
    assert 0.0 <= m["format_rate"] <= 1.0 and 0.0 <= m["score"] <= 1.0
    assert len(report["records"]) == 12  # 2 tasks x 2 samples x 3 modes
    for mode in ("planning", "planning_random"):  # the cost of K candidates, counted whether kept or not
        plan = report["search_world"][mode]
        assert plan["candidate_tokens"] >= plan["gen_tokens"] > 0
    assert "candidate_tokens" not in m
    flat = flat_metrics(report)
    assert "search_world/direct/score" in flat and "avg/planning/score" in flat


def test_hf_engine_temperature_zero_is_greedy():
    import torch

    from foresight_core.models import load_model
    from foresight_core.rollout import HFEngine

    torch.manual_seed(0)
    model, tok = load_model(ModelConfig(source="tiny"), train=False)
    engine = HFEngine(model, tok)
    prompt = tok("Which city is larger?", add_special_tokens=False)["input_ids"]
    a, b = engine.generate([prompt, prompt], SamplingParams(temperature=0.0, max_new_tokens=8))
    assert a.token_ids == b.token_ids  # greedy: the same prompt gives the same continuation
    with torch.no_grad():  # and the first token is the argmax of the model's next-token distribution
        first = model(torch.tensor([prompt])).logits[0, -1].float().argmax().item()
    assert a.token_ids[0] == first
    assert all(math.isfinite(x) and x <= 0 for x in a.logprobs)
