"""`repair_adapter()`: score every LoRA module of a task adapter, select the drifted ones, merge them, verify.

The callback and the CLI are thin shells over this module.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import merging, scoring
from .adapters import LoraAdapter, LoraModule, load_adapter, save_adapter
from .config import SafeMergeConfig
from .files import atomic_directory, check_not_inside
from .subspace import AlignmentSubspace


logger = logging.getLogger(__name__)

REPORT_FILE = "safemerge_report.json"
CONFIG_FILE = "safemerge_config.json"
MISSING_IN_SAFETY = "missing_in_safety_adapter"


@dataclass
class ModuleResult:
    """Scores, decision and merge outcome of one module.

    Attributes:
        name (`str`): module name, e.g. `model.layers.3.self_attn.v_proj`.
        score (`float | None`): ρ of the task update, None when undefined (see `undefined_reason`).
        undefined_reason (`str | None`): `"zero_update"` (ΔW = 0) or `"no_alignment_signal"` (V = 0).
        threshold (`float`): τ used for this module.
        selected (`bool`): whether the module was merged.
        method (`str | None`): merge method applied, None when unchanged.
        rank_before / rank_after (`int`): LoRA rank of the module before and after.
        realisation_error (`float`): relative Frobenius error of the stored factors against the method's definition.
        task_norm (`float`): `‖ΔW_task‖_F` (scaling included). safety_norm (`float | None`): `‖ΔW_safety‖_F`.
        merged_norm (`float`): `‖ΔW'‖_F` of the stored result.
        delta_norm (`float`): `‖V‖_F`.
        note (`str | None`): e.g. `"missing_in_safety_adapter"` when that policy left the module unmerged.
    """

    name: str
    score: float | None
    undefined_reason: str | None
    threshold: float
    selected: bool = False
    method: str | None = None
    rank_before: int = 0
    rank_after: int = 0
    realisation_error: float = 0.0
    task_norm: float = 0.0
    safety_norm: float | None = None
    merged_norm: float = 0.0
    delta_norm: float = 0.0
    note: str | None = None


@dataclass
class RepairResult:
    """The outcome of `repair_adapter` / `score_adapter`.

    Attributes:
        modules (`list[ModuleResult]`): one entry per LoRA module, in adapter order.
        adapter (`LoraAdapter`): the repaired adapter (the task adapter itself for a dry run).
        config (`SafeMergeConfig`): the exact config used.
        rank_policy (`str`): the policy that ran, `"exact"` or `"keep"`.
        carried_tensors (`list[str]`): saved keys carried over unchanged (e.g. `modules_to_save` copies).
        output_dir (`Path | None`): where the adapter was written.
        dry_run (`bool`): True for `score_adapter`.
    """

    modules: list[ModuleResult]
    adapter: LoraAdapter
    config: SafeMergeConfig
    rank_policy: str
    carried_tensors: list[str] = field(default_factory=list)
    output_dir: Path | None = None
    dry_run: bool = False

    @property
    def selected_modules(self) -> list[str]:
        return [m.name for m in self.modules if m.selected]

    @property
    def defined_scores(self) -> list[float]:
        return [m.score for m in self.modules if m.score is not None]

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-serialisable builtins (the content of `safemerge_report.json`)."""
        from .report import result_to_dict

        return result_to_dict(self)


