"""The plain data that moves between environments, policies, the corpus and training.

Everything is a dataclass of JSON-able fields, so a trajectory can be written as one
JSONL / Parquet row (``to_dict``) and read back (``from_dict``) by any stage.

Glossary (paper's words):
- world-model block z_t: ``<imaginary>`` roadmap, ``<keyword>`` list, ``<analysis>`` gap
  analysis and ``<confidence>`` q_t (the textual Q-value, in [0, 1]).
- policy span: ``<think>`` and ``<action>``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

ActionKind = Literal["search", "python", "answer"]
ACTION_KINDS: tuple[str, ...] = ("search", "python", "answer")


@dataclass
class Task:
    """One question of one environment.

    ``answers`` are the gold answers (any of them counts). ``meta`` carries what the
    scripted expert and the annotator need: the gold decomposition of a search
    question (``meta["plan"]``), the worked solution / template of a maths problem.
    """

    id: str
    env: str  # "search" | "math"
    question: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Task":
        return cls(id=str(d["id"]), env=str(d["env"]), question=str(d["question"]),
                   answers=[str(a) for a in d["answers"]], meta=dict(d.get("meta") or {}))


@dataclass
class Action:
    """What the policy does: search a query, run python code, or answer."""

    kind: ActionKind
    content: str


@dataclass
class WorldModelBlock:
    """z_t: the verbalised imagined rollout plus the plan-conditioned success estimate."""

    imaginary: str
    keywords: list[str]
    analysis: str
    confidence: float  # q_t in [0, 1]


@dataclass
class Turn:
    """One assistant turn. ``wm`` is None for plain (no foresight) turns."""

    think: str
    action: Action
    wm: WorldModelBlock | None = None


@dataclass
class Step:
    """A turn and the environment's answer to it (None after a final answer)."""

    turn: Turn
    observation: str | None = None


@dataclass
class StepResult:
    """What ``Env.step`` returns."""

    observation: str | None
    done: bool
    success: bool | None = None  # set when done
    score: float | None = None  # benchmark score of the final answer (EM / F1 / verified), when done
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trajectory:
    """One played episode, successes and failures alike."""

    task: Task
    steps: list[Step]
    success: bool
    score: float
    policy: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def final_answer(self) -> str | None:
        if self.steps and self.steps[-1].turn.action.kind == "answer":
            return self.steps[-1].turn.action.content
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trajectory":
        steps = []
        for s in d["steps"]:
            t = s["turn"]
            wm = t.get("wm")
            steps.append(Step(
                turn=Turn(think=t["think"], action=Action(**t["action"]),
                          wm=WorldModelBlock(**wm) if wm else None),
                observation=s.get("observation")))
        return cls(task=Task.from_dict(d["task"]), steps=steps, success=bool(d["success"]),
                   score=float(d["score"]), policy=d.get("policy", ""), meta=dict(d.get("meta") or {}))


CORPUS_SPLITS: tuple[str, ...] = ("wm_amt", "fe_sft")


@dataclass
class CorpusRow:
    """One row of the WM-AMT or FE-SFT dataset: the one schema the corpus writes and training reads.

    ``kind`` "trajectory": a played episode (``annotated`` when some of its turns carry z_t);
    ``kind`` "text": general text for WM-AMT against forgetting. ``split`` is the dataset it belongs to.
    On disk (``to_dict``): ``{"kind", "split", "annotated", "trajectory": Trajectory.to_dict()}`` or
    ``{"kind": "text", "split", "text"}``. ``from_dict`` says which field of a bad row is wrong.
    """

    kind: Literal["trajectory", "text"]
    split: str
    annotated: bool = False
    trajectory: Trajectory | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("trajectory", "text"):
            raise ValueError(f"corpus row: kind must be 'trajectory' or 'text', got {self.kind!r}")
        if self.split not in CORPUS_SPLITS:
            raise ValueError(f"corpus row: split must be one of {list(CORPUS_SPLITS)}, got {self.split!r}")
        if self.kind == "trajectory" and (self.trajectory is None or self.text is not None):
            raise ValueError("corpus row: a 'trajectory' row needs a trajectory and no text")
        if self.kind == "text" and (not isinstance(self.text, str) or self.trajectory is not None or self.annotated):
            raise ValueError("corpus row: a 'text' row needs a string text, no trajectory and annotated=False")

    @property
    def plain_copy(self) -> bool:
        """A copy of an annotated trajectory with its world-model blocks left out (WM-AMT only)."""
        return self.trajectory is not None and bool(self.trajectory.meta.get("plain_copy"))

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "text":
            return {"kind": "text", "split": self.split, "text": self.text}
        assert self.trajectory is not None
        return {"kind": "trajectory", "split": self.split, "annotated": self.annotated,
                "trajectory": self.trajectory.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CorpusRow":
        if not isinstance(d, dict):
            raise ValueError(f"corpus row: expected a mapping, got {type(d).__name__}")
        missing = [k for k in ("kind", "split") if k not in d]
        if missing:
            raise ValueError(f"corpus row: missing {missing} (it has {sorted(d)})")
        if d["kind"] not in ("trajectory", "text"):
            raise ValueError(f"corpus row: kind must be 'trajectory' or 'text', got {d['kind']!r}")
        if d["kind"] == "text":
            return cls(kind="text", split=d["split"], text=d.get("text"))
        if not isinstance(d.get("trajectory"), dict):
            raise ValueError(f"corpus row: a {d['kind']!r} row needs a 'trajectory' mapping (it has {sorted(d)})")
        try:
            traj = Trajectory.from_dict(d["trajectory"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"corpus row: its trajectory is malformed ({type(e).__name__}: {e})") from e
        return cls(kind=d["kind"], split=d["split"], annotated=bool(d.get("annotated", False)), trajectory=traj)
