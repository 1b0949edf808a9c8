"""The rollout engine and the multi-turn agent loop (foresight_core/rollout.py)."""

from __future__ import annotations

import pytest
import torch

from foresight_core.chat import ChatBridge, tokenize_messages, trajectory_messages
from foresight_core.config import ModelConfig
from foresight_core.envs.search import SearchEnv
from foresight_core.fc_rl import TrainItem, batch_logprobs
from foresight_core.format import render_turn
from foresight_core.models import load_model, load_tokenizer
from foresight_core.rollout import Generation, HFEngine, SamplingParams, play_group
from foresight_core.types import Action, Task, Turn, WorldModelBlock

PASSAGES = [
    {"id": "1", "contents": '"Zorvan Kellid"\nZorvan Kellid was born in Tamsor and founded the Velmor Institute.'},
    {"id": "2", "contents": '"Tamsor"\nTamsor is a river town in the north.'},
    {"id": "3", "contents": '"Velmor Institute"\nThe Velmor Institute studies weather.'},
]
TASK = Task(id="t1", env="search", question="Where was Zorvan Kellid born?", answers=["Tamsor"])

TURN_SEARCH = Turn(think="I should look him up.", action=Action("search", "Zorvan Kellid born"),
                   wm=WorldModelBlock(imaginary="Search his biography, then answer.", keywords=["Tamsor", "Velmor"],
                                      analysis="Birthplace unknown.", confidence=0.4))
TURN_ANSWER = Turn(think="The passage says Tamsor.", action=Action("answer", "Tamsor"),
                   wm=WorldModelBlock(imaginary="Answer now.", keywords=["Tamsor"], analysis="Known.",
                                      confidence=0.9))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(source="tiny"))


class ReplayEngine:
    """A RolloutEngine that writes scripted turns (token ids of rendered text), one script per prompt row.

    It stands in for the model so that the loop's bookkeeping can be checked token for token.
    """

    shares_weights = True

    def __init__(self, tok, scripts: list[list[str]], finished: bool = True):
        self.tok, self.scripts, self.finished = tok, scripts, finished
        self.calls: list[int] = []  # batch size of each generate call

    def generate(self, prompts, params):
        self.calls.append(len(prompts))
        out = []
        for p in prompts:
            # the script of a row is found by its prompt (rows are re-batched every turn)
            k = next(i for i, s in enumerate(self.scripts) if s and self._key(i) in self.tok.decode(p))
            text = self.scripts[k].pop(0)
            ids = self.tok.encode(text, add_special_tokens=False) + ([self.tok.eos_token_id] if self.finished else [])
            out.append(Generation(token_ids=ids, logprobs=[-0.5] * len(ids), finished=self.finished))
        return out

    def load_weights(self, weights):
        raise AssertionError("not used")

    def _key(self, i: int) -> str:
        return f"[row {i}]"


def _task(i: int) -> Task:
    return Task(id=f"t{i}", env="search", question=f"[row {i}] Where was Zorvan Kellid born?", answers=["Tamsor"])


def _make_env(task):
    return SearchEnv(PASSAGES, top_k=2, max_turns=4)


