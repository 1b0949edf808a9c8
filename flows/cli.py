"""The ``foresight`` command: each pipeline stage, the whole pipeline, configs and deployments.

    foresight corpus --preset tiny                      # stage 0: the build_corpus flow
    foresight run --preset laptop                       # the whole pipeline flow (the stages installed)
    foresight fe-sft --preset tiny --set fe_sft.max_steps=5   # the pipeline up to FE-SFT, finished stages reused
    foresight config show --preset paper                # the resolved config as YAML, credentials masked
    foresight presets                                   # the checked-in presets
    foresight serve --preset laptop --cron "0 3 * * 0"  # deployments with a retraining schedule
    foresight ablate --preset tiny                      # METHOD.md's ablation table in one flow run
    foresight eval --model models:/foresight-laptop@champion --benchmark nq=nq.jsonl,corpus=wiki.jsonl
                                                        # any model on benchmark files: no corpus, no training

Every command that takes a config takes ``--preset NAME`` or ``--config FILE`` plus repeatable
``--set key.path=value``; the environment variables of ``foresight_core.config.load`` apply too.
Nothing heavy is imported at the top, so ``--help`` and a bad config answer at once: a bad config
exits with code 2 and a message naming the field, before Prefect, Ray or MLflow load.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from foresight_core.config import STAGES, ConfigError, PipelineConfig, list_presets, load_config

# subcommand -> pipeline stage
STAGE_COMMANDS = {"corpus": "corpus", "wm-amt": "wm_amt", "fe-sft": "fe_sft", "relabel": "relabel", "fc-rl": "fc_rl",
                  "eval": "eval"}
STAGE_HELP = {
    "corpus": "stage 0: build the corpus (behaviour policy, hindsight z_t, Monte Carlo q_t) on Ray Data",
    "wm_amt": "stage 1: world-model agentic mid-training (runs the corpus first, reused when finished)",
    "fe_sft": "stage 2: format-eliciting SFT (runs the stages before it, reused when finished)",
    "relabel": "stage 2b, on demand: q relabelled with the FE-SFT model's own rollouts, then a short SFT (runs "
               "the stages before it, reused when finished)",
    "fc_rl": "stage 3: foresight-conditioned GRPO (runs the stages before it, reused when finished)",
    "eval": "evaluation on held-out tasks (runs the stages before it, reused when finished)",
}


def build_parser() -> argparse.ArgumentParser:
    config_args = argparse.ArgumentParser(add_help=False)
    source = config_args.add_mutually_exclusive_group()
    source.add_argument("--preset", metavar="NAME", help=f"a preset in foresight_core/config/presets ({', '.join(list_presets())}); "
                                                          "default: laptop")
    source.add_argument("--config", metavar="FILE", help="a YAML config file instead of a preset")
    config_args.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                             help="override one field, value read as YAML (repeatable): --set corpus.mc_rollouts=8")

    parser = argparse.ArgumentParser(
        prog="foresight", description="Foresight: corpus -> WM-AMT -> FE-SFT -> FC-RL -> eval, "
        "as Prefect flows on Ray, recorded in MLflow (arXiv 2606.27483).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, stage in STAGE_COMMANDS.items():
        stage_parser = sub.add_parser(command, parents=[config_args], help=STAGE_HELP[stage],
                                      description=STAGE_HELP[stage])
        if command == "eval":
            stage_parser.add_argument("--model", help="evaluate this model alone, no corpus and no training: an MLflow "
                                      "model URI (runs:/..., models:/foresight-laptop@champion), a local Hugging Face "
                                      "folder, or 'base'")
            stage_parser.add_argument("--benchmark", action="append", default=[], metavar="NAME=PATH[,corpus=P][,kind=K]",
                                      help="a benchmark file in its public format (Search-R1 QA with corpus= its "
                                      "passages, or kind=math for AIME-style rows), local or s3:// (repeatable)")
    sub.add_parser("run", parents=[config_args], help="the whole pipeline flow: the stages in `stages` "
                   "that are installed, finished ones reused")
    ablate = sub.add_parser("ablate", parents=[config_args], help="the method's ablation table in one flow run: "
                            "every variant trained and evaluated, shared stages reused")
    ablate.add_argument("--table", default="paper_table", help="a table in foresight_core/config/ablations or a YAML file "
                        "(default: paper_table)")
    ablate.add_argument("--only", action="append", default=[], metavar="VARIANT",
                        help="run only these variants (repeatable)")
    ablate.add_argument("--seeds", default=None, metavar="S,S,...",
                        help="seeds every row runs at (default: the table's, 0,1,2)")
    ablate.add_argument("--lanes", type=int, default=None, metavar="N",
                        help="rows run at once (default: the table's; on a local Ray each stage gets CPUs / N)")
    ablate.add_argument("--plan", action="store_true", help="print the rows, the shared stages and the estimated "
                        "GPU hours, and run nothing")
    ablate.add_argument("--params", type=float, default=None, metavar="N",
                        help="model parameters for the GPU-hour estimate (default: read from the model name)")
    ask = sub.add_parser("ask", parents=[config_args], help="ask the trained agent one question and watch it "
                         "think: each turn's imagined plan, keywords, confidence, action and observation")
    ask.add_argument("question", help="the question")
    ask.add_argument("--model", default=None, help="a registered agent (models:/NAME@ALIAS, models:/NAME/VERSION), a "
                     "run's weights (runs:/RUN/model), a local Hugging Face folder, or 'base' (default: the config's "
                     "champion, models:/foresight-<preset>@champion)")
    ask.add_argument("--env", choices=["search", "math"], default="search", help="the tool: search or python")
    ask.add_argument("--passages", default=None, help="a passages file to search instead of the agent's own")
    ask.add_argument("--max-turns", type=int, default=None, help="turns (default: serve.max_turns)")
    ask.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: serve.temperature)")
    ask.add_argument("--plan", type=int, default=None, metavar="K", help="test-time planning: K candidate turns, "
                     "act on the most confident")
    ask.add_argument("--min-confidence", type=float, default=None, help="abstain below this final confidence")
    config = sub.add_parser("config", help="inspect a resolved config")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    config_sub.add_parser("show", parents=[config_args], help="print the resolved config (credentials masked)")
    sub.add_parser("presets", help="list the checked-in presets")
    serve = sub.add_parser("serve", parents=[config_args], help="serve the pipeline and corpus flows as Prefect "
                           "deployments, the pipeline on a retraining schedule")
    serve.add_argument("--cron", default="0 3 * * 0", help="retraining schedule (cron, default: Sundays 03:00)")
    serve.add_argument("--timezone", default="UTC", help="time zone of the schedule")
    serve.add_argument("--dry-run", action="store_true", help="build and print the deployments, serve nothing")
    return parser


def _fail(message: str) -> int:
    print(f"foresight: error: {message}", file=sys.stderr)
    return 2


def _show_turn(n: int, turn: Mapping[str, Any]) -> None:
    """One turn of `foresight ask`, as it is played."""
    def line(label: str, text: Any, width: int = 400) -> None:
        if text not in (None, "", []):
            text = "; ".join(text) if isinstance(text, list) else str(text)
            text = " ".join(text.split()) if label != "code" else text
            print(f"  {label:<11} {text if len(text) <= width else text[:width] + ' ...'}")

    print(f"turn {n}{'' if turn['valid'] else '  (malformed: ' + str(turn['reason']) + ')'}")
    line("imagine", turn["imaginary"])
    line("keywords", turn["keywords"])
    line("analysis", turn["analysis"])
    line("confidence", None if turn["confidence"] is None else f"{turn['confidence']:.2f}")
    line("think", turn["think"])
    action = turn["action"]
    if action:
        line("code" if action["kind"] == "python" else action["kind"], action["content"])
    line("observes", turn["observation"])
    if not turn["valid"]:
        line("wrote", turn.get("text"), 300)
    sys.stdout.flush()


def _ask(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """`foresight ask`: one question, each turn shown as it is played, then the answer and its confidence."""
    from foresight_core.serving import RequestError
    from tasks.runtime import setup_env

    setup_env(cfg)
    from tasks.serving import load_agent

    try:
        agent = load_agent(cfg, args.model, args.passages)
    except Exception as e:  # noqa: BLE001 -- a missing model / registry / file: say which, no traceback
        return _fail(f"cannot load the agent {args.model or '(the champion)'}: {type(e).__name__}: {e}")
    settings = {"max_turns": args.max_turns, "temperature": args.temperature, "plan_candidates": args.plan,
                "min_confidence": args.min_confidence}
    turns = [0]

    def on_turn(_: int, turn: Mapping[str, Any]) -> None:
        turns[0] += 1
        _show_turn(turns[0], turn)

    try:
        out = agent.predict([{"question": args.question, "env": args.env, **settings}], on_turn=on_turn)[0]
    except RequestError as e:
        return _fail(str(e))
    if "error" in out and len(out) == 1:
        return _fail(out["error"])
    q = "no confidence stated" if out["confidence"] is None else f"confidence {out['confidence']:.2f}"
    if out["abstained"]:
        guess = (f"it would have said {out['proposed_answer']!r}" if out["proposed_answer"] is not None
                 else f"it gave no answer: {out['finish']}")
        print(f"answer: {out['answer']}  ({q}; {guess})")
    else:
        print(f"answer: {out['answer'] if out['answer'] is not None else '(none: ' + out['finish'] + ')'}  ({q})")
    print(f"tokens: {out['tokens']}" + (f" (+{out['candidate_tokens']:.0f} planning candidates)"
                                        if out["candidate_tokens"] else ""))
    return 0


def _missing_gpus(cfg: PipelineConfig, table: Any) -> str | None:
    """Why the table cannot run here (its config asks for GPUs this machine lacks), or None."""
    from foresight_core.config.ablation import row_configs

    wants = set()
    for v, _, vcfg in row_configs(cfg, table, seeds=[cfg.seed]):
        for stage in ("wm_amt", "fe_sft", "relabel", "fc_rl"):
            if stage in v.stages and getattr(vcfg, stage).scaling.use_gpu:
                wants.add(f"{stage}.scaling.use_gpu")
        if "eval" in v.stages and vcfg.eval.engine == "vllm":
            wants.add("eval.engine=vllm")
    if not wants:
        return None
    import torch

    if torch.cuda.is_available():
        return None
    return f"this config needs GPUs ({', '.join(sorted(wants))}) and this machine has none"


def stages_for(command: str, cfg: PipelineConfig) -> list[str]:
    """`run`: the config's stages. A stage command: every stage up to it (earlier ones are reused); relabel
    only when the config's stages have it."""
    if command == "run":
        return list(cfg.stages)
    stage = STAGE_COMMANDS[command]
    return [s for s in STAGES[: STAGES.index(stage) + 1] if s != "relabel" or s in cfg.stages or s == stage]


