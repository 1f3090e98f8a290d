"""Evaluation of SafeMERGE results: generation, harm judges, task scorers, datasets and reports.

Names are imported from their submodules on first access. So importing this package or its ``cli``
does not import torch, and the command line registers its ``eval`` subcommand quickly.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GenerationSettings": "generation",
    "generate_responses": "generation",
    "answer_nll": "generation",
    "attach_adapters": "variants",
    "load_base_model": "variants",
    "use_variant": "variants",
    "HarmJudge": "judges",
    "Judgement": "judges",
    "get_judge": "judges",
    "score_gsm8k": "scorers",
    "score_pubmedqa": "scorers",
    "score_xstest": "scorers",
    "wilson_interval": "scorers",
    "load_harmful_prompts": "datasets",
    "load_task_set": "datasets",
    "load_xstest": "datasets",
    "EvaluationResults": "results",
    "evaluate_variants": "runner",
}

__all__ = [
    "EvaluationResults",
    "GenerationSettings",
    "HarmJudge",
    "Judgement",
    "answer_nll",
    "attach_adapters",
    "evaluate_variants",
    "generate_responses",
    "get_judge",
    "load_base_model",
    "load_harmful_prompts",
    "load_task_set",
    "load_xstest",
    "score_gsm8k",
    "score_pubmedqa",
    "score_xstest",
    "use_variant",
    "wilson_interval",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    return getattr(module, name)
