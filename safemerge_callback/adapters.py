"""Read and write PEFT LoRA adapters as per-module factors.

An adapter file stores, per LoRA module, `<prefix>.lora_A.weight` `(r, in)` and `<prefix>.lora_B.weight` `(out, r)`
with `<prefix> = base_model.model.<module name>`. The update is `ΔW = s B A` with `s = lora_alpha / r` (or
`lora_alpha / √r` with rsLoRA), `r` and `lora_alpha` resolved per module from `rank_pattern` / `alpha_pattern`.
"""

from __future__ import annotations

import enum
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .files import resolve_directory


ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
KEY_PREFIX = "base_model.model."
# Files copied from the task adapter directory into a repaired adapter, so it stays a complete, loadable directory.
COMPANION_FILES = ("README.md", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

_LORA_KEY = re.compile(r"^(?P<prefix>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED_KEYS = {
    "lora_embedding_A": "embedding LoRA (`lora_embedding_A/B`)",
    "lora_embedding_B": "embedding LoRA (`lora_embedding_A/B`)",
    "lora_magnitude_vector": "DoRA (`lora_magnitude_vector`)",
    "lora_B.bias": "LoRA bias (`lora_bias=True`)",
}


@dataclass
class LoraModule:
    """The LoRA factors of one module.

    Attributes:
        name (`str`): module name in the base model, e.g. `model.layers.0.self_attn.q_proj`.
        lora_a (`torch.Tensor`): `A`, shape `(r, in)`, as stored.
        lora_b (`torch.Tensor`): `B`, shape `(out, r)`, as stored.
        lora_alpha (`float`): α of this module after `alpha_pattern`.
        scaling (`float`): `s`, so that `ΔW = s B A`.
    """

    name: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    lora_alpha: float
    scaling: float

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """`(out, in)` of the module's weight in PyTorch's `nn.Linear` layout."""
        return (self.lora_b.shape[0], self.lora_a.shape[1])


@dataclass
class LoraAdapter:
    """A LoRA adapter in memory: its config, its modules, and the other tensors it carries unchanged.

    Attributes:
        config (`dict`): the content of `adapter_config.json`.
        modules (`dict[str, LoraModule]`): LoRA modules by module name, in layer order.
        other_tensors (`dict[str, torch.Tensor]`): saved keys that are not LoRA factors (`modules_to_save` copies,
            biases saved with `bias="all"`), written back bit for bit.
        source (`str`): where the adapter came from, for reports.
        directory (`Path | None`): local directory of the adapter, when it was read from one.
    """

    config: dict[str, Any]
    modules: dict[str, LoraModule]
    other_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = "<memory>"
    directory: Path | None = None

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def modules_to_save(self) -> list[str]:
        return list(self.config.get("modules_to_save") or [])

    def scaling_for(self, rank: int, lora_alpha: float) -> float:
        """Return the LoRA scaling `α / r` (or `α / √r` with rsLoRA) this adapter's config gives a module."""
        return lora_scaling(rank, lora_alpha, self.use_rslora)


def lora_scaling(rank: int, lora_alpha: float, use_rslora: bool) -> float:
    """Return PEFT's LoRA scaling `s`: `α / r`, or `α / √r` with rsLoRA."""
    return lora_alpha / math.sqrt(rank) if use_rslora else lora_alpha / rank


def load_adapter(adapter: Any, *, role: str = "adapter", adapter_name: str = "default", revision: str | None = None,
                 allow_pickle: bool = False) -> LoraAdapter:
    """Load a LoRA adapter from a directory, a hub id, an in-memory PEFT model or a `LoraAdapter`.

    Args:
        adapter: a directory, a hub id, a `peft.PeftModel`, or a `LoraAdapter` (returned as is).
        role: the adapter's role (`"task adapter"`, `"safety adapter"`) for error messages.
        adapter_name: adapter of a PEFT model to read.
        revision: hub revision.
        allow_pickle: read `adapter_model.bin` when no safetensors file exists.

    Raises:
        ValueError: for missing or corrupt files, non-LoRA adapters, and LoRA variants the repair cannot score
            exactly (DoRA, embedding LoRA, LoRA bias).
    """
    if isinstance(adapter, LoraAdapter):
        return adapter
    if hasattr(adapter, "peft_config"):
        return adapter_from_model(adapter, adapter_name=adapter_name, role=role)
    if not isinstance(adapter, (str, Path)):
        raise TypeError(f"The {role} must be a directory, a hub id or a PeftModel, got {type(adapter).__name__}.")

    directory = resolve_directory(
        adapter, role=role, revision=revision, allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS, *COMPANION_FILES]
    )
    config = _read_config(directory, role)
    state_dict = _read_weights(directory, role, allow_pickle)
    return adapter_from_state_dict(state_dict, config, source=str(adapter), role=role, directory=directory)


def adapter_from_model(model: Any, *, adapter_name: str = "default", role: str = "adapter") -> LoraAdapter:
    """Read one adapter of an in-memory PEFT model (plain tensors; under ZeRO-3 / FSDP gather them first)."""
    from peft import get_peft_model_state_dict

    if adapter_name not in model.peft_config:
        raise ValueError(
            f"The {role} model has no adapter named {adapter_name!r}; it has {sorted(model.peft_config)}. "
            "Set `adapter_name` to one of them."
        )
    config = model.peft_config[adapter_name].to_dict()
    state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    state_dict = {key: value.detach().cpu() for key, value in state_dict.items()}
    return adapter_from_state_dict(state_dict, jsonable(config), source=f"<PeftModel:{adapter_name}>", role=role)


