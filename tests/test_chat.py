"""Chat-template bridge on the real SmolLM2 tokenizer: exact mask positions, and RL (incremental)
tokenization equal to SFT (whole-conversation) tokenization."""

from __future__ import annotations

import pytest

from foresight_core.chat import ChatBridge, prompt_messages, tokenize_messages, trajectory_messages
from foresight_core.config import ModelConfig
from foresight_core.format import render_turn, system_prompt
from foresight_core.models import load_tokenizer
from foresight_core.types import Action, Step, Task, Trajectory, Turn, WorldModelBlock

TASK = Task("t1", "search", "  Where was the director of Blue Harbour born? ", ["Paris"])
T1 = Turn("First find the director.", Action("search", "director of Blue Harbour"),
          WorldModelBlock("search the director, then the birthplace", ["Ada Lind", "Paris"],
                          "the director is unknown", 0.7))
OBS = "Doc 1 (Blue Harbour): directed by Ada Lind, born in Paris."
T2 = Turn("Ada Lind was born in Paris.", Action("answer", "Paris"),
          WorldModelBlock("answer with the birthplace", ["Paris"], "the director is Ada Lind", 0.9))
TRAJ = Trajectory(TASK, [Step(T1, OBS), Step(T2, None)], success=True, score=1.0)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(source="tiny"))


def runs(tok, ids: list[int], mask: list[int]) -> list[str]:
    """Decoded text of each maximal run of masked tokens."""
    out, cur = [], []
    for i, m in zip(ids, mask + [0]):
        if m:
            cur.append(i)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    if cur:
        out.append(tok.decode(cur))
    return out


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------- messages

def test_prompt_and_trajectory_messages():
    assert prompt_messages(TASK) == [{"role": "system", "content": system_prompt("search")},
                                     {"role": "user", "content": "Where was the director of Blue Harbour born?"}]
    msgs = trajectory_messages(TRAJ)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]  # no obs after answer
    assert msgs[2]["content"] == render_turn(T1)
    assert msgs[3]["content"] == f"<observation>{OBS}</observation>"
    plain = trajectory_messages(TRAJ, "plain")
    assert plain[0]["content"] == system_prompt("search", "plain")
    assert plain[4]["content"] == "<think>Ada Lind was born in Paris.</think>\n<action><answer>Paris</answer></action>"


# ---------------------------------------------------------------------------- masks at exact positions

def test_tokenize_masks_exact(tok):
    msgs = trajectory_messages(TRAJ)
    s = tokenize_messages(tok, msgs)
    n = len(s.input_ids)
    assert all(len(m) == n for m in (s.assistant_mask, s.observation_mask, s.wm_mask, s.policy_mask))
    assert tok.decode(s.input_ids) == tok.apply_chat_template(msgs, tokenize=False)

    a1, a2 = render_turn(T1), render_turn(T2)
    # assistant content and its closing <|im_end|>, nothing of the "<|im_start|>assistant\n" header
    assert runs(tok, s.input_ids, s.assistant_mask) == [a1 + "<|im_end|>", a2 + "<|im_end|>"]
    assert runs(tok, s.input_ids, s.observation_mask) == [f"<observation>{OBS}</observation>"]
    assert runs(tok, s.input_ids, s.wm_mask) == [
        "<imaginary>search the director, then the birthplace</imaginary>\n<keyword>Ada Lind; Paris</keyword>\n"
        "<analysis>the director is unknown</analysis>\n<confidence>0.70</confidence>",
        "<imaginary>answer with the birthplace</imaginary>\n<keyword>Paris</keyword>\n"
        "<analysis>the director is Ada Lind</analysis>\n<confidence>0.90</confidence>"]
    assert runs(tok, s.input_ids, s.policy_mask) == [
        "<think>First find the director.</think>\n<action><search>director of Blue Harbour</search></action>",
        "<think>Ada Lind was born in Paris.</think>\n<action><answer>Paris</answer></action>"]
    # the two sub-spans are disjoint, inside the assistant mask, and miss only the "\n" between them
    # and <|im_end|>: 2 tokens per assistant turn
    for i in range(n):
        assert s.wm_mask[i] + s.policy_mask[i] <= s.assistant_mask[i]
        assert not (s.assistant_mask[i] and s.observation_mask[i])
    gap = [tok.decode([t]) for t, a, w, p in zip(s.input_ids, s.assistant_mask, s.wm_mask, s.policy_mask)
           if a and not (w or p)]
    assert gap == ["\n", "<|im_end|>", "\n", "<|im_end|>"]


def test_python_code_with_brackets_and_plain_turns(tok):
    code = "a, b = 3, 5\nif a<b:\n    print(a << 2)"
    traj = Trajectory(Task("m1", "math", "Compute 3 << 2.", ["12"]),
                      [Step(Turn("Shift it.", Action("python", code)), "12\n"),
                       Step(Turn("It is 12.", Action("answer", "12")), None)], success=True, score=1.0)
    s = tokenize_messages(tok, trajectory_messages(traj))
    assert sum(s.wm_mask) == 0  # plain turns have no world-model span
    assert runs(tok, s.input_ids, s.policy_mask) == [
        f"<think>Shift it.</think>\n<action><python>{code}</python></action>",
        "<think>It is 12.</think>\n<action><answer>12</answer></action>"]
    assert runs(tok, s.input_ids, s.observation_mask) == ["<observation>12</observation>"]


