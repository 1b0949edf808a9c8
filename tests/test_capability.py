"""The format-capability check of the supervised stages (foresight_core/capability.py): which held-out
tasks it plays, and its metrics on scripted turns against numbers worked by hand."""

from __future__ import annotations

import math

import pytest

from foresight_core.capability import (check_metrics, held_out_task_uris, load_task_sets, play_check,
                                       run_format_check, select_tasks, set_name, summary_line)
from foresight_core.chat import ChatBridge
from foresight_core.config import ModelConfig
from foresight_core.envs.search import SearchEnv
from foresight_core.format import render_turn
from foresight_core.models import load_tokenizer
from foresight_core.rollout import Generation
from foresight_core.types import Action, Task, Turn, WorldModelBlock

PASSAGES = [
    {"id": "1", "contents": '"Zorvan Kellid"\nZorvan Kellid was born in Tamsor and founded the Velmor Institute.'},
    {"id": "2", "contents": '"Tamsor"\nTamsor is a river town in the north.'},
]


def turn(kind: str, content: str, keywords: list[str] | None, q: float | None) -> str:
    wm = None if keywords is None else WorldModelBlock("Plan.", keywords, "Analysis.", q)
    return render_turn(Turn("Thinking.", Action(kind, content), wm))


MALFORMED = "The answer is Tamsor."  # no tags at all

# One script per task (the row key in its question picks it), and what each turn should score:
SCRIPTS = {
    # row 0: search (keywords Tamsor, Velmor both in the passage: grounding 1; q 0.4), answer Tamsor
    #        (keyword Tamsor = the answer: grounding 1; q 0.9) -> success, well formed
    0: [turn("search", "Zorvan Kellid born", ["Tamsor", "Velmor"], 0.4), turn("answer", "Tamsor", ["Tamsor"], 0.9)],
    # row 1: answers Velmor at once (keywords Velmor found, Paris not: grounding 0.5; q 0.8) -> wrong, well formed
    1: [turn("answer", "Velmor", ["Velmor", "Paris"], 0.8)],
    # row 2: a malformed first turn -> episode over, nothing stated
    2: [MALFORMED],
    # row 3: a good search (keyword Kellid found: grounding 1; q 0.3), then a malformed turn -> failed
    3: [turn("search", "Zorvan Kellid", ["Kellid"], 0.3), MALFORMED],
}
SETS = {"alpha": [0, 1], "beta": [2, 3]}  # rows by held-out set


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(source="tiny"))


class ScriptedEngine:
    """A RolloutEngine that writes fixed token sequences: the next scripted turn of the row whose key is
    in the prompt, ended by the end-of-turn token."""

    shares_weights = True

    def __init__(self, tok, scripts: dict[int, list[str]]):
        self.tok = tok
        self.scripts = {k: list(v) for k, v in scripts.items()}

    def generate(self, prompts, params):
        out = []
        for p in prompts:
            text = self.tok.decode(p)
            row = next(k for k in self.scripts if f"[row {k}]" in text)
            ids = self.tok.encode(self.scripts[row].pop(0), add_special_tokens=False) + [self.tok.eos_token_id]
            out.append(Generation(token_ids=ids, logprobs=[-0.1] * len(ids), finished=True))
        return out

    def load_weights(self, weights):
        raise AssertionError("not used")


def task(row: int) -> Task:
    return Task(id=f"t{row}", env="search", question=f"[row {row}] Where was Zorvan Kellid born?", answers=["Tamsor"])


def task_sets() -> dict[str, list[Task]]:
    return {name: [task(r) for r in rows] for name, rows in SETS.items()}


def make_env(t: Task) -> SearchEnv:
    return SearchEnv(PASSAGES, top_k=2, max_turns=4)


