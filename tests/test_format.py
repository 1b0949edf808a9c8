"""The foresight turn format: strict rendering, a parser that never raises, property tests."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foresight_core.format import (ALL_TAGS, FormatError, format_confidence, parse_confidence, parse_turn,
                                   render_observation, render_turn, render_wm, system_prompt)
from foresight_core.types import ACTION_KINDS, Action, Turn, WorldModelBlock

WM = WorldModelBlock(imaginary="search the director, then his birthplace",
                     keywords=["Ada Lind", "Paris"], analysis="the director is unknown", confidence=0.7)
SEARCH = Turn(think="First find the director.", action=Action("search", "director of Blue Harbour"), wm=WM)
EXPECTED = ("<imaginary>search the director, then his birthplace</imaginary>\n"
            "<keyword>Ada Lind; Paris</keyword>\n"
            "<analysis>the director is unknown</analysis>\n"
            "<confidence>0.70</confidence>\n"
            "<think>First find the director.</think>\n"
            "<action><search>director of Blue Harbour</search></action>")
PLAIN = "<think>done</think>\n<action><answer>Paris</answer></action>"


# ---------------------------------------------------------------------------- confidence

@pytest.mark.parametrize("text, q", [
    ("0.7", 0.7), ("70%", 0.7), ("70", 0.7), (" 0.70 ", 0.7), ("70 %", 0.7), (".5", 0.5),
    ("0", 0.0), ("1", 1.0),            # 0..1 is a probability
    ("100", 1.0), ("100%", 1.0),       # 1 < x <= 100 is a percentage
    ("1.5", 0.015),                    # 1.5 > 1 -> 1.5 %
    ("0.5%", 0.005),                   # "%" always means percent
])
def test_parse_confidence_accepts(text, q):
    assert parse_confidence(text) == pytest.approx(q)


@pytest.mark.parametrize("text", ["", "abc", "-0.1", "101", "150%", "0.7.1", "nan", "inf", "1e-1", "0.7 0.8",
                                  "q=0.7", "%"])
def test_parse_confidence_rejects(text):
    assert parse_confidence(text) is None


def test_format_confidence():
    assert format_confidence(0.7) == "0.70"
    assert format_confidence(1) == "1.00"
    assert format_confidence(0.125) == "0.12"  # 0.125 is exact in binary; .2f rounds half to even
    for bad in (-0.01, 1.01, float("nan"), float("inf"), True):
        with pytest.raises(FormatError, match="confidence"):
            format_confidence(bad)


# ---------------------------------------------------------------------------- render

def test_render_turn_exact():
    assert render_turn(SEARCH) == EXPECTED
    assert render_turn(Turn("done", Action("answer", "Paris"))) == PLAIN
    assert render_wm(WM) == EXPECTED.split("\n<think>")[0]
    assert render_observation("  Doc 1 (Ada): born in Paris.\n") == \
        "<observation>Doc 1 (Ada): born in Paris.</observation>"


def test_render_normalises_fields():
    # fields are stripped; python code is dedented, so an indented block under its tag still runs
    t = Turn("  go  ", Action("python", "\n    x = 1\n    if x < 2:\n        print(x)\n"),
             WorldModelBlock(" r ", [" a ", "b"], " g ", 0.333))
    assert render_turn(t) == ("<imaginary>r</imaginary>\n<keyword>a; b</keyword>\n<analysis>g</analysis>\n"
                              "<confidence>0.33</confidence>\n<think>go</think>\n"
                              "<action><python>x = 1\nif x < 2:\n    print(x)</python></action>")


@pytest.mark.parametrize("turn, match", [
    (Turn("t", Action("search", "  ")), "empty action"),
    (Turn("t", Action("answer", "")), "empty action"),
    (Turn("t", Action("browse", "x")), "action kind"),  # type: ignore[arg-type]
    (Turn("I <think> twice", Action("answer", "x")), "think contains the format tag '<think>'"),
    (Turn("t", Action("python", "print('</python>')")), "contains the format tag '</python>'"),
    (Turn("t", Action("answer", "x"), WorldModelBlock("r", ["a;b"], "g", 0.5)), "keyword 0"),
    (Turn("t", Action("answer", "x"), WorldModelBlock("r", ["a", " "], "g", 0.5)), "keyword 1"),
    (Turn("t", Action("answer", "x"), WorldModelBlock("r", ["a"], "<analysis>", 0.5)), "analysis contains"),
    (Turn("t", Action("answer", "x"), WorldModelBlock("r", ["a"], "g", 1.5)), "confidence"),
    (Turn("t", Action("answer", "x"), WorldModelBlock("r", ["a"], "g", float("nan"))), "confidence"),
    (Turn(None, Action("answer", "x")), "think must be a string"),  # type: ignore[arg-type]
])
def test_render_is_strict(turn, match):
    with pytest.raises(FormatError, match=re.escape(match)):
        render_turn(turn)


# ---------------------------------------------------------------------------- parse: valid turns

def test_parse_full_turn_and_spans():
    p = parse_turn(EXPECTED)
    assert p.valid and p.reason is None and p.has_wm
    assert p.turn == SEARCH
    assert (p.imaginary, p.keywords, p.analysis, p.confidence, p.think) == (
        WM.imaginary, ["Ada Lind", "Paris"], WM.analysis, 0.7, SEARCH.think)
    # each span includes its tags
    assert EXPECTED[slice(*p.spans["keyword"])] == "<keyword>Ada Lind; Paris</keyword>"
    assert EXPECTED[slice(*p.spans["confidence"])] == "<confidence>0.70</confidence>"
    assert EXPECTED[slice(*p.spans["action"])] == "<action><search>director of Blue Harbour</search></action>"
    assert EXPECTED[slice(*p.wm_span)] == render_wm(WM)
    assert EXPECTED[slice(*p.policy_span)] == ("<think>First find the director.</think>\n"
                                              "<action><search>director of Blue Harbour</search></action>")


def test_parse_plain_turn():
    p = parse_turn(PLAIN, "any")
    assert p.valid and not p.has_wm and p.wm_span is None
    assert p.turn == Turn("done", Action("answer", "Paris"))
    assert parse_turn(EXPECTED, "any").valid  # a full turn is fine when wm is optional
    assert parse_turn(PLAIN).reason == "missing <imaginary>"


STATE = ("<imaginary>search the director, then his birthplace</imaginary>\n"
         "<think>First find the director.</think>\n"
         "<action><search>director of Blue Harbour</search></action>")


def test_state_turn_renders_the_roadmap_alone_and_parses_in_its_format():
    assert render_turn(SEARCH, "state") == STATE
    assert render_turn(SEARCH, "plain") == EXPECTED.split("\n", 4)[4]
    p = parse_turn(STATE, "state")
    assert p.valid, p.reason
    assert p.imaginary == "search the director, then his birthplace" and p.confidence is None
    assert STATE[slice(*p.wm_span)] == "<imaginary>search the director, then his birthplace</imaginary>"
    assert p.turn == Turn("First find the director.", Action("search", "director of Blue Harbour"))
    assert parse_turn(STATE, "any").valid
    assert parse_turn(STATE, "foresight").reason == "missing <keyword>"
    assert parse_turn(STATE, "plain").reason == "missing <keyword>"  # a partial block is never plain
    assert parse_turn(PLAIN, "state").reason == "missing <imaginary>"
    assert parse_turn(EXPECTED, "state").reason == ("unexpected <keyword> in a state turn "
                                                    "(only <imaginary>, <think>, <action>)")
    assert parse_turn(STATE, "bogus").reason.startswith("unknown turn format 'bogus'")
    with pytest.raises(FormatError, match="turn format"):
        render_turn(SEARCH, "bogus")


def test_system_prompt_per_format():
    full, state, plain = (system_prompt("search", f) for f in ("foresight", "state", "plain"))
    assert "<confidence>" in full and "<imaginary>" in state and "<confidence>" not in state
    assert "<imaginary>" not in plain
    with pytest.raises(ValueError, match="turn format"):
        system_prompt("search", "bogus")


def test_parse_tolerates_whitespace_and_percent_confidence():
    text = ("\n <imaginary> r </imaginary>\n\n<keyword> a ;b; ;</keyword> <analysis>g</analysis>"
            "<confidence> 70% </confidence>\n<think>\n t \n</think>\n<action>\n  <answer> x </answer>\n</action>\n")
    p = parse_turn(text)
    assert p.valid, p.reason
    assert p.turn == Turn("t", Action("answer", "x"), WorldModelBlock("r", ["a", "b"], "g", 0.7))


def test_python_code_with_angle_brackets():
    code = "a, b = 3, 5\nif a<b and b>a:\n    print(a << 2, '<b>', 'x</p>')"
    text = f"<think>compare</think><action><python>{code}</python></action>"
    p = parse_turn(text, "any")
    assert p.valid, p.reason
    assert p.action == Action("python", code)


# ---------------------------------------------------------------------------- parse: each invalid reason

W = EXPECTED.split("\n<think>")[0] + "\n"  # a valid world-model block to prefix plain policy text
ACT = "<action><answer>x</answer></action>"


@pytest.mark.parametrize("text, require_wm, reason", [
    ("", True, "missing <imaginary>"),
    ("<think>t</think>", False, "missing <action>"),
    (ACT, False, "missing <think>"),
    (W.replace("<analysis>the director is unknown</analysis>\n", "") + "<think>t</think>" + ACT, True,
     "missing <analysis>"),
    ("<imaginary>r</imaginary><think>t</think>" + ACT, False, "missing <keyword>"),  # partial wm
    ("<think>a</think><think>b</think>" + ACT, False, "duplicated <think>"),
    ("<think>t</think>" + ACT + ACT, False, "duplicated <action>"),
    ("<think>t" + ACT, False, "unclosed <think>"),
    ("<think>t</think><action><answer>x</answer>", False, "unclosed <action>"),
    ("<think>t</think><action><python>print(1)</action>", False, "unclosed <python>"),
    ("<think>t</think><action><answer>x</answer><think>u</think>", False, "unclosed <action>"),
    (ACT + "<think>t</think>", False, "<think> out of order (after <action>)"),
    ("<keyword>a</keyword><imaginary>r</imaginary><analysis>g</analysis><confidence>0.5</confidence>"
     "<think>t</think>" + ACT, True, "<imaginary> out of order (after <keyword>)"),
    (W.replace("0.70", "high") + "<think>t</think>" + ACT, True,
     "confidence 'high' is not a probability in [0, 1] or a percentage in [0, 100]"),
    (W.replace("0.70", "150") + "<think>t</think>" + ACT, True, "confidence '150' is not a probability"),
    (W.replace("0.70", "-0.2") + "<think>t</think>" + ACT, True, "confidence '-0.2' is not a probability"),
    ("<think>t</think><action></action>", False, "empty action (no <search>, <python> or <answer>)"),
    ("<think>t</think><action> \n </action>", False, "empty action (no <search>, <python> or <answer>)"),
    ("<think>t</think><action><search> </search></action>", False, "empty action: <search> has no content"),
    ("<think>t</think><action><search>q</search><answer>x</answer></action>", False,
     "more than one tool in <action>: <search>, <answer>"),
    ("<think>t</think><action><browse>x</browse></action>", False,
     "unknown tool tag <browse> in <action> (expected one of search, python, answer)"),
    ("<think>t</think><action>Paris</action>", False, "text inside <action> outside a tool tag: 'Paris'"),
    ("<think>t</think><action></answer></action>", False, "unexpected closing tag </answer> in <action>"),
    ("Sure! <think>t</think>" + ACT, False, "text outside tags: 'Sure!'"),
    ("<think>t</think> so " + ACT, False, "text outside tags: 'so'"),
    ("<think>t</think>" + ACT + " done", False, "text outside tags: 'done'"),
    ("<plan>p</plan><think>t</think>" + ACT, False, "unknown tag <plan>"),
    ("<think>t</think></think>" + ACT, False, "unexpected closing tag </think>"),
    ("<think>t</think><answer>x</answer>", False, "<answer> outside <action>"),
    ("<think>t</think>" + ACT + "<observation>made up</observation>", False,
     "unexpected <observation> in an assistant turn"),
    ("<think>I will <search>q</search></think>" + ACT, False, "tag <search> inside <think>"),
    ("<think>t</think><action><python>print('<think>')</python></action>", False, "tag <think> inside <python>"),
])
def test_parse_invalid_reason(text, require_wm, reason):
    p = parse_turn(text, "foresight" if require_wm else "plain")
    assert not p.valid
    assert p.reason is not None and p.reason.startswith(reason), p.reason


def test_invalid_turn_still_carries_what_was_read():
    # the action is read although <think> never closed: its content runs to the next tag
    p = parse_turn("<think>look it up<action><search>Ada Lind</search></action>", "any")
    assert p.reason == "unclosed <think>"
    assert p.turn == Turn("look it up", Action("search", "Ada Lind"))
    # a bad confidence keeps the rest of the block but no Turn.wm
    p = parse_turn(W.replace("0.70", "sure") + "<think>t</think>" + ACT)
    assert p.has_wm and p.confidence is None and p.keywords == ["Ada Lind", "Paris"]
    assert p.turn == Turn("t", Action("answer", "x"))
    assert parse_turn(12).reason == "turn must be a string, got int"  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- system prompt

def test_system_prompt():
    from foresight_core.config import ModelConfig
    from foresight_core.models import load_tokenizer
    tok = load_tokenizer(ModelConfig(source="tiny"))
    for env, tool in (("search", "<search>query</search>"), ("math", "<python>code</python>")):
        full, plain = system_prompt(env), system_prompt(env, "plain")
        assert tool in full and "<answer>" in full and "<observation>" in full
        assert all(f"<{t}>" in full for t in ("imaginary", "keyword", "analysis", "confidence", "think", "action"))
        assert "<imaginary>" not in plain and "<think>" in plain
        assert len(tok(full)["input_ids"]) <= 160  # small models read it every episode (measured 148/151)
    with pytest.raises(ValueError, match="unknown env 'chess'"):
        system_prompt("chess")


# ---------------------------------------------------------------------------- property tests

TAG = re.compile(r"</?(" + "|".join(ALL_TAGS) + r")>")
# fields drawn from anything, with the format's own punctuation over-represented
chars = st.one_of(st.sampled_from(list("<>/;%.: \n\tab1=")), st.characters(blacklist_categories=("Cs",)))
field_text = st.text(chars, max_size=30).map(str.strip).filter(lambda s: not TAG.search(s))
keyword = field_text.filter(lambda s: s and ";" not in s)
wm_blocks = st.builds(WorldModelBlock, imaginary=field_text, keywords=st.lists(keyword, max_size=4),
                      analysis=field_text, confidence=st.integers(0, 100).map(lambda i: i / 100))
turns = st.builds(Turn, think=field_text,
                  action=st.builds(Action, kind=st.sampled_from(["search", "answer"]),
                                   content=field_text.filter(bool)),
                  wm=st.none() | wm_blocks)
code = st.text(chars, min_size=1, max_size=60).filter(lambda s: not TAG.search(s) and s.strip())
fast = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


@fast
@given(turns)
def test_render_parse_round_trip(turn):
    text = render_turn(turn)
    p = parse_turn(text, "foresight" if turn.wm is not None else "any")
    assert p.valid, (p.reason, text)
    assert p.turn == turn
    assert p.has_wm == (turn.wm is not None)
    for tag, (a, b) in p.spans.items():
        assert text[a:b].startswith(f"<{tag}>") and text[a:b].endswith(f"</{tag}>")


@fast
@given(code, st.floats(0, 1))
def test_round_trip_python_and_any_confidence(src, q):
    turn = Turn("run it", Action("python", src), WorldModelBlock("r", ["k"], "g", q))
    text = render_turn(turn)
    p = parse_turn(text)
    assert p.valid, (p.reason, text)
    assert abs(p.confidence - q) <= 0.005 + 1e-12  # two decimals
    assert render_turn(p.turn) == text  # normalisation is idempotent


@settings(max_examples=500, deadline=None)
@given(st.text() | st.lists(st.sampled_from(["<think>", "</think>", "<action>", "</action>", "<answer>",
                                              "</python>", "<confidence>", "<", ">", ";", " ", "\n"])
                            | st.text(max_size=4)).map("".join),
       st.booleans())
def test_parse_never_raises_on_arbitrary_text(text, require_wm):
    p = parse_turn(text, "foresight" if require_wm else "plain")
    assert p.valid == (p.reason is None)
    assert all(0 <= a <= b <= len(text) for a, b in p.spans.values())


@settings(max_examples=400, deadline=None)
@given(turns, st.lists(st.tuples(st.sampled_from(["delete", "insert", "duplicate"]),
                                 st.integers(0, 10_000), st.integers(0, 40),
                                 st.sampled_from([f"<{t}>" for t in ALL_TAGS] + [f"</{t}>" for t in ALL_TAGS]
                                                 + ["x", "<", "0.9", ";", "<tool>"])),
                       min_size=1, max_size=4))
def test_parse_never_raises_on_mutated_turns(turn, edits):
    text = render_turn(turn)
    for op, at, size, piece in edits:
        at %= len(text) + 1
        if op == "delete":
            text = text[:at] + text[at + size:]
        elif op == "insert":
            text = text[:at] + piece + text[at:]
        else:
            text = text[:at] + text[at:at + size] + text[at:]
    p = parse_turn(text)
    assert p.valid == (p.reason is None)
    if p.valid:  # whatever survives as valid must read back as a well-formed turn
        assert p.turn is not None and p.turn.wm is not None and p.turn.action.kind in ACTION_KINDS
        assert render_turn(p.turn)