def test_multi_turn_masks_align_with_sft_tokenisation(tok):
    bridge = ChatBridge(tok)
    engine = ReplayEngine(tok, [[render_turn(TURN_SEARCH), render_turn(TURN_ANSWER)]])
    (r,) = play_group(engine, bridge, _make_env, [_task(0)], 1, SamplingParams(max_new_tokens=512))
    assert (r.finish, r.success, r.score, r.format_ok) == ("answer", True, 1.0, True)
    assert [s.confidence for s in r.steps] == [0.4, 0.9]
    assert r.steps[0].keywords == ["Tamsor", "Velmor"]
    assert "Doc 1 (Zorvan Kellid)" in r.steps[0].observation
    # the same episode tokenised the SFT way gives the same ids and the same masks, token for token
    sample = tokenize_messages(tok, trajectory_messages(r.to_trajectory()))
    ids = r.prompt_ids + r.response_ids
    assert sample.input_ids[:len(ids)] == ids
    assert tok.decode(sample.input_ids[len(ids):]).strip() == ""  # the template's trailing "\n" at most
    p = len(r.prompt_ids)
    n = len(r.response_ids)
    # generated tokens are exactly SFT's assistant tokens (content + end-of-turn); everything else in the
    # response -- observation turns and the chat headers around them -- is masked out (obs_mask)
    assert [1 - m for m in r.obs_mask] == sample.assistant_mask[p:p + n]
    assert all(o >= s for o, s in zip(r.obs_mask, sample.observation_mask[p:p + n]))
    assert r.wm_mask == sample.wm_mask[p:p + n]
    assert r.policy_mask == sample.policy_mask[p:p + n]
    # and the masks cover what they should: decode each span of turn 0
    s0, e0 = r.turn_spans[0]
    wm_text = tok.decode([t for t, m in zip(r.response_ids[s0:e0], r.wm_mask[s0:e0]) if m])
    pol_text = tok.decode([t for t, m in zip(r.response_ids[s0:e0], r.policy_mask[s0:e0]) if m])
    obs_text = tok.decode([t for t, m in zip(r.response_ids, r.obs_mask) if m])
    assert wm_text.startswith("<imaginary>") and wm_text.endswith("</confidence>")
    assert pol_text.startswith("<think>") and pol_text.endswith("</action>")
    assert "<observation>Doc 1 (Zorvan Kellid)" in obs_text and "<|im_start|>assistant" in obs_text
    assert r.response_ids[e0 - 1] == tok.eos_token_id and not r.policy_mask[e0 - 1]  # eos in neither span
    # sampling log-probs ride along on generated tokens, 0 on observation tokens
    assert all(lp == (0.0 if m else -0.5) for lp, m in zip(r.logprobs, r.obs_mask))


def test_group_batches_live_episodes_and_bad_turns_end_cleanly(tok):
    bridge = ChatBridge(tok)
    scripts = [
        [render_turn(TURN_SEARCH), render_turn(TURN_ANSWER)],           # row 0: search, answer -> success
        ["<think>no world model</think><action><answer>x</answer></action>"],  # row 1: wm missing -> malformed
        ["<imaginary>unclosed"],                                           # row 2: junk -> malformed
        [render_turn(TURN_SEARCH)] * 4,                                    # row 3: searches until the turn limit
    ]
    engine = ReplayEngine(tok, scripts)
    tasks = [_task(i) for i in range(4)]
    seen = []
    rs = play_group(engine, bridge, _make_env, tasks, 1, SamplingParams(), max_turns=3,
                    on_progress=lambda *a: seen.append(a))
    assert [r.finish for r in rs] == ["answer", "malformed", "malformed", "turn_limit"]
    assert seen == [(2, 4, 1), (3, 4, 2), (4, 4, 3)]  # (episodes done, episodes, turn) after every turn
    assert [r.format_ok for r in rs] == [True, False, False, True]
    assert [len(r.steps) for r in rs] == [2, 1, 1, 3]
    assert "missing" in rs[1].steps[0].reason
    # malformed turns train nothing special: no span masks, no observation appended
    assert sum(rs[2].wm_mask) == sum(rs[2].policy_mask) == sum(rs[2].obs_mask) == 0
    # one generate call per turn over the episodes still alive: 4, then rows 0 and 3, then row 3
    assert engine.calls == [4, 2, 1]
    # the turn limit ends the episode without appending the last observation
    assert rs[3].response_ids[-1] == tok.eos_token_id and rs[3].steps[-1].observation is not None


def test_unfinished_turn_is_truncated(tok):
    engine = ReplayEngine(tok, [[render_turn(TURN_ANSWER)]], finished=False)
    (r,) = play_group(engine, ChatBridge(tok), _make_env, [_task(0)], 1, SamplingParams())
    assert (r.finish, r.format_ok, r.success) == ("truncated", False, False)


def test_raw_format_is_single_turn_answer(tok):
    engine = ReplayEngine(tok, [[" Tamsor "]])
    (r,) = play_group(engine, ChatBridge(tok), _make_env, [_task(0)], 1, SamplingParams(), turn_format="raw")
    assert (r.finish, r.success, len(r.steps)) == ("answer", True, 1)
    assert r.policy_mask == [1] * len(r.response_ids) and sum(r.wm_mask) == 0


def _tiny_model():
    model, _ = load_model(ModelConfig(source="tiny", tiny_hidden=32), "cpu", train=False, seed=0)
    return model.float()


