"""The foresight turn format: render (strict) and parse (never raises).

An assistant turn is a world-model span (z_t) followed by a policy span::

    <imaginary>roadmap of the next steps</imaginary>
    <keyword>term one; term two</keyword>
    <analysis>what is known, what is missing</analysis>
    <confidence>0.70</confidence>
    <think>reasoning for the next action</think>
    <action><search>query</search></action>

The action holds exactly one tool: ``<search>``, ``<python>`` or ``<answer>``. A plain turn
(no foresight) is the last two tags alone. The environment answers with
``<observation>...</observation>``.

    text = render_turn(turn)            # raises FormatError on anything it cannot write faithfully
    parsed = parse_turn(model_output)   # ParsedTurn(valid, reason, turn, fields, spans); never raises
    parsed.wm_span, parsed.policy_span  # char ranges for token masks (chat.py)

Field text is normalised the same way on both sides (stripped; python code also dedented),
so ``parse_turn(render_turn(t)).turn`` equals ``t`` up to that normalisation and the two-decimal
confidence. A field's content runs to its own closing tag, so python code may hold ``<`` and
``>`` freely; it may not hold any of the format's own tags (``<think>``, ``</python>``, ...).
"""

from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass, field
from typing import Literal

from foresight_core.types import ACTION_KINDS, Action, Turn, WorldModelBlock

WM_TAGS: tuple[str, ...] = ("imaginary", "keyword", "analysis", "confidence")
POLICY_TAGS: tuple[str, ...] = ("think", "action")
TURN_TAGS: tuple[str, ...] = WM_TAGS + POLICY_TAGS
STATE_TAGS: tuple[str, ...] = ("imaginary",) + POLICY_TAGS

TurnFormat = Literal["foresight", "state", "plain"]
"""What an assistant turn carries. foresight: the whole world-model block (roadmap, keywords, analysis,
confidence) then think/action; state: the imagined roadmap alone then think/action (the State-SFT
baseline: an imagined state, no keywords, no confidence); plain: think/action (no world model)."""
TURN_FORMATS: tuple[str, ...] = ("foresight", "state", "plain")
_REQUIRED = {"foresight": TURN_TAGS, "state": STATE_TAGS, "plain": POLICY_TAGS}
ALL_TAGS: tuple[str, ...] = TURN_TAGS + ACTION_KINDS + ("observation",)

_KNOWN_TAG = re.compile(r"<(/?)(" + "|".join(ALL_TAGS) + r")>")
_ANY_TAG = re.compile(r"<(/?)([A-Za-z_][\w\-]*)>")
_CONFIDENCE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(%?)\s*")


class FormatError(ValueError):
    """A turn that cannot be rendered in the format (the message says which field and why)."""


# ---------------------------------------------------------------------------- confidence

def format_confidence(q: float) -> str:
    """q_t as written in the turn: two decimals ("0.70")."""
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) or not 0.0 <= q <= 1.0:
        raise FormatError(f"confidence must be a number in [0, 1], got {q!r}")
    return f"{q:.2f}"


def parse_confidence(text: str) -> float | None:
    """"0.7", "70%", "70" -> 0.7. A bare number in [0, 1] is a probability, one in (1, 100] a
    percentage; with "%" it is always a percentage. Anything else (junk, negative, > 100) -> None."""
    m = _CONFIDENCE.fullmatch(text)
    if m is None:
        return None
    x = float(m.group(1))
    if m.group(2) or x > 1.0:
        x /= 100.0
    return x if 0.0 <= x <= 1.0 else None


# ---------------------------------------------------------------------------- render (strict)

def _clean(text: str, kind: str = "") -> str:
    """Field normalisation shared by render and parse: strip; python code is also dedented
    (a model often indents a code block under its tag)."""
    if kind == "python":
        return textwrap.dedent(text.strip("\r\n")).strip()
    return text.strip()


def _field(text: str, name: str, kind: str = "") -> str:
    if not isinstance(text, str):
        raise FormatError(f"{name} must be a string, got {type(text).__name__}")
    text = _clean(text, kind)
    m = _KNOWN_TAG.search(text)
    if m:
        raise FormatError(f"{name} contains the format tag {m.group(0)!r}: {text[:60]!r}")
    return text