def _presets() -> int:
    from foresight_core.config.load import preset_path

    for name in list_presets():
        first = preset_path(name).read_text().splitlines()[:1]
        note = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        print(f"{name:10s} {note}")
    return 0


def _summary(cfg: PipelineConfig, refs: dict[str, Any]) -> None:
    """The references a run produced, one per line (plain text: no wrapping, easy to grep), then the
    stage table (``summary_text``) with each stage run's metrics read back from MLflow."""
    from tasks.tracking import run_metrics, tracking_uri

    width = max(map(len, refs), default=0)
    print(f"foresight {cfg.name}: outputs")
    for k, v in refs.items():
        print(f"  {k:<{width}}  {v}")
    metrics: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        run_id = refs.get(f"{stage}.run_id")
        if run_id and run_id != "None":
            try:
                metrics[stage] = run_metrics(cfg, run_id)
            except Exception as e:  # noqa: BLE001 - the table is a courtesy; the run itself succeeded
                print(f"foresight: could not read the {stage} run's metrics: {e}", file=sys.stderr)
    model_uri = final_model_uri(refs)
    print(summary_text(cfg.name, refs, metrics, tracking_uri(cfg), model_uri and _local_model_path(cfg, model_uri)),
          end="")


def final_model_uri(refs: Mapping[str, str]) -> str | None:
    """The latest model of a run: FC-RL's, else FE-SFT's, else WM-AMT's (the model evaluation played)."""
    return next((refs[k] for k in ("fc_rl.model_uri", "fe_sft.model_uri", "wm_amt.model_uri")
                 if refs.get(k) not in (None, "", "None")), None)


