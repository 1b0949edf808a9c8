"""The ``foresight`` command: each pipeline stage, the whole pipeline, configs and deployments.

    foresight corpus --preset tiny                      # stage 0: the build_corpus flow
    foresight run --preset laptop                       # the whole pipeline flow (the stages installed)
    foresight fe-sft --preset tiny --set fe_sft.max_steps=5   # the pipeline up to FE-SFT, finished stages reused
    foresight config show --preset paper                # the resolved config as YAML, credentials masked
    foresight presets                                   # the checked-in presets
    foresight serve --preset laptop --cron "0 3 * * 0"  # deployments with a retraining schedule
    foresight ablate --preset tiny                      # METHOD.md's ablation table in one flow run

Every command that takes a config takes ``--preset NAME`` or ``--config FILE`` plus repeatable
``--set key.path=value``; the environment variables of ``foresight_core.config.load`` apply too.
Nothing heavy is imported at the top, so ``--help`` and a bad config answer at once: a bad config
exits with code 2 and a message naming the field, before Prefect, Ray or MLflow load.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from foresight_core.config import STAGES, ConfigError, PipelineConfig, list_presets, load_config

# subcommand -> pipeline stage
STAGE_COMMANDS = {"corpus": "corpus", "wm-amt": "wm_amt", "fe-sft": "fe_sft", "fc-rl": "fc_rl", "eval": "eval"}
STAGE_HELP = {
    "corpus": "stage 0: build the corpus (behaviour policy, hindsight z_t, Monte Carlo q_t) on Ray Data",
    "wm_amt": "stage 1: world-model agentic mid-training (runs the corpus first, reused when finished)",
    "fe_sft": "stage 2: format-eliciting SFT (runs the stages before it, reused when finished)",
    "fc_rl": "stage 3: foresight-conditioned GRPO (runs the stages before it, reused when finished)",
    "eval": "evaluation on held-out tasks (runs the stages before it, reused when finished)",
}


def build_parser() -> argparse.ArgumentParser:
    config_args = argparse.ArgumentParser(add_help=False)
    source = config_args.add_mutually_exclusive_group()
    source.add_argument("--preset", metavar="NAME", help=f"a preset in configs/presets ({', '.join(list_presets())}); "
                                                          "default: laptop")
    source.add_argument("--config", metavar="FILE", help="a YAML config file instead of a preset")
    config_args.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                             help="override one field, value read as YAML (repeatable): --set corpus.mc_rollouts=8")

    parser = argparse.ArgumentParser(
        prog="foresight", description="Foresight: corpus -> WM-AMT -> FE-SFT -> FC-RL -> eval, "
        "as Prefect flows on Ray, recorded in MLflow (arXiv 2606.27483).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, stage in STAGE_COMMANDS.items():
        sub.add_parser(command, parents=[config_args], help=STAGE_HELP[stage], description=STAGE_HELP[stage])
    sub.add_parser("run", parents=[config_args], help="the whole pipeline flow: the stages in `stages` "
                   "that are installed, finished ones reused")
    ablate = sub.add_parser("ablate", parents=[config_args], help="the method's ablation table in one flow run: "
                            "every variant trained and evaluated, shared stages reused")
    ablate.add_argument("--table", default="paper_table", help="a table in configs/ablations or a YAML file "
                        "(default: paper_table)")
    ablate.add_argument("--only", action="append", default=[], metavar="VARIANT",
                        help="run only these variants (repeatable)")
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


def stages_for(command: str, cfg: PipelineConfig) -> list[str]:
    """`run`: the config's stages. A stage command: every stage up to it (earlier ones are reused)."""
    if command == "run":
        return list(cfg.stages)
    stage = STAGE_COMMANDS[command]
    return list(STAGES[: STAGES.index(stage) + 1])


def _presets() -> int:
    from foresight_core.config.load import preset_path

    for name in list_presets():
        first = preset_path(name).read_text().splitlines()[:1]
        note = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        print(f"{name:10s} {note}")
    return 0


def _summary(cfg: PipelineConfig, refs: dict[str, Any]) -> None:
    """The references a run produced, one per line (plain text: no wrapping, easy to grep)."""
    from foresight_tasks.tracking import tracking_uri

    width = max(map(len, refs), default=0)
    print(f"foresight {cfg.name}: outputs")
    for k, v in refs.items():
        print(f"  {k:<{width}}  {v}")
    uri = tracking_uri(cfg)
    print("MLflow: " + (f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else uri))


def _serve(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from foresight_flows.pipeline import make_deployments

    deployments = make_deployments(cfg, cron=args.cron, timezone=args.timezone)
    for d in deployments:
        print(f"deployment {d.flow_name}/{d.name}: schedules={[s.schedule for s in d.schedules]}")
    if not args.dry_run:
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
        from foresight_core.config.ablation import apply_variant, load_ablation

        try:
            table = load_ablation(args.table)
            if args.only:
                unknown = sorted(set(args.only) - {v.name for v in table.variants})
                if unknown:
                    raise ConfigError(f"--only: unknown variants {unknown}; the table has "
                                      f"{[v.name for v in table.variants]}")
                table = table.model_copy(update={"variants": [v for v in table.variants if v.name in args.only]})
            for v in table.variants:  # every variant's overrides checked before any work
                apply_variant(cfg, v)
        except ConfigError as e:
            return _fail(str(e))
    if args.command == "config":
        from foresight_tasks.tracking import config_yaml

        print(config_yaml(cfg), end="")  # SecretStr and URI passwords masked
        return 0

    from foresight_tasks.runtime import setup_env

    setup_env(cfg)  # before Prefect is imported: it reads PREFECT_HOME / PREFECT_API_URL on import
    if args.command == "serve":
        return _serve(cfg, args)
    from foresight_flows import pipeline as flows

    if table is not None:
        out = flows.ablation(cfg, table)
        _summary(cfg, {"ablation.run_id": out["ablation.run_id"]})
        return 0

    if args.command in STAGE_COMMANDS and not flows.stage_available(STAGE_COMMANDS[args.command]):
        stage = STAGE_COMMANDS[args.command]
        return _fail(f"stage {stage} is not in this install (module {flows.STAGE_MODULES[stage]} is missing)")
    cfg = cfg.model_copy(update={"stages": stages_for(args.command, cfg)})
    refs = flows.build_corpus(cfg) if args.command == "corpus" else flows.pipeline(cfg)
    _summary(cfg, refs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
