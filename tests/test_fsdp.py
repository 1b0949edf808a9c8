"""scaling.strategy: fsdp for WM-AMT / FE-SFT (PyTorch FSDP2 on CPU over gloo, two processes): the same
optimisation as DDP and as one process with the global batch, checkpoints in the DDP layout that resume
exactly, a final model that transformers loads; FC-RL refuses fsdp."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from foresight_core.config import LoRAConfig, ModelConfig, ScalingConfig, SFTConfig
from foresight_core.models import load_model, load_tokenizer
from foresight_core.sft import latest_checkpoint, prepare_data, train
from test_sft import trajectory as sft_trajectory  # the same hand-built trajectories

TINY = ModelConfig(source="tiny", tiny_layers=2, tiny_hidden=32)


def trajectory(i: int, n_steps: int) -> dict:
    return sft_trajectory(i, n_steps).to_dict()


def rows(n: int = 16) -> list[dict]:
    out = [trajectory(i, 1 + i % 3) for i in range(n)]
    for r in out[:3]:  # 3 held-out rows: rank 0 evaluates 2, rank 1 one (FSDP must keep them in step)
        r["split"] = "eval"
    return out


def cfg_for(strategy: str, **kw) -> SFTConfig:
    base = dict(loss_on="all", seq_len=128, batch_size=1, grad_accum=2, lr=3e-3, warmup_steps=1, max_steps=4,
                eval_every=2, checkpoint_every=2, eval_at_start=True, scaling=ScalingConfig(strategy=strategy))
    return SFTConfig(**{**base, **kw})


class Crash(RuntimeError):
    pass


def _full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter, unsharded (a collective under FSDP)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def _worker(rank: int, world: int, init_file: str, out: str, lora: bool) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out = Path(out)
    model_cfg = TINY.model_copy(update={"lora": LoRAConfig(r=4, alpha=8)}) if lora else TINY
    tok = load_tokenizer(model_cfg)
    data = prepare_data(rows(), tok, cfg_for("ddp"))
    results = {}
    runs = ["ddp", "fsdp"] if lora else ["ddp", "fsdp", "fsdp_resumed", "ddp_then_fsdp"]
    for run in runs:
        # the LoRA case also recomputes activations under FSDP (non-reentrant checkpointing in each unit)
        cfg = cfg_for("ddp" if run == "ddp" else "fsdp", activation_checkpointing=lora and run == "fsdp")
        torch.manual_seed(rank)  # LoRA's random init differs by rank: DDP and FSDP both take rank 0's
        model, _ = load_model(model_cfg, seed=0)
        if run == "fsdp_resumed":  # crash after the first checkpoint, then resume on a fresh model
            def crash(path, metrics):
                raise Crash("the machine went away")

            try:
                train(model, tok, data, cfg, out / run, seed=1, dtype=torch.float32, on_checkpoint=crash,
                      verbose=False)
            except Crash:
                pass
            model, _ = load_model(model_cfg, seed=5)  # a different init: everything must come from the checkpoint
            result = train(model, tok, data, cfg, out / run, seed=1, dtype=torch.float32, verbose=False,
                           resume_from=latest_checkpoint(out / run / "checkpoints"))
        elif run == "ddp_then_fsdp":  # the DDP run's step-2 checkpoint, continued under FSDP
            result = train(model, tok, data, cfg, out / run, seed=1, dtype=torch.float32, verbose=False,
                           resume_from=out / "ddp" / "checkpoints" / "step_000002")
        else:
            result = train(model, tok, data, cfg, out / run, seed=1, dtype=torch.float32, verbose=False)
        results[run] = {"params": _full_params(model), "metrics": result.metrics, "history": result.history,
                        "step": result.step, "model_dir": result.model_dir}
    if rank == 0:
        torch.save(results, out / "results.pt")
    dist.destroy_process_group()


def _spawn(tmp_path: Path, lora: bool = False) -> dict:
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), lora), nprocs=2)
    return torch.load(tmp_path / "results.pt", weights_only=False)


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=lambda m: f"{name}: {m}", **tol)


@pytest.mark.slow
def test_fsdp_equals_ddp_and_one_process_resumes_exactly_and_saves_an_hf_model(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    r = _spawn(tmp_path)
    ddp, fsdp, resumed = r["ddp"], r["fsdp"], r["fsdp_resumed"]

    # FSDP = DDP: parameters, the loss (targets weigh the same: reduce-scatter averages like DDP), the
    # clipped gradient norm, and the held-out losses (which FSDP evaluates with the ranks in step)
    _assert_close(fsdp["params"], ddp["params"], rtol=1e-5, atol=1e-6)
    for key in ("loss", "eval_loss", "eval_wm_loss"):
        assert fsdp["metrics"][key] == pytest.approx(ddp["metrics"][key], rel=1e-5), key
    # clip_grad_norm_'s fp32 norm (on CPU) is itself 1e-5..1e-4 off the exact fp64 norm of the same gradients,
    # under DDP as under FSDP (whole tensors vs shards: different rounding); the gradients agree to ~3e-7
    assert fsdp["metrics"]["grad_norm"] == pytest.approx(ddp["metrics"]["grad_norm"], rel=1e-3)
    assert [h["step"] for h in fsdp["history"]] == [h["step"] for h in ddp["history"]]

    # ... = one process with the global batch (2 rows per micro-batch)
    tok = load_tokenizer(TINY)
    single, _ = load_model(TINY, seed=0)
    cfg = cfg_for("fsdp", batch_size=2)  # no process group: the strategy is ignored
    data = prepare_data(rows(), tok, cfg)
    one = train(single, tok, data, cfg, tmp_path / "single", seed=1, dtype=torch.float32, verbose=False)
    _assert_close(fsdp["params"], {n: p.detach() for n, p in single.named_parameters()}, rtol=1e-4, atol=1e-5)
    assert fsdp["metrics"]["loss"] == pytest.approx(one.metrics["loss"], rel=1e-4)

    # the checkpoint is the file DDP writes: same trainable names, optimiser state by index, same values
    def state(run: str) -> dict:
        return torch.load(tmp_path / run / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=False)

    s_ddp, s_fsdp = state("ddp"), state("fsdp")
    assert set(s_fsdp["model"]) == set(s_ddp["model"]) == set(single.state_dict()) - {"lm_head.weight"}  # tied
    _assert_close(s_fsdp["model"], {k: v.cpu() for k, v in s_ddp["model"].items()}, rtol=1e-5, atol=1e-6)
    assert s_fsdp["optimizer"]["param_groups"] == s_ddp["optimizer"]["param_groups"]
    assert s_fsdp["optimizer"]["state"].keys() == s_ddp["optimizer"]["state"].keys()
    for i, st in s_ddp["optimizer"]["state"].items():  # Adam moments: relative to their norm (tiny entries)
        for k, v in st.items():
            w = torch.as_tensor(s_fsdp["optimizer"]["state"][i][k]).double()
            v = torch.as_tensor(v).double().cpu()
            assert w.shape == v.shape and (w - v).norm() <= 1e-4 * v.norm() + 1e-12, (i, k)

    # checkpoint at step 2, crash, resume on a differently initialised model: the uninterrupted run's weights
    assert resumed["step"] == 4
    for name, p in fsdp["params"].items():
        assert torch.equal(p, resumed["params"][name]), name
    # a DDP checkpoint resumes under FSDP (same file): DDP's weights at step 4
    assert r["ddp_then_fsdp"]["step"] == 4
    _assert_close(r["ddp_then_fsdp"]["params"], ddp["params"], rtol=1e-5, atol=1e-6)
    init, _ = load_model(TINY, seed=0)
    assert not torch.equal(init.model.embed_tokens.weight, fsdp["params"]["model.embed_tokens.weight"])

    # the final model (rank 0) is a plain HF folder with the trained weights, head tied to the embedding
    loaded = AutoModelForCausalLM.from_pretrained(fsdp["model_dir"])
    _assert_close({n: p.detach() for n, p in loaded.named_parameters()}, fsdp["params"], rtol=0, atol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_fsdp_with_lora_trains_like_ddp_and_saves_a_merged_model(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    r = _spawn(tmp_path, lora=True)
    ddp, fsdp = r["ddp"], r["fsdp"]  # fsdp also with activation checkpointing: the same maths
    _assert_close(fsdp["params"], ddp["params"], rtol=1e-5, atol=1e-6)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in fsdp["params"].items())  # B starts at 0: it moved
    ckpt = torch.load(latest_checkpoint(tmp_path / "fsdp" / "checkpoints") / "trainer_state.pt", weights_only=False)
    assert ckpt["model"] and all("lora_" in k for k in ckpt["model"])  # adapters only
    merged = AutoModelForCausalLM.from_pretrained(fsdp["model_dir"])
    ddp_merged = AutoModelForCausalLM.from_pretrained(ddp["model_dir"])
    assert not any("lora" in n for n, _ in merged.named_parameters())
    _assert_close(dict(merged.named_parameters()), dict(ddp_merged.named_parameters()), rtol=1e-5, atol=1e-6)


def test_fc_rl_refuses_fsdp():
    from foresight_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="fc_rl.scaling.strategy 'fsdp' is not supported"):
        load_config("tiny", overrides=["fc_rl.scaling.strategy=fsdp"], env={})
    cfg = load_config("tiny", overrides=["wm_amt.scaling.strategy=fsdp", "fe_sft.scaling.strategy=fsdp"], env={})
    assert cfg.wm_amt.scaling.strategy == cfg.fe_sft.scaling.strategy == "fsdp"
