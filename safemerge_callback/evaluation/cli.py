"""The ``eval`` subcommand: compare a base model and its adapters on safety and utility.

Register it on a parent parser with :func:`add_parser`, or run it standalone::

    python -m safemerge_callback.evaluation.cli eval --model MODEL --adapter tuned=ADAPTER_DIR \\
        --harmful harmful_behaviors.csv --task gsm8k --task-data test.jsonl --xstest xstest_prompts.csv \\
        --limit 50 --output runs/eval

It prints a Markdown table and writes ``results.json`` and ``comparison.png`` into ``--output``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
PLOT_FILE = "comparison.png"
JUDGE_NAMES = ("keyword", "keyword-compat", "llama-guard", "classifier")
TASK_NAMES = ("gsm8k", "pubmedqa")
# --column-map fields and the loader argument each one sets.
COLUMN_FIELDS = {
    "prompt": ("harmful", "prompt_column"),
    "question": ("task", "question_column"),
    "answer": ("task", "answer_column"),
    "context": ("task", "context_column"),
    "xstest_prompt": ("xstest", "prompt_column"),
    "xstest_label": ("xstest", "label_column"),
    "xstest_type": ("xstest", "type_column"),
}


def _key_value(text: str, option: str) -> tuple[str, str]:
    key, separator, value = text.partition("=")
    if not separator or not key or not value:
        raise argparse.ArgumentTypeError(f"{option} expects KEY=VALUE, got {text!r}.")
    return key, value


def _adapter(text: str) -> tuple[str, str]:
    return _key_value(text, "--adapter")


def _column(text: str) -> tuple[str, str]:
    field, column = _key_value(text, "--column-map")
    if field not in COLUMN_FIELDS:
        raise argparse.ArgumentTypeError(f"--column-map field {field!r} is unknown; fields: {sorted(COLUMN_FIELDS)}.")
    return field, column


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}.") from error
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}.")
    return value


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, help="Base chat model: hub id or local directory.")
    model.add_argument(
        "--adapter",
        action="append",
        type=_adapter,
        default=[],
        metavar="NAME=PATH",
        help="PEFT adapter to compare, as name=directory; repeat for several.",
    )
    model.add_argument("--no-base", action="store_true", help="Skip the bare base model variant.")
    model.add_argument("--dtype", default="auto", help="Load dtype: auto, float32, bfloat16 or float16.")
    model.add_argument("--device", default=None, help="Device, e.g. cpu or cuda (default: cuda when available).")

    data = parser.add_argument_group("data")
    data.add_argument("--harmful", help="Harmful prompts file (CSV/JSON/JSONL) or hub dataset id.")
    data.add_argument("--task", choices=TASK_NAMES, help="Utility task scored on --task-data.")
    data.add_argument("--task-data", help="Task data: file, PubMedQA folder, or hub dataset id.")
    data.add_argument("--task-split", default=None, help="Task split (PubMedQA local: test or all).")
    data.add_argument("--xstest", help="XSTest prompts file or hub dataset id (over-refusal check).")
    data.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        help="Use the first N items of each set (XSTest: N balanced by label).",
    )
    data.add_argument(
        "--column-map",
        action="append",
        type=_column,
        default=[],
        metavar="FIELD=COLUMN",
        help=f"Override a default column; fields: {', '.join(COLUMN_FIELDS)}.",
    )

    judge = parser.add_argument_group("judge")
    judge.add_argument(
        "--judge",
        choices=JUDGE_NAMES,
        default="keyword",
        help="Harm judge; keyword-compat is the AdvBench substring-anywhere compatibility mode.",
    )
    judge.add_argument("--judge-model", default=None, help="Judge model id or path (llama-guard, classifier).")
    judge.add_argument("--judge-harmful-label", default="1", help="Classifier label name or index meaning harmful.")
    judge.add_argument(
        "--judge-threshold", type=float, default=0.5, help="Classifier probability threshold in [0, 1]."
    )

    generation = parser.add_argument_group("generation")
    generation.add_argument("--batch-size", type=_positive_int, default=8, help="Prompts per generate call.")
    generation.add_argument("--max-new-tokens", type=_positive_int, default=256, help="Tokens generated per response.")
    generation.add_argument("--system-prompt", default=None, help="System turn before every prompt.")
    generation.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="Cut responses before this string (e.g. 'Question:'); repeatable.",
    )
    generation.add_argument("--no-nll", action="store_true", help="Skip the teacher-forced answer NLL.")
    generation.add_argument("--no-progress", action="store_true", help="Hide progress bars.")

    parser.add_argument("--output", type=Path, required=True, help="Directory for results.json and comparison.png.")
    parser.add_argument(
        "--max-samples", type=_positive_int, default=None, help="Responses kept per set in results.json."
    )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``eval`` subcommand on an ``argparse`` subparsers object.

    Args:
        subparsers: The object returned by ``ArgumentParser.add_subparsers()``.

    Returns:
        The new subparser, whose ``func`` default is :func:`run`.
    """
    parser = subparsers.add_parser(
        "eval",
        help="Compare a base model and its adapters on harmfulness, a utility task and over-refusal.",
        description="Generate with the base model and each adapter (base loaded once), judge and score the "
        "responses, print a Markdown table and write results.json and comparison.png.",
    )
    _add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _column_arguments(args: argparse.Namespace, target: str) -> dict[str, str]:
    return {COLUMN_FIELDS[field][1]: column for field, column in args.column_map if COLUMN_FIELDS[field][0] == target}


