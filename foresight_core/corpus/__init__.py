"""Stage 0: corpus construction -- trajectories with hindsight world-model blocks and Monte Carlo q labels.

    manifest = build_corpus(load_config(preset="tiny"))      # plan -> collect -> write (reused if done)
    manifest.dataset_uri("wm_amt")                           # .../corpus/<key>/wm_amt.jsonl

What happens, in order (each step a module of this package and a function usable on its own; the
adapter hands ``collect_items`` to Ray Data):

1. ``plan.plan_corpus(cfg)``: the training tasks (procedural search world, gsm_symbolic maths), one
   JSON-able work item per (task, rollout), and the held-out evaluation sets per benchmark.
2. ``collect.collect_items(items, cfg)`` (with ``annotate``): a behaviour policy (the scripted noisy expert, or an LLM) plays
   each item; sampled steps t get a hindsight world-model block z_t built from the *real* future
   of the same trajectory:
     - ``<imaginary>``: the future actions, abstracted (terms first found later become
       "[what step k finds]"; the final answer is never written unless the question names it);
     - ``<keyword>``: salient terms that really occur in the future tau_{>=t} (its actions and
       observations, as in scoring.future_texts), never an answer not yet seen;
     - ``<analysis>``: what is known at t and what is still missing (from the gold plan when the
       task has one);
     - ``<confidence>`` q_t: the success rate of ``mc_rollouts`` re-rollouts of the behaviour
       policy from s_t (the steps before t), each with its own rng (``q_label: action``: from s_t
       after the recorded action a_t).
   Pure given (items, cfg): every random draw is seeded from the item, or from the state s_t for
   the Monte Carlo rollouts, so any batching (in-process, Ray Data) gives the same rows.
3. ``write.write_corpus(rows, plan, cfg, out_uri)``: the WM-AMT corpus, the FE-SFT set, the RL tasks and
   ``eval/<benchmark>`` through ``storage.DatasetWriter`` (manifest.json last, with hashes, counts,
   token statistics, success rate and q-label statistics).
4. ``build.build_corpus(cfg)``, keyed by ``key.corpus_key``: the local driver; returns the existing manifest when
   ``<work_dir>/corpus/<corpus_key(cfg)>`` is complete.
5. ``calibration.calibration_report(rows, cfg)``: ECE / Brier of the q labels against fresh rollouts.

Rows. wm_amt / fe_sft hold ``foresight_core.types.CorpusRow`` rows (the schema SFT reads too):
``{"kind": "trajectory", "split": "wm_amt" | "fe_sft", "annotated": bool, "trajectory": Trajectory.to_dict()}`` (``trajectory.meta``: item, rollout, seed, env, type, n_steps,
annotated_steps, q_labels = [{t, prefix, q, successes, rollouts}], mc_rollouts; plain copies add
``plain_copy``) and, in wm_amt, ``{"kind": "text", "split": "wm_amt", "text": ...}``; rl_tasks and
eval/<benchmark> hold ``Task.to_dict()`` rows.

Cost. Environments are deterministic given the task and the actions, so each batch keeps a
transposition table of step results (``MemoEnv``) and a table of q estimates per state: replayed
prefixes and re-rollouts that repeat known actions cost no real step (no sandbox process).

Our choices (the paper does not say): FE-SFT takes ``fe_sft_share`` of the *successful*
trajectories (``fe_sft_failures`` adds failures), every step annotated, and they are held out of
WM-AMT; failures all go to WM-AMT, where the world model learns what goes wrong. q_t is the raw
Monte Carlo estimate k/N (no prior), so a noise-free expert gets q = 1.0 everywhere.
"""

from foresight_core.corpus.annotate import (MAX_KEYWORDS, annotate_step, entities, final_answers, first_seen,
                                            future_text, gap_analysis, keywords, known_text, numbers, roadmap)
from foresight_core.corpus.build import MapFn, build_corpus
from foresight_core.corpus.calibration import (N_BINS, calibration_pairs, calibration_report,
                                               summarize_calibration)
from foresight_core.corpus.collect import (CollectStats, MemoEnv, Rollouts, batches_by_task, behaviour_policy,
                                           collect_item, collect_items, sequential_map, state_key)
from foresight_core.corpus.key import code_version, corpus_key, corpus_uri
from foresight_core.corpus.plan import CorpusPlan, benchmark_tasks, eval_sets, item_seed, plan_corpus, train_tasks
from foresight_core.corpus.write import Manifest, corpus_summary, general_text_rows, row_text, write_corpus
from foresight_core.scoring import occurs

__all__ = ["MAX_KEYWORDS", "N_BINS", "CollectStats", "CorpusPlan", "Manifest", "MapFn", "MemoEnv", "Rollouts",
           "annotate_step", "batches_by_task", "benchmark_tasks", "behaviour_policy", "build_corpus", "calibration_pairs",
           "calibration_report", "code_version", "collect_item", "collect_items", "corpus_key", "corpus_summary",
           "corpus_uri", "entities", "eval_sets", "final_answers", "first_seen", "future_text", "gap_analysis",
           "general_text_rows", "item_seed", "keywords", "known_text", "numbers", "occurs", "plan_corpus",
           "roadmap", "row_text", "sequential_map", "state_key", "summarize_calibration", "train_tasks",
           "write_corpus"]
