"""The demo pipeline: base → aligned → safety adapter → task fine-tune with `SafeMergeCallback` → SafeLoRA → eval.

Each stage is cached under the output directory by a hash of its inputs (see `stages.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .data import DemoData, Example, build_builtin_data, check_disjoint, load_data_dir
from .settings import DemoSettings
from .stages import StageOutput, run_stage


logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
TABLE_FILE = "results.txt"
SCORES_PLOT = "scores.png"
COMPARISON_PLOT = "comparison.png"
BENIGN_ANSWERS = "benign_answers.json"


@dataclass
class DemoRun:
    """Outputs of `run_demo`.

    Attributes:
        stages (`dict[str, StageOutput]`): finished stages by name, in pipeline order.
        table (`str`): the comparison table.
        summary (`dict`): the content of `results.json` (headline numbers, timings, peak RSS, settings).
        output_dir (`Path`): where the results and plots were written.
    """

    stages: dict[str, StageOutput] = field(default_factory=dict)
    table: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    output_dir: Path | None = None


def examples_hash(*splits: list[Example]) -> str:
    """Return the SHA-256 of the given splits (so a stage reruns only when its own data changes)."""
    text = json.dumps([[asdict(e) for e in split] for split in splits], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_demo_data(settings: DemoSettings, data_dir: str | Path | None) -> DemoData:
    """Return the built-in data set, or the real sets of `data_dir`, checked for held-out evaluation prompts."""
    data = (build_builtin_data(settings.sizes, settings.seed) if data_dir is None
            else load_data_dir(data_dir, settings.sizes, settings.seed))
    check_disjoint(data)
    return data


def run_demo(settings: DemoSettings, output_dir: str | Path, *, base_model: str | None = None,
             data_dir: str | Path | None = None, force: bool = False,
             announce: Callable[[str], None] = logger.info) -> DemoRun:
    """Run (or reuse) every stage and write `results.json`, `results.txt`, `scores.png` and `comparison.png`.

    Args:
        settings: sizes, training doses, SafeMERGE settings and generation lengths.
        output_dir: holds one directory per finished stage plus the results.
        base_model: `None`/`"auto"` (offline SmolLM2 GGUF when installed, else the hub id), a local model
            directory or a hub id.
        data_dir: folder with `advbench/`, `gsm8k/` and `xstest/`; `None` uses the built-in data set.
        force: rebuild every stage even when a finished one exists.
        announce: called with one line per stage start and end (the CLI prints them).

    Returns:
        `DemoRun`.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data = load_demo_data(settings, data_dir)
    run = DemoRun(output_dir=output_dir)
    stage = StageRunner(output_dir, run.stages, force=force, announce=announce)

    base, aligned, safety = model_stages(stage, settings, data, base_model)
    task = task_stage(stage, settings, data, base, aligned, safety)
    safelora = stage("safelora", {"task": task.key, **_pick(settings, "threshold")},
                     lambda out: _build_safelora(base.path, aligned.path, task.path, settings, out))
    evaluation = stage("eval", {"aligned": aligned.key, "task": task.key, "safelora": safelora.key,
                                "data": examples_hash(data.eval_harmful, data.eval_benign, data.task_eval),
                                **_pick(settings, "refusal_tokens", "task_tokens", "eval_batch")},
                       lambda out: _build_eval(aligned.path, task.path, safelora.path, data, settings, out))
    _write_results(run, evaluation.path, task.path, settings, data, base_model or "auto")
    return run


class StageRunner:
    """Run cached stages under one output directory, announce them and record them in `stages` (by name)."""

    def __init__(self, output_dir: Path, stages: dict[str, StageOutput], *, force: bool = False,
                 announce: Callable[[str], None] = logger.info) -> None:
        self.output_dir = output_dir
        self.stages = stages
        self.force = force
        self.announce = announce

    def __call__(self, name: str, inputs: dict[str, Any], build: Callable[[Path], None],
                 label: str | None = None) -> StageOutput:
        label = label or name
        self.announce(f"[{label}] starting")
        output = run_stage(self.output_dir, name, inputs, build, force=self.force)
        state = "cached" if output.cached else f"done in {output.seconds:.0f} s"
        self.announce(f"[{label}] {state}: {output.path}")
        self.stages[label] = output
        return output


def model_stages(stage: StageRunner, settings: DemoSettings, data: DemoData,
                 base_model: str | None) -> tuple[StageOutput, StageOutput, StageOutput]:
    """Run (or reuse) the base, aligned and safety-adapter stages; return their outputs."""
    from .organism import base_model_source

    kind, location = base_model_source(base_model)
    base = stage("base", {"kind": kind, "location": location, "fingerprint": _source_fingerprint(kind, location)},
                 lambda out: _build_base(kind, location, out))
    aligned = stage("aligned", {"base": base.key, "data": examples_hash(data.align_harmful, data.align_benign),
                                **_pick(settings, "seed", "max_length", "align_steps", "align_batch", "align_lr",
                                        "benign_answer_tokens", "eval_batch")},
                    lambda out: _build_aligned(base.path, data, settings, out))
    safety = safety_stage(stage, settings, aligned, data.safety)
    return base, aligned, safety


