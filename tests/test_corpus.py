"""Stage 0: hindsight annotation properties, Monte Carlo q labels, the build, reuse and half-written output."""

from __future__ import annotations

import json
import random

import pytest

from foresight_core.config import load_config
from foresight_core.corpus import (batches_by_task, build_corpus, calibration_report, collect_items, corpus_key,
                                   future_text, gap_analysis, keywords, known_text, occurs, plan_corpus, roadmap)
from foresight_core.envs.loaders import LoaderError
from foresight_core.format import parse_turn, render_turn
from foresight_core.scoring import grounding as grounding_reward
from foresight_core.storage import MANIFEST, StorageError, is_complete, join_uri, read_json
from foresight_core.types import Action, CorpusRow, Step, Task, Trajectory, Turn
from test_storage import s3_storage  # noqa: F401  (the moto server fixture)

NO_NOISE = ["corpus.noise.wrong_query=0", "corpus.noise.premature_answer=0", "corpus.noise.arithmetic_slip=0",
            "corpus.noise.retry_after_miss=1"]


def search_cfg(tmp_path, *overrides: str):
    """The tiny preset without maths (fast): 24 search tasks x 2 rollouts, N = 4 re-rollouts."""
    return load_config("tiny", overrides=[f"work_dir={tmp_path / 'work'}", "envs.math.enabled=false",
                                          "corpus.n_train_tasks=24", "corpus.rollouts_per_task=2", *overrides], env={})


def trajectories(rows):
    """Collected trajectories, without the plain copies (which carry no labels)."""
    return [Trajectory.from_dict(r["trajectory"]) for r in rows
            if r["kind"] == "trajectory" and not r["trajectory"]["meta"].get("plain_copy")]


# ---------------------------------------------------------------------------------------------
# z_t on a hand-built 2-hop trajectory

TASK = Task(id="t1", env="search", question="Where was the founder of the Velmor Institute born?", answers=["Tamsor"],
            meta={"plan": [{"query": "Who founded the Velmor Institute?", "answer": "Zorvan Kellid"},
                           {"query": "Where was Zorvan Kellid born?", "answer": "Tamsor"}]})
STEPS = [
    Step(Turn("", Action("search", "Who founded the Velmor Institute?")),
         "Doc 1 (Velmor Institute): The Velmor Institute was founded in 1864 by Zorvan Kellid."),
    Step(Turn("", Action("search", "Where was Zorvan Kellid born?")),
         "Doc 1 (Zorvan Kellid): Zorvan Kellid is an engineer born in 1820 in Tamsor."),
    Step(Turn("", Action("answer", "Tamsor")), None),
]
TRAJ = Trajectory(task=TASK, steps=STEPS, success=True, score=1.0)


def test_hand_worked_annotation():
    # t=0: Zorvan Kellid is first found by step 1 (relative), Tamsor by step 2; the answer is never written.
    assert roadmap(TRAJ, 0) == ("1. search: Who founded the Velmor Institute? "
                                "2. search: Where was [what step 1 finds] born? 3. answer with what step 2 finds")
    # keywords: hop answer Zorvan Kellid (new at t=0) before Velmor Institute (in the question);
    # Tamsor is the final answer, unseen at t=0 -> left out.
    assert keywords(TRAJ, 0) == ["Zorvan Kellid", "Velmor Institute"]
    assert gap_analysis(TRAJ, 0) == ("Known: only the question. Missing: (1) Who founded the Velmor Institute? "
                                     "(2) Where was [answer 1] born?")
    # t=1: Zorvan Kellid is known now, so the query is written out.
    assert roadmap(TRAJ, 1) == "1. search: Where was Zorvan Kellid born? 2. answer with what step 1 finds"
    assert keywords(TRAJ, 1) == ["Zorvan Kellid"]  # Tamsor still unseen; 1820 is not a candidate
    assert gap_analysis(TRAJ, 1) == ("Known: (1) Who founded the Velmor Institute? -> Zorvan Kellid. "
                                     "Missing: (2) Where was Zorvan Kellid born?")
    # t=2: the answer has been seen in the last result; the roadmap still does not write it.
    assert roadmap(TRAJ, 2) == "1. answer with what is already known"
    assert keywords(TRAJ, 2) == ["Tamsor"]
    assert future_text(STEPS, 2) == "Tamsor"


