"""Rollouts for FC-RL: the engine interface, the Hugging Face engine, and the multi-turn agent loop.

    engine = HFEngine(model, tokenizer)                       # or vllm_engine.VLLMEngine on a GPU
    rollouts = play_group(engine, ChatBridge(tok), make_env, tasks, group_size=4,
                          params=SamplingParams(temperature=1.0, max_new_tokens=256))

A ``RolloutEngine`` turns token prompts into sampled continuations with the log-probability of
every sampled token, and takes new weights through ``load_weights``. ``play_group`` plays G
rollouts of every task at once, turn by turn: each turn one batched ``generate`` over all live
episodes, then every turn is parsed, its action stepped in the episode's own environment and the
observation appended as tokens that the loss never sees. A malformed or unfinished turn ends its
episode with format_ok False; nothing the model writes can crash the loop.

Each ``Rollout`` carries the response tokens (prompt excluded) with three masks -- observation,
world-model span, policy span -- the turn boundaries, the parsed confidence and keywords of every
step, and the outcome: everything ``fc_rl`` needs for rewards and per-token advantages.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from foresight_core.chat import ChatBridge, prompt_messages
from foresight_core.envs.base import Env
from foresight_core.format import ParsedTurn, parse_turn, render_observation, render_turn
from foresight_core.types import Action, Step, Task, Trajectory, Turn

log = logging.getLogger(__name__)

TurnFormat = Literal["foresight", "state", "plain", "raw"]


# ---------------------------------------------------------------------------------------------
# Engine interface


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0: greedy decoding
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop_token_ids: list[int] = field(default_factory=list)  # empty: the tokenizer's eos


@dataclass
class Generation:
    token_ids: list[int]  # sampled tokens, the stop token included when ``finished``
    logprobs: list[float]  # log-probability of each sampled token under the sampling distribution
    finished: bool  # ended on a stop token (False: cut at max_new_tokens)


class RolloutEngine(Protocol):
    shares_weights: bool
    """True when the engine samples from the learner's own module (nothing to sync)."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]: ...

    def load_weights(self, weights: Mapping[str, torch.Tensor] | str) -> None: ...


# ---------------------------------------------------------------------------------------------
# Hugging Face generate engine


class _SampledLogprobs:
    """The one logits processor of our ``generate`` calls: temperature and top-p, and a record of
    log p(sampled token) that never keeps (steps, B, V) scores.

    HF is asked for plain sampling (temperature 1, no top-k/top-p) and this processor does the
    warping, so the recorded distribution is exactly the one sampled from. Called at step k with ids
    ending in the token sampled at step k-1, it gathers that token's log-probability from the
    distribution of step k-1; ``finish`` gathers the last one.
    """

    def __init__(self, temperature: float, top_p: float) -> None:
        # temperature 0 is greedy decoding: HF takes the argmax, the recorded log-probs are at temperature 1
        self.temperature, self.top_p = (temperature or 1.0), top_p
        self.prev: torch.Tensor | None = None  # (B, V) log-probs of the last step's sampling distribution
        self.out: list[torch.Tensor] = []  # one (B,) per generated token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.out.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)  # (B, V)
        if self.top_p < 1.0:  # keep the smallest set of tokens whose mass reaches top_p (the top one always)
            sorted_lp, idx = logp.sort(dim=-1, descending=True)
            drop = sorted_lp.exp().cumsum(-1) - sorted_lp.exp() >= self.top_p
            logp = logp.scatter(1, idx, sorted_lp.masked_fill(drop, float("-inf")))
            logp = torch.log_softmax(logp, dim=-1)
        self.prev = logp
        return logp

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        assert self.prev is not None
        self.out.append(self.prev.gather(1, last_tokens[:, None]).squeeze(1))
        self.prev = None
        return torch.stack(self.out, dim=1)  # (B, new_tokens)