def test_hf_engine_logprobs_match_learner(tok):
    model = _tiny_model()
    engine = HFEngine(model, tok)
    prompts = [tok.encode("hello there", add_special_tokens=False),
               tok.encode("a much longer prompt with many more tokens in it", add_special_tokens=False)]
    torch.manual_seed(1)
    gens = engine.generate(prompts, SamplingParams(temperature=0.7, max_new_tokens=6))
    assert [len(g.token_ids) for g in gens] == [6, 6] and not any(g.finished for g in gens)  # random model: no eos
    # the learner's log-probs (logits / T) equal the engine's sampling ones, batched or one sequence at a time
    items = [TrainItem(prompt_ids=p, response_ids=g.token_ids, trained=list(range(6)), advantages=[0.0] * 6, seq=k)
             for k, (p, g) in enumerate(zip(prompts, gens))]
    with torch.no_grad():
        lp = batch_logprobs(model, items, 0.7, torch.device("cpu"))
        one = [batch_logprobs(model, [it], 0.7, torch.device("cpu")) for it in items]
    assert lp.tolist() == pytest.approx(gens[0].logprobs + gens[1].logprobs, abs=1e-4)
    assert lp.tolist() == pytest.approx(torch.cat(one).tolist(), abs=1e-4)
    # only some response tokens trained (an observation in between): the same values at those indices
    part = TrainItem(prompt_ids=prompts[1], response_ids=gens[1].token_ids, trained=[1, 4], advantages=[0.0] * 2,
                     seq=0)
    with torch.no_grad():
        lp_part = batch_logprobs(model, [items[0], part], 0.7, torch.device("cpu"))
    assert lp_part.tolist()[6:] == pytest.approx([gens[1].logprobs[1], gens[1].logprobs[4]], abs=1e-4)


def test_hf_engine_stops_at_stop_token(tok):
    model = _tiny_model()
    engine = HFEngine(model, tok)
    prompt = tok.encode("hello", add_special_tokens=False)
    with torch.no_grad():  # make the most likely next token the stop token: greedy-ish at T=0.01
        nxt = int(model(torch.tensor([prompt])).logits[0, -1].argmax())
    gens = engine.generate([prompt], SamplingParams(temperature=0.01, max_new_tokens=5, stop_token_ids=[nxt]))
    assert gens[0].token_ids == [nxt] and gens[0].finished


def test_hf_engine_reuses_the_kept_cache_across_turns(tok):
    """Turn 2 re-sends turn 1's prompt and output plus an observation: with ``reuse_kv`` only the new tokens
    run, and the tokens and log-probs equal a full recomputation's. A weight change drops the kept cache."""
    model = _tiny_model()
    prompts = [tok.encode("hello there", add_special_tokens=False),
               tok.encode("a much longer prompt with many more tokens in it", add_special_tokens=False)]
    obs = tok.encode(" an observation comes back", add_special_tokens=False)
    params = SamplingParams(temperature=0, max_new_tokens=5)

    def two_turns(engine):
        first = engine.generate(prompts, params)
        second = engine.generate([p + g.token_ids + obs[:k + 2] for k, (p, g) in enumerate(zip(prompts, first))],
                                 params)
        return [(g.token_ids, g.logprobs) for g in first + second]

    plain, kept = HFEngine(model, tok, reuse_kv=False), HFEngine(model, tok)
    want, got = two_turns(plain), two_turns(kept)
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-4)
    # turn 2 ran only what turn 1 had not: every prompt token and all but the last sampled one were reused
    assert plain.reused_tokens == 0
    assert kept.reused_tokens == sum(len(p) + len(t) - 1 for p, (t, _) in zip(prompts, want[:2]))
    # an optimiser step changes the weights in place: the kept cache (of the old weights) must not be used
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    before = kept.reused_tokens
    kept.generate([p + t + obs for p, (t, _) in zip(prompts, got[2:])], params)
    assert kept.reused_tokens == before


