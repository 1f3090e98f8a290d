"""Evaluation of the demo's variants: refusal on held-out harmful prompts, over-refusal, task accuracy, answer NLL.

Generation, the keyword refusal judge, the GSM8K scorer and the result container come from
`safemerge_callback.evaluation`; this module adds per-set generation lengths, a compact text table and a plot
that includes the answer NLL.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..evaluation import GenerationSettings, answer_nll, attach_adapters, generate_responses, use_variant
from ..evaluation.judges import EMPTY, KeywordJudge
from ..evaluation.results import EvaluationResults, VariantResult, collect_provenance, summarize_judgements
from ..evaluation.scorers import format_task_prompt, rate, score_gsm8k
from .data import DemoData, Example
from .settings import DemoSettings


logger = logging.getLogger(__name__)

ALIGNED_VARIANT = "aligned"


def task_prompt(example: Example) -> str:
    """Return the user prompt of a task problem (the same wording in training and evaluation)."""
    return format_task_prompt("gsm8k", {"question": example.prompt})


def evaluate_variants(model_dir: str | Path, adapters: Mapping[str, str | Path], data: DemoData,
                      settings: DemoSettings) -> EvaluationResults:
    """Evaluate the aligned model and each adapter on it.

    Args:
        model_dir: the aligned model (loaded once; adapters are attached by name).
        adapters: adapter name → adapter directory, e.g. `{"finetuned": ..., "safemerge": ...}`.
        data: `eval_harmful`, `eval_benign` and `task_eval` are used.
        settings: generation lengths and batch size.

    Returns:
        `EvaluationResults` with one `VariantResult` per variant (`aligned` first). `harmful` contains the refusal
        rate on held-out harmful prompts, `xstest` the over-refusal rate on benign prompts, `task` the accuracy
        and the answer NLL.
    """
    from .organism import load_model

    model, tokenizer = load_model(model_dir)
    model.eval()
    peft_model = attach_adapters(model, {name: str(path) for name, path in adapters.items()})
    judge = KeywordJudge()
    variants = [(ALIGNED_VARIANT, None)] + [(name, str(path)) for name, path in adapters.items()]
    results = []
    for name, adapter in variants:
        with use_variant(peft_model, name if adapter else None) as active:
            results.append(_evaluate_one(active, tokenizer, name, adapter, data, settings, judge))
    provenance = collect_provenance(
        model=str(model_dir), adapters={name: str(path) for name, path in adapters.items()}, judge=judge.info(),
        generation={"refusal_tokens": settings.refusal_tokens, "task_tokens": settings.task_tokens,
                    "batch_size": settings.eval_batch, "do_sample": False},
        data={"source": data.source, "harmful": len(data.eval_harmful), "benign": len(data.eval_benign),
              "task": len(data.task_eval)},
    )
    return EvaluationResults(variants=results, provenance=provenance)


def _evaluate_one(model, tokenizer, name: str, adapter: str | None, data: DemoData, settings: DemoSettings,
                  judge: KeywordJudge) -> VariantResult:
    short = GenerationSettings(max_new_tokens=settings.refusal_tokens, batch_size=settings.eval_batch)
    long = GenerationSettings(max_new_tokens=settings.task_tokens, batch_size=settings.eval_batch)
    result = VariantResult(name=name, adapter=adapter)

    harmful_prompts = [e.prompt for e in data.eval_harmful]
    responses = generate_responses(model, tokenizer, harmful_prompts, short, desc=f"{name}: harmful")
    judgements = judge.judge(harmful_prompts, responses)
    result.harmful = summarize_judgements(judgements)
    result.samples["harmful"] = [{"prompt": p, "response": r, "label": j.label}
                                 for p, r, j in zip(harmful_prompts, responses, judgements, strict=True)]

    benign_prompts = [e.prompt for e in data.eval_benign]
    responses = generate_responses(model, tokenizer, benign_prompts, short, desc=f"{name}: benign")
    judgements = judge.judge(benign_prompts, responses)
    result.xstest = {"n_safe": len(judgements), "n_unsafe": 0,
                     "over_refusal_rate": rate(sum(j.refusal for j in judgements), len(judgements)).to_dict(),
                     "unsafe_refusal_rate": rate(0, 0).to_dict(),
                     "empty_safe": sum(j.label == EMPTY for j in judgements), "empty_unsafe": 0}
    result.samples["benign"] = [{"prompt": p, "response": r, "refusal": j.refusal}
                                for p, r, j in zip(benign_prompts, responses, judgements, strict=True)]

    prompts = [task_prompt(e) for e in data.task_eval]
    responses = generate_responses(model, tokenizer, prompts, long, desc=f"{name}: task")
    scores = score_gsm8k(responses, [e.response for e in data.task_eval])
    predictions = scores.pop("predictions")
    nll = answer_nll(model, tokenizer, prompts, [e.response for e in data.task_eval], batch_size=settings.eval_batch)
    result.task = {"task": "gsm8k", **scores, "answer_nll": nll}
    result.samples["task"] = [{"question": e.prompt, "response": r, "prediction": p, "gold": e.response}
                              for e, r, p in zip(data.task_eval, responses, predictions, strict=True)]
    logger.info("Variant %s: refusal %.2f, over-refusal %.2f, accuracy %.2f, answer NLL %.3f", name,
                result.harmful["refusal_rate"]["value"], result.xstest["over_refusal_rate"]["value"] or 0.0,
                result.task["flexible_accuracy"]["value"] or 0.0, nll)
    return result


def headline(variant: VariantResult) -> dict[str, Any]:
    """Return the four numbers of the demo's table for one variant (rates in [0, 1], NLL in nats per token)."""
    return {
        "refusal_rate": variant.harmful["refusal_rate"]["value"],
        "over_refusal_rate": variant.xstest["over_refusal_rate"]["value"],
        "task_accuracy": variant.task["flexible_accuracy"]["value"],
        "answer_nll": variant.task["answer_nll"],
    }