def test_hand_worked_math_annotation():
    task = Task(id="m1", env="math", answers=["215"],
                question="Ann buys 22 pens at $9.0 each and a bag for $17. How much does she spend?")
    code = "step1 = 22 * 9.0\nstep2 = step1 + 17\nprint(round(step2, 6))"
    traj = Trajectory(task=task, steps=[Step(Turn("", Action("python", code)), "215.0"),
                                        Step(Turn("", Action("answer", "215")), None)], success=True, score=1.0)
    assert roadmap(traj, 0) == ("1. run a 2-step python computation that prints the result "
                                "2. answer with what step 1 finds")
    # "215.0" holds the unseen answer 215 -> out; code numbers in order (not the print line's 6); then the
    # assigned names fill the 4 slots
    assert keywords(traj, 0) == ["22", "9.0", "17", "step1"]
    assert gap_analysis(traj, 0) == ("Known: the problem gives 22, 9.0, 17. "
                                     "Missing: a computation that combines these quantities.")
    # t=1: the run printed 215.0, so 215 is known and may be a keyword
    assert keywords(traj, 1) == ["215"]
    assert gap_analysis(traj, 1) == ("Known: the problem gives 22, 9.0, 17; the last run printed: 215.0. "
                                     "Missing: a checked result to answer with.")


def test_premature_guess_and_turn_limit_in_roadmap():
    guess = Trajectory(task=TASK, steps=[Step(Turn("", Action("answer", "Korsa")), None)], success=False, score=0.0)
    assert roadmap(guess, 0) == "1. answer with a guess, not found in any result"
    assert keywords(guess, 0) == []  # the only future is the unseen guess
    cut = Trajectory(task=TASK, steps=STEPS[:2], success=False, score=0.0)
    assert roadmap(cut, 1).endswith("2. the turn limit ends the episode without an answer")


# ---------------------------------------------------------------------------------------------
# properties over a collected corpus


@pytest.fixture(scope="module")
def noisy_rows(tmp_path_factory):
    cfg = search_cfg(tmp_path_factory.mktemp("noisy"))
    return cfg, collect_items(plan_corpus(cfg).items, cfg)


@pytest.fixture(scope="module")
def math_rows(tmp_path_factory):
    """8 gsm_symbolic tasks x 2 rollouts, with more slips and guesses than the default noise."""
    cfg = load_config("tiny", overrides=[f"work_dir={tmp_path_factory.mktemp('math')}",
                                         "envs.search_world.enabled=false", "corpus.rollouts_per_task=2",
                                         "corpus.noise.arithmetic_slip=0.3", "corpus.noise.premature_answer=0.15"],
                      env={})
    return cfg, collect_items(plan_corpus(cfg).items, cfg)


@pytest.mark.parametrize("corpus", ["noisy_rows", "math_rows"])
def test_annotation_properties(corpus, request):
    cfg, rows = request.getfixturevalue(corpus)
    trajs = trajectories(rows)
    assert any(t.success for t in trajs) and any(not t.success for t in trajs)
    n_checked = 0
    for traj in trajs:
        labels = {lab["t"]: lab for lab in traj.meta["q_labels"]}
        assert sorted(labels) == traj.meta["annotated_steps"]
        for t, step in enumerate(traj.steps):
            wm = step.turn.wm
            assert (wm is not None) == (t in labels)
            if wm is None:
                continue
            n_checked += 1
            lab = labels[t]
            assert 0.0 <= wm.confidence <= 1.0 and wm.confidence == lab["successes"] / lab["rollouts"]
            assert lab["rollouts"] == cfg.corpus.mc_rollouts
            future = future_text(traj.steps, t)
            # keywords really occur later -- the RL grounding reward of hindsight keywords is 1
            assert all(occurs(k, future) for k in wm.keywords)
            if wm.keywords:
                assert grounding_reward(wm.keywords, future) == 1.0
            # no spoilers: a final answer is in the roadmap only when the question names it,
            # in keywords / analysis only once it has been seen
            known = known_text(traj.task, traj.steps, t)
            for ans in [*traj.task.answers, traj.final_answer or ""]:
                if ans and not occurs(ans, traj.task.question):
                    assert not occurs(ans, wm.imaginary), (ans, wm.imaginary)
                if ans and not occurs(ans, known):
                    assert not any(occurs(ans, k) for k in wm.keywords) and not occurs(ans, wm.analysis)
            # every annotated turn renders and parses back as a valid foresight turn
            parsed = parse_turn(render_turn(step.turn))
            assert parsed.valid and parsed.has_wm, parsed.reason
    assert n_checked > 10