def repair_adapter(
    task_adapter: Any,
    safety_adapter: Any = None,
    *,
    config: SafeMergeConfig | None = None,
    subspace: AlignmentSubspace | None = None,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    module_results: list[ModuleResult] | None = None,
    **config_overrides: Any,
) -> RepairResult:
    """Repair a LoRA task adapter with SafeMERGE and optionally write it as a stock-loadable adapter directory.

    Args:
        task_adapter: directory, hub id, `PeftModel` or `LoraAdapter` of the fine-tuned task adapter.
        safety_adapter: the safety adapter (same forms); defaults to `config.safety_adapter`. Not used by `safelora`.
        config: settings; `config_overrides` (any `SafeMergeConfig` field) are applied on top.
        subspace: a prepared `AlignmentSubspace`; built from `config.base_model` / `config.aligned_model` otherwise
            (the aligned model defaults to the task adapter's `base_model_name_or_path`).
        output_dir: write `adapter_model.safetensors`, `adapter_config.json`, `safemerge_report.json` and
            `safemerge_config.json` there, atomically.
        overwrite: replace an existing `output_dir`.
        progress: show a progress bar over modules.
        module_results: scores computed beforehand by `score_modules` (for example shared out across ranks); the
            repair then reads alignment deltas only where a method needs them (`safelora`).

    Returns:
        `RepairResult`. Inputs are never modified; unselected modules are bit-identical to the task adapter.
    """
    config = _resolve_config(config, config_overrides, safety_adapter)
    task, safety = _load_inputs(task_adapter, config, safety_adapter)
    policy = "exact" if config.rank_policy == "auto" else config.rank_policy
    _check_safety_covers(task, safety, config)
    subspace = subspace or build_subspace(config, task)
    if output_dir is not None:
        check_not_inside(Path(output_dir), [task.directory, safety.directory if safety else None,
                                            subspace.base.directory, subspace.aligned.directory])
        if Path(output_dir).exists() and not overwrite:
            raise FileExistsError(f"Output directory {str(output_dir)!r} already exists; pass overwrite=True "
                                  "(CLI: --overwrite) to replace it, or choose another directory.")

    # score → select
    if module_results is None:
        modules = score_modules(task, subspace, config, progress=progress)
    else:
        modules = _checked_results(module_results, task, config)
    _select(modules, config)
    _apply_missing_safety_policy(modules, task, safety, config)

    # merge → verify
    repaired = _merge_selected(task, safety, subspace, modules, config, policy, progress)
    result = RepairResult(modules=modules, adapter=repaired, config=config, rank_policy=policy,
                          carried_tensors=sorted(task.other_tensors))
    logger.info("SafeMERGE selected %d of %d modules (method %s, rank policy %s).",
                len(result.selected_modules), len(modules), config.method, policy)

    if output_dir is not None:
        write_result(result, output_dir, overwrite=overwrite)
    return result


def score_adapter(task_adapter: Any, *, config: SafeMergeConfig | None = None,
                  subspace: AlignmentSubspace | None = None, progress: bool = True,
                  **config_overrides: Any) -> RepairResult:
    """Score every module and report which ones a repair would select, without merging anything (dry run)."""
    config = _resolve_config(config, config_overrides, None)
    task = load_adapter(task_adapter, role="task adapter", adapter_name=config.adapter_name,
                        revision=config.revision, allow_pickle=config.allow_pickle)
    _check_finite(task, "task adapter")
    subspace = subspace or build_subspace(config, task)
    modules = score_modules(task, subspace, config, progress=progress)
    _select(modules, config)
    return RepairResult(modules=modules, adapter=task, config=config, rank_policy="none",
                        carried_tensors=sorted(task.other_tensors), dry_run=True)


