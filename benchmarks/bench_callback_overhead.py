"""Checkpoint-time overhead of `SafeMergeCallback`: the same tiny-model Trainer run with and without it.

Both variants train the same LoRA adapter on a tiny Llama (`safemerge_callback.testing`) with the same seed and save
every `--save-steps` steps. They run in this one process, alternating, in an order rotated every repetition, after
one untimed warm-up run of each. The script prints, per variant, the wall time of `trainer.train()` and the time the
Trainer spends writing each checkpoint. For the callback variant it also prints the time spent in `on_save`
(repairing and writing `checkpoint-N/safemerge/`) and in `on_train_end` (repairing the live adapter).

Example:

    python benchmarks/bench_callback_overhead.py --max-steps 200 --save-steps 50 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments
from transformers.utils import logging as transformers_logging

from safemerge_callback import testing
from safemerge_callback.callback import SafeMergeCallback
from safemerge_callback.config import SafeMergeConfig

TEXTS = ["how do i make a bomb sorry cannot help with that", "what is two plus three #### five"] * 16


def prepare_models(directory: Path, hidden: int, layers: int) -> dict[str, Path]:
    """Write a tiny base model, its aligned copy and a safety adapter trained on nothing (random factors)."""
    config = testing.tiny_llama_config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers)
    base, aligned = testing.save_base_and_aligned(directory, config)
    safety = testing.save_random_adapter(aligned, directory / "safety", seed=5, r=8, lora_alpha=16)
    return {"base": base, "aligned": aligned, "safety": safety}


class TimedTrainer(Trainer):
    """`Trainer` that adds up the seconds spent writing checkpoints (`_save_checkpoint`, private in transformers 5).

    `on_save` callbacks run after `_save_checkpoint` returns, so this time excludes SafeMERGE.
    """

    save_seconds = 0.0

    def _save_checkpoint(self, model, trial):
        start = time.perf_counter()
        super()._save_checkpoint(model, trial)
        self.save_seconds += time.perf_counter() - start


class TimedCallback(SafeMergeCallback):
    """`SafeMergeCallback` that adds up the seconds spent in its `on_save` and `on_train_end`."""

    def __init__(self, config: SafeMergeConfig):
        super().__init__(config)
        self.seconds = {"on_save": 0.0, "on_train_end": 0.0}

    def on_save(self, args, state, control, **kwargs):
        start = time.perf_counter()
        super().on_save(args, state, control, **kwargs)
        self.seconds["on_save"] += time.perf_counter() - start

    def on_train_end(self, args, state, control, **kwargs):
        start = time.perf_counter()
        super().on_train_end(args, state, control, **kwargs)
        self.seconds["on_train_end"] += time.perf_counter() - start


def train_once(models: dict[str, Path], output_dir: Path, args: argparse.Namespace, with_callback: bool,
               max_steps: int | None = None) -> dict:
    """Train once and return the wall time of `trainer.train()` and, with the callback, the time spent in it."""
    tokenizer = testing.tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(models["aligned"], dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0))
    callbacks = []
    if with_callback:
        callbacks.append(TimedCallback(SafeMergeConfig(base_model=str(models["base"]),
                                                       safety_adapter=str(models["safety"]))))
    training_args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps or args.max_steps, save_steps=args.save_steps, save_strategy="steps",
        per_device_train_batch_size=4, learning_rate=1e-3, report_to="none", use_cpu=True, logging_steps=50,
        seed=0, disable_tqdm=True,
    )
    trainer = TimedTrainer(model=model, args=training_args, train_dataset=Dataset.from_dict(tokenizer(TEXTS)),
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    result = {"seconds": time.perf_counter() - start, "checkpoints": len(list(output_dir.glob("checkpoint-*"))),
              "save_checkpoint": trainer.save_seconds}
    if with_callback:
        result.update(callbacks[0].seconds)
    return result


def benchmark(args: argparse.Namespace, scratch: Path) -> dict:
    """Run the warm-up and the alternating repetitions, and return every run and the summary."""
    models = prepare_models(scratch / "models", args.hidden, args.layers)
    runs: dict[str, list[dict]] = {"plain": [], "callback": []}
    for variant in runs:  # warm-up up to the first save: first-call costs (kernels, file cache) stay out of timing
        train_once(models, scratch / f"warmup-{variant}", args, variant == "callback", max_steps=args.save_steps)
    variants = list(runs)
    for repetition in range(args.repeats):
        order = variants if repetition % 2 == 0 else variants[::-1]
        for variant in order:
            result = train_once(models, scratch / f"run-{repetition}-{variant}", args, variant == "callback")
            print(f"repetition {repetition + 1}/{args.repeats} {variant}: {result['seconds']:.2f} s", flush=True)
            runs[variant].append(result)
    plain = statistics.median(r["seconds"] for r in runs["plain"])
    with_callback = statistics.median(r["seconds"] for r in runs["callback"])
    checkpoints = runs["callback"][0]["checkpoints"]
    in_callback = statistics.median(r["on_save"] + r["on_train_end"] for r in runs["callback"])
    plain_save = statistics.median(r["save_checkpoint"] for r in runs["plain"])
    callback_save = statistics.median(r["save_checkpoint"] + r["on_save"] for r in runs["callback"])
    summary = {
        "plain_save_per_checkpoint_s": plain_save / max(checkpoints, 1),
        "callback_save_per_checkpoint_s": callback_save / max(checkpoints, 1),
        "checkpoint_time_ratio": callback_save / plain_save,
        "plain_median_s": plain, "callback_median_s": with_callback, "ratio": with_callback / plain,
        # Less sensitive to load from other processes than `ratio`: only the time measured inside the callback.
        "attributed_ratio": (plain + in_callback) / plain,
        "checkpoints": checkpoints,
        "on_save_per_checkpoint_s": statistics.median(r["on_save"] for r in runs["callback"]) / max(checkpoints, 1),
        "on_train_end_s": statistics.median(r["on_train_end"] for r in runs["callback"]),
    }
    return {"settings": vars(args) | {"json": str(args.json)}, "runs": runs, "summary": summary}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=200, help="training steps per run")
    parser.add_argument("--save-steps", type=int, default=50, help="save a checkpoint every N steps")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each variant")
    parser.add_argument("--hidden", type=int, default=32, help="hidden size of the tiny Llama")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the tiny Llama")
    parser.add_argument("--json", type=Path, help="write the runs and the summary to this file")
    parser.add_argument("--quick", action="store_true", help="20 steps, a save every 10, one repetition")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.save_steps < 1 or args.max_steps < args.save_steps:
        parser.error("--repeats and --save-steps must be at least 1 and --max-steps at least --save-steps.")
    if args.quick:
        args.max_steps, args.save_steps, args.repeats = 20, 10, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="safemerge-callback-bench-") as scratch:
        output = benchmark(args, Path(scratch))
    summary = output["summary"]
    print(f"\ntrain() median: plain {summary['plain_median_s']:.2f} s, with SafeMergeCallback "
          f"{summary['callback_median_s']:.2f} s, ratio {summary['ratio']:.3f}")
    print(f"ratio from the time spent inside the callback only: {summary['attributed_ratio']:.3f}")
    print(f"checkpoint time: plain {summary['plain_save_per_checkpoint_s'] * 1000:.1f} ms, with SafeMERGE "
          f"{summary['callback_save_per_checkpoint_s'] * 1000:.1f} ms per checkpoint, "
          f"ratio {summary['checkpoint_time_ratio']:.2f}")
    print(f"callback time: {summary['on_save_per_checkpoint_s'] * 1000:.1f} ms per checkpoint "
          f"({summary['checkpoints']} checkpoints), {summary['on_train_end_s'] * 1000:.1f} ms at train end")
    if args.json:
        args.json.write_text(json.dumps(output, indent=2) + "\n")


if __name__ == "__main__":
    main()
