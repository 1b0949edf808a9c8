"""Corpus step 3, writing: the WM-AMT corpus, the FE-SFT set, the RL tasks and the eval sets through
``storage.DatasetWriter``, then ``manifest.json`` last (hashes, counts, token and q-label statistics)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from foresight_core.chat import trajectory_messages
from foresight_core.config.pipeline import PipelineConfig
from foresight_core.corpus.calibration import N_BINS
from foresight_core.corpus.key import code_version, corpus_key
from foresight_core.corpus.plan import CorpusPlan
from foresight_core.format import render_wm
from foresight_core.storage import DatasetWriter, join_uri, read_rows
from foresight_core.types import CorpusRow


# ---------------------------------------------------------------------------------------------
# 3. Write: datasets + manifest (last)


@dataclass
class Manifest:
    """A finished corpus: its folder URI and the contents of its manifest.json."""

    uri: str
    data: dict[str, Any]
    reused: bool = False

    @property
    def key(self) -> str:
        return self.data["key"]

    @property
    def datasets(self) -> list[str]:
        return list(self.data["datasets"])

    def dataset_uri(self, name: str) -> str:
        if name not in self.data["datasets"]:
            raise KeyError(f"corpus {self.uri} has no dataset {name!r}; it has {self.datasets}")
        return join_uri(self.uri, self.data["datasets"][name]["file"])

    def read(self, name: str, storage: Any = None) -> list[dict[str, Any]]:
        return read_rows(self.dataset_uri(name), storage)


def general_text_rows(cfg: PipelineConfig) -> list[CorpusRow]:
    """Plain text for WM-AMT against forgetting: the training world's passages or wiki summaries."""
    from foresight_core.envs.search import split_contents
    c = cfg.corpus
    if c.general_text == "none" or c.general_text_max_rows == 0:
        return []
    if c.general_text == "world_passages":
        if not cfg.envs.search_world.enabled:
            return []
        from foresight_core.envs.search_world import load_world
        passages = load_world(cfg.envs.search_world.train_seed, cfg.envs.search_world.n_entities).passages
    else:
        from foresight_core.envs.loaders import load_wiki_offline
        passages = load_wiki_offline(limit=c.general_text_max_rows)
    rows = []
    for p in passages[:c.general_text_max_rows]:
        title, text = split_contents(p["contents"])
        rows.append(CorpusRow("text", "wm_amt", text=f"{title}\n{text}" if title else text))
    return rows


def _token_counter(cfg: PipelineConfig) -> tuple[Callable[[list[str]], list[int]], str]:
    """Tokens per text with the configured model's tokenizer, else whitespace words (and which)."""
    try:
        from foresight_core.models import load_tokenizer
        tok = load_tokenizer(cfg.model)
    except Exception as e:  # no tokenizer available offline: fall back, and say so in the manifest
        return (lambda texts: [len(t.split()) for t in texts]), f"whitespace words (no tokenizer: {type(e).__name__})"
    return (lambda texts: [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]), \
        f"tokens ({type(tok).__name__} of model.source={cfg.model.source})"


def row_text(row: CorpusRow) -> str:
    """The text a row trains on: a trajectory as ChatML-like chat text, or the general text."""
    if row.trajectory is None:
        return row.text or ""
    msgs = trajectory_messages(row.trajectory)
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)


