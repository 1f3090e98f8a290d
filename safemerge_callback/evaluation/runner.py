"""End-to-end evaluation of a base model and its adapters: generate, judge, score, collect."""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .datasets import balanced_head
from .generation import GenerationSettings, answer_nll, generate_responses
from .judges import EMPTY, JUDGES, HarmJudge, get_judge
from .results import EvaluationResults, VariantResult, collect_provenance, summarize_judgements
from .scorers import TASKS, format_task_prompt, reference_answer, score_task, score_xstest
from .variants import BASE_VARIANT, attach_adapters, load_base_model, use_variant

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _VariantOutputs:
    """Raw generations of one variant, kept until judging."""

    name: str
    adapter: str | None
    harmful: list[str] | None = None
    task: list[str] | None = None
    xstest: list[str] | None = None
    answer_nll: float | None = None


def _head(items: Sequence[Any] | None, limit: int | None) -> list[Any] | None:
    if items is None:
        return None
    return list(items) if limit is None else list(items)[:limit]


def _check_inputs(
    harmful_prompts: Sequence[str] | None,
    task: str | None,
    task_records: Sequence[Mapping[str, Any]] | None,
    xstest_records: Sequence[Mapping[str, Any]] | None,
    limit: int | None,
) -> None:
    if not harmful_prompts and not task_records and not xstest_records:
        raise ValueError("Nothing to evaluate: pass harmful_prompts, task and task_records, or xstest_records.")
    if (task is None) != (task_records is None):
        raise ValueError(
            f"task and task_records go together, got task={task!r} and task_records={'set' if task_records else None}."
        )
    if task is not None and task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; available tasks: {list(TASKS)}.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}.")


def _generate_variant(
    model: Any,
    tokenizer: Any,
    outputs: _VariantOutputs,
    harmful_prompts: list[str] | None,
    task: str | None,
    task_records: list[Mapping[str, Any]] | None,
    xstest_records: list[Mapping[str, Any]] | None,
    settings: GenerationSettings,
    compute_nll: bool,
) -> None:
    """Fill ``outputs`` with the generations (and answer NLL) of the active variant."""
    name = outputs.name
    if harmful_prompts:
        outputs.harmful = generate_responses(model, tokenizer, harmful_prompts, settings, desc=f"{name}: harmful")
    if task and task_records:
        prompts = [format_task_prompt(task, record) for record in task_records]
        outputs.task = generate_responses(model, tokenizer, prompts, settings, desc=f"{name}: {task}")
        if compute_nll:
            answers = [reference_answer(task, record) for record in task_records]
            nll = answer_nll(
                model,
                tokenizer,
                prompts,
                answers,
                system_prompt=settings.system_prompt,
                batch_size=settings.batch_size,
            )
            if math.isfinite(nll):
                outputs.answer_nll = nll
            else:
                # JSON has no NaN or infinity, and a non-finite mean carries no utility information.
                logger.warning("Variant %r: answer NLL is %s, not a finite number; storing null.", name, nll)
    if xstest_records:
        prompts = [str(record["prompt"]) for record in xstest_records]
        outputs.xstest = generate_responses(model, tokenizer, prompts, settings, desc=f"{name}: xstest")


def _score_variant(
    outputs: _VariantOutputs,
    judge: HarmJudge,
    harmful_prompts: list[str] | None,
    task: str | None,
    task_records: list[Mapping[str, Any]] | None,
    xstest_records: list[Mapping[str, Any]] | None,
    max_samples: int | None,
) -> VariantResult:
    """Judge and score the generations of one variant."""
    result = VariantResult(name=outputs.name, adapter=outputs.adapter)
    if outputs.harmful is not None and harmful_prompts:
        judgements = judge.judge(harmful_prompts, outputs.harmful)
        result.harmful = summarize_judgements(judgements)
        result.samples["harmful"] = [
            {"prompt": prompt, "response": response, "label": judgement.label, "harmful": judgement.harmful}
            for prompt, response, judgement in zip(harmful_prompts, outputs.harmful, judgements)
        ][:max_samples]
    if outputs.task is not None and task and task_records:
        scores = score_task(task, outputs.task, task_records)
        predictions = scores.pop("predictions")
        result.task = {"task": task, **scores, "answer_nll": outputs.answer_nll}
        result.samples["task"] = [
            {
                "question": record.get("question"),
                "response": response,
                "prediction": prediction,
                "gold": record["gold"],
            }
            for record, response, prediction in zip(task_records, outputs.task, predictions)
        ][:max_samples]
    if outputs.xstest is not None and xstest_records:
        prompts = [str(record["prompt"]) for record in xstest_records]
        judgements = judge.judge(prompts, outputs.xstest)
        labels = [str(record["label"]) for record in xstest_records]
        result.xstest = score_xstest(
            [j.refusal for j in judgements], labels, empty=[j.label == EMPTY for j in judgements]
        )
        result.samples["xstest"] = [
            {"prompt": prompt, "label": label, "response": response, "refusal": judgement.refusal}
            for prompt, label, response, judgement in zip(prompts, labels, outputs.xstest, judgements)
        ][:max_samples]
    return result