def _local_model_path(cfg: PipelineConfig, model_uri: str) -> str | None:
    """The folder holding a ``runs:/<id>/<path>`` model when the run's artifacts are local files."""
    if not model_uri.startswith("runs:/"):
        return None
    from tasks.tracking import MlflowTracker, tracking_uri

    run_id, _, path = model_uri.removeprefix("runs:/").partition("/")
    try:
        root = MlflowTracker(tracking_uri(cfg), run_id).client.get_run(run_id).info.artifact_uri
    except Exception:  # noqa: BLE001 - the path is a courtesy
        return None
    if root.startswith("file://") or "://" not in root:
        return f"{root.removeprefix('file://').rstrip('/')}/{path}"
    return None


def _pct(x: float) -> str:
    return f"{x:.0%}"


def _f3(x: float) -> str:
    return f"{x:.3f}"


def _metric(metrics: Mapping[str, float], key: str, fmt: Any = _f3) -> str:
    value = metrics.get(key)
    return "-" if value is None or value != value else fmt(value)  # missing or NaN (nothing to measure)


def _stage_result(stage: str, m: Mapping[str, float]) -> list[str]:
    """A stage's headline metrics, one or more lines (evaluation: one per benchmark and mode)."""
    if stage == "corpus":
        return [f"{m.get('corpus.trajectories', 0):.0f} trajectories, success "
                f"{_metric(m, 'corpus.success_rate', _pct)}, {m.get('corpus.annotated_steps', 0):.0f} annotated steps"]
    if stage in ("wm_amt", "fe_sft"):
        line = f"held-out loss {_metric(m, 'eval_loss')} | world-model loss {_metric(m, 'eval_wm_loss')}"
        if any(k.startswith("check/") for k in m):
            line += (f" | check: format {_metric(m, 'check/format_rate', _pct)}, success "
                     f"{_metric(m, 'check/success_rate', _pct)}, ECE {_metric(m, 'check/ece')}, grounding "
                     f"{_metric(m, 'check/grounding_rate', _pct)}")
        return [line]
    if stage == "fc_rl":
        cols = (("success", "success_rate", _pct), ("format", "format_rate", _pct), ("ECE", "calib/ece", _f3),
                ("grounding", "grounding_rate", _pct))
        if any(k.startswith("eval_after/") for k in m):  # the held-out evaluation, before -> after
            return [" | ".join(f"{label} {_metric(m, f'eval_before/{k}', fmt)} -> {_metric(m, f'eval_after/{k}', fmt)}"
                               for label, k, fmt in cols)]
        return ["last step: " + " | ".join(f"{label} {_metric(m, k, fmt)}" for label, k, fmt in cols)]
    if stage == "eval":  # per benchmark and mode, then the mean over benchmarks per mode
        groups = sorted({k.rsplit("/", 1)[0] for k in m if k.count("/") == 2 and not k.startswith("avg/")})
        benches = sorted({g.split("/")[0] for g in groups})
        means: dict[str, float] = {}
        for mode in sorted({g.split("/")[1] for g in groups}) if len(benches) > 1 else ():
            for col in ("score", "format_rate", "ece", "grounding_rate"):
                vals = [m[f"{b}/{mode}/{col}"] for b in benches if f"{b}/{mode}/{col}" in m]
                if vals:
                    means[f"mean/{mode}/{col}"] = sum(vals) / len(vals)
        m = {**m, **means}
        groups += sorted({k.rsplit("/", 1)[0] for k in means})
        return [f"{g}: score {_metric(m, f'{g}/score')} | format {_metric(m, f'{g}/format_rate', _pct)} | "
                f"ECE {_metric(m, f'{g}/ece')} | grounding {_metric(m, f'{g}/grounding_rate', _pct)}"
                for g in groups] or ["-"]
    return ["-"]


