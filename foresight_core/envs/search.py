"""Search QA environment: BM25 retrieval (bm25s) over a passage corpus, answers scored by EM / F1.

    env = SearchEnv(passages, top_k=3, max_turns=4)   # passages: [{"id", "contents"}] or a BM25Index
    question = env.reset(task)
    env.step(Action("search", "Where was Zorvan Kellid born?"))
        # -> observation "Doc 1 (Zorvan Kellid): Zorvan Kellid was born in ...\nDoc 2 (...): ..."
    env.step(Action("answer", "Tamsor"))              # -> done, success = EM == 1, score = EM, info["f1"]

Passages use the Search-R1 wiki dump layout: ``contents`` is ``'"Title"\\ntext'``.
The BM25 index is built once per passage set and cached (keyed by a hash of ids and contents),
so many environments, episodes and tasks over the same corpus share one index.
Tokenisation is deliberately plain (lower case, word characters, a short stop-word list, no
stemming) so that fictional entity names match exactly.

Simplifications, said out loud: a step that reaches ``max_turns`` without an answer ends the
episode as a failure (its observation is still returned); a ``<python>`` action is answered
with an observation saying the tool is not available here (it still uses up a turn).
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import bm25s
import numpy as np

from foresight_core.metrics import exact_match, f1_score
from foresight_core.types import Action, StepResult, Task

# Lucene's English stop words (bm25s.stopwords.STOPWORDS_EN) plus question words and pronouns,
# so that "Who founded the Velmor Institute?" is searched as [founded, velmor, institute].
STOPWORDS = frozenset("""
a an and are as at be but by for if in into is it no not of on or such that the their then there these they
this to was will with
who whom whose what which where when why how does did do has have had its his her he she him them were been
""".split())
_WORD = re.compile(r"\w+")

EMPTY_QUERY_OBSERVATION = ("The search query is empty (or only stop words): put a few keywords inside "
                           "<search>...</search>.")
NO_RESULTS_OBSERVATION = "No passages matched the query. Try other keywords."
PYTHON_UNAVAILABLE_OBSERVATION = ("The python tool is not available in this environment. Use "
                                  "<search>query</search> to search, or <answer>...</answer> to answer.")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens minus stop words (the same for passages and queries)."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


def split_contents(contents: str) -> tuple[str, str]:
    """Search-R1 ``'"Title"\\ntext'`` -> (Title, text). Without a newline the title is empty."""
    if "\n" not in contents:
        return "", contents.strip()
    title, text = contents.split("\n", 1)
    return title.strip().strip('"').strip(), " ".join(text.split())


@dataclass
class Hit:
    """One retrieved passage."""

    rank: int  # 1-based
    doc_id: str
    title: str
    text: str
    score: float


class BM25Index:
    """A BM25 index over passages ``{"id": str, "contents": str}`` (build with ``index_for`` to share it)."""

    def __init__(self, passages: Sequence[dict[str, Any]]):
        if len(passages) == 0:
            raise ValueError("cannot build a BM25 index over an empty passage list")
        self.ids: list[str] = []
        self.titles: list[str] = []
        self.texts: list[str] = []
        corpus_tokens = []
        for i, p in enumerate(passages):
            if not isinstance(p, dict) or not isinstance(p.get("contents"), str) or "id" not in p:
                raise ValueError(f"passage #{i} must be a dict with 'id' and a string 'contents', got {p!r:.120}")
            title, text = split_contents(p["contents"])
            self.ids.append(str(p["id"]))
            self.titles.append(title)
            self.texts.append(text)
            corpus_tokens.append(tokenize(p["contents"]))
        self._bm25 = bm25s.BM25()
        self._bm25.index(corpus_tokens, show_progress=False)
        self._vocab: dict[str, int] = self._bm25.vocab_dict

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, query: str, k: int) -> list[Hit]:
        """Top-k passages with a positive BM25 score, best first (ties broken by corpus order)."""
        token_ids = [self._vocab[t] for t in tokenize(query) if t in self._vocab]
        if not token_ids:
            return []
        scores = self._bm25.get_scores_from_ids(token_ids)  # (num_docs,)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        order = sorted(top.tolist(), key=lambda i: (-float(scores[i]), i))
        return [Hit(rank=r + 1, doc_id=self.ids[i], title=self.titles[i], text=self.texts[i], score=float(scores[i]))
                for r, i in enumerate(order) if scores[i] > 0]


def passages_fingerprint(passages: Sequence[dict[str, Any]]) -> str:
    """A content hash of a passage list (ids and contents, in order)."""
    h = hashlib.sha1()
    for p in passages:
        h.update(str(p.get("id")).encode())
        h.update(b"\x00")
        h.update(str(p.get("contents")).encode())
        h.update(b"\x01")
    return h.hexdigest()


_INDEX_CACHE: OrderedDict[str, BM25Index] = OrderedDict()
_INDEX_CACHE_SIZE = 4


def index_for(passages: Sequence[dict[str, Any]]) -> BM25Index:
    """The BM25 index of these passages, built once per process and reused (a small LRU cache)."""
    key = passages_fingerprint(passages)
    if key in _INDEX_CACHE:
        _INDEX_CACHE.move_to_end(key)
        return _INDEX_CACHE[key]
    index = BM25Index(passages)
    _INDEX_CACHE[key] = index
    if len(_INDEX_CACHE) > _INDEX_CACHE_SIZE:
        _INDEX_CACHE.popitem(last=False)
    return index


def format_hits(hits: Sequence[Hit]) -> str:
    """The observation text: one line per passage, ``Doc 1 (Title): text``."""
    return "\n".join(f"Doc {h.rank} ({h.title}): {h.text}" if h.title else f"Doc {h.rank}: {h.text}" for h in hits)


class SearchEnv:
    """Multi-turn search QA over a BM25 index; follows the ``Env`` protocol (envs/base.py)."""

    def __init__(self, passages: Sequence[dict[str, Any]] | BM25Index, top_k: int = 3, max_turns: int = 4,
                 name: str = "search", scored: bool = True):
        if top_k < 1 or max_turns < 1:
            raise ValueError(f"top_k and max_turns must be >= 1, got top_k={top_k}, max_turns={max_turns}")
        self.index = passages if isinstance(passages, BM25Index) else index_for(passages)
        self.top_k = top_k
        self.max_turns = max_turns
        self.name = name
        self.scored = scored  # False: a served question, no gold answer, the final answer is not scored
        self._task: Task | None = None
        self._turns = 0
        self._done = False

    def reset(self, task: Task) -> str:
        """Start an episode on ``task``; returns the question shown to the agent."""
        if self.scored and not task.answers:
            raise ValueError(f"task {task.id} has no gold answers")
        self._task, self._turns, self._done = task, 0, False
        return task.question

    def search(self, query: str) -> tuple[str, list[Hit]]:
        """Observation text and hits of one search (no turn is counted)."""
        if not tokenize(query):
            return EMPTY_QUERY_OBSERVATION, []
        hits = self.index.search(query, self.top_k)
        return (format_hits(hits) if hits else NO_RESULTS_OBSERVATION), hits

    def step(self, action: Action) -> StepResult:
        if self._task is None:
            raise RuntimeError("call reset(task) before step()")
        if self._done:
            raise RuntimeError(f"episode of task {self._task.id} is over; call reset(task)")
        self._turns += 1
        if action.kind == "answer":
            self._done = True
            if not self.scored:
                return StepResult(observation=None, done=True, success=False, score=0.0, info={"turns": self._turns})
            em = exact_match(action.content, self._task.answers)
            f1 = f1_score(action.content, self._task.answers)
            return StepResult(observation=None, done=True, success=em == 1.0, score=em,
                              info={"em": em, "f1": f1, "turns": self._turns})
        info: dict[str, Any] = {"turns": self._turns}
        if action.kind == "search":
            observation, hits = self.search(action.content)
            info["doc_ids"] = [h.doc_id for h in hits]
        elif action.kind == "python":
            observation = PYTHON_UNAVAILABLE_OBSERVATION
        else:
            observation = f"Unknown action {action.kind!r}: use <search>query</search> or <answer>...</answer>."
        if self._turns >= self.max_turns:
            self._done = True
            info.update(reason="max_turns", em=0.0, f1=0.0)
            return StepResult(observation=observation, done=True, success=False, score=0.0, info=info)
        return StepResult(observation=observation, done=False, info=info)

    def reward(self, prediction: str, task: Task) -> float:
        """The benchmark's score of a final answer: normalised exact match (as Search-R1 reports)."""
        return exact_match(prediction, task.answers)