def test_max_len_truncates_every_list(tok):
    full = tokenize_messages(tok, trajectory_messages(TRAJ))
    cut = tokenize_messages(tok, trajectory_messages(TRAJ), max_len=100)
    assert len(cut.input_ids) == len(cut.policy_mask) == 100
    assert cut.input_ids == full.input_ids[:100] and cut.assistant_mask == full.assistant_mask[:100]


def test_template_that_rewrites_content_is_refused(tok):
    rewriting = load_tokenizer(ModelConfig(source="tiny"))
    rewriting.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}"
                               "<|im_end|>\n{% endfor %}")
    with pytest.raises(ValueError, match=r"message 0 \(system\) is not in the chat template's output verbatim"):
        tokenize_messages(rewriting, trajectory_messages(TRAJ))
    with pytest.raises(ValueError, match="does not close an assistant turn with the eos token"):
        no_eos = load_tokenizer(ModelConfig(source="tiny"))
        no_eos.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        ChatBridge(no_eos)


# ---------------------------------------------------------------------------- RL == SFT tokenization

def test_bridge_matches_tokenize_messages(tok):
    msgs = trajectory_messages(TRAJ)
    full = tokenize_messages(tok, msgs)
    bridge = ChatBridge(tok)
    ids = bridge.prompt_ids(msgs[:2])
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    turns = []
    for k, (turn_msg, obs) in enumerate(((msgs[2], OBS), (msgs[4], None))):
        gen = bridge.end_turn(encode(tok, turn_msg["content"]))  # what the model would have generated
        assert gen[-1] == tok.eos_token_id
        turns.append((len(ids), gen))
        ids = ids + gen
        if obs is not None:
            obs_ids = bridge.observation_ids(obs)
            assert tok.decode(obs_ids) == \
                f"\n<|im_start|>user\n<observation>{OBS}</observation><|im_end|>\n<|im_start|>assistant\n"
            ids = ids + obs_ids
    # SmolLM2's template ends the conversation with "<|im_end|>\n": one trailing "\n" token, in no mask
    assert ids == full.input_ids[:-1]
    assert tok.decode(full.input_ids[-1:]) == "\n"
    for start, gen in turns:
        wm, policy = bridge.turn_masks(gen)
        assert wm == full.wm_mask[start:start + len(gen)]
        assert policy == full.policy_mask[start:start + len(gen)]
        assert full.assistant_mask[start:start + len(gen)] == [1] * len(gen)


def test_turn_masks_on_split_characters_and_cut_generation(tok):
    # "Zürich" and "北京" are split inside UTF-8 characters by byte-level BPE: offsets come from prefix decoding
    turn = Turn("Zürich or 北京? 🙂", Action("search", "北京 Zürich"),
                WorldModelBlock("find the city", ["北京"], "unknown", 0.25))
    text = render_turn(turn)
    bridge = ChatBridge(tok)
    gen = bridge.end_turn(encode(tok, text))
    wm, policy = bridge.turn_masks(gen)
    full = tokenize_messages(tok, prompt_messages(TASK) + [{"role": "assistant", "content": text}])
    start = len(bridge.prompt_ids(prompt_messages(TASK)))
    assert full.input_ids[start:start + len(gen)] == gen
    assert (wm, policy) == (full.wm_mask[start:start + len(gen)], full.policy_mask[start:start + len(gen)])
    assert runs(tok, gen, wm) == [text.split("\n<think>")[0]]
    # a generation cut by the token limit inside "<keyword>": the unclosed tag runs to the end of the
    # text, so all 15 tokens "<imaginary>find the city</imaginary>\n<keyword>" are world-model tokens
    cut = encode(tok, text)[:15]
    assert tok.decode(cut) == "<imaginary>find the city</imaginary>\n<keyword>"
    wm, policy = bridge.turn_masks(cut)
    assert wm == [1] * 15 and policy == [0] * 15
    assert bridge.end_turn(cut) == cut + [tok.eos_token_id]


def test_turn_masks_on_non_canonical_tokens(tok):
    # A sampled turn need not be the tokenizer's own encoding: here every character is encoded on
    # its own ("北" alone is 3 byte tokens). Each token then belongs to the span of its character.
    text = render_turn(Turn("北京, if a<b", Action("python", "print('北' < '京')"),
                            WorldModelBlock("r 京", ["北京"], "g", 0.5)))
    gen, owner = [], []  # token ids, and the index of the character each one encodes
    for c, ch in enumerate(text):
        piece = encode(tok, ch)
        gen += piece
        owner += [c] * len(piece)
    gen.append(tok.eos_token_id)
    assert gen[:-1] != encode(tok, text)  # really non-canonical
    wm_end = text.index("</confidence>") + len("</confidence>")
    policy_start = text.index("<think>")
    wm, policy = ChatBridge(tok).turn_masks(gen)
    assert wm == [int(c < wm_end) for c in owner] + [0]
    assert policy == [int(c >= policy_start) for c in owner] + [0]
