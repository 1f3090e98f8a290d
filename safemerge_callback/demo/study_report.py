"""Statistics, tables and figures of the efficacy study (`study.py`): harm removed, task gain kept, seed intervals."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


# Two-sided 95% Student t quantiles by degrees of freedom (the study runs a handful of seeds).
T_QUANTILE_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def harm_rate(scores: Mapping[str, Any]) -> float:
    """Return the share of harmful prompts whose response the keyword judge found no refusal in, in [0, 1]."""
    return _mean(scores["harmful"])


def over_refusal_rate(scores: Mapping[str, Any]) -> float:
    return _mean(scores["over_refused"])


def accuracy(scores: Mapping[str, Any]) -> float | None:
    return _mean(scores["correct"]) if scores["correct"] else None


def recovery(aligned: Mapping[str, Any], finetuned: Mapping[str, Any], variant: Mapping[str, Any]) -> tuple[float, float]:
    """Return `(removed, kept)`: the share of the fine-tuning harm increase a variant removes, and of the task gain
    it keeps.

    `removed = (h_ft − h_v) / (h_ft − h_aligned)` with `h` the harmful rate; `kept = (L_aligned − L_v) /
    (L_aligned − L_ft)` with `L` the mean answer NLL. Both are 1 for a perfect repair and can leave [0, 1]; a
    denominator of zero (fine-tuning changed nothing) gives NaN.
    """
    increase = harm_rate(finetuned) - harm_rate(aligned)
    gain = aligned["nll"] - finetuned["nll"]
    removed = (harm_rate(finetuned) - harm_rate(variant)) / increase if increase else math.nan
    kept = (aligned["nll"] - variant["nll"]) / gain if gain else math.nan
    return removed, kept


def _mean(values: Sequence[float | bool]) -> float:
    return sum(values) / len(values) if values else math.nan


def interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Return `(mean, low, high)`: the mean over seeds and its 95% Student t interval (±NaN for one seed)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = T_QUANTILE_95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half



REFERENCE_ROWS = (("aligned", "aligned model"), ("safety_standard", "safety adapter alone (standard)"),
                  ("safety_strong", "safety adapter alone (strong)"))


def seed_rows(result: Mapping[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Return variant → metric → one value per seed (rates in [0, 1], NLL in nats per token)."""
    aligned = result["reference"]["aligned"]
    rows: dict[str, dict[str, list[float]]] = {}
    for scores in result["seeds"].values():
        finetuned = scores["finetuned"]
        for name, variant in scores.items():
            removed, kept = recovery(aligned, finetuned, variant)
            values = {"harmful": harm_rate(variant), "over_refusal": over_refusal_rate(variant),
                      "nll": variant["nll"], "accuracy": accuracy(variant), "removed": removed, "kept": kept}
            row = rows.setdefault(name, {})
            for metric, value in values.items():
                row.setdefault(metric, []).append(value)
    return rows


def _cell(values: Sequence[float | None], percent: bool = True, digits: int = 1, rate: bool = False) -> str:
    """Format a mean and its t interval; a `rate` interval is clipped to [0, 100] (a share cannot leave it)."""
    if any(v is None or math.isnan(v) for v in values):
        return "n/a"
    scale = 100 if percent else 1
    mean, low, high = interval([scale * v for v in values])
    if math.isnan(low):
        return f"{mean:.{digits}f}"
    if rate:
        low, high = max(low, 0.0), min(high, 100.0)
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _pooled(result: Mapping[str, Any], name: str) -> str:
    """Format the harmful rate pooled over every seed's prompts, with its 95% Wilson interval."""
    from ..evaluation.scorers import rate

    flags = [flag for scores in result["seeds"].values() for flag in scores[name]["harmful"]]
    pooled = rate(sum(flags), len(flags))
    return f"{100 * pooled.value:.1f} [{100 * pooled.low:.1f}, {100 * pooled.high:.1f}]"


def variant_table(result: Mapping[str, Any]) -> str:
    """Return the Markdown table of the evaluation split: mean over seeds with a 95% t interval per cell."""
    rows = seed_rows(result)
    seeds = len(result["seeds"])
    lines = ["| variant | harmful % | harmful %, pooled | harm removed % | over-refusal % | answer NLL | "
             "task gain kept % | accuracy % |", "|---|---|---|---|---|---|---|---|"]
    reference = result["reference"]
    for name, label in REFERENCE_ROWS:
        scores = reference[name]
        acc = accuracy(scores)
        lines.append(f"| {label} | {100 * harm_rate(scores):.1f} | | | {100 * over_refusal_rate(scores):.1f} | "
                     f"{scores['nll']:.3f} | | {'n/a' if acc is None else f'{100 * acc:.1f}'} |")
    for name, row in rows.items():
        lines.append(f"| {name} | {_cell(row['harmful'], rate=True)} | {_pooled(result, name)} | "
                     f"{_cell(row['removed'])} | {_cell(row['over_refusal'], rate=True)} | "
                     f"{_cell(row['nll'], percent=False, digits=3)} | {_cell(row['kept'])} | "
                     f"{_cell(row['accuracy'], rate=True)} |")
    sizes = result["sizes"]
    lines.append("")
    lines.append(f"Mean over {seeds} task seeds, 95% Student t interval in brackets (the harmful, over-refusal and accuracy intervals "
                 "are clipped to [0, 100]; harm removed and gain kept can leave it). "
                 f"The pooled column counts all {seeds} × {sizes['eval_harmful']} responses, with a 95% Wilson "
                 "interval that shows the prompt sampling error alone. Rows without an interval do not depend on the "
                 f"task seed. Per seed and variant: {sizes['eval_harmful']} held-out AdvBench prompts, "
                 f"{sizes['eval_benign']} XSTest safe prompts, NLL of {sizes['eval_nll']} GSM8K test answers, "
                 f"accuracy on {sizes['eval_accuracy']} GSM8K test problems.")
    return "\n".join(lines)


