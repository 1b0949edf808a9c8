"""Corpus step 2b, hindsight annotation: the world-model block z_t of step t from the real future of the
same trajectory (roadmap, keywords that occur in ``scoring.future_texts``, gap analysis, the q label)."""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence

from foresight_core.format import ALL_TAGS
from foresight_core.scoring import future_texts, occurs
from foresight_core.scoring import normalise_text as norm
from foresight_core.types import Step, Task, Trajectory, WorldModelBlock


MAX_KEYWORDS = 4


# ---------------------------------------------------------------------------------------------
# 2b. Hindsight annotation: z_t from the real future of the same trajectory

# A name: capitalised words, possibly joined by "of" / "the" ("The Ballad of Orvenna", "Velmor Institute").
_ENTITY = re.compile(r"\b[A-Z][\w'-]*(?:\s+(?:(?:of|the|de|von|van)\s+)*[A-Z][\w'-]*)*")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?![\w])")
_QUESTION_WORDS = frozenset("where who whom whose what which when why how in on at the a an is was does did do "
                            "for from of first next then doc".split())  # "Doc 1 (Title)" heads search results


def future_text(steps: Sequence[Step], t: int) -> str:
    """tau_{>=t}: the action of step t and every later action and observation (no think, no wm), exactly
    the text FC-RL's grounding reward and evaluation match keywords in (``scoring.future_texts``)."""
    return future_texts([s.turn.action.content for s in steps], [s.observation for s in steps])[t]


def known_text(task: Task, steps: Sequence[Step], t: int) -> str:
    """What the agent has seen before acting at step t: the question, past actions and observations."""
    return "\n".join([task.question, *(p for s in steps[:t] for p in (s.turn.action.content, s.observation) if p)])


def final_answers(traj: Trajectory) -> list[str]:
    """The gold answers and the trajectory's own final answer: never written before they are seen."""
    out = [a for a in traj.task.answers if norm(a)]
    if traj.final_answer and norm(traj.final_answer):
        out.append(traj.final_answer)
    return out


def entities(text: str) -> list[str]:
    """Capitalised names in ``text`` (leading question words dropped), in order of appearance."""
    out = []
    for m in _ENTITY.finditer(text):
        words = m.group(0).split()
        while words and words[0].lower() in _QUESTION_WORDS:
            words = words[1:]
        if words and not all(w.lower() in _QUESTION_WORDS for w in words):
            out.append(" ".join(words))
    return out


def numbers(text: str) -> list[str]:
    return _NUMBER.findall(text)


def first_seen(term: str, steps: Sequence[Step]) -> int | None:
    """Index of the first step whose observation contains ``term``."""
    return next((i for i, s in enumerate(steps) if s.observation and occurs(term, s.observation)), None)


