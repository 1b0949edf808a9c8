"""The model factory: tiny Llama, dtypes, LoRA, saving in HF format, and the real SmolLM2 GGUF (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from foresight_core.config import LoRAConfig, ModelConfig
from foresight_core.models import bf16_supported, compute_dtype, load_model, save_model, smollm2_model_dir

TINY = ModelConfig(source="tiny", tiny_layers=2, tiny_hidden=32)


def test_tiny_llama_shape_and_seeded_init():
    model, tok = load_model(TINY, seed=0)
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (len(tok), 32, 2)  # 49152 = SmolLM2's vocab
    assert cfg.num_attention_heads == 2 and cfg.head_dim == 16  # heads of 16 dims
    assert model.config.eos_token_id == tok.eos_token_id == tok.pad_token_id  # <|im_end|>
    assert model.dtype == torch.float32 and model.training  # fp32 master weights for training
    same, _ = load_model(TINY, seed=0)
    other, _ = load_model(TINY, seed=1)
    w = lambda m: m.model.layers[0].self_attn.q_proj.weight  # noqa: E731
    assert torch.equal(w(model), w(same)) and not torch.equal(w(model), w(other))
    # one head when the hidden size is not a multiple of 16
    odd, _ = load_model(ModelConfig(source="tiny", tiny_hidden=24, tiny_layers=1))
    assert odd.config.num_attention_heads == 1 and odd.config.head_dim == 24


def test_dtypes():
    expected = torch.bfloat16 if bf16_supported() else torch.float32
    assert compute_dtype(ModelConfig(source="tiny")) == expected
    assert compute_dtype(ModelConfig(source="tiny", dtype="float32")) == torch.float32
    model, _ = load_model(TINY.model_copy(update={"dtype": "bfloat16"}), train=False)
    assert model.dtype == torch.bfloat16 and not model.training  # inference: weights in the compute dtype


def test_lora_trains_adapters_and_saves_merged(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    cfg = TINY.model_copy(update={"lora": LoRAConfig(r=4, alpha=8)})
    model, tok = load_model(cfg, seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # move the adapters off zero so that merging matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    ids = torch.tensor([[1, 500, 600, 700]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    out = save_model(model, tok, tmp_path / "merged")
    assert any("lora_" in n for n, _ in model.named_parameters())  # the training model keeps its adapters
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["model_type"] == "llama" and (out / "tokenizer.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_hf_source_loads_a_saved_folder(tmp_path: Path):
    model, tok = load_model(TINY, seed=3)
    save_model(model, tok, tmp_path / "m")
    again, tok2 = load_model(ModelConfig(source="hf", name_or_path=str(tmp_path / "m")))
    assert len(tok2) == len(tok)
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)
    save_model(again, tok2, tmp_path / "m")  # an existing folder is replaced
    assert not list(tmp_path.glob("m.tmp-*"))


@pytest.mark.slow
def test_smollm2_gguf_converts_once_and_generates(tmp_path: Path):
    cfg = ModelConfig(source="smollm2_gguf", cache_dir=str(tmp_path))
    model, tok = load_model(cfg, train=False)
    folder = smollm2_model_dir(cfg)
    assert folder == tmp_path / "smollm2-135m-instruct-bf16"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30  # a plain Llama checkpoint
    assert model.dtype == compute_dtype(cfg)
    before = (folder / "model.safetensors").stat().st_mtime_ns
    load_model(cfg)  # second load reads the folder; no new conversion
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])  # the de-quantised weights are sane