def sweep_table(result: Mapping[str, Any]) -> str:
    """Return the Markdown table of the validation grid, the chosen point marked."""
    sweep = result["sweep"]
    choice = sweep["choice"]["name"]
    lines = ["| safety adapter | τ | (w_task, w_safety) | merged modules | harmful % | harm removed % | "
             "task gain kept % | chosen |", "|---|---|---|---|---|---|---|---|"]
    for point in sweep["points"]:
        lines.append(f"| {point['safety']} | {point['threshold']:g} | ({point['weights'][0]:g}, "
                     f"{point['weights'][1]:g}) | {point['selected']} | {100 * point['harmful_rate']:.1f} | "
                     f"{100 * point['removed']:.1f} | {100 * point['kept']:.1f} | "
                     f"{'yes' if point['name'] == choice else ''} |")
    scores = sweep["scores"]
    lines.append("")
    lines.append(f"Validation split, seed {result['settings']['seeds'][0]}: aligned harmful "
                 f"{100 * harm_rate(scores['aligned']):.1f}%, NLL {scores['aligned']['nll']:.3f}; fine-tuned harmful "
                 f"{100 * harm_rate(scores['finetuned']):.1f}%, NLL {scores['finetuned']['nll']:.3f}; "
                 f"{result['sizes']['validation_harmful']} harmful prompts, NLL of "
                 f"{result['sizes']['validation_nll']} answers.")
    return "\n".join(lines)


def plot_pareto_front(result: Mapping[str, Any], path: Path) -> Path:
    """Draw validation harm against answer NLL for every grid point, the Pareto front and the chosen point (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sweep = result["sweep"]
    figure = Figure(figsize=(6.5, 4.8))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot(1, 1, 1)
    points = sweep["points"]
    for safety, color in (("standard", "tab:blue"), ("strong", "tab:orange")):
        chosen = [p for p in points if p["safety"] == safety]
        axis.scatter([p["answer_nll"] for p in chosen], [100 * p["harmful_rate"] for p in chosen], color=color,
                     label=f"SafeMERGE linear, {safety} safety adapter", s=24)
        for p in chosen:
            axis.annotate(f"τ{p['threshold']:g} w{p['weights'][0]:g}/{p['weights'][1]:g}",
                          (p["answer_nll"], 100 * p["harmful_rate"]), fontsize=5, alpha=0.7)
    front = sorted((p for p in points if not any(_dominates(q, p) for q in points)), key=lambda p: p["answer_nll"])
    axis.plot([p["answer_nll"] for p in front], [100 * p["harmful_rate"] for p in front], color="tab:red",
              linewidth=1, label="Pareto front")
    for name, marker in (("aligned", "s"), ("finetuned", "D")):
        scores = sweep["scores"][name]
        axis.scatter([scores["nll"]], [100 * harm_rate(scores)], marker=marker, color="black", s=40)
        axis.annotate(name, (scores["nll"], 100 * harm_rate(scores)), fontsize=8, xytext=(4, 4),
                      textcoords="offset points")
    best = sweep["choice"]
    axis.scatter([best["answer_nll"]], [100 * best["harmful_rate"]], s=160, facecolors="none", edgecolors="tab:red")
    axis.set_xlabel("answer NLL on GSM8K validation answers (nats/token, lower is better)")
    axis.set_ylabel("harmful responses on validation prompts (%)")
    axis.set_title("τ × weight grid on the validation split (circled: chosen)", fontsize=10)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def _dominates(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    no_worse = a["harmful_rate"] <= b["harmful_rate"] and a["answer_nll"] <= b["answer_nll"]
    return no_worse and (a["harmful_rate"] < b["harmful_rate"] or a["answer_nll"] < b["answer_nll"])


def plot_layer_scores(result: Mapping[str, Any], path: Path) -> Path:
    """Draw the per-module scores ρ of the first seed's task adapter, τ and the chosen selection (PNG)."""
    from ..report import plot_scores
    from ..repair import repair_adapter
    from .study import merge_config

    choice = result["sweep"]["choice"]
    config = merge_config(result["models"], "linear", choice["threshold"], choice["weights"])
    repaired = repair_adapter(result["score_report"], result["safeties"][choice["safety"]], config=config,
                              progress=False)
    return plot_scores(repaired, path)


def write_report(result: Mapping[str, Any], output_dir: Path) -> list[Path]:
    """Write `study.md` (both tables), `pareto.png` and `layer_scores.png` into `output_dir`; return the paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = output_dir / "study.md"
    markdown.write_text("## Evaluation split\n\n" + variant_table(result) + "\n\n## Validation grid\n\n"
                        + sweep_table(result) + "\n")
    return [markdown, plot_pareto_front(result, output_dir / "pareto.png"),
            plot_layer_scores(result, output_dir / "layer_scores.png")]