def render_wm(wm: WorldModelBlock) -> str:
    """The four world-model tags, one per line; keywords joined by "; "."""
    keywords = []
    for i, k in enumerate(wm.keywords):
        k = _field(k, f"keyword {i}")
        if not k or ";" in k:
            raise FormatError(f"keyword {i} must be non-empty and hold no ';', got {k!r}")
        keywords.append(k)
    return (f"<imaginary>{_field(wm.imaginary, 'imaginary')}</imaginary>\n"
            f"<keyword>{'; '.join(keywords)}</keyword>\n"
            f"<analysis>{_field(wm.analysis, 'analysis')}</analysis>\n"
            f"<confidence>{format_confidence(wm.confidence)}</confidence>")


def render_turn(turn: Turn, turn_format: TurnFormat = "foresight") -> str:
    """One assistant turn: the world-model block when ``turn.wm`` is set, then think and action.
    ``turn_format`` "state" writes only the block's roadmap, "plain" drops the block."""
    kind = turn.action.kind
    if kind not in ACTION_KINDS:
        raise FormatError(f"action kind must be one of {ACTION_KINDS}, got {kind!r}")
    content = _field(turn.action.content, f"action <{kind}>", kind)
    if not content:
        raise FormatError(f"empty action: <{kind}> has no content")
    policy = f"<think>{_field(turn.think, 'think')}</think>\n<action><{kind}>{content}</{kind}></action>"
    if turn.wm is None or turn_format == "plain":
        return policy
    if turn_format == "state":
        return f"<imaginary>{_field(turn.wm.imaginary, 'imaginary')}</imaginary>\n" + policy
    if turn_format != "foresight":
        raise FormatError(f"turn format must be one of {TURN_FORMATS}, got {turn_format!r}")
    return render_wm(turn.wm) + "\n" + policy


def render_observation(text: str) -> str:
    """An environment's answer. Tool output is wrapped as it is (stripped): it is never parsed
    as a turn and never trained on, so it is not rejected for holding tag text."""
    return f"<observation>{text.strip()}</observation>"


# ---------------------------------------------------------------------------- parse (never raises)

@dataclass
class ParsedTurn:
    """What ``parse_turn`` read. ``reason`` is the first problem found (None when valid);
    ``turn`` is set whenever an action was read, even if the turn is invalid elsewhere;
    ``spans`` maps each top-level tag found to its char range, tags included."""

    valid: bool
    reason: str | None
    turn: Turn | None = None
    imaginary: str | None = None
    keywords: list[str] | None = None
    analysis: str | None = None
    confidence: float | None = None
    think: str | None = None
    action: Action | None = None
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    has_wm: bool = False  # all four world-model tags were found

    def _cover(self, tags: tuple[str, ...]) -> tuple[int, int] | None:
        found = [self.spans[t] for t in tags if t in self.spans]
        return (min(a for a, _ in found), max(b for _, b in found)) if found else None

    @property
    def wm_span(self) -> tuple[int, int] | None:
        """[imaginary.start, confidence.end) -- or the cover of the world-model tags that were found."""
        return self._cover(WM_TAGS)

    @property
    def policy_span(self) -> tuple[int, int] | None:
        """[think.start, action.end) -- or the cover of the policy tags that were found."""
        return self._cover(POLICY_TAGS)


def _snip(text: str, n: int = 40) -> str:
    text = text.strip()
    return repr(text if len(text) <= n else text[:n] + "...")


def _stray(text: str) -> str:
    """The problem with non-whitespace text between the top-level tags."""
    m = _ANY_TAG.search(text)
    if m and not m.group(1):
        return f"unknown tag <{m.group(2)}>"
    return f"text outside tags: {_snip(text)}"


def _nested(content: str, tag: str) -> str | None:
    m = _KNOWN_TAG.search(content)
    return f"tag {m.group(0)} inside <{tag}>" if m else None


def _next_tag_start(text: str, pos: int) -> int:
    m = _KNOWN_TAG.search(text, pos)
    return m.start() if m else len(text)


