"""Multi-turn rollouts with the HF engine: kept keys and values and growing buffers against re-prefilling.

    python benchmarks/rollout_engine.py                  # SmolLM2-135M, 4 episodes x 4 turns, 160 new tokens a turn
    python benchmarks/rollout_engine.py --rows 8 --turns 3

Every turn of an agent episode re-sends the whole conversation: the question, every earlier turn and
every observation. The baseline is what ``HFEngine`` did before (and what a plain ``model.generate``
loop does): prefill the whole history every turn, with transformers' own cache, which concatenates
its tensors at every decoding step. Ours keeps each sequence's keys and values between turns (only the
new observation runs) in buffers that grow by doubling. Both sides decode greedily the same prompts,
turn by turn, with the same observations appended; the benchmark checks that they produce the same
tokens, then prints generated tokens/s of each and the ratio. The sides alternate (``--repeats``) so a
busy machine slows both alike. The CPU type and the dtype are printed with the figures: compare
them only within one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

OBSERVATION = ("\n<|im_start|>user\n<observation>Doc 1 (Velmor Institute): The Velmor Institute is a research "
               "centre founded in 1921 in Tamsor by Zorvan Kellid. It studies weather, rivers and the long-range "
               "forecasting of floods. Doc 2 (Tamsor): Tamsor is a river town in the north with 48,200 people."
               "</observation><|im_end|>\n<|im_start|>assistant\n")


def play(engine, tokenizer, prompts: list[list[int]], turns: int, max_new_tokens: int):
    import torch

    from foresight_core.rollout import SamplingParams

    obs = tokenizer(OBSERVATION, add_special_tokens=False)["input_ids"]
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
    seqs = [list(p) for p in prompts]
    outs, generated = [], 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(turns):
            gens = engine.generate(seqs, params)
            outs.append([g.token_ids for g in gens])
            generated += sum(len(g.token_ids) for g in gens)
            seqs = [s + g.token_ids + obs for s, g in zip(seqs, gens)]
    return outs, generated, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4, help="episodes played together (FC-RL's G)")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--quick", action="store_true", help="the tiny random model (a smoke run, no figures)")
    a = p.parse_args()

    import os

    import torch

    from foresight_core.config import ModelConfig
    from foresight_core.models import bf16_supported, compute_dtype, cpu_type, load_model
    from foresight_core.rollout import HFEngine

    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    mcfg = ModelConfig(source="tiny" if a.quick else "smollm2_gguf")
    model, tok = load_model(mcfg, "cpu", train=False, seed=0)
    dtype = compute_dtype(mcfg, "cpu")
    print(f"CPU: {cpu_type()}; dtype {'bf16 autocast' if dtype == torch.bfloat16 and bf16_supported('cpu') else 'fp32'} "
          f"on both sides; {torch.get_num_threads()} threads", flush=True)
    questions = ["What is the population of the town where the founder of the Velmor Institute was born?",
                 "In which year was the research centre in Tamsor founded, and by whom?",
                 "What does the Velmor Institute study? Search first, then answer.",
                 "Who founded the institute that studies floods, and where was he born?"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": questions[i % len(questions)] + f" (case {i})"}],
                                       add_generation_prompt=True, tokenize=True) for i in range(a.rows)]
    prompts = [list(x["input_ids"]) if hasattr(x, "keys") else list(x) for x in prompts]
    sides = {"baseline (re-prefill, transformers' cache)": dict(reuse_kv=False, kv_buffers=False),
             "ours (kept keys and values, growing buffers)": dict(reuse_kv=True, kv_buffers=True)}
    rates: dict[str, list[float]] = {k: [] for k in sides}
    tokens: dict[str, list] = {}
    play(HFEngine(model, tok, autocast_dtype=dtype), tok, prompts, 1, 8, )  # warm-up
    for rep in range(a.repeats):
        for name, kw in sides.items():
            engine = HFEngine(model, tok, autocast_dtype=dtype, **kw)
            outs, n, secs = play(engine, tok, prompts, a.turns, a.max_new_tokens)
            tokens[name] = outs
            rates[name].append(n / secs)
            print(f"  repeat {rep + 1} {name}: {n} tokens in {secs:.1f} s = {n / secs:.1f} tok/s", flush=True)
    base, ours = (statistics.median(v) for v in rates.values())
    same = len({repr(v) for v in tokens.values()}) == 1
    print(f"{a.rows} episodes x {a.turns} turns, up to {a.max_new_tokens} new tokens a turn, greedy; "
          f"same tokens on both sides: {same}")
    print(f"baseline {base:.1f} tok/s | ours {ours:.1f} tok/s | ratio {ours / base:.2f}x")


if __name__ == "__main__":
    main()
