"""`SafeMergeConfig`: every setting of a repair, validated once, shared by the library, the callback and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


MERGE_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "peft_linear", "safelora")
METHODS_WITHOUT_SAFETY_ADAPTER = ("safelora",)
SELECTION_MODES = ("threshold", "lowest_k")
RANK_POLICIES = ("exact", "keep", "auto")
MISSING_SAFETY_POLICIES = ("error", "keep_task")
MAJORITY_SIGN_METHODS = ("total", "frequency")


@dataclass
class ModuleOverride:
    """Per-module settings for the modules whose full name matches `pattern` (a regular expression, `re.search`).

    Args:
        pattern (`str`): regular expression matched against module names such as `model.layers.12.self_attn.q_proj`.
        threshold (`float`, *optional*): τ for these modules.
        weights (`tuple[float, float]`, *optional*): `(w_task, w_safety)` for these modules.
        skip (`bool`, defaults to `False`): never select these modules.
    """

    pattern: str
    threshold: float | None = None
    weights: tuple[float, float] | None = None
    skip: bool = False


@dataclass
class SafeMergeConfig:
    """Settings of one SafeMERGE repair.

    The score of a module is `ρ = cos(vec(C ΔW), vec(ΔW))` with `C = V Vᵀ / ‖V‖_F` and `V = W_aligned − W_base`. A
    module is selected when `ρ < threshold` (τ in the SafeMERGE paper, arXiv 2503.17239), and its task update is then
    replaced by `w_task ΔW_task + w_safety ΔW_safety`.

    > Models and adapters

    Args:
        base_model (`str`, *optional*):
            Pre-trained model before safety alignment (local directory or hub id), e.g. `meta-llama/Llama-2-7b-hf`.
            `"auto"` looks the aligned model up in a small table of well-known pairs.
        aligned_model (`str`, *optional*):
            Safety-aligned model the adapters were trained on. The callback defaults it to the PEFT model's
            `base_model_name_or_path`.
        safety_adapter (`str`, *optional*):
            LoRA adapter trained on the aligned model with safety data (directory or hub id). Required by every
            method except `safelora`.
        adapter_name (`str`, defaults to `"default"`): adapter of an in-memory PEFT model to repair.
        revision (`str`, *optional*): hub revision used for hub ids.
        allow_pickle (`bool`, defaults to `False`):
            Allow `.bin` (pickle) checkpoints. They are read with `torch.load(weights_only=True)` and loaded whole.

    > Selection

    Args:
        threshold (`float`, defaults to 0.35): τ in [-1, 1]; modules with `ρ < τ` are selected.
        selection (`str`, defaults to `"threshold"`):
            `"threshold"` selects `ρ < τ`; `"lowest_k"` selects the `num_selected` modules with the lowest scores
            (the SafeLoRA "number" mode).
        num_selected (`int`, *optional*): how many modules `"lowest_k"` selects.

    > Merge

    Args:
        method (`str`, defaults to `"linear"`):
            `linear` (exact `w_t ΔW_t + w_s ΔW_s`), `ties`, `dare_linear`, `dare_ties` (dense TIES / DARE on the two
            updates, factored back by SVD), `peft_linear` (PEFT's factor mixing, for parity with the published code;
            not the formula above) or `safelora` (`B ← C B`, no safety adapter).
        weights (`tuple[float, float]`, defaults to `(0.8, 0.2)`): `(w_task, w_safety)`, finite and not both zero.
        density (`float`, defaults to 0.5): fraction of entries kept by TIES / DARE, in (0, 1].
        majority_sign_method (`str`, defaults to `"total"`): TIES sign election, `"total"` or `"frequency"`.
        seed (`int`, defaults to 0): seed of the DARE masks; each module draws from its own generator seeded from
            `(seed, module name)`, so every rank and every rerun draws the same mask.
        rank_policy (`str`, defaults to `"auto"`):
            `exact` widens selected modules to the rank the merge needs and records it in `rank_pattern` /
            `alpha_pattern`; `keep` truncates to the task rank by SVD and reports the relative error; `auto` is
            `exact` except where parameter shapes cannot change (sharded training), where it is `keep`.
        missing_safety_module (`str`, defaults to `"error"`):
            What to do when the safety adapter lacks a module of the task adapter: `"error"` raises,
            `"keep_task"` leaves that module unmerged and lists it in the report.
        module_overrides (`list[ModuleOverride]`, defaults to `[]`): per-module threshold, weights or skip.

    > Callback

    Args:
        repair_on_save (`bool`, defaults to `True`): write `checkpoint-N/safemerge/` at every checkpoint.
        repair_on_train_end (`bool`, defaults to `True`): repair the live adapter in place when training ends.
        cache_bytes (`int`, *optional*): deprecated and ignored. Scoring streams each alignment delta from the
            memory-mapped checkpoints at about the cost of reading it, so no delta cache is kept.
    """

    base_model: str | None = None
    aligned_model: str | None = None
    safety_adapter: str | None = None
    adapter_name: str = "default"
    revision: str | None = None
    allow_pickle: bool = False

    threshold: float = 0.35
    selection: str = "threshold"
    num_selected: int | None = None

    method: str = "linear"
    weights: tuple[float, float] = (0.8, 0.2)
    density: float = 0.5
    majority_sign_method: str = "total"
    seed: int = 0
    rank_policy: str = "auto"
    missing_safety_module: str = "error"
    module_overrides: list[ModuleOverride] = field(default_factory=list)

    repair_on_save: bool = True
    repair_on_train_end: bool = True
    cache_bytes: int | None = None

    def __post_init__(self) -> None:
        self.weights = _check_weights("weights", self.weights)
        _check_threshold("threshold", self.threshold)
        _check_choice("method", self.method, MERGE_METHODS)
        _check_choice("selection", self.selection, SELECTION_MODES)
        _check_choice("rank_policy", self.rank_policy, RANK_POLICIES)
        _check_choice("missing_safety_module", self.missing_safety_module, MISSING_SAFETY_POLICIES)
        _check_choice("majority_sign_method", self.majority_sign_method, MAJORITY_SIGN_METHODS)

        if not isinstance(self.density, (int, float)) or not (0.0 < self.density <= 1.0) or math.isnan(self.density):
            raise ValueError(
                f"`density` must be in (0, 1] (the fraction of entries TIES/DARE keep), got {self.density!r}."
            )
        if self.selection == "lowest_k":
            if not isinstance(self.num_selected, int) or self.num_selected < 0:
                raise ValueError(
                    f"`selection='lowest_k'` needs `num_selected` as a non-negative int, got {self.num_selected!r}."
                )
        if not isinstance(self.seed, int):
            raise TypeError(f"`seed` must be an int, got {type(self.seed).__name__}.")
        if self.cache_bytes is not None:
            warnings.warn("`cache_bytes` is deprecated and has no effect, because scoring streams each alignment "
                          "delta from the memory-mapped checkpoints and keeps no delta cache. Remove the argument.",
                          FutureWarning, stacklevel=3)

        self.module_overrides = [_to_override(item) for item in self.module_overrides]

    @property
    def needs_safety_adapter(self) -> bool:
        """Whether `method` merges with a safety adapter (all methods but `safelora`)."""
        return self.method not in METHODS_WITHOUT_SAFETY_ADAPTER

    def settings_for(self, module_name: str) -> tuple[float, tuple[float, float], bool]:
        """Return `(threshold, weights, skip)` for one module, applying the first matching override."""
        for override in self.module_overrides:
            if re.search(override.pattern, module_name):
                threshold = self.threshold if override.threshold is None else override.threshold
                weights = self.weights if override.weights is None else override.weights
                return threshold, weights, override.skip
        return self.threshold, self.weights, False

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-serialisable builtins."""
        data = dataclasses.asdict(self)
        data["weights"] = list(self.weights)
        for override in data["module_overrides"]:
            if override["weights"] is not None:
                override["weights"] = list(override["weights"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SafeMergeConfig":
        """Build a config from a mapping, rejecting unknown keys with the list of valid ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown SafeMergeConfig field(s) {unknown}; valid fields are {sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> "SafeMergeConfig":
        """Read a config from a YAML or JSON recipe file."""
        import yaml

        text = Path(path).read_text(encoding="utf-8")
        try:
            data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as error:
            raise ValueError(f"Recipe {path} is not valid {'JSON' if str(path).endswith('.json') else 'YAML'}: "
                             f"{error}") from None
        if not isinstance(data, dict):
            raise ValueError(f"Recipe {path} must contain a mapping of SafeMergeConfig fields, got {type(data).__name__}.")
        return cls.from_dict(data)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


def _check_threshold(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or math.isnan(value) or not (-1.0 <= value <= 1.0):
        raise ValueError(f"`{name}` must be a number in [-1, 1] because ρ is a cosine, got {value!r}.")


def _check_weights(name: str, value: Any) -> tuple[float, float]:
    try:
        w_task, w_safety = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be two numbers (w_task, w_safety), got {value!r}.") from None
    if not (math.isfinite(w_task) and math.isfinite(w_safety)):
        raise ValueError(f"`{name}` must be finite, got {value!r}.")
    if w_task == 0.0 and w_safety == 0.0:
        raise ValueError(f"`{name}` must not be all zero (that would delete the update), got {value!r}.")
    if w_task < 0.0 or w_safety < 0.0:
        raise ValueError(
            f"`{name}` must be non-negative, got {value!r}. A negative weight subtracts an adapter, which SafeMERGE "
            "does not define."
        )
    return (w_task, w_safety)


def _to_override(item: Any) -> ModuleOverride:
    if isinstance(item, ModuleOverride):
        override = item
    elif isinstance(item, dict):
        override = ModuleOverride(**item)
    else:
        raise TypeError(f"`module_overrides` entries must be ModuleOverride or dict, got {type(item).__name__}.")
    try:
        re.compile(override.pattern)
    except re.error as error:
        raise ValueError(f"Invalid `module_overrides` pattern {override.pattern!r}: {error}.") from None
    if override.threshold is not None:
        _check_threshold(f"module_overrides[{override.pattern!r}].threshold", override.threshold)
    if override.weights is not None:
        override.weights = _check_weights(f"module_overrides[{override.pattern!r}].weights", override.weights)
    return override
