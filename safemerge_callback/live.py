"""Read the adapter of a live (possibly sharded) PEFT model, and write a repaired adapter back into it in place."""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

from . import distributed
from .adapters import KEY_PREFIX, LoraAdapter, adapter_from_state_dict, jsonable


logger = logging.getLogger(__name__)


def unwrap_peft_model(model: torch.nn.Module) -> Any:
    """Return the `PeftModel` inside DDP / FSDP1 / `torch.compile` wrappers.

    Raises:
        TypeError: when no PEFT model is found.
    """
    current = model
    for _ in range(8):
        if hasattr(current, "peft_config"):
            return current
        current = getattr(current, "module", None) or getattr(current, "_orig_mod", None)
        if current is None:
            break
    raise TypeError(
        f"SafeMergeCallback needs a PEFT model (get_peft_model or SFTTrainer(peft_config=...)), got "
        f"{type(model).__name__}."
    )


def saved_key(clean_name: str, adapter_name: str) -> str:
    """Map a live parameter name to its key in `adapter_model.safetensors` (the adapter name segment removed)."""
    return re.sub(rf"\.{re.escape(adapter_name)}(?=\.|$)", "", clean_name, count=1).replace(".modules_to_save.", ".")


def read_live_adapter(model: torch.nn.Module, adapter_name: str, backend: str) -> LoraAdapter:
    """Gather one adapter of a live model into a `LoraAdapter` of full CPU tensors (collective).

    Under ZeRO-3 and FSDP the parameters are gathered first, so the result has full tensors on every rank.
    """
    peft_model = unwrap_peft_model(model)
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"The model has no adapter named {adapter_name!r}; it has {sorted(peft_model.peft_config)}. "
                         "Set SafeMergeConfig.adapter_name.")
    config = jsonable(peft_model.peft_config[adapter_name].to_dict())
    state_dict = {}
    with distributed.full_adapter_parameters(model, adapter_name, backend) as parameters:
        for name, parameter in parameters:
            state_dict[saved_key(name, adapter_name)] = distributed.read_full_value(parameter, backend)
    empty = [key for key, value in state_dict.items() if value.numel() == 0]
    if empty:
        raise RuntimeError(f"Gathered empty tensors for {empty[:5]} on backend {backend!r}; the parameters are still "
                           "partitioned. This is a bug in the gather path, please report it with `safemerge env`.")
    return adapter_from_state_dict(state_dict, config, source=f"<live:{adapter_name}>", role="task adapter")


@torch.no_grad()
def write_live_adapter(model: torch.nn.Module, result: Any, adapter_name: str, backend: str) -> list[str]:
    """Write the selected modules of a `RepairResult` into the live model in place (collective); return their names.

    Modules whose rank is unchanged are overwritten value by value, which works on every backend. Modules whose rank
    grew (`rank_policy="exact"`) get new `lora_A`/`lora_B` layers, which only a single process or DDP allows; the
    PEFT config's `rank_pattern`/`alpha_pattern` are updated so `save_pretrained` writes a loadable adapter.
    """
    peft_model = unwrap_peft_model(model)
    repaired = result.adapter
    changed = [m.name for m in result.modules if m.selected]
    widened = [m.name for m in result.modules if m.selected and m.rank_after != m.rank_before]
    if widened and backend in distributed.SHARDED_BACKENDS:
        raise ValueError(f"Cannot change the rank of {widened[:5]} under {backend}; use rank_policy='keep' or 'auto'.")

    values = {}
    for name in changed:
        if name in widened:
            continue
        values[f"{name}.lora_A.{adapter_name}.weight"] = repaired.modules[name].lora_a
        values[f"{name}.lora_B.{adapter_name}.weight"] = repaired.modules[name].lora_b
    # A write-back that stops half way would leave old and new factors mixed, so keep what it changes and put the
    # adapter back on failure. Sharded parameters cannot be restored from one rank, so there the error gets a note.
    undo = None if backend in distributed.SHARDED_BACKENDS else _snapshot_layers(peft_model, changed, adapter_name)
    try:
        with distributed.full_adapter_parameters(model, adapter_name, backend, writeback=True) as parameters:
            for clean_name, parameter in parameters:
                key = clean_name.removeprefix(KEY_PREFIX)
                if key in values:
                    distributed.write_full_value(parameter, values[key], backend)

        for name in widened:
            _replace_factors(peft_model, name, repaired.modules[name], adapter_name)
        if widened:
            peft_config = peft_model.peft_config[adapter_name]
            peft_config.rank_pattern = dict(repaired.config.get("rank_pattern") or {})
            peft_config.alpha_pattern = dict(repaired.config.get("alpha_pattern") or {})
    except BaseException as error:
        if undo is None:
            error.add_note(f"The live adapter may be partly written under {backend}; do not save it.")
        else:
            _restore_layers(peft_model, undo, adapter_name)
            error.add_note("The live adapter was put back as it was before the repair.")
        raise
    return changed