def safety_stage(stage: StageRunner, settings: DemoSettings, aligned: StageOutput, examples: list[Example],
                 label: str | None = None) -> StageOutput:
    """Run (or reuse) a LoRA safety adapter on the aligned model, trained on `examples` plus benign pairs."""
    return stage("safety", {"aligned": aligned.key, "data": examples_hash(examples),
                            **_pick(settings, "seed", "max_length", "safety_steps", "safety_batch", "safety_lr",
                                    "safety_benign_fraction", "lora_rank", "lora_alpha")},
                 lambda out: _build_safety(aligned.path, examples, settings, out), label=label)


def task_stage(stage: StageRunner, settings: DemoSettings, data: DemoData, base: StageOutput, aligned: StageOutput,
               safety: StageOutput, label: str | None = None) -> StageOutput:
    """Run (or reuse) the task fine-tune; `finetuned/` contains the adapter as trained, `safemerge/` the repaired one."""
    return stage("task", {"base": base.key, "aligned": aligned.key, "safety": safety.key,
                          "data": examples_hash(data.task_train),
                          **_pick(settings, "seed", "max_length", "task_steps", "task_batch", "task_lr", "save_steps",
                                  "lora_rank", "lora_alpha", "threshold", "weights")},
                 lambda out: _build_task(base.path, aligned.path, safety.path, data, settings, out), label=label)


def _pick(settings: DemoSettings, *names: str) -> dict[str, Any]:
    values = settings.to_dict()
    return {name: values[name] for name in names}