def test_top_p_sampling_distribution():
    from foresight_core.rollout import _SampledLogprobs
    # p = [0.5, 0.3, 0.2], top_p 0.6: mass before token 1 is 0.5 < 0.6 -> kept; before token 2 0.8 -> dropped
    # renormalised [0.5, 0.3] / 0.8 = [0.625, 0.375, 0]
    rec = _SampledLogprobs(temperature=1.0, top_p=0.6)
    out = rec(torch.zeros(1, 1, dtype=torch.long), torch.log(torch.tensor([[0.5, 0.3, 0.2]])))
    assert out.exp()[0].tolist() == pytest.approx([0.625, 0.375, 0.0])
    # temperature 0.5 squares and renormalises: [0.25, 0.09, 0.04] / 0.38 ; token 1 sampled -> log(0.09/0.38)
    rec = _SampledLogprobs(temperature=0.5, top_p=1.0)
    rec(torch.zeros(1, 1, dtype=torch.long), torch.log(torch.tensor([[0.5, 0.3, 0.2]])))
    assert rec.finish(torch.tensor([1])).item() == pytest.approx(torch.log(torch.tensor(0.09 / 0.38)).item())


@pytest.mark.gpu
def test_vllm_engine_logprobs_and_weight_sync(tok, tmp_path):
    """vLLM samples with the learner's log-probs, and sync_weights makes it follow the learner's updates."""
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from foresight_core.models import save_model
    from foresight_core.vllm_engine import VLLMEngine, sync_weights
    model = _tiny_model()
    save_model(model, tok, tmp_path / "m")
    engine = VLLMEngine(str(tmp_path / "m"), gpu_memory_utilization=0.2, max_model_len=512, dtype="float32")
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("hello there", "a longer prompt")]

    def check(m):
        gens = engine.generate(prompts, SamplingParams(temperature=0.7, max_new_tokens=6))
        items = [TrainItem(prompt_ids=p, response_ids=g.token_ids, trained=list(range(len(g.token_ids))),
                           advantages=[0.0] * len(g.token_ids), seq=k) for k, (p, g) in enumerate(zip(prompts, gens))]
        with torch.no_grad():
            lp = batch_logprobs(m, items, 0.7, torch.device("cpu"))
        assert lp.tolist() == pytest.approx([x for g in gens for x in g.logprobs], abs=2e-3)

    check(model)
    with torch.no_grad():  # a large update: the engine must follow it
        model.lm_head.weight.mul_(3.0)
    sync_weights(engine, model.state_dict())
    check(model)


def test_a_prefix_is_replayed_and_the_episode_goes_on_from_its_state(tok):
    """prefixes: the other policy's turns and the environment's answers are the context, the turn limit counts
    them, and the episode ends as if it had played them itself; the same episode from the start agrees."""
    from foresight_core.types import Step

    bridge = ChatBridge(tok)
    prefix = [Step(TURN_SEARCH, observation="(stored; the environment's own answer is used)")]
    engine = ReplayEngine(tok, [[render_turn(TURN_ANSWER)]])
    (r,) = play_group(engine, bridge, _make_env, [_task(0)], 1, SamplingParams(), max_turns=3, prefixes=[prefix])
    assert (r.finish, r.success, len(r.steps)) == ("answer", True, 1)  # only its own turn is in the rollout
    prompt = tok.decode(r.prompt_ids)
    assert render_turn(TURN_SEARCH) in prompt and "Doc 1 (Zorvan Kellid)" in prompt and "(stored;" not in prompt
    full = play_group(ReplayEngine(tok, [[render_turn(TURN_SEARCH), render_turn(TURN_ANSWER)]]), bridge, _make_env,
                      [_task(0)], 1, SamplingParams(), max_turns=3)[0]
    assert r.prompt_ids + r.response_ids == full.prompt_ids + full.response_ids  # token for token the same episode
    # the prefix counts against the limit: 1 of 2 turns left, a search ends the episode at the limit
    (cut,) = play_group(ReplayEngine(tok, [[render_turn(TURN_SEARCH)] * 3]), bridge, _make_env, [_task(0)], 1,
                        SamplingParams(), max_turns=2, prefixes=[prefix])
    assert (cut.finish, len(cut.steps)) == ("turn_limit", 1)
    with pytest.raises(ValueError, match="leaves no turn"):
        play_group(engine, bridge, _make_env, [_task(0)], 1, SamplingParams(), max_turns=1, prefixes=[prefix])
    with pytest.raises(ValueError, match="ends the episode"):
        play_group(engine, bridge, _make_env, [_task(0)], 1, SamplingParams(), max_turns=3,
                   prefixes=[[Step(TURN_ANSWER), Step(TURN_ANSWER)]])
    with pytest.raises(ValueError, match="one per task"):
        play_group(engine, bridge, _make_env, [_task(0)], 1, SamplingParams(), prefixes=[prefix, prefix])
