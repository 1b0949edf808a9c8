"""The SFT loop: loss masks (exact positions), the fused loss, the schedule, data order, resume, DDP."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from foresight_core.chat import TokenizedSample, tokenize_messages, trajectory_messages
from foresight_core.config import ModelConfig, SFTConfig
from foresight_core.format import render_observation, render_turn
from foresight_core.models import load_model, load_tokenizer
from foresight_core.packing import IGNORE, LMSample, pack
from foresight_core.losses import CausalLMLoss, linear_cross_entropy
from foresight_core.sft import (latest_checkpoint, loss_mask, lr_factor,
                                micro_batch_rows, prepare_data, train)
from foresight_core.storage import StorageError
from foresight_core.tracking import MemoryTracker
from foresight_core.types import Action, Step, Task, Trajectory, Turn, WorldModelBlock

TINY = ModelConfig(source="tiny", tiny_layers=2, tiny_hidden=32)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY)


def trajectory(i: int, n_steps: int = 2) -> Trajectory:
    steps = []
    for t in range(n_steps):
        last = t == n_steps - 1
        wm = WorldModelBlock(f"find fact {t} of item {i}", [f"Item{i}", f"Fact{t}"], "one hop left", 0.25 * (t + 1))
        action = Action("answer", f"Fact{i}") if last else Action("search", f"item {i} fact {t}")
        steps.append(Step(Turn(f"step {t} of item {i}", action, wm if i % 3 else None),
                          None if last else f"Doc 1 (Item{i}): item {i} has fact {t} and more text"))
    return Trajectory(Task(f"task-{i}", "search", f"What is the fact of item {i}?", [f"Fact{i}"]), steps,
                      success=i % 2 == 0, score=float(i % 2 == 0))


# ---------------------------------------------------------------------------- loss masks

def test_loss_masks_hand_built():
    # tokens:      sys  q   a1  a1  obs obs  a2  eos
    s = TokenizedSample(input_ids=[1, 2, 3, 4, 5, 6, 7, 8],
                        assistant_mask=[0, 0, 1, 1, 0, 0, 1, 1],
                        observation_mask=[0, 0, 0, 0, 1, 1, 0, 0],
                        wm_mask=[0, 0, 1, 0, 0, 0, 0, 0], policy_mask=[0, 0, 0, 1, 0, 0, 1, 0])
    assert loss_mask(s, "assistant") == [0, 0, 1, 1, 0, 0, 1, 1]  # FE-SFT
    assert loss_mask(s, "all") == [1, 1, 1, 1, 0, 0, 1, 1]  # WM-AMT: all but observations
    assert loss_mask(s, "all", train_on_observations=True) == [1] * 8
    assert loss_mask(s, "observation") == [0, 0, 0, 0, 1, 1, 0, 0]  # IWM: the environment's answers alone
    # packed (seq_len 8): targets are the next tokens that are masked in; 1 and 5, 6 never are
    p = pack([LMSample(s.input_ids, {"loss": loss_mask(s, "all")})], 8, 0)
    assert p.labels["loss"].tolist() == [[2, 3, 4, IGNORE, IGNORE, 7, 8, IGNORE]]
    p = pack([LMSample(s.input_ids, {"loss": loss_mask(s, "assistant")})], 8, 0)
    assert p.labels["loss"].tolist() == [[IGNORE, 3, 4, IGNORE, IGNORE, 7, 8, IGNORE]]


def decoded_targets(tok, sample, mask: list[int]) -> str:
    return tok.decode([i for i, m in zip(sample.input_ids, mask) if m])


def test_loss_masks_on_a_real_trajectory(tok):
    traj = trajectory(1)
    s = tokenize_messages(tok, trajectory_messages(traj))
    t1, t2 = (render_turn(st.turn) for st in traj.steps)
    # FE-SFT: exactly the two assistant turns, each with its end-of-turn token
    assert decoded_targets(tok, s, loss_mask(s, "assistant")) == f"{t1}<|im_end|>{t2}<|im_end|>"
    # WM-AMT: everything except the observation's text
    dropped = [1 - m for m in loss_mask(s, "all")]
    assert decoded_targets(tok, s, dropped) == render_observation(traj.steps[0].observation)
    # the held-out world-model loss reads the four world-model tags of both turns
    wm = decoded_targets(tok, s, s.wm_mask)
    assert wm.startswith("<imaginary>find fact 0") and wm.count("<confidence>") == 2
    # IWM: the targets are the observation (the next state), given the history and the action
    assert decoded_targets(tok, s, loss_mask(s, "observation")) == render_observation(traj.steps[0].observation)


def test_state_sft_renders_the_roadmap_without_keywords_or_confidence(tok):
    traj = trajectory(1)
    s = tokenize_messages(tok, trajectory_messages(traj, "state"))
    wm = decoded_targets(tok, s, s.wm_mask)
    assert wm.startswith("<imaginary>find fact 0") and wm.count("<imaginary>") == 2
    assert "<keyword>" not in tok.decode(s.input_ids) and "<confidence>" not in tok.decode(s.input_ids)


# ---------------------------------------------------------------------------- fused loss

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_linear_cross_entropy_matches_reference(dtype, tol):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 8, generator=g, requires_grad=True)
    w = torch.randn(50, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (10,), generator=g)
    ref = F.cross_entropy(h @ w.T, y, reduction="sum")
    (ref * 2.5).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ours = linear_cross_entropy(h, w, y, chunk=3, dtype=dtype)  # chunks of 3, 3, 3, 1
    (ours * 2.5).backward()
    torch.testing.assert_close(ours, ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(h.grad, gh, rtol=tol, atol=tol)
    torch.testing.assert_close(w.grad, gw, rtol=tol, atol=tol)
    with torch.no_grad():  # the evaluation path computes no gradients
        torch.testing.assert_close(linear_cross_entropy(h, w, y, 4, dtype), ref.detach(), rtol=tol, atol=tol)


def test_frozen_head_gets_no_gradient():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(20, 8)  # e.g. LoRA: the head is frozen
    linear_cross_entropy(h, w, torch.tensor([1, 2, 3, 4]), dtype=torch.float32).backward()
    assert h.grad is not None and w.grad is None


def test_causal_lm_loss_equals_hf_loss_per_sample(tok):
    model, _ = load_model(TINY, seed=0)
    model.eval()
    a = tokenize_messages(tok, trajectory_messages(trajectory(1)))
    b = tokenize_messages(tok, trajectory_messages(trajectory(2, n_steps=1)))
    samples = [LMSample(s.input_ids, {"loss": loss_mask(s, "assistant")}) for s in (a, b)]
    p = pack(samples, len(a.input_ids) + len(b.input_ids) + 3, tok.pad_token_id)
    assert len(p) == 1  # both in one row
    with torch.no_grad():
        ours = CausalLMLoss(model, chunk=64, dtype=torch.float32)(p.input_ids, p.position_ids,
                                                                   {"loss": p.labels["loss"]})["loss"]
        ref = 0.0
        for s, m in zip((a, b), (samples[0].masks["loss"], samples[1].masks["loss"])):
            labels = torch.tensor([i if k else IGNORE for i, k in zip(s.input_ids, m)])[None]
            out = model(input_ids=torch.tensor([s.input_ids]), labels=labels, use_cache=False)
            ref += out.loss.item() * (labels[0, 1:] != IGNORE).sum().item()  # HF: mean over shifted targets
    assert ours.item() == pytest.approx(ref, rel=1e-5)


# ---------------------------------------------------------------------------- schedule and data order

def test_lr_schedule_hand_numbers():
    # warm-up 4: (s+1)/4; then cosine from 1 to 0.1 over steps 4..10
    assert [lr_factor(s, 4, 10, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # step 7: progress (7-4)/6 = 0.5 -> 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55
    assert lr_factor(7, 4, 10, 0.1) == pytest.approx(0.55)
    assert lr_factor(10, 4, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(0, 0, 10, 0.0) == 1.0


def test_micro_batches_shard_by_rank_and_cover_each_epoch():
    n, b, world = 11, 2, 2  # 10 usable rows a epoch (one left out), 3 micro-batches per rank: 2 + 2 + 1
    epoch0 = [[micro_batch_rows(k, n, b, r, world, seed=3) for k in range(3)] for r in range(world)]
    flat = [i for r in epoch0 for mb in r for i in mb]
    assert len(flat) == 10 and len(set(flat)) == 10
    assert [len(mb) for mb in epoch0[0]] == [2, 2, 1]
    # one worker with twice the batch sees the same rows, micro-batch by micro-batch (n a multiple of world)
    for k in range(3):
        single = micro_batch_rows(k, 10, b * world, 0, 1, seed=3)
        assert single == micro_batch_rows(k, 10, b, 0, world, 3) + micro_batch_rows(k, 10, b, 1, world, 3)
    assert micro_batch_rows(3, n, b, 0, world, 3) != epoch0[0][0] or n < 3  # a new permutation next epoch
    with pytest.raises(ValueError, match="1 packed rows cannot be shared by 2 workers"):
        micro_batch_rows(0, 1, 1, 0, 2, 0)


def test_config_refuses_observation_loss_without_loss_on_all():
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="train_on_observations needs loss_on: all"):
        SFTConfig(loss_on="assistant", train_on_observations=True)


def test_prepare_data_splits_by_task_and_names_bad_rows(tok):
    rows = [trajectory(i).to_dict() for i in range(6)] + [{"text": "plain general text about rivers"}]
    rows[0]["split"] = "eval"
    rows[1] = {"kind": "trajectory", "split": "wm_amt", "annotated": True, "trajectory": rows[1]}  # a corpus row
    data = prepare_data(rows, tok, SFTConfig(seq_len=256), source="corpus.jsonl")
    assert data.info["eval_samples"] == 1 and data.info["train_samples"] == 6
    with pytest.raises(ValueError, match=r"corpus.jsonl: row 2: .*needs 'trajectory'"):
        prepare_data([rows[1], {"oops": 1}], tok, SFTConfig(seq_len=256), source="corpus.jsonl")
    # FE-SFT: general text has no assistant tokens, so it is dropped (counted)
    data = prepare_data(rows, tok, SFTConfig(seq_len=256, loss_on="assistant"))
    assert data.train.stats.empty >= 1


# ---------------------------------------------------------------------------- the loop

def small_cfg(**kw) -> SFTConfig:
    base = dict(loss_on="all", seq_len=128, batch_size=2, grad_accum=2, lr=3e-3, warmup_steps=1, max_steps=4,
                eval_every=2, checkpoint_every=2, eval_share=0.0)
    return SFTConfig(**{**base, **kw})


def rows(n: int = 16) -> list[dict]:
    out = [trajectory(i, 1 + i % 3).to_dict() for i in range(n)]
    for r in out[:3]:
        r["split"] = "eval"
    return out


def test_training_lowers_held_out_world_model_loss(tok, tmp_path: Path):
    model, _ = load_model(TINY, seed=0)
    data = prepare_data(rows(), tok, small_cfg())
    tracker = MemoryTracker()
    result = train(model, tok, data, small_cfg(max_steps=6, eval_every=3), tmp_path, tracker=tracker, verbose=False)
    wm = tracker.series("eval_wm_loss")
    assert len(wm) == 3 and wm[-1] < wm[0] - 0.5  # random init (~ln 49152 = 10.8) learns the format fast
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "eval_loss"):
        assert all(math.isfinite(v) for v in tracker.series(key)), key
    assert (result.model_dir / "config.json").exists() and result.step == 6
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_000006"
    assert len(list((tmp_path / "checkpoints").glob("step_*"))) == 2  # keep_checkpoints


class Crash(RuntimeError):
    pass


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tok, tmp_path: Path):
    cfg = small_cfg()
    data = prepare_data(rows(), tok, cfg)

    straight, _ = load_model(TINY, seed=0)
    train(straight, tok, data, cfg, tmp_path / "a", seed=1, verbose=False)

    def crash_after_first_checkpoint(path, metrics):
        raise Crash("the machine went away")

    first, _ = load_model(TINY, seed=0)
    with pytest.raises(Crash):
        train(first, tok, data, cfg, tmp_path / "b", seed=1, on_checkpoint=crash_after_first_checkpoint,
              verbose=False)
    ckpt = latest_checkpoint(tmp_path / "b" / "checkpoints")
    assert ckpt.name == "step_000002"

    resumed, _ = load_model(TINY, seed=5)  # different init: everything must come from the checkpoint
    result = train(resumed, tok, data, cfg, tmp_path / "b", seed=1, resume_from=ckpt, verbose=False)
    assert result.step == 4
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    # and the run did move away from the initial weights
    init, _ = load_model(TINY, seed=0)
    assert not torch.equal(next(init.parameters()), next(straight.parameters()))


def test_activation_checkpointing_changes_memory_not_maths(tok, tmp_path: Path):
    cfg = small_cfg(max_steps=2, eval_at_start=False)
    data = prepare_data(rows(), tok, cfg)
    plain, _ = load_model(TINY, seed=0)
    train(plain, tok, data, cfg, tmp_path / "a", dtype=torch.float32, verbose=False)
    recomputed, _ = load_model(TINY, seed=0)
    train(recomputed, tok, data, small_cfg(max_steps=2, eval_at_start=False, activation_checkpointing=True),
          tmp_path / "b", dtype=torch.float32, verbose=False)
    for p, q in zip(plain.parameters(), recomputed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_lora_trains_only_adapters_and_checkpoints_only_them(tok, tmp_path: Path):
    from foresight_core.config import LoRAConfig

    cfg = small_cfg(max_steps=2, eval_at_start=False)
    model, _ = load_model(TINY.model_copy(update={"lora": LoRAConfig(r=4, alpha=8)}), seed=0)
    base_before = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    result = train(model, tok, prepare_data(rows(), tok, cfg), cfg, tmp_path, verbose=False)
    assert torch.equal(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight, base_before)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it moved
    state = torch.load(latest_checkpoint(tmp_path / "checkpoints") / "trainer_state.pt", weights_only=False)
    assert state["model"] and all("lora_" in k for k in state["model"])
    assert "lora" not in (result.model_dir / "model.safetensors").read_bytes()[:20000].decode("latin1")  # merged


def test_checkpoint_of_another_model_is_refused(tok, tmp_path: Path):
    cfg = small_cfg(max_steps=2)
    data = prepare_data(rows(), tok, cfg)
    model, _ = load_model(TINY, seed=0)
    train(model, tok, data, cfg, tmp_path, verbose=False)
    other, _ = load_model(ModelConfig(source="tiny", tiny_layers=3, tiny_hidden=32), seed=0)
    with pytest.raises(ValueError, match="does not match the model"):
        train(other, tok, data, cfg, tmp_path / "x", resume_from=latest_checkpoint(tmp_path / "checkpoints"),
              verbose=False)


def test_a_corrupted_checkpoint_is_named_before_it_is_loaded(tok, tmp_path: Path):
    cfg = small_cfg(max_steps=2)
    data = prepare_data(rows(), tok, cfg)
    model, _ = load_model(TINY, seed=0)
    train(model, tok, data, cfg, tmp_path, verbose=False)
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    blob = bytearray((ckpt / "trainer_state.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte in the middle of the tensors
    (ckpt / "trainer_state.pt").write_bytes(bytes(blob))
    with pytest.raises(StorageError, match=r"trainer_state.pt is corrupted: its sha256 .* recorded when it was written"):
        train(model, tok, data, cfg, tmp_path / "x", resume_from=ckpt, verbose=False)


def test_cli_trains_then_resumes_instead_of_starting_over(tmp_path: Path, capsys):
    import json as _json

    from foresight_core.sft import main

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(_json.dumps(r) + "\n" for r in rows()))
    args = ["--preset", "tiny", "--stage", "fe_sft", "--data", str(data), "--out", str(tmp_path / "out"),
            "--set", "model.tiny_hidden=32", "--set", "fe_sft.seq_len=128", "--set", "fe_sft.max_steps=2"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "step 2/2" in first and '"step": 2' in first
    assert main(args + ["--set", "fe_sft.max_steps=3"]) == 0  # a longer run picks up at step 2
    second = capsys.readouterr().out
    assert "resumed from" in second and "step 1/3" not in second and "step 3/3" in second


# ---------------------------------------------------------------------------- DDP

def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    tok = load_tokenizer(TINY)
    cfg = small_cfg(batch_size=1, max_steps=2, eval_at_start=False)
    model, _ = load_model(TINY, seed=0)
    result = train(model, tok, prepare_data(rows(), tok, cfg), cfg, Path(out) / f"rank{rank}", dtype=torch.float32,
                   verbose=False)
    torch.save({"params": [p.detach() for p in model.parameters()], "metrics": result.metrics},
               Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_workers_equal_one_worker_with_twice_the_batch(tok, tmp_path: Path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for p, q in zip(r0["params"], r1["params"]):
        assert torch.equal(p, q)  # DDP keeps the replicas identical
    cfg = small_cfg(batch_size=2, max_steps=2, eval_at_start=False)
    single, _ = load_model(TINY, seed=0)
    result = train(single, tok, prepare_data(rows(), tok, cfg), cfg, tmp_path / "single", dtype=torch.float32,
                   verbose=False)
    for p, q in zip(single.parameters(), r0["params"]):
        torch.testing.assert_close(p.detach(), q, rtol=1e-4, atol=1e-5)
    assert r0["metrics"]["loss"] == pytest.approx(result.metrics["loss"], rel=1e-4)
    assert r0["metrics"]["eval_loss"] == pytest.approx(result.metrics["eval_loss"], rel=1e-4)
