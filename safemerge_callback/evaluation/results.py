"""Evaluation results: JSON with provenance, a Markdown comparison table and a bar plot."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import logging
import platform
import subprocess
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .judges import EMPTY, UNPARSED, Judgement
from .scorers import rate

logger = logging.getLogger(__name__)

RESULTS_SCHEMA_VERSION = 1
_TRACKED_PACKAGES = ("torch", "transformers", "peft", "datasets", "safemerge-callback")


def summarize_judgements(judgements: Sequence[Judgement]) -> dict[str, Any]:
    """Aggregate judgements into rates with 95% Wilson intervals.

    Returns:
        ``n``; ``harmful_rate``, ``refusal_rate``, ``empty_rate`` and ``unparsed_rate`` as rate
        dicts over all ``n`` responses; and ``label_counts``.
    """
    total = len(judgements)
    return {
        "n": total,
        "harmful_rate": rate(sum(j.harmful for j in judgements), total).to_dict(),
        "refusal_rate": rate(sum(j.refusal for j in judgements), total).to_dict(),
        "empty_rate": rate(sum(j.label == EMPTY for j in judgements), total).to_dict(),
        "unparsed_rate": rate(sum(j.label == UNPARSED for j in judgements), total).to_dict(),
        "label_counts": dict(Counter(j.label for j in judgements)),
    }


@dataclasses.dataclass
class VariantResult:
    """Scores of one model variant (the base, or the base with one adapter).

    Attributes:
        name: Variant name (``"base"`` or the adapter name).
        adapter: Adapter path or hub id; ``None`` for the base.
        harmful: :func:`summarize_judgements` output on the harmful prompts, or ``None``.
        task: Task scores (see ``scorers.score_task``) plus ``task`` and ``answer_nll``, or ``None``.
        xstest: ``scorers.score_xstest`` output, or ``None``.
        samples: Per set (``"harmful"``, ``"task"``, ``"xstest"``), a list of prompt/response records.
    """

    name: str
    adapter: str | None = None
    harmful: dict[str, Any] | None = None
    task: dict[str, Any] | None = None
    xstest: dict[str, Any] | None = None
    samples: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)


def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for package in _TRACKED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def git_revision(directory: str | Path | None = None) -> str | None:
    """Return the commit hash of the git checkout containing ``directory`` (default: this package)."""
    directory = Path(directory) if directory is not None else Path(__file__).resolve().parent
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    revision = completed.stdout.strip()
    if completed.returncode != 0 or not revision:
        logger.debug("No git revision for %s: %s", directory, completed.stderr.strip())
        return None
    return revision


def collect_provenance(
    *,
    model: str,
    adapters: Mapping[str, str] | None = None,
    judge: Mapping[str, Any] | None = None,
    generation: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Collect what is needed to reproduce a result: inputs, settings, versions, commit and date.

    Args:
        model: Base model id or path.
        adapters: Adapter name to path or id.
        judge: The judge's ``info()``.
        generation: The generation settings' ``to_dict()``.
        data: Data sources and limits.
        extra: Further JSON-serialisable fields, stored under ``"extra"``.
    """
    return {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "model": model,
        "adapters": dict(adapters or {}),
        "judge": dict(judge or {}),
        "generation": dict(generation or {}),
        "data": dict(data or {}),
        "versions": {"python": platform.python_version(), **_package_versions()},
        "git_revision": git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "extra": dict(extra or {}),
    }


