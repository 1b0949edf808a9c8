"""FSDP (PyTorch FSDP2, ``fully_shard``): sharding, and full states for checkpoints and the final model.

Each decoder layer is its own FSDP unit and the ``CausalLMLoss`` wrapper is the root, so the root's
own parameters (embeddings, final norm, the LM head -- tied to the embeddings in SmolLM2, one
parameter either way) are gathered for the whole of its forward, where the fused loss reads
``lm_head.weight`` directly. Parameters stay fp32 (autocast computes in ``dtype``, as under DDP).
Gradients are reduce-scattered after every micro-batch (sharded gradients accumulate; no full
gradient is ever kept), averaged over ranks as DDP does. Checkpoints hold full states gathered to
rank 0, in the layout one process or DDP writes, so a checkpoint resumes under any strategy and
world size.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from foresight_core.models import unwrap


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (all of them, or the LoRA adapters): what a checkpoint must hold."""
    return {n: p.detach() for n, p in unwrap(model).named_parameters() if p.requires_grad}


def is_sharded(model: nn.Module) -> bool:
    """Does ``model`` hold FSDP-sharded (DTensor) parameters?"""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_model(loss_fn: nn.Module, device: torch.device) -> None:
    """``fully_shard`` every decoder layer of ``loss_fn.model``, then ``loss_fn`` itself (the root), in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = loss_fn.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    units = set(getattr(base, "_no_split_modules", None) or [])  # transformers: the decoder-layer classes
    layers = [m for m in base.modules() if type(m).__name__ in units]
    if not layers:
        layers = list(getattr(base.get_decoder(), "layers", []))
    if not layers:
        raise ValueError(f"fsdp: found no decoder layers to shard in {type(base).__name__}")
    # rank 0's weights everywhere first, as DDP does: fully_shard keeps each rank's own slice of its own
    # tensors, and a random init (LoRA's A matrices) differs between ranks
    with torch.no_grad():
        for t in list(loss_fn.parameters()) + list(loss_fn.buffers()):
            dist.broadcast(t.data, src=0)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # FSDP places shards on the current device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(loss_fn, mesh=mesh)


def _full_options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def _optimizer_names(model: nn.Module, optimizer) -> list[str]:
    """The parameter names of ``optimizer``'s parameters in the order of its groups (its state-dict ids)."""
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def gather_training_state(model: nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """FSDP: ``(trainable_state, optimizer.state_dict())`` of the whole model, on rank 0's CPU (empty
    elsewhere). A collective: every rank calls it. Same layout as unsharded ones: optimizer state keyed by
    the parameter's index in the groups, not by name."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    names = set(trainable_state(model))
    full = get_model_state_dict(model, options=_full_options(ignore_frozen_params=True))
    osd = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if dist.get_rank() != 0:
        return {}, {}
    ids: dict[str, int] = {}
    groups = [{**g, "params": [ids.setdefault(n, len(ids)) for n in g["params"]]} for g in osd["param_groups"]]
    return ({k: v for k, v in full.items() if k in names},
            {"state": {ids[n]: v for n, v in osd["state"].items()}, "param_groups": groups})


def load_sharded_state(model: nn.Module, optimizer, model_state: dict[str, torch.Tensor],
                       optimizer_state: dict[str, Any]) -> None:
    """FSDP: load full (unsharded) states, present on every rank, into the sharded model and optimiser."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    names = _optimizer_names(model, optimizer)
    if len(names) != sum(len(g["params"]) for g in optimizer_state["param_groups"]):
        raise ValueError("the checkpoint's optimizer has a different number of parameters than this one")
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in optimizer_state["param_groups"]]
    by_name = {"state": {names[i]: v for i, v in optimizer_state["state"].items()}, "param_groups": groups}
    # strict=False: frozen parameters (LoRA) and a tied LM head are not in a checkpoint (load_checkpoint
    # has already checked that every trainable parameter is)
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def gather_model(model: nn.Module) -> nn.Module | None:
    """FSDP: an unsharded CPU copy of ``model`` on rank 0 (None elsewhere), for ``save_model``. A collective.

    Rank 0 builds the same architecture (and LoRA adapters) on the meta device and takes the gathered
    full weights as its parameters; non-persistent buffers (rotary frequencies) come from ``model``."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_full_options())
    if dist.get_rank() != 0:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.device("meta"):
        plain = type(base)(base.config)
    if base is not model:  # peft: the same adapters, merged by save_model
        from peft import get_peft_model

        name = model.active_adapter
        plain = get_peft_model(plain, copy.deepcopy(model.peft_config[name]), adapter_name=name)
    expected = plain.state_dict()
    missing = [k for k in expected if k not in full]
    plain.load_state_dict({k: v for k, v in full.items() if k in expected}, strict=False, assign=True)
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()  # a tied LM head is the embedding again
    buffers = dict(model.named_buffers())
    for name, buf in list(plain.named_buffers()):
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner)._buffers[leaf] = buffers[name].detach().cpu().clone()
    still_meta = [n for n, t in list(plain.named_parameters()) + list(plain.named_buffers()) if t.is_meta]
    if still_meta:
        raise RuntimeError(f"fsdp: the gathered model lacks {still_meta[:3]} (missing from the state: {missing[:3]})")
    return plain.train(model.training)