def _growing_cache(n_layers: int, capacity: int) -> Any:
    """A ``DynamicCache`` whose layers write into buffers with room for ``capacity`` tokens. The stock layer
    concatenates every step, copying the whole cache each time: ~10-15% of a decode step of SmolLM2 at
    1200 tokens of context on 2 CPU cores, measured."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._view, self._kb, self._vb, self._n = None, None, None, 0
            if self.keys is not self._view and self.keys.numel():  # edited from outside (crop, batch select)
                k, v = self.keys, self.values
                self._kb, self._n = None, 0
                self._write(k, v)
            self._write(key_states, value_states)
            return self.keys, self.values

        def _write(self, k: torch.Tensor, v: torch.Tensor) -> None:
            n, m = self._n, k.shape[-2]
            if self._kb is None or n + m > self._kb.shape[-2] or self._kb.shape[:-2] != k.shape[:-2]:
                shape = (*k.shape[:-2], max(capacity, n + m + 256, (n + m) * 3 // 2), k.shape[-1])
                kb, vb = k.new_empty(shape), v.new_empty(shape)
                if n:
                    kb[..., :n, :], vb[..., :n, :] = self._kb[..., :n, :], self._vb[..., :n, :]
                self._kb, self._vb = kb, vb
            self._kb[..., n:n + m, :] = k
            self._vb[..., n:n + m, :] = v
            self._n = n + m
            self.keys, self.values = self._kb[..., :self._n, :], self._vb[..., :self._n, :]
            self._view = self.keys

    cache = DynamicCache()
    cache.layers = [GrowingLayer() for _ in range(n_layers)]
    return cache


class HFEngine:
    """Batched ``model.generate`` with left padding, the KV cache and bf16 autocast where supported.

    The engine holds the learner's own module, so weight sync is free (``shares_weights``). Prompts
    are sorted by length and cut into batches of ``max_batch`` sequences to bound padding and memory.

    Multi-turn episodes re-send their whole history every turn. With ``reuse_kv`` the engine keeps the
    keys and values of the last call's sequences (prompt and generated tokens) and, when a new prompt
    starts with one of them, runs only the new tokens (the observation) through the model: the prompt
    is not prefilled again every turn. The kept cache is dropped as soon as any weight changes
    (``Tensor._version``: an optimiser step, ``load_weights``), so it never mixes two policies.
    """

    shares_weights = True

    def __init__(self, model: torch.nn.Module, tokenizer: Any, autocast_dtype: torch.dtype | None = None,
                 max_batch: int = 64, reuse_kv: bool = True, kv_buffers: bool = True) -> None:
        self.model = model
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.autocast_dtype = autocast_dtype
        self.max_batch = max_batch
        self.reuse_kv = reuse_kv
        self.kv_buffers = kv_buffers  # False: transformers' own cache, which concatenates every step (a baseline)
        self._kv: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}  # tokens -> per layer (H, n, D)
        self._kv_weights = -1  # the weights' version the kept cache was computed with
        self.reused_tokens = 0  # prompt tokens served from the kept cache instead of a forward pass (a counter)

    def load_weights(self, weights: Mapping[str, torch.Tensor] | str) -> None:
        """Copy weights into the engine's module (a state dict, or a folder saved with save_pretrained)."""
        if isinstance(weights, str):
            from transformers import AutoModelForCausalLM
            weights = AutoModelForCausalLM.from_pretrained(weights).state_dict()
        self.model.load_state_dict(weights)
        self._kv = {}

    def _weights_version(self) -> int:
        return sum(p._version for p in self.model.parameters())

    def _cached_prefix(self, prompt: list[int]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """The longest kept sequence that ``prompt`` extends (at least one token left to run)."""
        for n in sorted({len(k) for k in self._kv}, reverse=True):
            if n < len(prompt) and (layers := self._kv.get(tuple(prompt[:n]))) is not None:
                return n, layers
        return 0, None

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        if not self.reuse_kv or self._kv_weights != self._weights_version():
            self._kv = {}
        cached = [self._cached_prefix(p) for p in prompts]
        kept: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        # batch rows with similar numbers of tokens to run, to bound padding
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) - cached[i][0])
        out: list[Generation | None] = [None] * len(prompts)
        was_training = self.model.training
        self.model.eval()
        try:
            for b in range(0, len(order), self.max_batch):
                idx = order[b:b + self.max_batch]
                gens = self._generate_batch([prompts[i] for i in idx], [cached[i] for i in idx], params, kept)
                for i, g in zip(idx, gens):
                    out[i] = g
        finally:
            self.model.train(was_training)
        self._kv, self._kv_weights = kept, self._weights_version()
        return out  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[list[int]],
                        cached: list[tuple[int, list[tuple[torch.Tensor, torch.Tensor]] | None]],
                        params: SamplingParams,
                        kept: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]]) -> list[Generation]:
        """One batch. Row r's columns: [pad | its C_r cached tokens | pad | its new tokens], cache width C and
        N new columns shared by the batch; the attention mask hides the pads and the position ids follow it."""
        from transformers import DynamicCache, GenerationConfig, LogitsProcessorList
        device = next(self.model.parameters()).device
        B = len(prompts)
        C = max(c for c, _ in cached)
        N = max(len(p) - c for p, (c, _) in zip(prompts, cached))
        ids = torch.full((B, C + N), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, C + N), dtype=torch.long)
        for r, (p, (c, _)) in enumerate(zip(prompts, cached)):
            ids[r, C - c:C] = torch.tensor(p[:c], dtype=torch.long)
            attn[r, C - c:C] = 1
            ids[r, C + N - (len(p) - c):] = torch.tensor(p[c:], dtype=torch.long)
            attn[r, C + N - (len(p) - c):] = 1
        n_layers = self.model.config.get_text_config().num_hidden_layers
        cache = _growing_cache(n_layers, C + N + params.max_new_tokens) if self.kv_buffers else DynamicCache()
        if C:
            for li in range(n_layers):
                ref = next(layers for _, layers in cached if layers is not None)[li][0]
                k = ref.new_zeros((B, ref.shape[0], C, ref.shape[2]))
                v = torch.zeros_like(k)
                for r, (c, layers) in enumerate(cached):
                    if layers is not None:
                        k[r, :, C - c:] = layers[li][0]
                        v[r, :, C - c:] = layers[li][1]
                cache.update(k.to(device), v.to(device), li)
            self.reused_tokens += sum(c for c, _ in cached)
        stops = params.stop_token_ids or [self.eos_id]
        gen_cfg = GenerationConfig(do_sample=params.temperature > 0, temperature=1.0, top_p=1.0, top_k=0,
                                   max_new_tokens=params.max_new_tokens, eos_token_id=stops,
                                   pad_token_id=self.pad_id, use_cache=True, return_dict_in_generate=True)
        rec = _SampledLogprobs(params.temperature, params.top_p)
        autocast = (torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            res = self.model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                      cache=cache, generation_config=gen_cfg,
                                      logits_processor=LogitsProcessorList([rec]))
        seqs = res.sequences
        width = C + N
        new = seqs[:, width:].cpu()  # (B, S), pad after a row's stop token
        lps = rec.finish(seqs[:, -1]).cpu()
        S = new.shape[1]
        gens = []
        for r in range(B):
            row = new[r].tolist()
            end = next((j + 1 for j, t in enumerate(row) if t in stops), None)
            n = end if end is not None else len(row)
            gens.append(Generation(token_ids=row[:n], logprobs=lps[r, :n].tolist(), finished=end is not None))
        if self.reuse_kv:
            self._keep(cache, attn, prompts, gens, width, S, kept)
        return gens

    @staticmethod
    def _keep(cache: Any, attn: torch.Tensor, prompts: list[list[int]], gens: list[Generation], width: int, S: int,
              kept: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Keep each row's keys and values: its unpadded prompt columns and the generated tokens that were fed
        back (all but the last sampled one)."""
        layers = getattr(cache, "layers", None)
        if not layers or layers[0].keys is None or layers[0].keys.shape[-2] != width + S - 1:
            return  # not the layout we expect (another cache type): keep nothing
        for r, (p, g) in enumerate(zip(prompts, gens)):
            fed = min(len(g.token_ids), S - 1)
            cols = torch.cat([attn[r].nonzero().squeeze(1), torch.arange(width, width + fed)]).to(layers[0].keys.device)
            kept[tuple(p + g.token_ids[:fed])] = [(layer.keys[r].index_select(1, cols),
                                                   layer.values[r].index_select(1, cols)) for layer in layers]


# ---------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class RolloutStep:
    """One assistant turn of a rollout, as generated and as parsed."""

    text: str
    start: int  # [start, end): its generated tokens, in response coordinates
    end: int
    valid: bool
    reason: str | None = None
    confidence: float | None = None
    keywords: list[str] | None = None
    action: Action | None = None
    turn: Turn | None = None
    observation: str | None = None


@dataclass
class Rollout:
    task: Task
    env: str
    group: int  # index of the task in the batch: GRPO's group
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)  # generated and observation tokens, prompt excluded
    logprobs: list[float] = field(default_factory=list)  # sampling log-probs; 0.0 on observation tokens
    obs_mask: list[int] = field(default_factory=list)
    wm_mask: list[int] = field(default_factory=list)
    policy_mask: list[int] = field(default_factory=list)
    steps: list[RolloutStep] = field(default_factory=list)
    format_ok: bool = True
    success: bool = False
    score: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)  # the environment's info of the final answer
    finish: str = ""  # answer | turn_limit | malformed | truncated | context_limit | env_error
    done: bool = False

    @property
    def turn_spans(self) -> list[tuple[int, int]]:
        return [(s.start, s.end) for s in self.steps]

    @property
    def generated_tokens(self) -> int:
        return len(self.response_ids) - sum(self.obs_mask)

    def to_trajectory(self) -> Trajectory:
        """The well-formed steps as a ``Trajectory`` (for evaluation metrics and logging)."""
        steps = [Step(turn=s.turn, observation=s.observation) for s in self.steps if s.turn is not None]
        return Trajectory(task=self.task, steps=steps, success=self.success, score=self.score, policy="fc_rl",
                          meta={"finish": self.finish, "format_ok": self.format_ok})


def _parse_raw(text: str) -> ParsedTurn:
    """raw turn format: the whole completion is the answer."""
    act = Action("answer", text.strip())
    return ParsedTurn(valid=True, reason=None, turn=Turn(think="", action=act), action=act)


def play_group(engine: RolloutEngine, bridge: ChatBridge, make_env: Callable[[Task], Env], tasks: Sequence[Task],
               group_size: int, params: SamplingParams, turn_format: TurnFormat = "foresight",
               max_turns: int | None = None, max_context_tokens: int = 4096,
               on_progress: Callable[[int, int, int], None] | None = None,
               on_turn: Callable[[int, RolloutStep], None] | None = None,
               prefixes: Sequence[Sequence[Step]] | None = None) -> list[Rollout]:
    """Play ``group_size`` rollouts of every task, all episodes batched together turn by turn.

    ``make_env(task)`` gives a fresh environment per rollout (environments are stateful).
    ``bridge`` is a ``chat.ChatBridge``: prompt tokens, observation tokens, per-token span masks.
    ``on_progress(episodes done, episodes, turn)`` is called after every turn (a progress display);
    ``on_turn(rollout index, step)`` after each rollout's turn, its observation included (a live view).
    ``prefixes[g]``: steps of another policy that task g's rollouts start after (a state s_t, not the
    start): their actions are replayed in each rollout's environment and the turns, rendered in
    ``turn_format``, with the environment's answers, become part of the prompt; they count against the
    turn limit. A prefix the environment ends, or that leaves no turn, raises ``ValueError``.
    Returns rollouts grouped by task: rollouts[g * group_size + i] is sample i of tasks[g].
    """
    if prefixes is not None and (len(prefixes) != len(tasks) or turn_format == "raw"):
        raise ValueError(f"prefixes: one per task ({len(tasks)}), and none in the raw format; got "
                         f"{len(prefixes)} in the {turn_format} format")
    rollouts: list[Rollout] = []
    envs: list[Env] = []
    limits: list[int] = []
    for g, task in enumerate(tasks):
        prefix = prefixes[g] if prefixes is not None else ()
        for _ in range(group_size):
            env = make_env(task)
            question = env.reset(task)
            if turn_format == "raw":
                messages = [{"role": "user", "content": question}]
            else:
                messages = prompt_messages(task, turn_format) + _replay(env, task, prefix, turn_format)
            envs.append(env)
            limit = 1 if turn_format == "raw" else min(max_turns or env.max_turns, env.max_turns) - len(prefix)
            if limit < 1:
                raise ValueError(f"task {task.id}: a prefix of {len(prefix)} steps leaves no turn within the "
                                 f"limit of {limit + len(prefix)}")
            limits.append(limit)
            rollouts.append(Rollout(task=task, env=env.name, group=g, prompt_ids=bridge.prompt_ids(messages)))

    turn = 0
    while live := [i for i, r in enumerate(rollouts) if not r.done]:
        gens = engine.generate([rollouts[i].prompt_ids + rollouts[i].response_ids for i in live], params)
        for i, gen in zip(live, gens):
            _take_turn(rollouts[i], envs[i], gen, bridge, turn_format,
                       last_turn=turn + 1 >= limits[i],
                       room=max_context_tokens - params.max_new_tokens)
            if on_turn is not None:
                on_turn(i, rollouts[i].steps[-1])
        turn += 1
        if on_progress is not None:
            on_progress(sum(r.done for r in rollouts), len(rollouts), turn)
    return rollouts


def _replay(env: Env, task: Task, prefix: Sequence[Step], turn_format: TurnFormat) -> list[dict]:
    """Step ``prefix``'s actions in ``env`` (just reset); its turns and the environment's answers as messages."""
    messages: list[dict] = []
    for i, step in enumerate(prefix):
        res = env.step(step.turn.action)
        if res.done:
            raise ValueError(f"task {task.id}: prefix step {i + 1} of {len(prefix)} ends the episode")
        messages += [{"role": "assistant", "content": render_turn(step.turn, turn_format)},
                     {"role": "user", "content": render_observation(res.observation or "")}]
    return messages


def _take_turn(r: Rollout, env: Env, gen: Generation, bridge: ChatBridge, turn_format: TurnFormat,
               last_turn: bool, room: int) -> None:
    """Append one generated turn to a rollout, step its action, and append the observation (or end it)."""
    n = len(gen.token_ids)
    text = bridge.tokenizer.decode(gen.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if turn_format == "raw":  # the whole completion is the answer; a cut one is still scored, format_ok False
        parsed = _parse_raw(text)
        wm_mask, pol_mask = [0] * n, [1] * n
    else:
        parsed = parse_turn(text, turn_format)
        ok = parsed.valid and gen.finished
        wm_mask, pol_mask = bridge.turn_masks(gen.token_ids) if ok else ([0] * n, [0] * n)
    step = RolloutStep(text=text, start=len(r.response_ids), end=len(r.response_ids) + n,
                       valid=parsed.valid and gen.finished,
                       reason=parsed.reason if not parsed.valid else (None if gen.finished else "no end-of-turn token"),
                       confidence=parsed.confidence, keywords=parsed.keywords, action=parsed.action,
                       turn=parsed.turn if parsed.valid else None)
    r.steps.append(step)
    r.response_ids += gen.token_ids
    r.logprobs += gen.logprobs
    r.obs_mask += [0] * n
    r.wm_mask += wm_mask
    r.policy_mask += pol_mask
    if not step.valid:
        r.format_ok = False
        if turn_format != "raw":
            r.done, r.finish = True, "malformed" if gen.finished else "truncated"
            return
    try:
        res = env.step(parsed.action)
    except Exception as e:  # an environment bug must not kill a long run; counted in the metrics
        log.warning("env %s failed on %r: %s", env.name, parsed.action, e)
        r.done, r.finish, r.info = True, "env_error", {"error": repr(e)}
        return
    step.observation = res.observation
    if res.done:
        r.done = True
        r.finish = "answer" if parsed.action.kind == "answer" else "turn_limit"
        if turn_format == "raw" and not gen.finished:
            r.finish = "truncated"
        r.success, r.score, r.info = bool(res.success), float(res.score or 0.0), dict(res.info)
        return
    if last_turn:
        r.done, r.finish = True, "turn_limit"
        return
    obs_ids = bridge.observation_ids(res.observation or "")
    if len(r.prompt_ids) + len(r.response_ids) + len(obs_ids) > room:
        step.observation = None  # never shown to the model
        r.done, r.finish = True, "context_limit"
        return
    r.response_ids += obs_ids
    r.logprobs += [0.0] * len(obs_ids)
    r.obs_mask += [1] * len(obs_ids)
    r.wm_mask += [0] * len(obs_ids)
    r.policy_mask += [0] * len(obs_ids)