def test_metrics_of_scripted_turns_match_the_hand_worked_numbers(tok):
    m = play_check(ScriptedEngine(tok, SCRIPTS), ChatBridge(tok), make_env, task_sets(), n_tasks=4, seed=3)
    assert m["n_tasks"] == 4
    assert m["format_rate"] == pytest.approx(2 / 4)  # rows 0 and 1 are well formed throughout
    assert m["valid_turn_rate"] == pytest.approx(4 / 6)  # 2 + 1 + 0 + 1 of 2 + 1 + 1 + 2 turns
    assert m["success_rate"] == pytest.approx(1 / 4)
    assert m["grounding_rate"] == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    # stated q against the episode outcome: (0.4, 1), (0.9, 1), (0.8, 0), (0.3, 0)
    assert m["brier"] == pytest.approx((0.6 ** 2 + 0.1 ** 2 + 0.8 ** 2 + 0.3 ** 2) / 4)  # 0.275
    assert m["ece"] == pytest.approx((0.6 + 0.1 + 0.8 + 0.3) / 4)  # one prediction per bin: 0.45
    assert m["mean_confidence"] == pytest.approx((0.4 + 0.9 + 0.8 + 0.3) / 4)
    assert m["alpha/format_rate"] == 1.0 and m["alpha/success_rate"] == 0.5
    assert m["beta/format_rate"] == 0.0 and m["beta/success_rate"] == 0.0
    line = summary_line(m)
    assert line.startswith("4 tasks | format 50.0% | valid turns 66.7%") and "ECE 0.450" in line


def test_plain_turns_have_no_world_model_metrics(tok):
    plain = {0: [render_turn(Turn("Thinking.", Action("answer", "Tamsor")))]}
    m = play_check(ScriptedEngine(tok, plain), ChatBridge(tok), make_env, {"alpha": [task(0)]}, n_tasks=1,
                   turn_format="plain")
    assert m == {"n_tasks": 1.0, "format_rate": 1.0, "valid_turn_rate": 1.0, "success_rate": 1.0,
                 "alpha/format_rate": 1.0, "alpha/success_rate": 1.0}  # no q, no keywords: left out, not NaN
    # the same turn where the world-model block is required is malformed
    m = play_check(ScriptedEngine(tok, plain), ChatBridge(tok), make_env, {"alpha": [task(0)]}, n_tasks=1)
    assert m["format_rate"] == 0.0 and m["valid_turn_rate"] == 0.0


def test_no_tasks_and_empty_rollouts():
    assert check_metrics([]) == {"n_tasks": 0.0}
    assert play_check(None, None, make_env, {}, n_tasks=5) == {"n_tasks": 0.0}
    with pytest.raises(ValueError):
        check_metrics([], ["alpha"])


def test_tasks_are_balanced_across_sets_and_seeded():
    sets = {"search_world": [Task(f"s{i}", "search", "?", ["a"]) for i in range(10)],
            "gsm_symbolic": [Task(f"m{i}", "math", "?", ["1"]) for i in range(3)]}
    picked = select_tasks(sets, 8, seed=1)
    names = [s for s, _ in picked]
    assert names.count("gsm_symbolic") == 3 and names.count("search_world") == 5  # maths runs out: search fills
    assert names[:6] == ["gsm_symbolic", "search_world"] * 3
    assert len({t.id for _, t in picked}) == 8  # no task twice
    assert select_tasks(sets, 8, seed=1) == picked  # deterministic for a seed
    assert [t.id for _, t in select_tasks(sets, 8, seed=2)] != [t.id for _, t in picked]
    assert len(select_tasks(sets, 100)) == 13 and select_tasks(sets, 0) == []
    # balanced: an even split when both sets have enough
    assert [s for s, _ in select_tasks(sets, 4)].count("gsm_symbolic") == 2