def test_rows_do_not_depend_on_batching(noisy_rows):
    cfg, rows = noisy_rows
    items = plan_corpus(cfg).items
    by_task = [r for b in batches_by_task(items) for r in collect_items(b, cfg)]
    odd = [r for b in (items[:7], items[7:20], items[20:]) for r in collect_items(b, cfg)]  # splits a task's rollouts
    assert json.dumps(by_task) == json.dumps(rows) == json.dumps(odd)


def test_noise_free_expert_gets_q_one(tmp_path):
    cfg = search_cfg(tmp_path, *NO_NOISE)
    rows = collect_items(plan_corpus(cfg).items, cfg)
    trajs = trajectories(rows)
    assert all(t.success for t in trajs)
    qs = [lab["q"] for t in trajs for lab in t.meta["q_labels"]]
    assert qs and all(q == 1.0 for q in qs)
    report = calibration_report(rows, cfg, fresh=2)
    assert report["ece"] == 0.0 and report["brier"] == 0.0  # q = 1 and every fresh rollout succeeds


def test_action_q_of_the_final_answer_is_its_outcome(tmp_path):
    """q_label=action: the re-rollouts start by replaying the recorded a_t; at the answer step the
    episode is over, so q is exactly the trajectory's own outcome (0 or 1)."""
    cfg = search_cfg(tmp_path, "corpus.q_label=action", "corpus.annotate_share=1")
    for traj in trajectories(collect_items(plan_corpus(cfg).items[:16], cfg)):
        last = traj.meta["q_labels"][-1]
        if traj.steps[-1].turn.action.kind == "answer":
            assert last["t"] == len(traj.steps) - 1 and last["q"] == float(traj.success)


def test_calibration_report_shape(noisy_rows):
    cfg, rows = noisy_rows
    report = calibration_report(rows[:12], cfg, fresh=2)
    assert report["pairs"] == 2 * report["states"] > 0
    assert 0.0 <= report["ece"] <= 1.0 and 0.0 <= report["brier"] <= 1.0
    assert sum(b["count"] for b in report["bins"]) == report["pairs"]


# ---------------------------------------------------------------------------------------------
# build, manifest, reuse, half-written output


def test_tiny_build_manifest_and_reuse(tiny_cfg):
    manifest = build_corpus(tiny_cfg, progress=False)
    d = manifest.data
    assert not manifest.reused and manifest.uri == join_uri(tiny_cfg.work_dir, "corpus", corpus_key(tiny_cfg))
    assert d["successes"] > 0 and d["failures"] > 0 and d["annotated_steps"] > 0
    assert set(d["success_rate_by_env"]) == {"search", "math"}
    assert {"wm_amt", "fe_sft", "rl_tasks", "eval/search_world", "eval/gsm_symbolic"} <= set(manifest.datasets)
    assert d["counts"]["rl_tasks"] == 2 * tiny_cfg.corpus.n_train_tasks  # search + math
    assert d["token_stats"]["unit"].startswith("tokens")
    assert d["config"]["corpus"] == tiny_cfg.corpus.model_dump(mode="json")
    wm_rows = manifest.read("wm_amt")
    assert {r["kind"] for r in wm_rows} == {"trajectory", "text"}
    assert all(r["split"] == "fe_sft" and r["annotated"] for r in manifest.read("fe_sft"))
    Task.from_dict(manifest.read("eval/search_world")[0])
    # the same config again: the finished output is reused, nothing is collected
    def must_not_run(items, cfg):
        raise AssertionError("a complete corpus must be reused")
    again = build_corpus(tiny_cfg, map_fn=must_not_run, progress=False)
    assert again.reused and again.data["files"] == d["files"]


