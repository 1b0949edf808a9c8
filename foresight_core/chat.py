"""Chat-template bridge: trajectories -> chat messages -> token ids with per-token masks.

    msgs = trajectory_messages(traj)                  # system, question, assistant / observation turns
    sample = tokenize_messages(tokenizer, msgs)        # input_ids + assistant / observation / wm / policy masks

``assistant_mask`` marks what SFT trains on: each assistant message's content and its end-of-turn
token (``<|im_end|>`` for ChatML) so the model learns to stop. ``observation_mask`` marks observation
turns (``<observation>...</observation>``), never trained on. ``wm_mask`` / ``policy_mask`` are the
sub-spans [imaginary, confidence] and [think, action] of assistant content (format.py spans). A token
belongs to a span when its char range overlaps it. The "\\n" between the two spans and the
end-of-turn token are in neither.

RL rollouts build the same ids turn by turn with ``ChatBridge``::

    bridge = ChatBridge(tokenizer)
    ids = bridge.prompt_ids(prompt_messages(task))   # ends with "<|im_start|>assistant\\n"
    gen = bridge.end_turn(generated_ids)              # the model's turn, ending with eos
    wm, policy = bridge.turn_masks(gen)
    ids += gen + bridge.observation_ids(obs)
    # observation_ids: "\\n<|im_start|>user\\n<observation>..</observation><|im_end|>\\n<|im_start|>assistant\\n"

For a ChatML template (SmolLM2, Qwen2.5) the result equals ``tokenize_messages`` of the same
conversation token for token (tested), up to the template's trailing "\\n" after the last
``<|im_end|>``, as long as the generated ids are the tokenizer's own encoding of the turn's text
and the turn does not start with whitespace. Both hold for rendered turns, since every chat-template
boundary there sits next to a special token or a "\\n" followed by "<", where byte-level BPE never
merges. Templates that rewrite past assistant messages (e.g. Qwen3 drops earlier ``<think>``)
cannot be matched incrementally and are refused by ``tokenize_messages`` with a clear error.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass

from foresight_core.format import TurnFormat, parse_turn, render_observation, render_turn, system_prompt
from foresight_core.types import Task, Trajectory

OBSERVATION_OPEN = "<observation>"


# ---------------------------------------------------------------------------- messages

def prompt_messages(task: Task, turn_format: TurnFormat = "foresight") -> list[dict]:
    """System prompt (format + tool of the task's env) and the question."""
    return [{"role": "system", "content": system_prompt(task.env, turn_format)},
            {"role": "user", "content": task.question.strip()}]


def trajectory_messages(traj: Trajectory, turn_format: TurnFormat = "foresight") -> list[dict]:
    """The whole episode as chat messages in ``turn_format``: "plain" drops every world-model block
    (the plain-SFT baseline), "state" keeps only its roadmap (State-SFT); steps without a block are
    rendered plain either way."""
    msgs = prompt_messages(traj.task, turn_format)
    for step in traj.steps:
        msgs.append({"role": "assistant", "content": render_turn(step.turn, turn_format)})
        if step.observation is not None:
            msgs.append({"role": "user", "content": render_observation(step.observation)})
    return msgs


# ---------------------------------------------------------------------------- tokenize with masks

@dataclass
class TokenizedSample:
    """Token ids of a conversation and four 0/1 masks of the same length."""

    input_ids: list[int]
    assistant_mask: list[int]
    observation_mask: list[int]
    wm_mask: list[int]
    policy_mask: list[int]


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class _Marker:
    """Sets mask[i] = 1 for every token whose char range [s, e) overlaps [a, b): s < b and e > a.
    Token offsets are sorted, so each span costs two binary searches."""

    def __init__(self, offsets: list[tuple[int, int]]):
        self.starts = [s for s, _ in offsets]
        self.ends = [e for _, e in offsets]

    def mark(self, mask: list[int], a: int, b: int) -> None:
        if b <= a:
            return
        i, j = bisect_right(self.ends, a), bisect_left(self.starts, b)
        if j > i:
            mask[i:j] = [1] * (j - i)


def tokenize_messages(tokenizer, messages: list[dict], max_len: int | None = None) -> TokenizedSample:
    """Apply the chat template once, tokenize with offsets, and mark each message's content
    (found by a running cursor in the rendered text). ``max_len`` keeps the first tokens."""
    text = _render(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, marker = list(enc["input_ids"]), _Marker(enc["offset_mapping"])
    n = len(ids)
    assistant, observation, wm, policy = [0] * n, [0] * n, [0] * n, [0] * n
    eos = tokenizer.eos_token
    cursor = 0
    for i, msg in enumerate(messages):
        role, content = msg["role"], msg["content"]
        at = text.find(content, cursor)
        if at < 0:
            raise ValueError(f"message {i} ({role}) is not in the chat template's output verbatim: the "
                             f"template rewrites message content, so token masks cannot be placed: {content[:60]!r}")
        end = cursor = at + len(content)
        if role == "assistant":
            marker.mark(assistant, at, end)
            stop = text.find(eos, end)
            if stop >= 0 and not text[end:stop].strip():  # the end-of-turn token that follows the content
                marker.mark(assistant, end, stop + len(eos))
                cursor = stop + len(eos)
            parsed = parse_turn(content, "any")
            for mask, span in ((wm, parsed.wm_span), (policy, parsed.policy_span)):
                if span is not None:
                    marker.mark(mask, at + span[0], at + span[1])
        elif role == "user" and content.startswith(OBSERVATION_OPEN):
            marker.mark(observation, at, end)
    if max_len is not None:
        ids, assistant, observation, wm, policy = (x[:max_len] for x in (ids, assistant, observation, wm, policy))
    return TokenizedSample(ids, assistant, observation, wm, policy)


# ---------------------------------------------------------------------------- incremental ids for RL

class ChatBridge:
    """Builds a rollout's token ids turn by turn, consistent with ``tokenize_messages``.

    At construction it renders a probe conversation once to learn what the template writes
    between the end of an assistant turn (its eos token) and the content of the next one."""

    _A, _O = "FORESIGHT_ASSISTANT_PROBE", "FORESIGHT_OBSERVATION_PROBE"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id: int = tokenizer.eos_token_id
        eos = tokenizer.eos_token
        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                 {"role": "assistant", "content": self._A}, {"role": "user", "content": self._O}]
        text = _render(tokenizer, probe, add_generation_prompt=True)
        a_end = text.index(self._A) + len(self._A)
        if not text.startswith(eos, a_end):
            raise ValueError(f"chat template does not close an assistant turn with the eos token {eos!r}; "
                             "ChatBridge needs it to know where a generated turn ends")
        o = text.index(self._O)
        self._before_obs = text[a_end + len(eos):o]  # "\n<|im_start|>user\n" for ChatML
        self._after_obs = text[o + len(self._O):]    # "<|im_end|>\n<|im_start|>assistant\n"
        self._special = set(tokenizer.all_special_ids)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The conversation so far plus the assistant header the model continues from."""
        return _encode(self.tokenizer, _render(self.tokenizer, messages, add_generation_prompt=True))

    def end_turn(self, gen_ids: list[int]) -> list[int]:
        """A generated turn with its eos: generation cut by a token limit gets one appended."""
        gen_ids = list(gen_ids)
        return gen_ids if gen_ids and gen_ids[-1] == self.eos_id else gen_ids + [self.eos_id]

    def observation_ids(self, obs_text: str) -> list[int]:
        """Tokens after a generated turn (which ends with eos): the observation turn (raw env text,
        wrapped here in <observation>) and the next assistant header."""
        return _encode(self.tokenizer, self._before_obs + render_observation(obs_text) + self._after_obs)

    def turn_text(self, gen_ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
        """The turn's text (special tokens dropped) and each token's char range in it; special
        tokens (the closing eos) get an empty range where they sit."""
        tok = self.tokenizer
        core = [i for i in gen_ids if i not in self._special]
        text = tok.decode(core, clean_up_tokenization_spaces=False)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == core:  # the usual case: the model wrote the tokenizer's own encoding
            found = iter(enc["offset_mapping"])
            offsets, top = [], 0
            for i in gen_ids:
                a, b = (top, top) if i in self._special else next(found)
                offsets.append((a, b))
                top = b
            return text, offsets
        # Otherwise measure each prefix (quadratic, rare). A token that ends inside a character
        # (split UTF-8 bytes decode to trailing U+FFFD) ends where the last whole character does.
        prefixes = tok.batch_decode([[i for i in gen_ids[:k + 1] if i not in self._special]
                                     for k in range(len(gen_ids))], clean_up_tokenization_spaces=False)
        offsets, top = [], 0
        for p in prefixes:
            end = max(top, min(len(p.rstrip("\ufffd")), len(text)))
            offsets.append((top, end))
            top = end
        return text, offsets

    def turn_masks(self, gen_ids: list[int]) -> tuple[list[int], list[int]]:
        """(wm_mask, policy_mask) per generated token, from the decoded text's format spans."""
        text, offsets = self.turn_text(gen_ids)
        parsed = parse_turn(text, "any")
        marker, n = _Marker(offsets), len(gen_ids)
        wm, policy = [0] * n, [0] * n
        for mask, span in ((wm, parsed.wm_span), (policy, parsed.policy_span)):
            if span is not None:
                marker.mark(mask, *span)
        return wm, policy