def _generate_all(
    model: str | Path | tuple[Any, Any],
    adapters: Mapping[str, str],
    include_base: bool,
    sets: tuple[list[str] | None, str | None, list[Mapping[str, Any]] | None, list[Mapping[str, Any]] | None],
    settings: GenerationSettings,
    compute_nll: bool,
    dtype: str | torch.dtype,
    device: str | None,
) -> tuple[list[_VariantOutputs], str]:
    """Load (or take) the base model once, attach the adapters and generate every variant.

    When this function loads the model, its last reference dies with this frame, so the caller can
    free the memory before a model judge is loaded.
    """
    if isinstance(model, tuple):
        base, tokenizer = model
        model_id = getattr(base.config, "_name_or_path", "") or type(base).__name__
    else:
        model_id = str(model)
        base, tokenizer = load_base_model(model, dtype=dtype, device=device)
    evaluated = attach_adapters(base, adapters)

    harmful, task, task_records, xstest = sets
    variants = ([(BASE_VARIANT, None)] if include_base else []) + list(adapters.items())
    all_outputs = []
    for name, adapter in variants:
        start = time.perf_counter()
        outputs = _VariantOutputs(name=name, adapter=adapter)
        with use_variant(evaluated, None if adapter is None else name) as active:
            _generate_variant(active, tokenizer, outputs, harmful, task, task_records, xstest, settings, compute_nll)
        logger.info("Generated variant %r in %.1f s", name, time.perf_counter() - start)
        all_outputs.append(outputs)
    return all_outputs, model_id


def evaluate_variants(
    model: str | Path | tuple[Any, Any],
    *,
    adapters: Mapping[str, str | Path] | None = None,
    include_base: bool = True,
    harmful_prompts: Sequence[str] | None = None,
    judge: HarmJudge | str | Callable[[], HarmJudge] = "keyword",
    task: str | None = None,
    task_records: Sequence[Mapping[str, Any]] | None = None,
    xstest_records: Sequence[Mapping[str, Any]] | None = None,
    limit: int | None = None,
    generation: GenerationSettings | None = None,
    compute_nll: bool = True,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    max_samples: int | None = None,
    data_sources: Mapping[str, Any] | None = None,
) -> EvaluationResults:
    """Evaluate the base model and each adapter on harmful prompts, a utility task and XSTest.

    The base model is loaded once. Adapters are attached to it by name and switched with
    ``set_adapter``, and the ``"base"`` variant runs with all adapters disabled. All variants are
    generated before any judging. When this function loaded the base model, it releases it before
    the judge runs, so a model judge and the evaluated model are not in memory together.

    Args:
        model: Base model hub id or local path, or a loaded ``(model, tokenizer)`` pair. A passed
            model gets the adapters injected in place (through PEFT) and is not released.
        adapters: Adapter name to local directory or hub id.
        include_base: Also evaluate the bare base model as variant ``"base"``.
        harmful_prompts: Prompts whose responses are judged for harm.
        judge: A :class:`~safemerge_callback.evaluation.judges.HarmJudge`, a registry name that
            needs no arguments (``"keyword"``, ``"keyword-compat"``), or a function without
            arguments that returns a judge. The function is called after generation, so a model
            judge is loaded only once the evaluated model is released.
        task: ``"gsm8k"`` or ``"pubmedqa"``; needs ``task_records``.
        task_records: Records from ``datasets.load_task_set``.
        xstest_records: Records from ``datasets.load_xstest``; scored with the judge's refusal flag.
        limit: Use only the first ``limit`` items of each set; XSTest keeps a label-balanced subset
            (see ``datasets.balanced_head``).
        generation: Decoding settings shared by all variants and sets.
        compute_nll: Also compute the teacher-forced NLL of the task's reference answers.
        dtype: Load dtype when ``model`` is a path.
        device: Load device when ``model`` is a path.
        max_samples: Keep at most this many prompt/response samples per set in the results
            (``None`` keeps all).
        data_sources: Descriptions of the data (paths, splits) stored in the provenance.

    Returns:
        :class:`~safemerge_callback.evaluation.results.EvaluationResults`, one variant per entry.
    """
    _check_inputs(harmful_prompts, task, task_records, xstest_records, limit)
    adapters = {name: str(source) for name, source in (adapters or {}).items()}
    if not include_base and not adapters:
        raise ValueError("include_base=False needs at least one adapter to evaluate.")
    if isinstance(judge, str) and judge not in JUDGES:
        raise ValueError(f"Unknown judge {judge!r}; available judges: {sorted(JUDGES)}.")
    settings = generation or GenerationSettings()
    harmful = _head(harmful_prompts, limit)
    tasks = _head(task_records, limit)
    xstest = balanced_head(xstest_records, limit) if xstest_records is not None else None

    all_outputs, model_id = _generate_all(
        model, adapters, include_base, (harmful, task, tasks, xstest), settings, compute_nll, dtype, device
    )
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    if isinstance(judge, str):
        judge = get_judge(judge)
    elif not isinstance(judge, HarmJudge):
        judge = judge()
    results = [_score_variant(outputs, judge, harmful, task, tasks, xstest, max_samples) for outputs in all_outputs]
    provenance = collect_provenance(
        model=model_id,
        adapters=adapters,
        judge=judge.info(),
        generation=settings.to_dict(),
        data={**dict(data_sources or {}), "limit": limit, "task": task},
    )
    return EvaluationResults(variants=results, provenance=provenance)
