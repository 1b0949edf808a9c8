"""The served agent: what the registered MLflow model does with a question."""

from __future__ import annotations

from pydantic import Field

from foresight_core.config.base import StrictModel


class ServeConfig(StrictModel):
    min_confidence: float | None = Field(default=None, ge=0, le=1)
    """Abstain below this final stated confidence: the agent answers "I don't know" (and says what it would
    have guessed) instead of guessing. None: always answer."""
    max_turns: int = Field(default=4, ge=1, le=16)
    """Turns per question unless a request asks for fewer or more (at most ``max_turns_limit``)."""
    max_turns_limit: int = Field(default=8, ge=1, le=32)
    """The most turns a request may ask for."""
    temperature: float = Field(default=0.0, ge=0, le=2)
    """Sampling temperature unless a request sets one (0: greedy)."""
    plan_candidates: int = Field(default=0, ge=0, le=16)
    """Test-time planning unless a request sets it: K candidate turns, act on the highest stated confidence
    (0 or 1: off)."""
    plan_temperature: float = Field(default=1.0, gt=0, le=2)
    """Sampling temperature of the K planning candidates (as ``eval.plan_temperature``; greedy candidates would
    all be the same turn)."""
    max_plan_candidates: int = Field(default=8, ge=1, le=64)
    """The most candidates a request may ask for."""
    max_new_tokens: int = Field(default=256, ge=8, le=4096)
    """Tokens generated per turn."""
    max_context_tokens: int = Field(default=4096, ge=256)
    """Prompt plus response tokens of one episode."""
    max_question_chars: int = Field(default=4000, ge=1)
    """Longer questions are refused (that row gets an error)."""
    max_rows: int = Field(default=64, ge=1)
    """Questions per request; more are refused (every row gets an error)."""
    batch_size: int = Field(default=8, ge=1)
    """Questions played together (one batched generate per turn)."""