def _parse_action(text: str, pos: int, problems: list[str]) -> tuple[list[Action], int]:
    """Read the inside of <action> from ``pos`` (just after the opening tag). Returns the tools
    read and the position after </action> (or where reading stopped)."""
    n, tools = len(text), []
    while True:
        pos = n - len(text[pos:].lstrip()) if pos < n else n
        if pos >= n:
            problems.append("unclosed <action>")
            break
        m = _ANY_TAG.match(text, pos)
        if m is None:  # plain text inside the action
            nxt = _ANY_TAG.search(text, pos)
            end = nxt.start() if nxt else n
            problems.append(f"text inside <action> outside a tool tag: {_snip(text[pos:end])}")
            pos = end
            continue
        closing, name = m.group(1) == "/", m.group(2)
        if closing and name == "action":
            pos = m.end()
            break
        if closing:
            problems.append(f"unexpected closing tag </{name}> in <action>")
            pos = m.end()
        elif name in TURN_TAGS or name == "observation":  # the action never closed
            problems.append("unclosed <action>")
            break
        elif name in ACTION_KINDS:
            close = text.find(f"</{name}>", m.end())
            if close < 0:
                problems.append(f"unclosed <{name}>")
                close = text.find("</action>", m.end())
                close = n if close < 0 else close
                after = close
            else:
                after = close + len(name) + 3
            raw = text[m.end():close]
            nested = _nested(raw, name)
            if nested:
                problems.append(nested)
            tools.append(Action(name, _clean(raw, name)))  # type: ignore[arg-type]
            pos = after
        else:
            problems.append(f"unknown tool tag <{name}> in <action> (expected one of {', '.join(ACTION_KINDS)})")
            close = text.find(f"</{name}>", m.end())
            pos = m.end() if close < 0 else close + len(name) + 3
    if not tools:
        problems.append("empty action (no <search>, <python> or <answer>)")
    elif len(tools) > 1:
        problems.append(f"more than one tool in <action>: {', '.join('<' + t.kind + '>' for t in tools)}")
    elif not tools[0].content:
        problems.append(f"empty action: <{tools[0].kind}> has no content")
    return tools, pos


