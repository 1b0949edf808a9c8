"""The served agent (foresight_core/serving.py): answers, stated confidence, abstention and per-row errors,
on scripted turns (the engine writes fixed text) and with the real tiny model."""

from __future__ import annotations

import pytest

from foresight_core.config import EnvsConfig, ModelConfig
from foresight_core.config.serve import ServeConfig
from foresight_core.models import load_model, load_tokenizer
from foresight_core.serving import ABSTAIN, Agent, RequestError
from test_capability import PASSAGES, MALFORMED, ScriptedEngine, turn


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(source="tiny"))


def agent(tok, scripts, serve: ServeConfig | None = None, passages=PASSAGES) -> Agent:
    return Agent(None, tok, serve or ServeConfig(), EnvsConfig(), passages=passages,
                 engine=ScriptedEngine(tok, scripts))


def test_answer_with_confidence_turns_and_abstention(tok):
    scripts = {0: [turn("search", "Zorvan Kellid born", ["Tamsor", "Velmor"], 0.4),
                   turn("answer", "Tamsor", ["Tamsor"], 0.9)]}
    seen = []
    out = agent(tok, scripts).predict([{"question": "[row 0] Where was Zorvan Kellid born?", "env": "search"}],
                                      on_turn=lambda i, t: seen.append((i, t["action"]["kind"])))[0]
    assert out["answer"] == "Tamsor" and out["confidence"] == 0.9 and out["confidences"] == [0.4, 0.9]
    assert not out["abstained"] and out["finish"] == "answer" and out["format_ok"]
    first, last = out["turns"]
    assert first["keywords"] == ["Tamsor", "Velmor"] and first["imaginary"] == "Plan."
    assert first["action"] == {"kind": "search", "content": "Zorvan Kellid born"} and "Tamsor" in first["observation"]
    assert last["observation"] is None and out["tokens"] > 0
    assert seen == [(0, "search"), (0, "answer")]  # streamed as played
    # below the configured confidence the agent abstains and says what it would have guessed
    out = agent(tok, {0: list(scripts[0])}, ServeConfig(min_confidence=0.95)).answer(
        "[row 0] Where was Zorvan Kellid born?")
    assert out["abstained"] and out["answer"] == ABSTAIN and out["proposed_answer"] == "Tamsor"
    # a request may lower the bar for itself
    out = agent(tok, {0: list(scripts[0])}, ServeConfig(min_confidence=0.95)).answer(
        "[row 0] Where was Zorvan Kellid born?", min_confidence=0.5)
    assert not out["abstained"] and out["answer"] == "Tamsor"


def test_no_answer_is_not_a_guess(tok):
    out = agent(tok, {1: [MALFORMED]}, ServeConfig(min_confidence=0.5)).answer("[row 1] Who?")
    assert out["proposed_answer"] is None and out["abstained"] and out["finish"] == "malformed"
    assert out["turns"][0]["valid"] is False and out["turns"][0]["reason"]


def test_bad_rows_get_their_own_error_and_the_rest_is_answered(tok):
    good = {0: [turn("answer", "Tamsor", ["Tamsor"], 0.9)]}
    rows = [{"question": "", "env": "search"}, {"question": "[row 0] Where?", "env": "search"},
            {"question": "x", "env": "chess"}, {"question": "y" * 5000, "env": "search"},
            {"question": "[row 0] z", "env": "search", "max_turns": 99},
            {"question": "[row 0] z", "env": "search", "temperature": "hot"}, "not a row"]
    out = agent(tok, good).predict(rows)
    assert out[1]["answer"] == "Tamsor"
    assert out[0] == {"error": "question must be a non-empty string"}
    assert out[2] == {"error": "env must be one of ['search', 'math'], got 'chess'"}
    assert "5000 characters" in out[3]["error"] and "serve.max_question_chars" in out[3]["error"]
    assert out[4] == {"error": "max_turns must be in [1, 8], got 99"}
    assert out[5] == {"error": "temperature must be a number, got 'hot'"}
    assert "must be an object" in out[6]["error"]
    many = agent(tok, good, ServeConfig(max_rows=2)).predict([{"question": "q"}] * 3)
    assert all("limit is 2 (serve.max_rows)" in r["error"] for r in many)
    assert "unknown settings ['bogus']" in agent(tok, good).predict([{"question": "q"}], {"bogus": 1})[0]["error"]
    with pytest.raises(RequestError, match="no passages"):
        agent(tok, good, passages=None).answer("[row 0] Where?")


def test_tool_code_that_attacks_the_sandbox_is_an_observation(tok, tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("still here")
    attack = (f"import os, shutil\nshutil.rmtree({str(tmp_path)!r}, ignore_errors=True)\n"
              "os.system('kill -9 -1')\nprint(open('/etc/hostname').read())")
    scripts = {2: [turn("python", attack, ["x"], 0.5), turn("answer", "4", ["4"], 0.6)]}
    out = agent(tok, scripts).predict([{"question": "[row 2] What is 2 + 2?", "env": "math"}])[0]
    assert out["answer"] == "4" and isinstance(out["turns"][0]["observation"], str)
    assert canary.read_text() == "still here"  # the sandbox saw no host folder to delete


def test_the_tiny_model_answers_something_well_typed(tok):
    model, tokenizer = load_model(ModelConfig(source="tiny"), train=False)
    a = Agent(model, tokenizer, ServeConfig(max_new_tokens=16, max_turns=2), EnvsConfig(), passages=PASSAGES)
    out = a.predict([{"question": "Where was Zorvan Kellid born?", "env": "search"},
                     {"question": "What is 6 * 7?", "env": "math", "max_turns": 1}])
    for r in out:
        assert "error" not in r, r
        assert r["confidence"] is None or 0.0 <= r["confidence"] <= 1.0
        assert isinstance(r["turns"], list) and r["tokens"] > 0 and isinstance(r["abstained"], bool)
