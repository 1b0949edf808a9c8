"""Behaviour policies: who plays the episodes of the corpus.

    policy = expert_for(task, cfg.corpus.noise)          # scripted noisy expert of the task's environment
    policy = LLMPolicy.from_config(cfg.corpus.llm)       # any Hugging Face causal LM, prompted in the format
    turn = policy.act(task, history, rng)                # history: the steps so far, with observations

The scripted experts live beside this module (``search_expert``, ``math_expert``); each follows
the gold plan its environment puts in ``task.meta``. A policy's decisions depend only on ``(task, history, rng)``. That is what makes Monte Carlo
q labels valid: re-rolling the policy from any prefix of a trajectory samples the same
distribution of futures the recorded trajectory came from. Behaviour turns carry ``wm=None``;
the hindsight annotator (``foresight_core.corpus``) adds z_t afterwards.

An LLM turn that cannot be parsed does not crash the episode: it becomes an ``InvalidTurn``,
which ``play_episode`` ends as a failure without stepping the environment.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from foresight_core.config.corpus import ExpertNoiseConfig, LLMPolicyConfig
from foresight_core.types import Action, Step, Task, Trajectory, Turn


@runtime_checkable
class Policy(Protocol):
    name: str

    def act(self, task: Task, history: list[Step], rng: random.Random) -> Turn: ...


@dataclass
class InvalidTurn(Turn):
    """A model output with no parsable action. ``raw`` is the generated text, ``reason`` the parser's."""

    raw: str = ""
    reason: str = ""


def expert_for(task: Task, noise: ExpertNoiseConfig) -> Policy:
    """The scripted noisy expert of the task's environment (it follows ``task.meta``'s gold plan)."""
    if task.env == "search":
        from foresight_core.policies.search_expert import ScriptedSearchExpert
        return ScriptedSearchExpert(noise)
    if task.env == "math":
        from foresight_core.policies.math_expert import ScriptedMathExpert
        return ScriptedMathExpert(noise)
    raise ValueError(f"task {task.id}: no scripted expert for environment {task.env!r} (use behaviour: llm)")


# ---------------------------------------------------------------------------------------------
# LLM policy

_TAG = re.compile(r"</?[a-zA-Z_]+>")


def invalid_turn(raw: str, reason: str) -> InvalidTurn:
    """An ``answer`` turn that renders (tags and angle brackets removed) and keeps the raw output aside."""
    def untagged(text: str) -> str:
        return " ".join(_TAG.sub(" ", text).replace("<", " ").replace(">", " ").split())

    shown = untagged(raw)[:200] or "(empty output)"
    return InvalidTurn(think=f"unparsable turn: {untagged(reason)}", action=Action("answer", shown), raw=raw,
                       reason=reason)


class LLMPolicy:
    """Any Hugging Face causal LM, prompted with the system prompt, the question and the turns so far.

    Sampling uses HF ``generate``; its torch RNG is seeded from ``rng`` inside a forked RNG state,
    so a turn is a function of ``(task, history, rng)`` and the caller's torch RNG is left alone.
    ``foresight=False`` (the default for a behaviour policy) asks for plain turns; the world-model
    block, if the model writes one anyway, is dropped.
    """

    def __init__(self, model: Any, tokenizer: Any, temperature: float = 0.8, max_new_tokens: int = 256,
                 foresight: bool = False, name: str = "llm") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.foresight = foresight
        self.name = name

    @classmethod
    def from_config(cls, cfg: LLMPolicyConfig) -> "LLMPolicy":
        """Load through the model factory: ``tiny`` / ``smollm2_gguf`` are its embedded sources, anything
        else a hub id or local path."""
        from foresight_core.config.model import ModelConfig
        from foresight_core.models import load_model
        embedded = cfg.model in ("tiny", "smollm2_gguf")
        mcfg = ModelConfig(source=cfg.model) if embedded else ModelConfig(source="hf", name_or_path=cfg.model)
        model, tokenizer = load_model(mcfg, train=False)
        return cls(model, tokenizer, cfg.temperature, cfg.max_new_tokens, name=f"llm:{cfg.model}")

    def messages(self, task: Task, history: list[Step]) -> list[dict]:
        from foresight_core.chat import trajectory_messages
        so_far = Trajectory(task=task, steps=list(history), success=False, score=0.0, policy=self.name)
        return trajectory_messages(so_far, "foresight" if self.foresight else "plain")

    def generate(self, messages: list[dict], rng: random.Random) -> str:
        import torch
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        sample = self.temperature > 0
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(rng.getrandbits(63))
            out = self.model.generate(**enc, do_sample=sample, temperature=self.temperature if sample else None,
                                      top_p=None, top_k=None, max_new_tokens=self.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id)
        new = out[0, enc["input_ids"].shape[1]:]  # (T_new,)
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        end = text.find("</action>")
        return text if end < 0 else text[:end + len("</action>")]

    def act(self, task: Task, history: list[Step], rng: random.Random) -> Turn:
        from foresight_core.format import parse_turn
        raw = self.generate(self.messages(task, history), rng)
        parsed = parse_turn(raw, "any")
        if parsed.turn is None:
            return invalid_turn(raw, parsed.reason or "no action")
        turn = parsed.turn
        return Turn(think=turn.think, action=turn.action, wm=turn.wm if self.foresight else None)