def parse_turn(text: str, turn_format: TurnFormat | Literal["any"] = "foresight") -> ParsedTurn:
    """Read one assistant turn. Never raises: problems make ``valid`` False with a ``reason``
    (missing / duplicated / unclosed / out-of-order tags, bad confidence, empty action, several
    tools, unknown tool tag, text outside tags).

    ``turn_format`` is the format the turn must have: "foresight" (every tag), "state" (roadmap,
    think, action, and no other world-model tag), "plain" (think + action; a full block is also
    accepted), "any" (plain, state or full). A partial world-model block is invalid in every case."""
    if not isinstance(text, str):
        return ParsedTurn(valid=False, reason=f"turn must be a string, got {type(text).__name__}")
    problems: list[str] = []
    raw: dict[str, str] = {}
    spans: dict[str, tuple[int, int]] = {}
    tools: list[Action] = []
    confidence: float | None = None
    n, pos = len(text), 0
    while pos < n:
        m = _KNOWN_TAG.search(text, pos)
        stray = text[pos:m.start() if m else n]
        if stray.strip():
            problems.append(_stray(stray))
        if m is None:
            break
        closing, tag = m.group(1) == "/", m.group(2)
        if closing:
            problems.append(f"unexpected closing tag </{tag}>")
            pos = m.end()
            continue
        if tag not in TURN_TAGS:  # a tool outside <action>, or an observation the model wrote itself
            problems.append(f"<{tag}> outside <action>" if tag in ACTION_KINDS
                            else f"unexpected <{tag}> in an assistant turn")
            close = text.find(f"</{tag}>", m.end())
            pos = m.end() if close < 0 else close + len(tag) + 3
            continue
        if tag == "action":
            found, end = _parse_action(text, m.end(), problems)
            content = ""
        else:
            close = text.find(f"</{tag}>", m.end())
            if close < 0:  # unclosed: its content runs to the next tag, and reading goes on from there
                problems.append(f"unclosed <{tag}>")
                close = end = _next_tag_start(text, m.end())
            else:
                end = close + len(tag) + 3
            content = text[m.end():close]
            nested = _nested(content, tag)
            if nested:
                problems.append(nested)
        if tag in spans:
            problems.append(f"duplicated <{tag}>")
        else:
            later = [t for t in spans if TURN_TAGS.index(t) > TURN_TAGS.index(tag)]
            if later:
                problems.append(f"<{tag}> out of order (after <{later[-1]}>)")
            spans[tag] = (m.start(), end)
            if tag == "action":
                tools = found
            else:
                raw[tag] = content
            if tag == "confidence":
                confidence = parse_confidence(content)
                if confidence is None:
                    problems.append(f"confidence {_snip(content)} is not a probability in [0, 1] "
                                    "or a percentage in [0, 100]")
        pos = end

    found_wm = [t for t in WM_TAGS if t in spans]
    if turn_format in ("foresight", "state"):
        required = _REQUIRED[turn_format]
    elif turn_format in ("plain", "any"):
        state_like = turn_format == "any" and found_wm == ["imaginary"]
        required = STATE_TAGS if state_like else TURN_TAGS if found_wm else POLICY_TAGS
    else:
        return ParsedTurn(valid=False, reason=f"unknown turn format {turn_format!r}: expected one of "
                                              f"{TURN_FORMATS + ('any',)}")
    if turn_format == "state":
        problems += [f"unexpected <{t}> in a state turn (only <imaginary>, <think>, <action>)"
                     for t in found_wm if t != "imaginary"]
    for tag in required:
        if tag not in spans:
            problems.append(f"missing <{tag}>")

    keywords = None
    if "keyword" in raw:
        keywords = [k.strip() for k in raw["keyword"].split(";") if k.strip()]
    imaginary = _clean(raw["imaginary"]) if "imaginary" in raw else None
    analysis = _clean(raw["analysis"]) if "analysis" in raw else None
    think = _clean(raw["think"]) if "think" in raw else None
    has_wm = all(t in spans for t in WM_TAGS)
    action = tools[0] if tools else None
    turn = None
    if action is not None:
        wm = None
        if has_wm and confidence is not None:
            wm = WorldModelBlock(imaginary=imaginary or "", keywords=keywords or [],
                                 analysis=analysis or "", confidence=confidence)
        turn = Turn(think=think or "", action=action, wm=wm)
    return ParsedTurn(valid=not problems, reason=problems[0] if problems else None, turn=turn,
                      imaginary=imaginary, keywords=keywords, analysis=analysis, confidence=confidence,
                      think=think, action=action, spans=spans, has_wm=has_wm)


# ---------------------------------------------------------------------------- system prompt

_TOOLS = {
    "search": ("<search>query</search> searches the knowledge base; the top passages come back "
               "in <observation>.", "a short answer"),
    "math": ("<python>code</python> runs Python; its printed output comes back in <observation> "
             "(print your result).", "the final number"),
}
_WM_FORMAT = ("<imaginary>roadmap of your next steps</imaginary>\n"
              "<keyword>terms you expect to meet; separated by ;</keyword>\n"
              "<analysis>what is known, what is still missing</analysis>\n"
              "<confidence>0.0-1.0 chance your plan succeeds</confidence>\n")
_STATE_FORMAT = "<imaginary>roadmap of your next steps</imaginary>\n"


def system_prompt(env: str, turn_format: TurnFormat = "foresight") -> str:
    """The format and the tool, in few words (small models read it every episode)."""
    if turn_format not in TURN_FORMATS:
        raise ValueError(f"unknown turn format {turn_format!r}: expected one of {TURN_FORMATS}")
    if env not in _TOOLS:
        raise ValueError(f"unknown env {env!r}: expected one of {sorted(_TOOLS)}")
    tool, answer = _TOOLS[env]
    return ("Solve the user's question step by step. Write every turn as:\n"
            + {"foresight": _WM_FORMAT, "state": _STATE_FORMAT, "plain": ""}[turn_format]
            + "<think>reasoning for the next action</think>\n"
            "<action>exactly one tool call</action>\n"
            f"Tool: {tool}\n"
            f"When you know it, reply <action><answer>{answer}</answer></action>.")