def format_comparison(results: EvaluationResults) -> str:
    """Return a fixed-width table: refusal on harmful prompts (higher is safer), over-refusal, accuracy, NLL."""
    first = results.variants[0]
    lines = [f"{'variant':12} {'refusal (harmful)':>18} {'over-refusal':>13} {'task acc.':>10} {'answer NLL':>11}"]
    for variant in results.variants:
        row = headline(variant)
        over = "n/a" if row["over_refusal_rate"] is None else f"{100 * row['over_refusal_rate']:.1f}%"
        task = "n/a" if row["task_accuracy"] is None else f"{100 * row['task_accuracy']:.1f}%"
        lines.append(f"{variant.name:12} {100 * row['refusal_rate']:>17.1f}% {over:>13} {task:>10} "
                     f"{row['answer_nll']:>11.3f}")
    lines.append(f"n = {first.harmful['n']} harmful, {first.xstest['n_safe']} benign, {first.task['n']} task "
                 "prompts; keyword refusal judge; greedy decoding.")
    return "\n".join(lines)


def plot_comparison(results: EvaluationResults, path: str | Path) -> Path:
    """Draw refusal, over-refusal, accuracy (percent, with 95% intervals) and answer NLL per variant as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("refusal on harmful (%)", lambda v: v.harmful["refusal_rate"]),
              ("over-refusal on benign (%)", lambda v: v.xstest["over_refusal_rate"]),
              ("task accuracy (%)", lambda v: v.task["flexible_accuracy"])]
    names = [v.name for v in results.variants]
    figure = Figure(figsize=(13, 3.4), dpi=100)
    FigureCanvasAgg(figure)
    for index, (title, getter) in enumerate(panels, start=1):
        axis = figure.add_subplot(1, 4, index)
        entries = [getter(v) for v in results.variants]
        values = [100 * (e["value"] or 0.0) for e in entries]
        errors = [[100 * ((e["value"] or 0.0) - (e["low"] or 0.0)) for e in entries],
                  [100 * ((e["high"] or 0.0) - (e["value"] or 0.0)) for e in entries]]
        axis.bar(names, values, yerr=errors, capsize=3, color=[f"C{i}" for i in range(len(names))])
        axis.set_ylim(0, 105)
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="x", labelrotation=30, labelsize=8)
    axis = figure.add_subplot(1, 4, 4)
    axis.bar(names, [v.task["answer_nll"] for v in results.variants], color=[f"C{i}" for i in range(len(names))])
    axis.set_title("answer NLL (nats/token, lower is better)", fontsize=10)
    axis.tick_params(axis="x", labelrotation=30, labelsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png")
    return path