def test_half_written_output_is_rebuilt(tmp_path):
    cfg = search_cfg(tmp_path, "corpus.n_train_tasks=4", "corpus.rollouts_per_task=1")
    out = str(tmp_path / "corpus")

    def dies(items, cfg):
        raise RuntimeError("worker lost")
    with pytest.raises(RuntimeError, match="worker lost"):
        build_corpus(cfg, out_uri=out, map_fn=dies, progress=False)
    assert not is_complete(out)
    first = build_corpus(cfg, out_uri=out, progress=False)
    # a later run died after rewriting a data file (the manifest was removed first)
    (tmp_path / "corpus" / MANIFEST).unlink()
    (tmp_path / "corpus" / "wm_amt.jsonl").write_text('{"kind": "text", "split": "wm_amt", "text": "half"}\n')
    assert not is_complete(out)
    second = build_corpus(cfg, out_uri=out, progress=False)
    assert not second.reused and is_complete(out)
    assert second.data["files"]["wm_amt.jsonl"] == first.data["files"]["wm_amt.jsonl"]  # same bytes again
    # a manifest whose hash no longer matches its file is not complete either
    (tmp_path / "corpus" / "fe_sft.jsonl").write_text("")
    assert not is_complete(out) and not build_corpus(cfg, out_uri=out, progress=False).reused


def test_parquet_output_and_no_secret_in_manifest(tmp_path):
    cfg = search_cfg(tmp_path, "corpus.n_train_tasks=4", "corpus.format=parquet",
                     "infra.storage.key=AKIA-SECRET-KEY", "infra.storage.secret=very-secret")
    manifest = build_corpus(cfg, progress=False)
    text = (tmp_path / "work" / "corpus" / manifest.key / MANIFEST).read_text()
    assert "SECRET" not in text and "very-secret" not in text and '"key": "**********"' in text
    rows = manifest.read("wm_amt")
    assert manifest.dataset_uri("wm_amt").endswith("wm_amt.parquet")
    assert [Trajectory.from_dict(r["trajectory"]).task.id for r in rows if r["kind"] == "trajectory"]
    assert read_json(join_uri(manifest.uri, MANIFEST))["format"] == "parquet"


def test_bad_benchmark_row(tmp_path):
    bench = tmp_path / "nq.jsonl"
    bench.write_text('{"question": "who?", "golden_answers": ["a"]}\n{"question": "what?"}\n'
                     '{"question": "when?", "golden_answers": ["1999"]}\n')
    src = f"envs.search_qa.sources=[{{name: nq, kind: search_qa, path: {bench}}}]"
    cfg = search_cfg(tmp_path, "corpus.n_train_tasks=2", src)
    with pytest.raises(LoaderError, match=r"nq.jsonl:2: missing 'golden_answers'"):
        plan_corpus(cfg)
    cfg = search_cfg(tmp_path, "corpus.n_train_tasks=2", "corpus.skip_bad_rows=true", src)
    manifest = build_corpus(cfg, progress=False)
    assert manifest.data["counts"]["eval/nq"] == 2
    assert manifest.data["load_reports"]["nq"]["rows_skipped"] == 1
    assert [t["question"] for t in manifest.read("eval/nq")] == ["who?", "when?"]


def test_key_follows_corpus_config_only(tmp_path):
    a = search_cfg(tmp_path)
    assert corpus_key(a) == corpus_key(search_cfg(tmp_path, "fc_rl.lr=0.5", "name=other"))
    assert corpus_key(a) != corpus_key(search_cfg(tmp_path, "corpus.mc_rollouts=5"))
    assert corpus_key(a) != corpus_key(search_cfg(tmp_path, "seed=1"))


def test_item_seeds_are_stable():
    cfg = load_config("tiny", overrides=["envs.math.enabled=false"], env={})
    items = plan_corpus(cfg).items
    assert [it["item"] for it in items] == list(range(len(items)))
    assert items == plan_corpus(cfg).items
    assert len({it["seed"] for it in items}) == len(items)
    random.Random(items[0]["seed"])  # an int seed