def _assigned_names(code: str) -> list[str]:
    """Variables a python action assigns, in order (what it computes)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id not in names:
            names.append(node.id)
    return names


def _scrub(text: str, traj: Trajectory, allowed: str) -> str:
    """Replace every final answer that does not occur in ``allowed`` by "[the answer]"."""
    for ans in sorted(final_answers(traj), key=len, reverse=True):
        if not occurs(ans, allowed):
            text = re.sub(rf"(?<!\w){re.escape(ans)}(?!\w)", "[the answer]", text, flags=re.IGNORECASE)
    return text


def roadmap(traj: Trajectory, t: int) -> str:
    """The future actions from step t on, abstracted: a term the trajectory first finds in the
    observation of a later step j becomes "[what step k finds]" (k = j - t + 1, steps counted from
    t); answers are described by where they come from, never written."""
    steps, task = traj.steps, traj.task
    known = known_text(task, steps, t)
    parts = []
    for j in range(t, len(steps)):
        action = steps[j].turn.action
        k = j - t + 1
        if action.kind == "search":
            query = action.content
            terms = entities(query) + numbers(query) + [h["answer"] for h in task.meta.get("plan", [])]
            for term in sorted(set(terms), key=len, reverse=True):
                seen = first_seen(term, steps)
                if not occurs(term, known) and seen is not None and t <= seen < j and term in query:
                    query = query.replace(term, f"[what step {seen - t + 1} finds]")
            parts.append(f"{k}. search: {query}")
        elif action.kind == "python":
            names = _assigned_names(action.content)
            if names and all(re.fullmatch(r"step\d+", n) for n in names):  # the scripted expert's programs
                parts.append(f"{k}. run a {len(names)}-step python computation that prints the result")
            elif names:
                parts.append(f"{k}. run python that computes {', '.join(names[:4])}")
            else:
                parts.append(f"{k}. run python code")
        else:
            seen = first_seen(action.content, steps[:j])
            if seen is None:
                where = "a guess, not found in any result"
            elif seen < t:
                where = "what is already known"
            else:
                where = f"what step {seen - t + 1} finds"
            parts.append(f"{k}. answer with {where}")
    if not steps or steps[-1].turn.action.kind != "answer":
        parts.append(f"{len(steps) - t + 1}. the turn limit ends the episode without an answer")
    return _scrub(" ".join(parts), traj, allowed=task.question)


def top_result(observation: str) -> str:
    """The first line of a search observation ("Doc 1 (Title): text"), the most relevant passage."""
    return observation.split("\n", 1)[0]


def keywords(traj: Trajectory, t: int, k: int = MAX_KEYWORDS) -> list[str]:
    """Up to k salient terms that occur in tau_{>=t}; never a final answer unseen at t.

    Search: the gold plan's hop answers, names in future queries, in the top result of future
    searches and in the answer -- terms new at t first. Maths: numbers printed by future runs, then
    the numbers future code computes with (not its print line), then the answer, then the names
    the code assigns -- in order of appearance. A term inside a chosen one is skipped.
    """
    steps, task = traj.steps, traj.task
    future, known = future_text(steps, t), known_text(task, steps, t)
    fut = steps[t:]
    answers = [s.turn.action.content for s in fut if s.turn.action.kind == "answer"]
    if task.env == "math":
        code = [s.turn.action.content for s in fut if s.turn.action.kind == "python"]
        cands = [n for s in fut if s.turn.action.kind == "python" and s.observation for n in numbers(s.observation)]
        cands += [n for c in code for line in c.splitlines() if not line.lstrip().startswith("print(")
                  for n in numbers(line)]
        cands += [n for a in answers for n in numbers(a)]
        cands += [v for c in code for v in _assigned_names(c)]
    else:
        cands = [h["answer"] for h in task.meta.get("plan", [])]
        cands += [e for s in fut if s.turn.action.kind == "search" for e in entities(s.turn.action.content)]
        cands += [e for s in fut if s.observation for e in entities(top_result(s.observation))]
        cands += answers
    spoilers = [a for a in final_answers(traj) if not occurs(a, known)]
    chosen: list[str] = []
    for c in cands:
        c = c.strip()
        if (";" in c or not occurs(c, future) or any(occurs(c, x) for x in chosen)
                or any(occurs(a, c) for a in spoilers)):
            continue
        chosen.append(c)
    if task.env != "math":
        chosen.sort(key=lambda c: occurs(c, known))  # stable: names new at t first
    return chosen[:k]


def gap_analysis(traj: Trajectory, t: int) -> str:
    """What is known before step t and what is still missing to answer."""
    steps, task = traj.steps, traj.task
    past = steps[:t]
    plan = task.meta.get("plan")
    if task.env == "search" and plan:
        from foresight_core.envs.search_world import plan_progress
        h, _ = plan_progress(plan, past)
        known = " ".join(f"({i + 1}) {hop['query']} -> {hop['answer']}" for i, hop in enumerate(plan[:h]))
        missing = []
        for i in range(h, len(plan)):
            q = plan[i]["query"]
            for j in range(h, i):
                q = q.replace(plan[j]["answer"], f"[answer {j + 1}]")
            missing.append(f"({i + 1}) {q}")
        gap = " ".join(missing) if missing else "nothing; every fact the question needs is found, so answer."
        text = f"Known: {known or 'only the question'}. Missing: {gap}"
    elif task.env == "search":
        n = sum(s.turn.action.kind == "search" for s in past)
        seen = [e for s in past if s.observation for e in entities(s.observation)][:4]
        known = f"{n} searches so far" + (f", mentioning {', '.join(seen)}" if seen else "")
        text = f"Known: {known}. Missing: the facts that answer the question."
    else:
        given = numbers(task.question)[:6]
        outputs = [s.observation for s in past if s.turn.action.kind == "python" and s.observation]
        known = f"the problem gives {', '.join(given)}" if given else "the problem statement"
        if outputs:
            last = " ".join(outputs[-1].split())[:80]
            known += f"; the last run printed: {last}"
        missing = "a checked result to answer with" if outputs else "a computation that combines these quantities"
        text = f"Known: {known}. Missing: {missing}."
    return _scrub(text, traj, allowed=known_text(task, steps, t))


_FORMAT_TAG = re.compile(r"</?(?:" + "|".join(ALL_TAGS) + r")>")


def annotate_step(traj: Trajectory, t: int, q: float) -> WorldModelBlock:
    """z_t of step t of ``traj``, with the Monte Carlo estimate ``q``. Format tags quoted from tool
    output or model-written queries are dropped, so every block renders."""
    def clean(text: str) -> str:
        return _FORMAT_TAG.sub(" ", text)
    kws = [k for k in keywords(traj, t) if not _FORMAT_TAG.search(k)]
    return WorldModelBlock(imaginary=clean(roadmap(traj, t)), keywords=kws, analysis=clean(gap_analysis(traj, t)),
                           confidence=q)