def write_result(result: RepairResult, output_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the repaired adapter, `safemerge_report.json` and `safemerge_config.json` into `output_dir` atomically."""
    output_dir = Path(output_dir)
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        save_adapter(result.adapter, staging)
        result.output_dir = output_dir
        (staging / REPORT_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        (staging / CONFIG_FILE).write_text(json.dumps(result.config.to_dict(), indent=2) + "\n")
    return output_dir


def _resolve_config(config, overrides, safety_adapter) -> SafeMergeConfig:
    if config is None:
        config = SafeMergeConfig(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    if safety_adapter is not None and isinstance(safety_adapter, (str, Path)):
        config = dataclasses.replace(config, safety_adapter=str(safety_adapter))
    return config


def _load_inputs(task_adapter, config, safety_adapter=None) -> tuple[LoraAdapter, LoraAdapter | None]:
    task = load_adapter(task_adapter, role="task adapter", adapter_name=config.adapter_name,
                        revision=config.revision, allow_pickle=config.allow_pickle)
    _check_finite(task, "task adapter")
    if not config.needs_safety_adapter:
        return task, None
    # An in-memory safety adapter (PeftModel, LoraAdapter) is not recorded in the config: use the object given.
    safety_adapter = config.safety_adapter if safety_adapter is None else safety_adapter
    if safety_adapter is None:
        raise ValueError(f"method {config.method!r} merges with a safety adapter, but none was given. Pass "
                         "`safety_adapter` (a LoRA trained on the aligned model with refusal data), or use "
                         "method 'safelora', which needs none.")
    safety = load_adapter(safety_adapter, role="safety adapter", revision=config.revision,
                          allow_pickle=config.allow_pickle)
    _check_finite(safety, "safety adapter")
    check_compatible(task, safety)
    return task, safety


def _check_finite(adapter: LoraAdapter, role: str) -> None:
    bad = [name for name, m in adapter.modules.items()
           if not (torch.isfinite(m.lora_a).all() and torch.isfinite(m.lora_b).all())]
    if bad:
        raise ValueError(f"The {role} {adapter.source!r} has NaN or Inf in {len(bad)} module(s): {bad[:10]}. "
                         "Training diverged or the file is corrupt; use an earlier checkpoint.")


def check_compatible(task: LoraAdapter, safety: LoraAdapter) -> None:
    mismatched = [f"{name}: task (out, in) = {m.shape}, safety {safety.modules[name].shape}"
                  for name, m in task.modules.items()
                  if name in safety.modules and safety.modules[name].shape != m.shape]
    if mismatched:
        raise ValueError("The task and safety adapters disagree on module shapes, so they were trained on different "
                         "models:\n  " + "\n  ".join(mismatched[:20]) + "\nTrain the safety adapter on the aligned "
                         "model the task adapter was trained on.")
    task_base = task.config.get("base_model_name_or_path")
    safety_base = safety.config.get("base_model_name_or_path")
    if task_base and safety_base and task_base != safety_base:
        warnings.warn(f"The task adapter was trained on {task_base!r} and the safety adapter on {safety_base!r}. "
                      "Shapes match, so the merge goes ahead; make sure both are the same aligned model.",
                      stacklevel=4)


def build_subspace(config: SafeMergeConfig, task: LoraAdapter) -> AlignmentSubspace:
    """Open the alignment subspace of `config`; the aligned model defaults to the adapter's base model."""
    aligned = config.aligned_model or task.config.get("base_model_name_or_path")
    if config.base_model is None or aligned is None:
        raise ValueError("Scoring needs the base model (before alignment) and the aligned model: set `base_model` "
                         f"and `aligned_model` (aligned defaults to the adapter's base_model_name_or_path, {aligned!r}).")
    from .known_models import resolve_base_model

    base = resolve_base_model(config.base_model, aligned)
    return AlignmentSubspace(base, aligned, revision=config.revision, allow_pickle=config.allow_pickle)


def score_modules(task: LoraAdapter, subspace: AlignmentSubspace, config: SafeMergeConfig, *,
                  names: list[str] | None = None, progress: bool = True) -> list[ModuleResult]:
    """Score the modules `names` (default: all, in adapter order) of a task adapter; nothing is selected yet."""
    names = list(task.modules) if names is None else names
    subspace.check_modules({name: task.modules[name].shape for name in names}, task.fan_in_fan_out)
    results = []
    for name in tqdm(names, desc="SafeMERGE scoring", unit="module", disable=not progress):
        module = task.modules[name]
        projected, delta_norm = subspace.projection(name, module.shape, module.lora_b, task.fan_in_fan_out)
        terms = scoring.score_from_projection(projected, delta_norm, module.lora_a, module.lora_b)
        threshold, _, _ = config.settings_for(name)
        results.append(ModuleResult(
            name=name, score=terms.score, undefined_reason=terms.undefined_reason, threshold=threshold,
            rank_before=module.rank, rank_after=module.rank, task_norm=abs(module.scaling) * terms.update_norm,
            merged_norm=abs(module.scaling) * terms.update_norm, delta_norm=terms.delta_norm,
        ))
    no_signal = [r.name for r in results if r.undefined_reason == scoring.NO_ALIGNMENT_SIGNAL]
    if no_signal:
        warnings.warn(f"{len(no_signal)} module(s) have identical base and aligned weights (V = 0), so they carry no "
                      f"alignment signal and are left as they are: {no_signal[:10]}.", stacklevel=3)
    return results


def _checked_results(module_results: list[ModuleResult], task: LoraAdapter, config: SafeMergeConfig) -> list[ModuleResult]:
    """Copy precomputed scores, with τ taken from `config` (scores do not depend on it) and nothing selected yet."""
    by_name = {result.name: dataclasses.replace(
        result, selected=False, threshold=config.settings_for(result.name)[0], method=None, note=None,
        rank_after=result.rank_before, realisation_error=0.0, safety_norm=None, merged_norm=result.task_norm,
    ) for result in module_results}
    if set(by_name) != set(task.modules):
        raise ValueError(f"`module_results` cover {len(by_name)} modules but the task adapter has {len(task.modules)}; "
                         f"missing {sorted(set(task.modules) - set(by_name))[:10]}. Score every module first.")
    return [by_name[name] for name in task.modules]


def _select(modules: list[ModuleResult], config: SafeMergeConfig) -> None:
    skipped = {m.name for m in modules if config.settings_for(m.name)[2]}
    scores = {m.name: m.score for m in modules if m.name not in skipped}
    if config.selection == "lowest_k":
        chosen = scoring.select_lowest(scores, config.num_selected)
    else:
        chosen = scoring.select_below_threshold(scores, {m.name: m.threshold for m in modules})
    for module in modules:
        module.selected = module.name in chosen


def _check_safety_covers(task: LoraAdapter, safety: LoraAdapter | None, config: SafeMergeConfig) -> None:
    """Raise before any scoring when the safety adapter lacks task modules and the policy is `"error"`."""
    if safety is None or config.missing_safety_module != "error":
        return
    missing = [name for name in task.modules if name not in safety.modules]
    if missing:
        raise ValueError(
            f"The safety adapter {safety.source!r} lacks {len(missing)} module(s) of the task adapter: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}. Train the safety adapter with the same target_modules, or set "
            "`missing_safety_module='keep_task'` to leave those modules unmerged (they are listed in the report)."
        )


def _apply_missing_safety_policy(modules, task, safety, config) -> None:
    """Unselect and mark the modules the safety adapter lacks (`keep_task`; `error` was raised before scoring)."""
    if safety is None:
        return
    missing = [m.name for m in modules if m.name not in safety.modules]
    if not missing:
        return
    selected_missing = [m for m in modules if m.selected and m.name in missing]
    for module in modules:
        if module.name in missing:
            module.note = MISSING_IN_SAFETY
    for module in selected_missing:
        module.selected = False
    if selected_missing:
        logger.warning("Left %d selected module(s) unmerged because the safety adapter lacks them: %s",
                       len(selected_missing), [m.name for m in selected_missing][:10])


def _merge_selected(task, safety, subspace, modules, config, policy, progress=True) -> LoraAdapter:
    new_modules = dict(task.modules)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    selected = [m for m in modules if m.selected]
    for result in tqdm(selected, desc=f"SafeMERGE {config.method}", unit="module", disable=not (progress and selected)):
        module = task.modules[result.name]
        safety_module = safety.modules[result.name] if safety is not None else None
        try:
            merged = _merge_module(module, safety_module, subspace, task, config, policy)
            stored = _store_module(module, merged, task, policy, rank_pattern, alpha_pattern)
        except Exception as error:  # numerical failures (SVD, out of memory) do not say which module failed
            error.add_note(f"SafeMERGE failed while merging module {result.name!r}; nothing was written and the "
                           "inputs are unchanged.")
            raise
        _verify_module(result.name, stored)
        new_modules[result.name] = stored
        result.method = config.method
        result.rank_after = stored.rank
        result.realisation_error = merged.realisation_error
        result.merged_norm = abs(stored.scaling) * merging.lowrank_norm(stored.lora_a.float(), stored.lora_b.float())
        if safety_module is not None:
            result.safety_norm = abs(safety_module.scaling) * merging.lowrank_norm(safety_module.lora_a.float(),
                                                                                 safety_module.lora_b.float())
    new_config = copy.deepcopy(task.config)
    if rank_pattern:
        # PEFT takes the first pattern that matches, so the exact per-module keys go before the user's patterns,
        # and they replace an equal key already there (an adapter repaired before).
        for name, ours in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
            theirs = task.config.get(name) or {}
            new_config[name] = {**ours, **{key: value for key, value in theirs.items() if key not in ours}}
    return dataclasses.replace(task, config=new_config, modules=new_modules)


def _merge_module(module, safety_module, subspace, task, config, policy) -> merging.MergedFactors:
    _, weights, _ = config.settings_for(module.name)
    if config.method == "safelora":
        projected, delta_norm = subspace.projection(module.name, module.shape, module.lora_b, task.fan_in_fan_out)
        projected_b = merging.project_safelora(projected, delta_norm)
        return merging.MergedFactors(module.scaling * module.lora_a.float(), projected_b, 0.0)

    task_factors = (module.lora_a, module.lora_b, module.scaling)
    safety_factors = (safety_module.lora_a, safety_module.lora_b, safety_module.scaling)
    if config.method == "linear":
        merged = merging.merge_linear(task_factors, safety_factors, weights)
    elif config.method == "peft_linear":
        merged = merging.merge_peft_linear(task_factors, safety_factors, weights)
    else:
        updates = (module.scaling * module.lora_b.float() @ module.lora_a.float(),
                   safety_module.scaling * safety_module.lora_b.float() @ safety_module.lora_a.float())
        generator = merging.module_generator(config.seed, module.name)
        dense = merging.merge_dense(updates, weights, config.method, config.density, config.majority_sign_method,
                                    generator)
        target_rank = module.rank + safety_module.rank if policy == "exact" else module.rank
        return merging.factor_dense(dense, target_rank)
    return merging.truncate_factors(merged, module.rank) if policy == "keep" else merged


def _store_module(module: LoraModule, merged: merging.MergedFactors, task: LoraAdapter, policy: str,
                  rank_pattern: dict, alpha_pattern: dict) -> LoraModule:
    """Turn scaling-1 factors into stored factors: fold the task scaling at the task rank, or widen with patterns."""
    dtype = module.lora_a.dtype
    lora_a, lora_b = merged.lora_a, merged.lora_b
    if lora_a.shape[0] < module.rank:
        # An SVD of a matrix with fewer dimensions than r yields fewer factors; zero rows keep the stored shape.
        missing = module.rank - lora_a.shape[0]
        lora_a = torch.cat([lora_a, lora_a.new_zeros(missing, lora_a.shape[1])])
        lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], missing)], dim=1)
    if lora_a.shape[0] == module.rank:
        # Same rank as the task module: fold its scaling into A, so the module keeps its config entry.
        return LoraModule(module.name, (lora_a / module.scaling).to(dtype), lora_b.to(dtype), module.lora_alpha,
                          module.scaling)

    rank = lora_a.shape[0]
    lora_alpha = _scaling_one_alpha(task, rank)
    key = re.escape(module.name)
    rank_pattern[key] = rank
    alpha_pattern[key] = lora_alpha
    return LoraModule(module.name, lora_a.to(dtype), lora_b.to(dtype), lora_alpha, task.scaling_for(rank, lora_alpha))


def _scaling_one_alpha(task: LoraAdapter, rank: int) -> float:
    """Return the α that makes PEFT's scaling exactly 1 for `rank` (α = r, or α = √r with rsLoRA)."""
    return float(rank) ** 0.5 if task.use_rslora else float(rank)


def _verify_module(name: str, module: LoraModule) -> None:
    if not (torch.isfinite(module.lora_a).all() and torch.isfinite(module.lora_b).all()):
        raise ValueError(f"The merge produced NaN or Inf for {name!r}; nothing was written. Check the inputs of this "
                         "module (adapter factors and alignment delta).")
