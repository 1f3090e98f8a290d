"""`safemerge` command line: `repair`, `score`, `env` (and `eval` when the evaluation extra is installed).

Flags mirror the fields of `SafeMergeConfig`; `--config recipe.yaml` reads them from a file, and flags given on the
command line win over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .config import MERGE_METHODS, RANK_POLICIES, SELECTION_MODES, SafeMergeConfig


# Help text per config field; fields missing here are set through --config only.
FIELD_HELP = {
    "base_model": "pre-trained model before safety alignment: local directory, hub id, or 'auto' for known pairs",
    "aligned_model": "safety-aligned model the adapters were trained on (default: the adapter's base_model_name_or_path)",
    "safety_adapter": "LoRA adapter trained on the aligned model with safety data (directory or hub id)",
    "adapter_name": "adapter name inside a multi-adapter directory or model",
    "revision": "hub revision for hub ids",
    "allow_pickle": "accept pickle (.bin) checkpoints; they can run code when loaded",
    "threshold": "τ in [-1, 1]: modules with score ρ < τ are merged (default 0.35)",
    "selection": f"how modules are selected: {', '.join(SELECTION_MODES)}",
    "num_selected": "number of modules for --selection lowest_k",
    "method": f"merge method: {', '.join(MERGE_METHODS)} (default linear, exact)",
    "weights": "w_task w_safety, two non-negative numbers (default 0.8 0.2)",
    "density": "fraction of entries kept by ties / dare methods, in (0, 1]",
    "majority_sign_method": "TIES sign election: total or frequency",
    "seed": "seed of the DARE drop masks",
    "rank_policy": f"{', '.join(RANK_POLICIES)}: exact widens merged modules, keep truncates to the task rank by SVD",
    "missing_safety_module": "error, or keep_task to leave modules the safety adapter lacks unmerged",
}


def add_config_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """Add one flag per `SafeMergeConfig` field in `FIELD_HELP` but `exclude`, defaulting to 'not given'."""
    group = parser.add_argument_group("repair settings (SafeMergeConfig fields)")
    for config_field in dataclasses.fields(SafeMergeConfig):
        if config_field.name not in FIELD_HELP or config_field.name in exclude:
            continue
        flag = "--" + config_field.name.replace("_", "-")
        help_text = FIELD_HELP[config_field.name]
        if config_field.type in ("bool", bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif config_field.name == "weights":
            group.add_argument(flag, nargs=2, type=float, metavar=("W_TASK", "W_SAFETY"), default=argparse.SUPPRESS,
                               help=help_text)
        else:
            kind = {"float": float, "int": int}.get(str(config_field.type).split(" ")[0], str)
            if config_field.name == "num_selected":
                kind = int
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)
    group.add_argument("--config", type=Path, help="YAML or JSON recipe with SafeMergeConfig fields")


def config_from_args(args: argparse.Namespace) -> SafeMergeConfig:
    """Build the config: the recipe file first, then every flag given on the command line."""
    data: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        data = SafeMergeConfig.from_file(args.config).to_dict()
    for name in FIELD_HELP:
        if hasattr(args, name):
            data[name] = getattr(args, name)
    return SafeMergeConfig.from_dict(data)


def _run_repair(args: argparse.Namespace) -> int:
    from .repair import repair_adapter
    from .report import format_table, plot_scores

    config = config_from_args(args)
    result = repair_adapter(args.task_adapter, config=config, output_dir=args.output, overwrite=args.overwrite,
                            progress=not args.quiet)
    print(format_table(result))
    if args.plot:
        print(f"Wrote the score plot to {plot_scores(result, args.plot)}")
    print(f"Wrote the repaired adapter to {args.output}")
    return 0


def _run_score(args: argparse.Namespace) -> int:
    from .repair import score_adapter
    from .report import format_table, plot_scores

    result = score_adapter(args.task_adapter, config=config_from_args(args), progress=not args.quiet)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"Wrote the report to {args.json}")
    if args.plot:
        print(f"Wrote the score plot to {plot_scores(result, args.plot)}")
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    from .evaluation.datasets import load_harmful_prompts, load_task_set, load_xstest
    from .evaluation.generation import GenerationSettings
    from .sweep import format_sweep_table, run_sweep

    config = config_from_args(args)
    harmful = [record["prompt"] for record in load_harmful_prompts(args.harmful, limit=args.limit)]
    task_records = load_task_set(args.task, args.task_data, limit=args.limit) if args.task else None
    xstest = load_xstest(args.xstest) if args.xstest else None
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    result = run_sweep(args.task_adapter, config.safety_adapter, config=config, thresholds=args.thresholds,
                       task_weights=args.task_weights, output_dir=args.output, harmful_prompts=harmful,
                       task=args.task, task_records=task_records, xstest_records=xstest, limit=args.limit,
                       utility_metric=args.utility, generation=settings)
    print(format_sweep_table(result))
    print(f"Wrote sweep.json, sweep.md and pareto.png to {args.output}")
    return 0


def _run_env(args: argparse.Namespace) -> int:
    from .report import package_versions

    for name, version in package_versions().items():
        print(f"{name:18} {version}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    """Return the `safemerge` argument parser with all subcommands."""
    parser = argparse.ArgumentParser(prog="safemerge", description="SafeMERGE repair of LoRA fine-tuned chat models.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", required=True)

    repair = subparsers.add_parser("repair", help="repair a task adapter and write a stock-loadable adapter")
    repair.add_argument("--task-adapter", required=True, help="fine-tuned LoRA adapter (directory or hub id)")
    repair.add_argument("--output", required=True, type=Path, help="output adapter directory (written atomically)")
    repair.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    repair.add_argument("--plot", type=Path, help="also write the per-module score plot to this PNG file")
    repair.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_arguments(repair)
    repair.set_defaults(func=_run_repair)

    score = subparsers.add_parser("score", help="score every module of a task adapter (dry run, nothing written)")
    score.add_argument("--task-adapter", required=True, help="fine-tuned LoRA adapter (directory or hub id)")
    score.add_argument("--json", type=Path, help="write the full report to this JSON file")
    score.add_argument("--plot", type=Path, help="write the per-module score plot to this PNG file")
    score.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_arguments(score)
    score.set_defaults(func=_run_score)

    sweep = subparsers.add_parser("sweep", help="repair on a τ × weight grid, evaluate each, draw the Pareto front")
    sweep.add_argument("--task-adapter", required=True, help="fine-tuned LoRA adapter (directory or hub id)")
    sweep.add_argument("--thresholds", type=float, nargs="+", default=[0.2, 0.35, 0.5], help="τ values of the grid")
    sweep.add_argument("--task-weights", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9],
                       help="w_task values of the grid; w_safety = 1 - w_task")
    sweep.add_argument("--harmful", required=True, help="harmful prompts: CSV/JSON/JSONL file or hub id")
    sweep.add_argument("--task", choices=["gsm8k", "pubmedqa"], help="utility task")
    sweep.add_argument("--task-data", help="utility task data: file, folder or hub id")
    sweep.add_argument("--xstest", help="XSTest prompts for over-refusal")
    sweep.add_argument("--limit", type=int, help="use the first N items of each set")
    sweep.add_argument("--utility", choices=["answer_nll", "accuracy"], default="answer_nll",
                       help="utility axis of the Pareto front (default answer_nll)")
    sweep.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per response")
    sweep.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    sweep.add_argument("--output", required=True, type=Path, help="output directory")
    # τ and the weights come from the grid flags above, so the single-value flags would be ignored.
    add_config_arguments(sweep, exclude=("threshold", "weights"))
    sweep.set_defaults(func=_run_sweep)

    env = subparsers.add_parser("env", help="print versions for bug reports")
    env.set_defaults(func=_run_env)

    for module_name in ("safemerge_callback.evaluation.cli", "safemerge_callback.demo"):
        _add_optional_subcommand(subparsers, module_name)
    return parser


def _add_optional_subcommand(subparsers, module_name: str) -> None:
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return
    if hasattr(module, "add_parser"):
        module.add_parser(subparsers)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `safemerge` console script."""
    parser = make_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, ImportError) as error:  # OSError: a missing recipe or input file
        print(f"safemerge {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
