"""The GPU rollout engine: vLLM behind the same ``RolloutEngine`` protocol as ``rollout.HFEngine``.

    engine = VLLMEngine("work/fe_sft/model", gpu_memory_utilization=0.3)   # a save_pretrained folder
    gens = engine.generate(prompt_token_ids, SamplingParams(temperature=1.0, max_new_tokens=256))
    sync_weights(engine, model.state_dict())                              # after every optimiser step

Imported only when ``fc_rl.engine == "vllm"`` (vLLM is the optional ``gpu`` extra); the learner
(``fc_rl.py``) never imports it: weights move through the one function ``sync_weights``.

The engine is colocated with the learner, as TRL's "colocate" mode: vLLM runs inside this process
(``distributed_executor_backend="external_launcher"``, one engine per DDP rank, tensor parallel 1),
so a weight sync is an in-memory ``load_weights`` on the model runner, no copy through a server.
``logprobs_mode="processed_logprobs"`` makes vLLM return the log-probabilities of the distribution it
sampled from (after temperature / top-p), as ``HFEngine`` does. To run it as a Ray actor, wrap it:
``ray.remote(num_gpus=1)(VLLMEngine).remote(path)``; its methods take and return plain lists.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from foresight_core.rollout import Generation, SamplingParams


class VLLMEngine:
    shares_weights = False

    def __init__(self, model_path: str, gpu_memory_utilization: float = 0.3, max_model_len: int = 4096,
                 seed: int = 0, dtype: str = "bfloat16") -> None:
        from vllm import LLM
        # external_launcher reads the torch.distributed rendezvous variables; a single process gets defaults
        for var, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                             ("MASTER_PORT", "29555")):
            os.environ.setdefault(var, default)
        self.llm = LLM(model=model_path, gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       dtype=dtype, seed=seed, distributed_executor_backend="external_launcher",
                       logprobs_mode="processed_logprobs", enable_prefix_caching=True)
        self.eos_id = self.llm.get_tokenizer().eos_token_id

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt
        stops = params.stop_token_ids or [self.eos_id]
        sp = VSamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=-1,
                             max_tokens=params.max_new_tokens, stop_token_ids=stops, logprobs=0,
                             skip_special_tokens=False, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        gens = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            # logprobs=0 returns the sampled token's entry at every position
            lps = [float(step[t].logprob) for step, t in zip(c.logprobs or [], ids)]
            gens.append(Generation(token_ids=ids, logprobs=lps, finished=bool(ids) and ids[-1] in stops))
        return gens

    def load_weights(self, weights: Mapping[str, torch.Tensor] | str) -> None:
        if isinstance(weights, str):
            from safetensors.torch import load_file
            from pathlib import Path
            weights = {k: v for f in sorted(Path(weights).glob("*.safetensors")) for k, v in load_file(f).items()}
        sync_weights(self, weights)


def sync_weights(engine: VLLMEngine, state_dict: Mapping[str, torch.Tensor]) -> None:
    """The one way weights reach vLLM: load the learner's tensors into the colocated model runner.

    Names are the Hugging Face checkpoint's (``model.layers.0.self_attn.q_proj.weight``); vLLM's
    ``load_weights`` fuses q/k/v and gate/up itself. The prefix cache is dropped (it holds KV of the
    old weights).
    """
    model: Any = engine.llm.llm_engine.model_executor.driver_worker.model_runner.model
    model.load_weights((name, t.detach()) for name, t in state_dict.items())
    engine.llm.reset_prefix_cache()