def summary_text(name: str, refs: Mapping[str, str], metrics: Mapping[str, Mapping[str, float]],
                 tracking_uri: str, model_path: str | None = None) -> str:
    """The end-of-run table: one row per stage (wall time, reused or new, headline metrics), then
    where the final model is and how to open these runs in MLflow's UI.

    ``refs``: the pipeline's references (``<stage>.run_id``, ``.reused``, ``.wall_s``, ``.model_uri``);
    ``metrics``: each stage run's latest metrics, by stage; ``model_path``: the final model's local
    folder when the artifact store is local. Plain text, no colour, no wrapping.
    """
    from tasks.progress import clock

    stages = [s for s in STAGES if f"{s}.run_id" in refs]
    new_word = {"corpus": "built", "eval": "ran"}
    rows = []
    for s in stages:
        wall = refs.get(f"{s}.wall_s")
        run = "reused" if refs.get(f"{s}.reused") == "true" else new_word.get(s, "trained")
        if refs.get(f"{s}.run_id") in (None, "", "None"):
            run = "skipped"
        lines = _stage_result(s, metrics.get(s, {})) if run != "skipped" else ["-"]
        rows.append((s, clock(float(wall)) if wall else "-", run, lines))
    out = []
    if rows:
        total = sum(float(refs[f"{s}.wall_s"]) for s in stages if refs.get(f"{s}.wall_s"))
        out.append(f"foresight {name}: {len(stages)} stage{'s' if len(stages) != 1 else ''} in {clock(total)}")
        head = ("stage", "wall", "run")
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
        out.append("  " + "  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  result")
    for s, wall, run, lines in rows:
        cells = "  ".join(c.ljust(w) for c, w in zip((s, wall, run), widths))
        out.append(f"  {cells}  {lines[0]}")
        out += [" " * (len(cells) + 4) + line for line in lines[1:]]
    model_uri = final_model_uri(refs)
    if model_uri:
        out.append(f"final model: {model_uri}" + (f"\n  local folder: {model_path}" if model_path else ""))
    if refs.get("registry.version"):
        verdict = "the champion" if refs.get("registry.promoted") == "true" else "not promoted"
        out.append(f"registered: {refs['registry.model_uri']}, {verdict}: {refs.get('registry.reason', '')}")
    ui = f"mlflow ui --backend-store-uri {tracking_uri}" if tracking_uri.startswith("sqlite:") else tracking_uri
    out.append(f"MLflow: {ui}")
    return "\n".join(out) + "\n"


