"""Load a base model once, attach named PEFT adapters to it and switch between variants.

Adapters are attached by name with PEFT and selected with :func:`use_variant`. The bare base model
runs inside ``PeftModel.disable_adapter()``, so no variant reloads the base weights.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

BASE_VARIANT = "base"
"""Variant name reserved for the base model with every adapter disabled."""


def resolve_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """Map a dtype name such as ``"bfloat16"`` to the ``torch.dtype``; ``"auto"`` and dtypes pass through."""
    if not isinstance(dtype, str) or dtype == "auto":
        return dtype
    resolved = getattr(torch, dtype, None)
    if isinstance(resolved, torch.dtype):
        return resolved
    raise ValueError(f"dtype={dtype!r} is not a torch dtype name; use 'auto', 'float32', 'bfloat16' or 'float16'.")


def load_base_model(
    model_name_or_path: str | Path, *, dtype: str | torch.dtype = "auto", device: str | torch.device | None = None
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer once, in eval mode.

    Args:
        model_name_or_path: Hub id or local directory.
        dtype: ``"auto"`` (the checkpoint's dtype), a ``torch.dtype`` or its name (``"bfloat16"``).
        device: Target device; defaults to ``"cuda"`` when available, else ``"cpu"``.

    Returns:
        ``(model, tokenizer)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(str(model_name_or_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_name_or_path), dtype=resolve_dtype(dtype))
    model.to(device).eval()
    return model, tokenizer


def _check_adapter_source(name: str, source: str | Path) -> None:
    text = str(source)
    if Path(text).expanduser().exists():
        return
    # Hub ids have the form "owner/name"; anything shaped like a filesystem path must exist locally.
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text:
        raise ValueError(f"Adapter {name!r}: path {text!r} does not exist; pass a saved PEFT adapter directory.")


def attach_adapters(model: Any, adapters: Mapping[str, str | Path]) -> Any:
    """Attach named PEFT adapters to a loaded base model without copying its weights.

    The first adapter wraps the model with ``PeftModel.from_pretrained``, which injects adapter
    layers into ``model`` in place; the others are added with ``load_adapter``. Use
    :func:`use_variant` to select one, or the bare base.

    Args:
        model: A loaded base model, or a ``PeftModel`` to add adapters to.
        adapters: Adapter name to a local adapter directory or hub id. ``"base"`` is reserved.

    Returns:
        The ``PeftModel`` (or ``model`` unchanged when ``adapters`` is empty), in eval mode.

    Raises:
        ValueError: On a reserved or empty name, or a local path that does not exist.
    """
    if not adapters:
        return model
    from peft import PeftModel

    for name, source in adapters.items():
        if not name or name == BASE_VARIANT:
            raise ValueError(f"Adapter name {name!r} is reserved or empty; pick another name for {source!r}.")
        _check_adapter_source(name, source)
    peft_model = model if isinstance(model, PeftModel) else None
    for name, source in adapters.items():
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, str(source), adapter_name=name, is_trainable=False)
        else:
            peft_model.load_adapter(str(source), adapter_name=name, is_trainable=False)
        logger.info("Attached adapter %r from %s", name, source)
    peft_model.eval()
    return peft_model


@contextlib.contextmanager
def use_variant(model: Any, adapter_name: str | None) -> Iterator[Any]:
    """Select one adapter, or disable all adapters, for the duration of the block.

    Args:
        model: A ``PeftModel`` from :func:`attach_adapters`, or a plain model (base only).
        adapter_name: Adapter to activate; ``None`` or ``"base"`` runs the bare base model.

    Yields:
        ``model`` itself, with the variant active.

    Raises:
        ValueError: If the adapter is not attached.
    """
    from peft import PeftModel

    is_peft = isinstance(model, PeftModel)
    if adapter_name in (None, BASE_VARIANT):
        context = model.disable_adapter() if is_peft else contextlib.nullcontext()
        with context:
            yield model
        return
    available = sorted(model.peft_config) if is_peft else []
    if adapter_name not in available:
        raise ValueError(f"Adapter {adapter_name!r} is not attached; attached adapters: {available}.")
    model.set_adapter(adapter_name, inference_mode=True)
    yield model