@pytest.mark.s3
def test_build_on_s3(tmp_path, s3_storage):
    """The same build through s3fs (a moto server): written, complete, then reused."""
    import uuid
    cfg = search_cfg(tmp_path, "corpus.n_train_tasks=4", f"work_dir=s3://foresight-test/{uuid.uuid4().hex}",
                     f"infra.storage.endpoint_url={s3_storage.endpoint_url}", "infra.storage.key=testing",
                     "infra.storage.secret=testing", f"infra.storage.region={s3_storage.region}")
    manifest = build_corpus(cfg, progress=False)
    assert manifest.uri.startswith("s3://") and is_complete(manifest.uri, cfg.infra.storage)
    assert manifest.read("rl_tasks", cfg.infra.storage)[0]["env"] == "search"
    assert build_corpus(cfg, progress=False).reused


def test_llm_behaviour_policy(tmp_path):
    """The LLM path end to end with a random tiny Llama: junk turns become failed episodes, never a crash."""
    cfg = search_cfg(tmp_path, "corpus.n_train_tasks=2", "corpus.rollouts_per_task=1", "corpus.mc_rollouts=2",
                     "corpus.behaviour=llm", "corpus.llm={model: tiny, max_new_tokens: 8}")
    trajs = trajectories(collect_items(plan_corpus(cfg).items, cfg))
    assert len(trajs) == 2 and not any(t.success for t in trajs)
    assert all(t.policy == "llm:tiny" for t in trajs)
    for t in trajs:
        assert all(lab["q"] == 0.0 for lab in t.meta["q_labels"])
        for step in t.steps:
            render_turn(step.turn)


def test_llm_behaviour_needs_its_section():
    from foresight_core.config import ConfigError
    with pytest.raises(ConfigError, match="corpus.*needs a corpus.llm section"):
        load_config("tiny", overrides=["corpus.behaviour=llm"], env={})


def test_every_written_row_is_a_corpus_row_and_round_trips(tiny_cfg):
    """The corpus writes CorpusRow.to_dict() rows; reading them back gives the same rows, field for field."""
    manifest = build_corpus(tiny_cfg, progress=False)
    for name in ("wm_amt", "fe_sft"):
        for d in manifest.read(name):
            row = CorpusRow.from_dict(d)
            assert row.split == name and row.to_dict() == d


@pytest.mark.parametrize("bad, match", [
    ({"split": "wm_amt", "text": "x"}, r"missing \['kind'\]"),
    ({"kind": "text", "split": "train", "text": "x"}, r"split must be one of \['wm_amt', 'fe_sft'\], got 'train'"),
    ({"kind": "text", "split": "wm_amt"}, r"a 'text' row needs a string text"),
    ({"kind": "trajectory", "split": "fe_sft"}, r"a 'trajectory' row needs a 'trajectory' mapping"),
    ({"kind": "trajectory", "split": "fe_sft", "trajectory": {"steps": []}}, r"its trajectory is malformed"),
    ({"kind": "episode", "split": "fe_sft", "trajectory": {}}, r"kind must be 'trajectory' or 'text', got 'episode'"),
])
def test_a_bad_corpus_row_names_what_is_wrong(bad, match):
    with pytest.raises(ValueError, match=match):
        CorpusRow.from_dict(bad)


def test_a_data_version_draws_fresh_training_data_on_the_same_eval_sets(tmp_path):
    base = search_cfg(tmp_path, "corpus.n_train_tasks=6", "envs.math.enabled=true")
    fresh = search_cfg(tmp_path, "corpus.n_train_tasks=6", "envs.math.enabled=true", "corpus.data_version=2026-12-06")
    a, b = plan_corpus(base), plan_corpus(fresh)
    for env in ("search", "math"):  # other training tasks in each environment
        assert [t.question for t in a.rl_tasks if t.env == env] != [t.question for t in b.rl_tasks if t.env == env]
    assert [i["seed"] for i in a.items] != [i["seed"] for i in b.items]  # other behaviour rollouts
    assert {k: [t.to_dict() for t in v] for k, v in a.eval_sets.items()} == \
        {k: [t.to_dict() for t in v] for k, v in b.eval_sets.items()}  # the same held-out sets
    assert corpus_key(base) != corpus_key(fresh)
    assert plan_corpus(search_cfg(tmp_path, "corpus.n_train_tasks=6", "envs.math.enabled=true",
                                  "corpus.data_version=2026-12-06")).items == b.items  # a version is reproducible