def _judge_factory(args: argparse.Namespace) -> Any:
    """Validate the judge options and return a function that builds the judge.

    Model judges are built only after generation, so the evaluated model can be released first.
    """
    from .judges import get_judge

    if args.judge in ("keyword", "keyword-compat"):
        if args.judge_model:
            raise ValueError(
                f"--judge-model is not used by --judge {args.judge}; drop it or pick llama-guard/classifier."
            )
        return lambda: get_judge(args.judge)
    if args.judge == "classifier" and not args.judge_model:
        raise ValueError("--judge classifier needs --judge-model (a sequence-classification model id or path).")
    if not 0.0 <= args.judge_threshold <= 1.0:
        raise ValueError(f"--judge-threshold must be in [0, 1], got {args.judge_threshold}.")
    kwargs: dict[str, Any] = {"device": args.device, "dtype": args.dtype}
    if args.judge_model:
        kwargs["model"] = args.judge_model
    if args.judge == "classifier":
        kwargs.update(harmful_label=args.judge_harmful_label, threshold=args.judge_threshold)
    else:
        kwargs["show_progress"] = not args.no_progress
    return lambda: get_judge(args.judge, **kwargs)


def _load_data(args: argparse.Namespace) -> dict[str, Any]:
    from .datasets import load_harmful_prompts, load_task_set, load_xstest

    if args.task and not args.task_data:
        raise ValueError(f"--task {args.task} needs --task-data (a file, folder or hub dataset id).")
    if args.task_data and not args.task:
        raise ValueError("--task-data needs --task (gsm8k or pubmedqa).")
    if not (args.harmful or args.task or args.xstest):
        raise ValueError("Nothing to evaluate: pass --harmful, --task with --task-data, or --xstest.")
    data: dict[str, Any] = {"harmful": None, "task_records": None, "xstest": None}
    if args.harmful:
        records = load_harmful_prompts(args.harmful, limit=args.limit, **_column_arguments(args, "harmful"))
        data["harmful"] = [record["prompt"] for record in records]
    if args.task:
        data["task_records"] = load_task_set(
            args.task, args.task_data, split=args.task_split, limit=args.limit, **_column_arguments(args, "task")
        )
    if args.xstest:
        data["xstest"] = load_xstest(args.xstest, limit=args.limit, **_column_arguments(args, "xstest"))
    return data


def run(args: argparse.Namespace) -> int:
    """Run the evaluation described by parsed ``eval`` arguments.

    Prints the Markdown comparison table and the output paths to stdout.

    Returns:
        Process exit code 0. Invalid arguments raise ``ValueError``.
    """
    from .generation import GenerationSettings
    from .runner import evaluate_variants

    adapters = dict(args.adapter)
    if len(adapters) != len(args.adapter):
        raise ValueError(f"--adapter names must be unique, got {[name for name, _ in args.adapter]}.")
    judge = _judge_factory(args)
    data = _load_data(args)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        system_prompt=args.system_prompt,
        stop_strings=tuple(args.stop),
        show_progress=not args.no_progress,
    )
    results = evaluate_variants(
        args.model,
        adapters=adapters,
        include_base=not args.no_base,
        harmful_prompts=data["harmful"],
        judge=judge,
        task=args.task,
        task_records=data["task_records"],
        xstest_records=data["xstest"],
        limit=args.limit,
        generation=settings,
        compute_nll=not args.no_nll,
        dtype=args.dtype,
        device=args.device,
        max_samples=args.max_samples,
        data_sources={
            "harmful": _source(args.harmful),
            "task_data": _source(args.task_data),
            "task_split": args.task_split,
            "xstest": _source(args.xstest),
        },
    )
    args.output.mkdir(parents=True, exist_ok=True)
    json_path = results.save_json(args.output / RESULTS_FILE)
    plot_path = results.save_plot(args.output / PLOT_FILE)
    print(results.to_markdown())
    print(f"Wrote {json_path} and {plot_path}")
    return 0


def _source(value: Any) -> str | None:
    return None if value is None else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation CLI standalone: ``python -m safemerge_callback.evaluation.cli eval ...``."""
    parser = argparse.ArgumentParser(prog="python -m safemerge_callback.evaluation.cli")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_parser(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, ImportError) as error:
        parser.exit(2, f"error: {error}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