def _serve(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from foresight_core.config import parse_override
    from flows.pipeline import make_deployments

    if args.config:  # a config file: the whole config is the deployments' parameter (credentials masked)
        deployments = make_deployments(cfg=cfg, cron=args.cron, timezone=args.timezone)
    else:  # a preset and overrides: what a run through the API would send
        overrides = dict(parse_override(item) for item in args.overrides)
        deployments = make_deployments(args.preset or "laptop", overrides, cron=args.cron, timezone=args.timezone)
    for d in deployments:
        print(f"deployment {d.flow_name}/{d.name}: schedules={[s.schedule for s in d.schedules]}")
    if args.dry_run:
        return 0
    if not cfg.infra.prefect.api_url:
        return _fail("foresight serve needs a Prefect server: Prefect's ephemeral server, the default without "
                     "one, runs no scheduler, so the retraining schedule would never fire. Start one "
                     "(`prefect server start`) and set PREFECT_API_URL=http://127.0.0.1:4200/api "
                     "(or infra.prefect.api_url); --dry-run prints the deployments without serving")
    from prefect import serve

    serve(*deployments)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "presets":
        return _presets()
    try:
        cfg = load_config(args.preset, args.config, args.overrides)
    except ConfigError as e:
        return _fail(str(e))
    table = None
    if args.command == "ablate":
        from foresight_core.config.ablation import load_ablation, row_configs

        try:
            table = load_ablation(args.table)
            if args.only:
                unknown = sorted(set(args.only) - {v.name for v in table.variants})
                if unknown:
                    raise ConfigError(f"--only: unknown variants {unknown}; the table has "
                                      f"{[v.name for v in table.variants]}")
                table = table.model_copy(update={"variants": [v for v in table.variants if v.name in args.only]})
            if args.seeds is not None:
                try:
                    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
                except ValueError:
                    raise ConfigError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
                from pydantic import ValidationError

                from foresight_core.config.load import _format_validation_error
                try:
                    table = type(table).model_validate({**table.model_dump(), "seeds": seeds})
                except ValidationError as e:
                    raise ConfigError(_format_validation_error(e, "--seeds")) from None
            if args.lanes is not None:
                if args.lanes < 1:
                    raise ConfigError(f"--lanes: expected a whole number >= 1, got {args.lanes}")
                table = table.model_copy(update={"lanes": args.lanes})
            row_configs(cfg, table)  # every row's overrides checked at every seed, before any work
        except ConfigError as e:
            return _fail(str(e))
        from foresight_core.budget import ablation_plan, plan_text

        print(plan_text(ablation_plan(cfg, table, params=args.params)), flush=True)
        if args.plan:
            return 0
        missing = _missing_gpus(cfg, table)
        if missing:
            return _fail(f"{missing}: planned above, not run (`--plan` prints the plan alone)")
    if args.command == "config":
        from tasks.tracking import config_yaml

        print(config_yaml(cfg), end="")  # SecretStr and URI passwords masked
        return 0

    from tasks.runtime import setup_env

    setup_env(cfg)  # before Prefect is imported: it reads PREFECT_HOME / PREFECT_API_URL on import
    if args.command == "ask":
        return _ask(cfg, args)
    if args.command == "serve":
        return _serve(cfg, args)
    from flows import pipeline as flows

    if table is not None:
        out = flows.ablation(cfg, table)
        _summary(cfg, {"ablation.run_id": out["ablation.run_id"]})
        return 0

    if args.command == "eval" and (args.model or args.benchmark):
        if not args.benchmark:
            return _fail("eval --model needs at least one --benchmark NAME=PATH[,corpus=...][,kind=...]")
        from foresight_core.config.envs import parse_benchmark

        try:
            for spec in args.benchmark:
                parse_benchmark(spec)
        except ValueError as e:
            return _fail(str(e))
        refs = flows.evaluate_model(model=args.model or "base", benchmarks=list(args.benchmark), cfg=cfg)
        _summary(cfg, refs)
        return 0
    cfg = cfg.model_copy(update={"stages": stages_for(args.command, cfg)})
    refs = flows.build_corpus(cfg=cfg) if args.command == "corpus" else flows.pipeline(cfg=cfg)
    _summary(cfg, refs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