def test_held_out_tasks_by_reference_and_the_stage_check_on_a_saved_model(tmp_path):
    """The corpus's eval/* sets are found by its manifest; a saved tiny model plays them (random weights:
    nothing well formed, but every metric is there and in range)."""
    from foresight_core.config import load_config
    from foresight_core.models import load_model, save_model
    from foresight_core.storage import DatasetWriter

    search = Task("sw0", "search", "Who founded the institute?", ["x"], {"world_seed": 7, "n_entities": 24})
    maths = Task("m0", "math", "What is 2 + 2?", ["4"])
    corpus = str(tmp_path / "corpus")
    with DatasetWriter(corpus) as w:
        w.write_rows("eval/search_world.jsonl", [search.to_dict()])
        w.write_rows("eval/gsm_symbolic.jsonl", [maths.to_dict()])
        w.write_rows("wm_amt.jsonl", [{"text": "hello"}])
        w.commit({"stage": "corpus", "datasets": {"wm_amt": {"file": "wm_amt.jsonl"},
                                                   "eval/search_world": {"file": "eval/search_world.jsonl"},
                                                   "eval/gsm_symbolic": {"file": "eval/gsm_symbolic.jsonl"}}})
    uris = held_out_task_uris(corpus)
    assert [set_name(u) for u in uris] == ["gsm_symbolic", "search_world"]
    assert held_out_task_uris(uris[0]) == [uris[0]] and held_out_task_uris(str(tmp_path / "nothing")) == []
    assert load_task_sets(uris) == {"gsm_symbolic": [maths], "search_world": [search]}

    cfg = load_config("tiny", overrides=["model.tiny_hidden=32", "fe_sft.format_check_max_new_tokens=8"], env={})
    model, tokenizer = load_model(cfg.model, train=False)
    model_dir = save_model(model, tokenizer, tmp_path / "model")
    m = run_format_check(cfg, "fe_sft", model_dir, uris)
    assert m["n_tasks"] == 2 and set(m) >= {"format_rate", "valid_turn_rate", "success_rate",
                                             "search_world/format_rate", "gsm_symbolic/format_rate"}
    assert all(0.0 <= v <= 1.0 for k, v in m.items() if k != "n_tasks") and not any(map(math.isnan, m.values()))
    assert run_format_check(cfg, "fe_sft", model_dir, uris) == m  # deterministic for a seed


def test_a_failing_check_is_reported_and_keeps_the_stage_result(tmp_path, capsys):
    from pathlib import Path

    from foresight_core.config import load_config
    from foresight_core.sft import SFTResult, check_final_model

    class Tags:
        tags: dict[str, str] = {}

        def log_metrics(self, metrics, step=None):
            raise AssertionError("a failed check logs no metrics")

        def set_tags(self, tags):
            self.tags.update(tags)

    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"not": "a task"}\n')
    cfg = load_config("tiny", overrides=["fe_sft.format_check_tasks=2"], env={})
    result = SFTResult(step=3, metrics={"loss": 1.0}, history=[], model_dir=Path(tmp_path / "model"))
    tracker = Tags()
    assert check_final_model(cfg, "fe_sft", result, [str(bad)], tracker=tracker) == {}
    assert result.metrics == {"loss": 1.0}
    assert "format check failed" in tracker.tags["foresight.check.error"]
    assert "format check failed, the trained model is kept" in capsys.readouterr().out


def test_state_turns_are_well_formed_in_the_state_format(tok):
    state = ("<imaginary>search the founder, then answer</imaginary>\n<think>Thinking.</think>\n"
             "<action><answer>Tamsor</answer></action>")
    m = play_check(ScriptedEngine(tok, {0: [state]}), ChatBridge(tok), make_env, {"alpha": [task(0)]}, n_tasks=1,
                   turn_format="state")
    assert m["format_rate"] == 1.0 and m["success_rate"] == 1.0 and "ece" not in m  # no q: no calibration
    full = play_check(ScriptedEngine(tok, {0: [state]}), ChatBridge(tok), make_env, {"alpha": [task(0)]}, n_tasks=1,
                      turn_format="foresight")
    assert full["format_rate"] == 0.0  # the same turn lacks the keywords and confidence the full format needs