def _source_fingerprint(kind: str, location: str) -> str:
    """Identify a local base model by file names, sizes and modification times (cheap, and changes on rewrite)."""
    path = Path(location)
    if kind == "hub":
        return location
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    listing = [(str(p.relative_to(path.parent)), p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _build_base(kind: str, location: str, out: Path) -> None:
    from .organism import materialize_base

    materialize_base(kind, location, out)


def _build_aligned(base_dir: Path, data: DemoData, settings: DemoSettings, out: Path) -> None:
    """Full fine-tune of the base on refusals plus the base model's own answers to benign prompts."""
    from ..evaluation import GenerationSettings, generate_responses
    from .organism import freeze_embeddings, load_model, sft_config, train

    model, tokenizer = load_model(base_dir)
    prompts = [e.prompt for e in data.align_benign]
    answers = generate_responses(model.eval(), tokenizer, prompts, GenerationSettings(
        max_new_tokens=settings.benign_answer_tokens, batch_size=settings.eval_batch), desc="base: benign answers")
    benign = [Example(e.prompt, answer.strip(), e.category)
              for e, answer in zip(data.align_benign, answers, strict=True) if answer.strip()]
    (out / BENIGN_ANSWERS).write_text(json.dumps([asdict(e) for e in benign], indent=1, ensure_ascii=False))
    examples = list(data.align_harmful) + benign
    random.Random(settings.seed).shuffle(examples)
    trainable = freeze_embeddings(model.train())
    logger.info("Alignment: %d pairs, %d trainable parameters", len(examples), trainable)
    args = sft_config(out / "trainer", steps=settings.align_steps, batch_size=settings.align_batch,
                      learning_rate=settings.align_lr, max_length=settings.max_length, seed=settings.seed,
                      warmup_steps=max(1, settings.align_steps // 10))
    trainer = train(model, tokenizer, examples, args)
    trainer.model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _save_log(trainer, out / "train_log.json")
    shutil.rmtree(out / "trainer", ignore_errors=True)


def _build_safety(aligned_dir: Path, refusals: list[Example], settings: DemoSettings, out: Path) -> None:
    """LoRA safety adapter on the aligned model: refusals in new wordings plus a share of benign answers."""
    from .organism import load_model, lora_config, sft_config, train

    model, tokenizer = load_model(aligned_dir)
    benign = [Example(**row) for row in json.loads((aligned_dir / BENIGN_ANSWERS).read_text())]
    count = round(settings.safety_benign_fraction * len(refusals))
    examples = list(refusals) + random.Random(settings.seed).sample(benign, min(count, len(benign)))
    random.Random(settings.seed + 1).shuffle(examples)
    args = sft_config(out / "trainer", steps=settings.safety_steps, batch_size=settings.safety_batch,
                      learning_rate=settings.safety_lr, max_length=settings.max_length, seed=settings.seed)
    trainer = train(model, tokenizer, examples, args,
                    peft_config=lora_config(settings.lora_rank, settings.lora_alpha))
    trainer.model.save_pretrained(out / "adapter")
    _save_log(trainer, out / "train_log.json")
    shutil.rmtree(out / "trainer", ignore_errors=True)


def _build_task(base_dir: Path, aligned_dir: Path, safety_dir: Path, data: DemoData, settings: DemoSettings,
                out: Path) -> None:
    """LoRA task fine-tune with `SafeMergeCallback`: repaired copies at checkpoints, the final adapter repaired."""
    from transformers import TrainerCallback

    from ..callback import SafeMergeCallback
    from ..config import SafeMergeConfig
    from ..report import plot_scores
    from .evaluate import task_prompt
    from .organism import load_model, lora_config, sft_config, train

    class SaveRawAdapter(TrainerCallback):
        """Save the adapter as trained, before `SafeMergeCallback` repairs it in place at train end."""

        def on_train_end(self, args, state, control, model=None, **kwargs):
            model.save_pretrained(out / "finetuned")

    model, tokenizer = load_model(aligned_dir)
    config = SafeMergeConfig(base_model=str(base_dir), aligned_model=str(aligned_dir),
                             safety_adapter=str(safety_dir / "adapter"), threshold=settings.threshold,
                             weights=settings.weights, method="linear")
    safemerge = SafeMergeCallback(config)
    examples = [Example(task_prompt(e), e.response, e.category) for e in data.task_train]
    args = sft_config(out / "trainer", steps=settings.task_steps, batch_size=settings.task_batch,
                      learning_rate=settings.task_lr, max_length=settings.max_length, seed=settings.seed,
                      save_steps=settings.save_steps)
    trainer = train(model, tokenizer, examples, args, peft_config=lora_config(settings.lora_rank, settings.lora_alpha),
                    callbacks=[SaveRawAdapter(), safemerge])
    # The callback repaired the live adapter when training ended, so this saves the SafeMERGE adapter.
    trainer.model.save_pretrained(out / "safemerge")
    _save_log(trainer, out / "train_log.json")
    history = [{"step": step, "selected": result.selected_modules,
                "min_score": min(result.defined_scores, default=None)} for step, result in safemerge.results]
    (out / "safemerge_history.json").write_text(json.dumps(history, indent=1) + "\n")
    if safemerge.last_result is not None:
        (out / "safemerge_report.json").write_text(json.dumps(safemerge.last_result.to_dict(), indent=1) + "\n")
        plot_scores(safemerge.last_result, out / SCORES_PLOT)


def _build_safelora(base_dir: Path, aligned_dir: Path, task_dir: Path, settings: DemoSettings, out: Path) -> None:
    from ..repair import repair_adapter

    repair_adapter(task_dir / "finetuned", method="safelora", base_model=str(base_dir),
                   aligned_model=str(aligned_dir), threshold=settings.threshold, output_dir=out / "adapter")


def _build_eval(aligned_dir: Path, task_dir: Path, safelora_dir: Path, data: DemoData, settings: DemoSettings,
                out: Path) -> None:
    from .evaluate import evaluate_variants, format_comparison, plot_comparison

    adapters = {"finetuned": task_dir / "finetuned", "safemerge": task_dir / "safemerge",
                "safelora": safelora_dir / "adapter"}
    results = evaluate_variants(aligned_dir, adapters, data, settings)
    results.save_json(out / "evaluation.json")
    (out / TABLE_FILE).write_text(format_comparison(results) + "\n")
    plot_comparison(results, out / COMPARISON_PLOT)


def _save_log(trainer, path: Path) -> None:
    path.write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")


def _write_results(run: DemoRun, eval_dir: Path, task_dir: Path, settings: DemoSettings, data: DemoData,
                   base_model: str) -> None:
    """Copy the table and plots next to the stages and write `results.json` with timings and peak memory."""
    from ..evaluation.results import EvaluationResults
    from .evaluate import headline

    results = EvaluationResults.load_json(eval_dir / "evaluation.json")
    run.table = (eval_dir / TABLE_FILE).read_text().rstrip("\n")
    report = json.loads((task_dir / "safemerge_report.json").read_text()) if (
        task_dir / "safemerge_report.json").is_file() else {}
    run.summary = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base_model": base_model,
        "data_source": data.source,
        "settings": settings.to_dict(),
        "variants": {v.name: headline(v) for v in results.variants},
        "safemerge_selected": report.get("selected_modules", []),
        "safemerge_totals": report.get("totals", {}),
        "stages": {name: {"path": str(s.path), "cached": s.cached, "seconds": round(s.seconds, 1)}
                   for name, s in run.stages.items()},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    out = run.output_dir
    (out / RESULTS_FILE).write_text(json.dumps(run.summary, indent=2) + "\n")
    (out / TABLE_FILE).write_text(run.table + "\n")
    shutil.copyfile(eval_dir / COMPARISON_PLOT, out / COMPARISON_PLOT)
    if (task_dir / SCORES_PLOT).is_file():
        shutil.copyfile(task_dir / SCORES_PLOT, out / SCORES_PLOT)
