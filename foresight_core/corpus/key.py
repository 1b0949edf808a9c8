"""Corpus key: what the corpus depends on (seed, envs, corpus config, tokenizer, the code version of the
corpus package), and the folder it is written to, ``<work_dir>/corpus/<key>``."""

from __future__ import annotations

import hashlib
import json

from foresight_core import provenance
from foresight_core.config.pipeline import PipelineConfig
from foresight_core.storage import WorkDir


def code_version() -> str:
    """The version of the code that shapes the corpus: ``foresight_core.provenance.code_version`` of this
    module (the package version and a hash of every ``foresight_core`` source it reaches)."""
    return provenance.code_version("foresight_core.corpus")


def corpus_key(cfg: PipelineConfig) -> str:
    """Hash of everything the corpus depends on: seed, envs, corpus config, tokenizer, code version.
    (Benchmark files are identified by their paths, not their contents.)"""
    relevant = {"seed": cfg.seed, "envs": cfg.envs.model_dump(mode="json"),
                "corpus": cfg.corpus.model_dump(mode="json"),
                "tokenizer": [cfg.model.source, cfg.model.name_or_path], "code": code_version()}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def corpus_uri(cfg: PipelineConfig) -> str:
    return WorkDir(cfg.work_dir).corpus(corpus_key(cfg))