def test_a_corrupted_dataset_file_is_named_by_the_stage_that_reads_it(tmp_path):
    from tasks.corpus import find_corpus
    from tasks.train import StageInputError, resolve_dataset

    cfg = search_cfg(tmp_path, "corpus.n_train_tasks=4")
    manifest = build_corpus(cfg, progress=False)
    path = tmp_path / "work" / "corpus" / manifest.key / "wm_amt.jsonl"
    path.write_text(path.read_text().replace('"success": true', '"success": false', 1))  # one edited row
    with pytest.raises(StageInputError, match=r"wm_amt.jsonl is corrupted or was changed after it was written"):
        resolve_dataset("wm_amt", manifest.uri, cfg)
    with pytest.raises(StorageError, match=r"wm_amt.jsonl is corrupted"):
        find_corpus(cfg, manifest.uri)
    assert not build_corpus(cfg, progress=False).reused  # the corpus stage itself rebuilds it


# ---------------------------------------------------------------------------------------------
# q labels matched to the student


def test_weakened_noise_by_hand():
    from foresight_core.config.corpus import ExpertNoiseConfig
    from foresight_core.corpus.collect import weakened

    n = ExpertNoiseConfig(wrong_query=0.2, premature_answer=0.0, arithmetic_slip=0.5, retry_after_miss=0.8)
    assert weakened(n, 0.0) == n
    half = weakened(n, 0.5)
    assert (half.wrong_query, half.premature_answer, half.arithmetic_slip, half.retry_after_miss) == \
        pytest.approx((0.6, 0.5, 0.75, 0.4))
    assert weakened(n, 1.0).retry_after_miss == 0.0 and weakened(n, 1.0).wrong_query == 1.0
    with pytest.raises(ValueError, match="weakening"):
        weakened(n, 1.5)


def test_matched_labelling_policy_hits_its_target_and_lowers_q(tmp_path):
    from foresight_core.corpus.build import labelling_policy
    from foresight_core.corpus.collect import match_weakness

    cfg = search_cfg(tmp_path, "corpus.q_policy=matched", "corpus.q_target_success=0.25")
    plan = plan_corpus(cfg)
    match = match_weakness(cfg, plan.rl_tasks, 0.25, episodes=2)
    assert 0.0 < match["weakness"] < 1.0 and abs(match["success"] - 0.25) <= 0.1 and match["episodes"] == 48
    matched_cfg, record = labelling_policy(cfg, plan)
    assert record["source"] == "matched" and matched_cfg.corpus.q_noise is not None
    assert matched_cfg.corpus.q_noise.wrong_query > cfg.corpus.noise.wrong_query
    # the same trajectories (the behaviour policy still plays them), labelled by the weaker policy: lower q
    behaviour = trajectories(collect_items(plan.items, search_cfg(tmp_path)))
    matched = trajectories(collect_items(plan.items, matched_cfg))
    acts = lambda ts: [[(s.turn.action, s.observation) for s in t.steps] for t in ts]
    assert acts(matched) == acts(behaviour)
    mean = lambda ts: sum(lab["q"] for t in ts for lab in t.meta["q_labels"]) / sum(len(t.meta["q_labels"]) for t in ts)
    assert mean(matched) < mean(behaviour) - 0.2
    # the behaviour policy: nothing to match
    assert labelling_policy(search_cfg(tmp_path), plan)[1] == {"policy": "expert", "source": "behaviour"}


def test_matched_build_records_the_policy_and_keeps_its_key(tmp_path):
    cfg = search_cfg(tmp_path, "corpus.n_train_tasks=8", "corpus.q_policy=matched", "corpus.q_target_success=0.2")
    manifest = build_corpus(cfg, progress=False)
    assert manifest.data["q_policy"]["source"] == "matched" and manifest.key == corpus_key(cfg)
    assert manifest.data["config"]["corpus"]["q_noise"] is not None  # what labelled q is in the manifest
    assert build_corpus(cfg, progress=False).reused
    assert corpus_key(cfg) != corpus_key(search_cfg(tmp_path, "corpus.n_train_tasks=8"))


def test_matched_labels_need_the_scripted_expert():
    with pytest.raises(Exception, match="need corpus.behaviour 'expert'"):
        load_config("tiny", overrides=["corpus.behaviour=llm", "corpus.llm.model=tiny", "corpus.q_policy=matched"],
                    env={})
