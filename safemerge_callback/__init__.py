"""SafeMERGE for LoRA fine-tuning: score every LoRA module against the alignment direction and merge drifted ones."""

__version__ = "0.1.0"

from .config import ModuleOverride, SafeMergeConfig
from .repair import ModuleResult, RepairResult, repair_adapter, score_adapter
from .subspace import AlignmentSubspace


def __getattr__(name: str):
    # The callback imports transformers' Trainer machinery; load it only when it is asked for.
    if name == "SafeMergeCallback":
        from .callback import SafeMergeCallback

        return SafeMergeCallback
    raise AttributeError(f"module 'safemerge_callback' has no attribute {name!r}")


__all__ = [
    "AlignmentSubspace",
    "ModuleOverride",
    "ModuleResult",
    "RepairResult",
    "SafeMergeCallback",
    "SafeMergeConfig",
    "repair_adapter",
    "score_adapter",
]