def _stats(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    vs = sorted(values)
    mean = sum(vs) / len(vs)
    return {"n": len(vs), "mean": mean, "min": vs[0], "p50": vs[len(vs) // 2], "max": vs[-1],
            "std": (sum((v - mean) ** 2 for v in vs) / len(vs)) ** 0.5}


def corpus_summary(rows: list[CorpusRow]) -> dict[str, Any]:
    """Counts, success rates and q-label statistics of collected trajectory rows (plain copies excluded)."""
    trajs = [r.trajectory for r in rows if r.trajectory is not None and not r.plain_copy]
    by_env: dict[str, list[bool]] = {}
    for tr in trajs:
        by_env.setdefault(tr.task.env, []).append(tr.success)
    qs = [lab["q"] for tr in trajs for lab in tr.meta["q_labels"]]
    hist = [0] * N_BINS
    for q in qs:
        hist[min(int(q * N_BINS), N_BINS - 1)] += 1
    n_succ = sum(tr.success for tr in trajs)
    return {
        "trajectories": len(trajs), "successes": n_succ, "failures": len(trajs) - n_succ,
        "success_rate": n_succ / len(trajs) if trajs else None,
        "success_rate_by_env": {e: sum(v) / len(v) for e, v in sorted(by_env.items())},
        "annotated_trajectories": sum(bool(tr.meta["annotated_steps"]) for tr in trajs),
        "annotated_steps": sum(len(tr.meta["annotated_steps"]) for tr in trajs),
        "steps": sum(len(tr.steps) for tr in trajs),
        "invalid_turns": sum("invalid_turn" in tr.meta for tr in trajs),
        "q_labels": {**_stats(qs), "histogram": hist,
                     "share_q0": (sum(q == 0 for q in qs) / len(qs)) if qs else None,
                     "share_q1": (sum(q == 1 for q in qs) / len(qs)) if qs else None},
    }


def write_corpus(rows: list[dict[str, Any]], plan: CorpusPlan, cfg: PipelineConfig, out_uri: str,
                 timing: dict[str, Any] | None = None, q_policy: dict[str, Any] | None = None,
                 key: str | None = None) -> Manifest:
    """Write every dataset under ``out_uri`` and manifest.json last; returns the manifest.

    ``rows``: the collected trajectory rows as ``collect_items`` returns them (``CorpusRow.to_dict()``)."""
    ext = cfg.corpus.format
    parsed = [CorpusRow.from_dict(r) for r in rows]
    parsed.sort(key=lambda r: r.trajectory.meta["item"] if r.trajectory else -1)  # stable: an item's rows keep order
    corpus: dict[str, list[CorpusRow]] = {
        "wm_amt": [r for r in parsed if r.split == "wm_amt"] + general_text_rows(cfg),
        "fe_sft": [r for r in parsed if r.split == "fe_sft"],
    }
    datasets: dict[str, list[dict[str, Any]]] = {
        **{name: [r.to_dict() for r in rs] for name, rs in corpus.items()},
        "rl_tasks": [t.to_dict() for t in plan.rl_tasks],
        **{f"eval/{name}": [t.to_dict() for t in tasks] for name, tasks in plan.eval_sets.items()},
    }
    count_tokens, unit = _token_counter(cfg)
    token_stats: dict[str, Any] = {"unit": unit}
    row_tokens: dict[int, int] = {}
    for name, rs in corpus.items():
        counts = count_tokens([row_text(r) for r in rs]) if rs else []
        token_stats[name] = {**_stats(counts), "total": sum(counts)}
        row_tokens.update((id(r), n) for r, n in zip(rs, counts))
    # the token overhead of foresight: world-model blocks / all tokens of annotated trajectories
    annotated = [r for r in parsed if r.annotated and r.trajectory is not None]
    wm_texts = [render_wm(s.turn.wm) for r in annotated for s in r.trajectory.steps if s.turn.wm]
    wm_tokens = sum(count_tokens(wm_texts)) if wm_texts else 0
    traj_tokens = sum(row_tokens[id(r)] for r in annotated)
    token_stats["wm_share_of_annotated_tokens"] = wm_tokens / traj_tokens if traj_tokens else None

    summary = corpus_summary(parsed)
    manifest = {
        "stage": "corpus", "key": key or corpus_key(cfg), "code_version": code_version(),
        "config": cfg.model_dump(mode="json"),  # SecretStr fields dump as "**********"
        "format": ext, "created_unix": time.time(), "timing": timing or {}, "q_policy": q_policy or {},
        "datasets": {name: {"file": f"{name}.{ext}", "rows": len(rs)} for name, rs in datasets.items()},
        "counts": {**{name: len(rs) for name, rs in datasets.items()}, "items": len(plan.items),
                   "text_rows": sum(r.kind == "text" for r in corpus["wm_amt"]),
                   "plain_rows": sum(r.kind == "trajectory" and not r.annotated for r in corpus["wm_amt"])},
        **summary,
        "token_stats": token_stats,
        "load_reports": plan.load_reports,
    }
    with DatasetWriter(out_uri, cfg.infra.storage) as w:
        for name, rs in datasets.items():
            w.write_rows(f"{name}.{ext}", rs)
        data = w.commit(manifest)
    return Manifest(uri=out_uri, data=data)