def adapter_from_state_dict(state_dict: dict[str, torch.Tensor], config: dict[str, Any], *, source: str = "<memory>",
                            role: str = "adapter", directory: Path | None = None) -> LoraAdapter:
    """Split a saved adapter state dict into per-module factors and carried tensors, validating it."""
    _check_config(config, source, role)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        for marker, description in _UNSUPPORTED_KEYS.items():
            if f".{marker}" in key:
                raise ValueError(
                    f"The {role} {source!r} uses {description} (key {key!r}). SafeMERGE scores and merges plain "
                    "linear LoRA updates only; retrain without it or leave that module out of `target_modules`."
                )
        match = _LORA_KEY.match(key)
        if match is None:
            other[key] = tensor
            continue
        factors.setdefault(match["prefix"], {})[match["factor"]] = tensor

    modules = {}
    for prefix, pair in sorted(factors.items(), key=lambda item: _natural_key(item[0])):
        name = prefix[len(KEY_PREFIX):] if prefix.startswith(KEY_PREFIX) else prefix
        if set(pair) != {"A", "B"}:
            raise ValueError(f"The {role} {source!r} has lora_{'A' if 'A' in pair else 'B'} but not its partner for "
                             f"module {name!r}; the file is incomplete.")
        modules[name] = _make_module(name, pair["A"], pair["B"], config, source, role)
    if not modules:
        raise ValueError(f"The {role} {source!r} contains no LoRA factors (keys ending in lora_A/lora_B.weight).")
    return LoraAdapter(config=config, modules=modules, other_tensors=other, source=source, directory=directory)


def adapter_state_dict(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """Return the adapter as a PEFT state dict (keys as in `adapter_model.safetensors`)."""
    state_dict = {}
    for name, module in adapter.modules.items():
        state_dict[f"{KEY_PREFIX}{name}.lora_A.weight"] = module.lora_a.contiguous()
        state_dict[f"{KEY_PREFIX}{name}.lora_B.weight"] = module.lora_b.contiguous()
    state_dict.update(adapter.other_tensors)
    return state_dict


def save_adapter(adapter: LoraAdapter, directory: Path) -> None:
    """Write `adapter_model.safetensors`, `adapter_config.json` and the companion files into an existing directory."""
    save_file(adapter_state_dict(adapter), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(adapter.config, indent=2) + "\n")
    if adapter.directory is not None:
        for name in COMPANION_FILES:
            if (adapter.directory / name).is_file():
                shutil.copy2(adapter.directory / name, directory / name)


def pattern_value(patterns: dict[str, Any] | None, module_name: str, default: Any) -> Any:
    """Resolve `rank_pattern` / `alpha_pattern` for one module as PEFT does: the first key that matches the end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _make_module(name: str, lora_a: torch.Tensor, lora_b: torch.Tensor, config: dict, source: str,
                 role: str) -> LoraModule:
    if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(
            f"The {role} {source!r} has inconsistent factors for {name!r}: lora_A {tuple(lora_a.shape)}, "
            f"lora_B {tuple(lora_b.shape)}; expected (r, in) and (out, r). Conv LoRA layers are not supported."
        )
    rank = lora_a.shape[0]
    lora_alpha = float(pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8)))
    scaling = lora_scaling(rank, lora_alpha, bool(config.get("use_rslora")))
    return LoraModule(name=name, lora_a=lora_a, lora_b=lora_b, lora_alpha=lora_alpha, scaling=scaling)


def _check_config(config: dict[str, Any], source: str, role: str) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ValueError(f"The {role} {source!r} is a {peft_type} adapter; SafeMERGE repairs LoRA adapters only.")
    if config.get("use_dora"):
        raise ValueError(
            f"The {role} {source!r} uses DoRA (`use_dora=True`). Its update is not `s·B·A` (a magnitude vector "
            "rescales the columns), so the alignment score would be wrong; train a plain LoRA adapter instead."
        )
    if config.get("lora_bias"):
        raise ValueError(f"The {role} {source!r} has `lora_bias=True`, which the merge does not support; "
                         "train it with `lora_bias=False`.")
    if config.get("target_parameters"):
        raise ValueError(f"The {role} {source!r} targets parameters directly (`target_parameters`); "
                         "SafeMERGE supports LoRA on modules (`target_modules`) only.")


def _read_config(directory: Path, role: str) -> dict[str, Any]:
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"The {role} directory {str(directory)!r} has no {ADAPTER_CONFIG}; "
                         "pass a directory written by `PeftModel.save_pretrained`.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"The {role} config {str(path)!r} is not valid JSON: {error}.") from None


def _read_weights(directory: Path, role: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    path = directory / ADAPTER_WEIGHTS
    if path.is_file():
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"The {role} weights {str(path)!r} are corrupt or truncated ({error}). "
                             "Save the adapter again.") from None
    pickle_path = directory / ADAPTER_PICKLE
    if pickle_path.is_file():
        if not allow_pickle:
            raise ValueError(
                f"The {role} {str(directory)!r} has only a pickle file ({ADAPTER_PICKLE}), which can run code when "
                "loaded. Convert it to safetensors, or set `allow_pickle=True` if you trust its source."
            )
        return torch.load(pickle_path, map_location="cpu", weights_only=True)
    raise ValueError(f"The {role} directory {str(directory)!r} has no {ADAPTER_WEIGHTS}.")


def _natural_key(name: str) -> list:
    """Sort key that orders `layers.2` before `layers.10`, so reports follow the model's layer order."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def jsonable(value: Any) -> Any:
    """Convert a PEFT config dict (sets, enums, tuples) into JSON-serialisable builtins."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        items = [jsonable(v) for v in value]
        return sorted(items) if isinstance(value, set) else items
    if isinstance(value, enum.Enum):  # PeftType, TaskType
        return value.value
    return value
