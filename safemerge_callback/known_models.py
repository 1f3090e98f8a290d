"""Well-known aligned → base model pairs, so `base_model="auto"` works for the common chat models."""

from __future__ import annotations


# Aligned (chat / instruct) hub id → the pre-trained model it was aligned from, as published by each model's authors.
ALIGNED_TO_BASE = {
    "meta-llama/Llama-2-7b-chat-hf": "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-2-13b-chat-hf": "meta-llama/Llama-2-13b-hf",
    "meta-llama/Llama-2-70b-chat-hf": "meta-llama/Llama-2-70b-hf",
    "meta-llama/Meta-Llama-3-8B-Instruct": "meta-llama/Meta-Llama-3-8B",
    "meta-llama/Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B",
    "meta-llama/Llama-3.1-70B-Instruct": "meta-llama/Llama-3.1-70B",
    "Qwen/Qwen2-7B-Instruct": "Qwen/Qwen2-7B",
    "Qwen/Qwen2.5-7B-Instruct": "Qwen/Qwen2.5-7B",
    "mistralai/Mistral-7B-Instruct-v0.2": "mistralai/Mistral-7B-v0.1",
    "google/gemma-2-9b-it": "google/gemma-2-9b",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M",
}


def resolve_base_model(base_model: str, aligned_model: str) -> str:
    """Return `base_model`, or for `"auto"` the known base of `aligned_model`.

    Raises:
        ValueError: when `base_model="auto"` and `aligned_model` is not in the table.
    """
    if base_model != "auto":
        return base_model
    if aligned_model in ALIGNED_TO_BASE:
        return ALIGNED_TO_BASE[aligned_model]
    raise ValueError(
        f"base_model='auto' has no entry for the aligned model {aligned_model!r}; known aligned models: "
        f"{sorted(ALIGNED_TO_BASE)}. Pass the pre-trained model it was aligned from as `base_model`."
    )