def _snapshot_layers(peft_model: Any, names: list[str], adapter_name: str) -> dict[str, Any]:
    """Keep what a write-back changes: each layer's factor modules and values, `r`, α, scaling, and the patterns."""
    layers = {}
    for name in names:
        layer = peft_model.base_model.model.get_submodule(name)
        lora_a, lora_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        layers[name] = (lora_a, lora_b, lora_a.weight.detach().clone(), lora_b.weight.detach().clone(),
                        layer.r[adapter_name], layer.lora_alpha[adapter_name], layer.scaling[adapter_name])
    peft_config = peft_model.peft_config[adapter_name]
    patterns = (dict(peft_config.rank_pattern or {}), dict(peft_config.alpha_pattern or {}))
    return {"layers": layers, "patterns": patterns}


def _restore_layers(peft_model: Any, snapshot: dict[str, Any], adapter_name: str) -> None:
    """Put back the layers and patterns kept by `_snapshot_layers`."""
    for name, (lora_a, lora_b, value_a, value_b, rank, alpha, scaling) in snapshot["layers"].items():
        layer = peft_model.base_model.model.get_submodule(name)
        lora_a.weight.data.copy_(value_a)
        lora_b.weight.data.copy_(value_b)
        layer.lora_A[adapter_name], layer.lora_B[adapter_name] = lora_a, lora_b
        layer.r[adapter_name], layer.lora_alpha[adapter_name], layer.scaling[adapter_name] = rank, alpha, scaling
    peft_config = peft_model.peft_config[adapter_name]
    peft_config.rank_pattern, peft_config.alpha_pattern = snapshot["patterns"]


def _replace_factors(peft_model: Any, module_name: str, module: Any, adapter_name: str) -> None:
    """Give one LoRA layer new, wider `lora_A`/`lora_B` and the matching `r`, `lora_alpha` and `scaling`."""
    layer = peft_model.base_model.model.get_submodule(module_name)
    old_a, old_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
    device, dtype = old_a.weight.device, old_a.weight.dtype
    new_a = torch.nn.Linear(module.lora_a.shape[1], module.rank, bias=False, device=device, dtype=dtype)
    new_b = torch.nn.Linear(module.rank, module.lora_b.shape[0], bias=False, device=device, dtype=dtype)
    new_a.weight.copy_(module.lora_a)
    new_b.weight.copy_(module.lora_b)
    new_a.weight.requires_grad_(old_a.weight.requires_grad)
    new_b.weight.requires_grad_(old_b.weight.requires_grad)
    layer.lora_A[adapter_name] = new_a
    layer.lora_B[adapter_name] = new_b
    layer.r[adapter_name] = module.rank
    layer.lora_alpha[adapter_name] = module.lora_alpha
    layer.scaling[adapter_name] = module.scaling
