"""Environment configs: the procedural search world, benchmark search QA, maths with a python tool."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from foresight_core.config.base import StrictModel


class SearchWorldConfig(StrictModel):
    """A seeded world of fictional entities; questions must be searched for, not remembered."""

    enabled: bool = True
    """Include the procedural search world in corpus, RL and evaluation."""
    n_entities: int = Field(default=120, ge=8)
    """Entities per world (people, organisations, places, works)."""
    train_seed: int = 1
    """Seed of the training world."""
    eval_seed: int = 2
    """Seed of the held-out evaluation world (different entities and relations)."""
    question_mix: dict[Literal["one_hop", "bridge", "comparison", "compositional"], float] = {
        "one_hop": 0.3, "bridge": 0.3, "comparison": 0.2, "compositional": 0.2}
    """Share of each question type (1-hop NQ-like, 2-hop bridge HotpotQA-like, comparison 2Wiki-like, 3-hop MuSiQue-like)."""
    top_k: int = Field(default=3, ge=1)
    """Passages returned per search (the Search-R1 setting uses 3)."""
    max_turns: int = Field(default=6, ge=1)
    """Turn limit of an episode; no answer by then is a failure."""

    @model_validator(mode="after")
    def _mix_positive(self) -> "SearchWorldConfig":
        if not self.question_mix or any(v < 0 for v in self.question_mix.values()) or sum(self.question_mix.values()) <= 0:
            raise ValueError("question_mix needs non-negative shares with a positive sum")
        return self


class BenchmarkSource(StrictModel):
    """A real benchmark file in its public format."""

    name: str
    """Benchmark name (nq, triviaqa, popqa, hotpotqa, 2wiki, musique, bamboogle, aime24, ...)."""
    kind: Literal["search_qa", "math"]
    """search_qa rows: question, golden_answers. math rows: problem, answer."""
    path: str
    """Local path or s3:// URI of a JSONL or Parquet file."""
    corpus_path: str | None = None
    """For search_qa: the passage corpus (JSONL with id, contents) searched with BM25."""
    limit: int | None = Field(default=None, ge=1)
    """Use at most this many rows."""


def parse_benchmark(spec: str) -> BenchmarkSource:
    """``"nq=data/nq.jsonl,corpus=wiki.jsonl,kind=search_qa,limit=100"`` -> a ``BenchmarkSource`` (kind:
    search_qa by default; math for AIME-style rows). Raises ``ValueError`` saying what is wrong."""
    head, _, rest = spec.partition(",")
    name, eq, path = head.partition("=")
    if not eq or not name.strip() or not path.strip():
        raise ValueError(f"--benchmark {spec!r}: expected NAME=PATH[,corpus=PASSAGES][,kind=search_qa|math][,limit=N]")
    fields: dict[str, Any] = {"name": name.strip(), "path": path.strip(), "kind": "search_qa"}
    keys = {"corpus": "corpus_path", "kind": "kind", "limit": "limit"}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in keys:
            raise ValueError(f"--benchmark {spec!r}: unknown option {item!r}; options: corpus=, kind=, limit=")
        fields[keys[key.strip()]] = value.strip()
    try:
        return BenchmarkSource.model_validate(fields)
    except ValueError as e:
        raise ValueError(f"--benchmark {spec!r}: {e}") from None


class SearchQAConfig(StrictModel):
    """Search QA over a real passage corpus (BM25), scored by EM / F1."""

    sources: list[BenchmarkSource] = []
    """Benchmarks to evaluate (and optionally train) on. Empty on the embedded default."""
    top_k: int = Field(default=3, ge=1)
    """Passages per search."""
    max_turns: int = Field(default=4, ge=1)
    """Turn limit of an episode."""


class SandboxConfig(StrictModel):
    """Limits for model-written python code."""

    backend: Literal["bwrap", "rlimit"] = "bwrap"
    """bwrap: own network/PID/mount namespaces plus rlimits (needs bubblewrap). rlimit: a plain subprocess
    with rlimits and a scrubbed environment; it cannot cut the network, so use it only for trusted code."""
    cpu_seconds: int = Field(default=5, ge=1)
    """CPU-time limit (RLIMIT_CPU)."""
    wall_seconds: float = Field(default=10.0, gt=0)
    """Wall-clock limit; the whole process tree is killed after it."""
    memory_mb: int = Field(default=512, ge=64)
    """Address-space limit (RLIMIT_AS)."""
    max_output_chars: int = Field(default=2000, ge=64)
    """Stdout/stderr returned to the model is cut to this."""
    max_processes: int = Field(default=32, ge=1)
    """Process limit inside the sandbox (fork bombs); run as root, the code gets its own unused uid so
    that the kernel enforces it."""
    disk_mb: int = Field(default=32, ge=1)
    """Largest file the code may write (RLIMIT_FSIZE); with bwrap also the size of its tmpfs working folder."""
    kill_output_bytes: int = Field(default=1_000_000, ge=1024)
    """The program is stopped once it has written this many bytes (stdout + stderr); beyond
    ``max_output_chars`` output is drained and dropped, never buffered."""
    cache_size: int = Field(default=4096, ge=0)
    """MathEnv reuses the result of identical code (LRU entries per process), so Monte Carlo replays
    of a prefix run each distinct program once. 0 turns the cache off."""


class MathConfig(StrictModel):
    """GSM8K-derived problems (reasoning-gym gsm_symbolic) with a python interpreter tool."""

    enabled: bool = True
    """Include maths in corpus, RL and evaluation."""
    eval_template_share: float = Field(default=0.25, gt=0, lt=1)
    """Share of problem templates held out for evaluation (unseen templates)."""
    seed: int = 3
    """Seed of problem generation."""
    max_turns: int = Field(default=4, ge=1)
    """Turn limit of an episode."""
    sandbox: SandboxConfig = SandboxConfig()
    """The python tool's sandbox."""


class EnvsConfig(StrictModel):
    search_world: SearchWorldConfig = SearchWorldConfig()
    """The procedural search world (the embedded default's search task)."""
    search_qa: SearchQAConfig = SearchQAConfig()
    """Real search QA benchmarks (NQ, HotpotQA, ...) when their files are given."""
    math: MathConfig = MathConfig()
    """Maths with a code interpreter."""