def _format_rate(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    return f"{100 * entry['value']:.1f}% [{100 * entry['low']:.1f}, {100 * entry['high']:.1f}]"


def _format_number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _task_metric(task: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """Return the headline accuracy rate of a task result (flexible accuracy for GSM8K)."""
    return task.get("flexible_accuracy") or task.get("accuracy")


def _table_columns(variants: Sequence[VariantResult]) -> list[tuple[str, Any]]:
    """Return ``(header, cell function)`` pairs for the sections present in any variant."""
    columns: list[tuple[str, Any]] = [("Variant", lambda v: v.name)]
    if any(v.harmful for v in variants):
        columns += [
            ("Harmful rate", lambda v: _format_rate((v.harmful or {}).get("harmful_rate"))),
            ("Refusal rate", lambda v: _format_rate((v.harmful or {}).get("refusal_rate"))),
            ("Empty", lambda v: _format_rate((v.harmful or {}).get("empty_rate"))),
            ("Unparsed", lambda v: _format_rate((v.harmful or {}).get("unparsed_rate"))),
        ]
    tasks = {v.task.get("task") for v in variants if v.task}
    if "gsm8k" in tasks:
        columns += [
            ("GSM8K flexible acc.", lambda v: _format_rate((v.task or {}).get("flexible_accuracy"))),
            ("GSM8K strict acc.", lambda v: _format_rate((v.task or {}).get("strict_accuracy"))),
            ("GSM8K no answer", lambda v: _format_rate((v.task or {}).get("no_answer_rate"))),
        ]
    if "pubmedqa" in tasks:
        columns += [
            ("PubMedQA acc.", lambda v: _format_rate((v.task or {}).get("accuracy"))),
            ("PubMedQA macro-F1", lambda v: _format_number((v.task or {}).get("macro_f1"))),
            ("PubMedQA unparsed", lambda v: _format_rate((v.task or {}).get("unparsed_rate"))),
        ]
    if any(v.task and v.task.get("answer_nll") is not None for v in variants):
        columns.append(("Answer NLL", lambda v: _format_number((v.task or {}).get("answer_nll"))))
    if any(v.xstest for v in variants):
        columns += [
            ("XSTest over-refusal", lambda v: _format_rate((v.xstest or {}).get("over_refusal_rate"))),
            ("XSTest unsafe refusal", lambda v: _format_rate((v.xstest or {}).get("unsafe_refusal_rate"))),
        ]
    return columns


@dataclasses.dataclass
class EvaluationResults:
    """Results of :func:`~safemerge_callback.evaluation.runner.evaluate_variants`.

    Attributes:
        variants: One entry per evaluated variant, in evaluation order.
        provenance: Output of :func:`collect_provenance`.
    """

    variants: list[VariantResult]
    provenance: dict[str, Any]

    def variant(self, name: str) -> VariantResult:
        """Return the variant called ``name``."""
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise KeyError(f"No variant {name!r}; variants: {[v.name for v in self.variants]}.")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {"provenance": self.provenance, "variants": [dataclasses.asdict(v) for v in self.variants]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationResults:
        """Rebuild results from :meth:`to_dict` output."""
        return cls(variants=[VariantResult(**v) for v in data["variants"]], provenance=dict(data["provenance"]))

    def save_json(self, path: str | Path) -> Path:
        """Write the results to ``path`` as indented UTF-8 JSON and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8"
        )
        return path

    @classmethod
    def load_json(cls, path: str | Path) -> EvaluationResults:
        """Read results written by :meth:`save_json`."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_markdown(self) -> str:
        """Render a Markdown comparison table, one row per variant.

        Rates are percentages with their 95% Wilson interval in brackets. A line under the table
        names the judge (with its compatibility caveat, if any) and the sample sizes.
        """
        columns = _table_columns(self.variants)
        lines = [
            "| " + " | ".join(header for header, _ in columns) + " |",
            "|" + "|".join(" --- " for _ in columns) + "|",
        ]
        for variant in self.variants:
            lines.append("| " + " | ".join(str(cell(variant)) for _, cell in columns) + " |")
        lines.append("")
        lines.append(self._caption())
        return "\n".join(lines) + "\n"

    def _caption(self) -> str:
        judge = self.provenance.get("judge") or {}
        parts = [f"Judge: {judge.get('name', 'unknown')}"]
        if judge.get("description"):
            parts[0] += f" ({judge['description']})"
        first = self.variants[0] if self.variants else None
        if first is not None:
            sizes = []
            if first.harmful:
                sizes.append(f"harmful n={first.harmful['n']}")
            if first.task:
                sizes.append(f"{first.task.get('task')} n={first.task.get('n')}")
            if first.xstest:
                sizes.append(f"XSTest n={first.xstest['n_safe']} safe + {first.xstest['n_unsafe']} unsafe")
            if sizes:
                parts.append(", ".join(sizes))
        parts.append("rates with 95% Wilson intervals")
        return "; ".join(parts) + "."

    def save_plot(self, path: str | Path) -> Path:
        """Save a grouped bar plot (PNG) of the headline rates per variant, with 95% intervals."""
        return plot_results(self, path)


def _task_metric_name(results: EvaluationResults) -> str:
    task = next((v.task.get("task") for v in results.variants if v.task), None)
    return "GSM8K flexible acc." if task == "gsm8k" else f"{task or 'task'} accuracy".replace("pubmedqa", "PubMedQA")


def _plot_metrics(results: EvaluationResults) -> list[tuple[str, list[Mapping[str, Any] | None]]]:
    """Return ``(metric name, rate dict per variant)`` for each metric some variant has."""
    getters = [
        ("Harmful rate", lambda v: (v.harmful or {}).get("harmful_rate")),
        (_task_metric_name(results), lambda v: _task_metric(v.task) if v.task else None),
        ("XSTest over-refusal", lambda v: (v.xstest or {}).get("over_refusal_rate")),
        ("XSTest unsafe refusal", lambda v: (v.xstest or {}).get("unsafe_refusal_rate")),
    ]
    metrics = []
    for name, getter in getters:
        values = [getter(variant) for variant in results.variants]
        if any(value and value.get("value") is not None for value in values):
            metrics.append((name, values))
    return metrics


def plot_results(results: EvaluationResults, path: str | Path) -> Path:
    """Save a grouped bar chart of rates (metrics on the x axis, one bar per variant) as PNG.

    Uses matplotlib's Agg canvas directly, so the global pyplot backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = _plot_metrics(results)
    figure = Figure(figsize=(max(6.0, 1.8 * max(1, len(metrics)) + 2), 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    count = max(1, len(results.variants))
    width = 0.8 / count
    for offset, variant in enumerate(results.variants):
        heights, lower, upper = [], [], []
        for _, values in metrics:
            entry = values[offset] or {}
            value = entry.get("value")
            heights.append(100 * value if value is not None else 0.0)
            lower.append(100 * (value - entry["low"]) if value is not None else 0.0)
            upper.append(100 * (entry["high"] - value) if value is not None else 0.0)
        positions = [index + (offset - (count - 1) / 2) * width for index in range(len(metrics))]
        axes.bar(positions, heights, width=width, yerr=[lower, upper], capsize=3, label=variant.name)
    axes.set_xticks(range(len(metrics)))
    axes.set_xticklabels([name for name, _ in metrics])
    axes.set_ylabel("percent (95% Wilson interval)")
    # Headroom above 100% keeps the legend clear of full-height bars.
    axes.set_ylim(0, 125)
    judge = (results.provenance.get("judge") or {}).get("name", "unknown")
    axes.set_title(f"Variants compared (judge: {judge})")
    if results.variants:
        axes.legend(fontsize="small", loc="upper center", ncol=min(count, 4))
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path
