"""τ × merge-weight sweeps: score once, repair on a grid, evaluate every repaired adapter, draw the Pareto front.

Scores do not depend on τ or the weights, so a grid costs one scoring pass plus one cheap merge per point. The
evaluation (generation) dominates the run time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .adapters import load_adapter
from .config import SafeMergeConfig
from .adapters import LoraAdapter
from .repair import build_subspace, repair_adapter, score_modules


logger = logging.getLogger(__name__)

FINE_TUNED = "fine-tuned"


@dataclasses.dataclass
class SweepPoint:
    """One evaluated variant of the sweep.

    Attributes:
        name (`str`): variant name (`tau0_35-w0_8`, `fine-tuned` or `base`).
        threshold (`float | None`): τ, None for the fine-tuned adapter and the base model.
        task_weight (`float | None`): `w_task`; the safety weight is `1 − w_task`.
        selected (`int`): number of merged modules.
        harmful_rate (`float | None`): share of harmful responses on the harmful prompts, in [0, 1].
        utility (`float | None`): the utility metric (accuracy in [0, 1], higher is better; or answer NLL, lower is
            better, see `SweepResult.utility_metric`).
        on_front (`bool`): whether no other point is at least as good on both axes and better on one.
    """

    name: str
    threshold: float | None
    task_weight: float | None
    selected: int
    harmful_rate: float | None = None
    utility: float | None = None
    on_front: bool = False


@dataclasses.dataclass
class SweepResult:
    """All points of a sweep with the evaluation they came from."""

    points: list[SweepPoint]
    utility_metric: str
    evaluation: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {"utility_metric": self.utility_metric, "points": [dataclasses.asdict(p) for p in self.points],
                "evaluation": self.evaluation.to_dict() if self.evaluation is not None else None}


def write_grid_adapters(task: LoraAdapter, safety_adapter: Any, config: SafeMergeConfig, thresholds: Sequence[float],
                        task_weights: Sequence[float], output_dir: Path) -> tuple[dict[str, Path], list[SweepPoint]]:
    """Score the task adapter once and write one repaired adapter per (τ, w_task) into `output_dir/adapters/`."""
    for weight in task_weights:
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"Task weights must lie in [0, 1] (the safety weight is 1 − w), got {weight}.")
    subspace = build_subspace(config, task)
    scores = score_modules(task, subspace, config)

    adapters: dict[str, Path] = {}
    points = []
    for threshold in thresholds:
        for weight in task_weights:
            # PEFT adapter names cannot contain dots, so 0.35 is written 0_35.
            name = f"tau{threshold:g}-w{weight:g}".replace(".", "_")
            point_config = dataclasses.replace(config, threshold=threshold, weights=(weight, 1.0 - weight))
            result = repair_adapter(task, safety_adapter, config=point_config, subspace=subspace,
                                    module_results=scores, output_dir=output_dir / "adapters" / name,
                                    overwrite=True, progress=False)
            adapters[name] = output_dir / "adapters" / name
            points.append(SweepPoint(name, threshold, weight, len(result.selected_modules)))
    return adapters, points


def mark_pareto_front(points: Sequence[SweepPoint], higher_utility_is_better: bool) -> None:
    """Set `on_front` for the points no other point dominates (lower harm and better utility)."""
    scored = [p for p in points if p.harmful_rate is not None and p.utility is not None]
    for point in scored:
        point.on_front = not any(_dominates(other, point, higher_utility_is_better) for other in scored)


def _dominates(a: SweepPoint, b: SweepPoint, higher_is_better: bool) -> bool:
    utility_a, utility_b = (a.utility, b.utility) if higher_is_better else (-a.utility, -b.utility)
    no_worse = a.harmful_rate <= b.harmful_rate and utility_a >= utility_b
    better = a.harmful_rate < b.harmful_rate or utility_a > utility_b
    return no_worse and better


def run_sweep(task_adapter: Any, safety_adapter: Any, *, config: SafeMergeConfig, thresholds: Sequence[float],
              task_weights: Sequence[float], output_dir: str | Path, harmful_prompts: Sequence[str],
              task: str | None = None, task_records: Sequence[Mapping[str, Any]] | None = None,
              utility_metric: str = "answer_nll", **evaluate_kwargs: Any) -> SweepResult:
    """Repair on a τ × w_task grid, evaluate every adapter against the aligned model, and mark the Pareto front.

    Args:
        task_adapter / safety_adapter: directories or hub ids.
        config: base settings (models, method, rank policy); τ and weights come from the grid.
        thresholds: τ values. task_weights: `w_task` values in [0, 1]; `w_safety = 1 − w_task`.
        output_dir: receives `adapters/`, `sweep.json`, `sweep.md` and `pareto.png`.
        harmful_prompts: prompts judged for harm. task / task_records: the utility set (`gsm8k` or `pubmedqa`).
        utility_metric: `"answer_nll"` (lower is better; moves even when a small model's accuracy is at the floor)
            or `"accuracy"` (GSM8K flexible accuracy or PubMedQA accuracy).
        evaluate_kwargs: passed to `evaluation.evaluate_variants` (judge, limit, generation, xstest_records, ...).
    """
    from .evaluation.runner import evaluate_variants

    if utility_metric not in ("answer_nll", "accuracy"):
        raise ValueError(f"utility_metric must be 'answer_nll' or 'accuracy', got {utility_metric!r}.")
    output_dir = Path(output_dir)
    task_lora = load_adapter(task_adapter, role="task adapter", revision=config.revision,
                             allow_pickle=config.allow_pickle)
    if task_lora.directory is None:
        raise ValueError("run_sweep evaluates adapters from disk; pass the task adapter as a directory or hub id.")
    adapters, points = write_grid_adapters(task_lora, safety_adapter, config, thresholds, task_weights, output_dir)
    aligned = config.aligned_model or task_lora.config.get("base_model_name_or_path")
    variants = {FINE_TUNED: str(task_lora.directory), **{name: str(path) for name, path in adapters.items()}}
    evaluation = evaluate_variants(aligned, adapters=variants,
                                   harmful_prompts=harmful_prompts, task=task, task_records=task_records,
                                   compute_nll=utility_metric == "answer_nll", **evaluate_kwargs)

    points = [SweepPoint("base", None, None, 0), SweepPoint(FINE_TUNED, None, None, 0), *points]
    for point in points:
        variant = evaluation.variant(point.name)
        point.harmful_rate = (variant.harmful or {}).get("harmful_rate", {}).get("value")
        point.utility = _utility(variant.task, utility_metric)
    mark_pareto_front(points, higher_utility_is_better=utility_metric == "accuracy")
    result = SweepResult(points=points, utility_metric=utility_metric, evaluation=evaluation)
    _write_outputs(result, output_dir)
    return result


def _utility(task_scores: Mapping[str, Any] | None, metric: str) -> float | None:
    if not task_scores:
        return None
    if metric == "answer_nll":
        return task_scores.get("answer_nll")
    entry = task_scores.get("flexible_accuracy") or task_scores.get("accuracy") or {}
    return entry.get("value")


def format_sweep_table(result: SweepResult) -> str:
    """Return a Markdown table of the sweep, Pareto-optimal points marked with `*`."""
    lines = [f"| variant | τ | w_task | merged modules | harmful rate | {result.utility_metric} | front |",
             "|---|---|---|---|---|---|---|"]
    for p in result.points:
        harm = "n/a" if p.harmful_rate is None else f"{100 * p.harmful_rate:.1f}%"
        utility = "n/a" if p.utility is None else f"{p.utility:.4f}"
        lines.append(f"| {p.name} | {p.threshold if p.threshold is not None else '-'} | "
                     f"{p.task_weight if p.task_weight is not None else '-'} | {p.selected} | {harm} | {utility} | "
                     f"{'*' if p.on_front else ''} |")
    return "\n".join(lines)


def plot_pareto(result: SweepResult, path: str | Path) -> Path:
    """Draw harmful rate against utility for every point, the Pareto front as a line (PNG, needs matplotlib)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.0, 4.5))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot(1, 1, 1)
    scored = [p for p in result.points if p.harmful_rate is not None and p.utility is not None]
    for point in scored:
        marker = "s" if point.threshold is None else "o"
        axis.scatter(point.utility, 100 * point.harmful_rate, marker=marker,
                     color="tab:red" if point.on_front else "tab:gray")
        axis.annotate(point.name, (point.utility, 100 * point.harmful_rate), fontsize=6, alpha=0.8)
    front = sorted((p for p in scored if p.on_front), key=lambda p: p.utility)
    axis.plot([p.utility for p in front], [100 * p.harmful_rate for p in front], color="tab:red", linewidth=1)
    axis.set_xlabel(f"{result.utility_metric} ({'lower' if result.utility_metric == 'answer_nll' else 'higher'} is better)")
    axis.set_ylabel("harmful responses (%)")
    axis.set_title("SafeMERGE τ × weight sweep (red: Pareto front)")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def _write_outputs(result: SweepResult, output_dir: Path) -> None:
    (output_dir / "sweep.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (output_dir / "sweep.md").write_text(format_sweep_table(result) + "\n")
    plot_pareto(result, output_dir / "pareto.png")
