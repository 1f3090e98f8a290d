"""Tiny real models, checkpoints and adapters built in-process, for tests, benchmarks and the quick start.

Nothing here downloads anything: configs are built in code, weights are random, tokenizers are word-level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


TINY_WORDS = [
    "<pad>", "<unk>", "<s>", "</s>", "user", "assistant", "system", ":", "\n", "how", "do", "i", "make", "a", "bomb",
    "sorry", "cannot", "help", "with", "that", "what", "is", "two", "plus", "three", "five", "####", "the", "answer",
    "yes", "no", "maybe", "safe", "unsafe", "S1", "please", "explain", "math", "question", "Question",
]


def tiny_llama_config(**overrides: Any):
    """Return a tiny `LlamaConfig` with grouped-query attention (v_proj narrower than q_proj)."""
    from transformers import LlamaConfig

    settings = dict(vocab_size=len(TINY_WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_qwen2_config(**overrides: Any):
    """Return a tiny `Qwen2Config` (q/k/v projections carry biases)."""
    from transformers import Qwen2Config

    settings = dict(vocab_size=len(TINY_WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    settings.update(overrides)
    return Qwen2Config(**settings)


def tiny_gpt2_config(**overrides: Any):
    """Return a tiny `GPT2Config` (`Conv1D` layers, weights stored `(in, out)`)."""
    from transformers import GPT2Config

    settings = dict(vocab_size=len(TINY_WORDS), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                    pad_token_id=0, bos_token_id=2, eos_token_id=3)
    settings.update(overrides)
    return GPT2Config(**settings)


def tiny_tokenizer():
    """Return a word-level `PreTrainedTokenizerFast` over `TINY_WORDS` with a simple chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(TINY_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = (
        "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} \n {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    return tokenizer


def build_model(config, seed: int = 0):
    """Instantiate a causal LM from `config` with seeded random weights, in float32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float().eval()


def save_base_and_aligned(directory: str | Path, config=None, *, seed: int = 0, alignment_scale: float = 0.05,
                          max_shard_size: str | None = "40KB") -> tuple[Path, Path]:
    """Save a tiny base model and an "aligned" copy whose weights differ by a seeded random low-rank perturbation.

    Both are written with `save_pretrained` (sharded safetensors with an index when `max_shard_size` is small). Each
    2-D weight gets `W + alignment_scale · P Q` with a rank-2 `P Q`, so alignment deltas have real structure.

    Returns:
        `(base_dir, aligned_dir)`.
    """
    directory = Path(directory)
    config = config or tiny_llama_config()
    base = build_model(config, seed)
    base_dir, aligned_dir = directory / "base", directory / "aligned"
    _save(base, base_dir, max_shard_size)

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, parameter in base.named_parameters():
            if parameter.ndim == 2:
                rows, cols = parameter.shape
                left = torch.randn(rows, 2, generator=generator)
                right = torch.randn(2, cols, generator=generator)
                parameter.add_(alignment_scale * left @ right / cols**0.5)
    _save(base, aligned_dir, max_shard_size)
    return base_dir, aligned_dir


def _save(model, directory: Path, max_shard_size: str | None) -> None:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    tiny_tokenizer().save_pretrained(directory)


def save_random_adapter(model_dir: str | Path, output_dir: str | Path, *, seed: int = 0, r: int = 4,
                        lora_alpha: float = 8, target_modules: Any = ("q_proj", "v_proj"), scale: float = 0.1,
                        **lora_kwargs: Any) -> Path:
    """Attach a LoRA adapter to the model in `model_dir`, fill `lora_A`/`lora_B` with seeded random values, save it.

    Random non-zero `lora_B` makes it behave like a trained adapter (PEFT initialises `lora_B` to zero). Extra keyword
    arguments go to `LoraConfig` (`use_rslora`, `rank_pattern`, `alpha_pattern`, `layers_to_transform`,
    `modules_to_save`, `fan_in_fan_out`, ...).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets,
                                                  lora_dropout=0.0, **lora_kwargs))
    fill_lora_weights(peft_model, seed=seed, scale=scale)
    peft_model.save_pretrained(output_dir)
    return Path(output_dir)


def fill_lora_weights(peft_model, *, seed: int = 0, scale: float = 0.1, adapter_name: str = "default") -> None:
    """Overwrite every `lora_A`/`lora_B` (and `modules_to_save` copy) of one adapter with seeded random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if f".{adapter_name}." not in name and not name.endswith(f".{adapter_name}"):
                continue
            if ".lora_" in name or ".modules_to_save." in name:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


def main(argv: list[str] | None = None) -> int:
    """Write tiny base/aligned checkpoints and task/safety adapters into a folder, for trying the CLI offline."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m safemerge_callback.testing",
                                     description="Write tiny models and adapters for trying `safemerge` offline.")
    parser.add_argument("output", type=Path, help="folder to create base/, aligned/, task/ and safety/ in")
    args = parser.parse_args(argv)

    base, aligned = save_base_and_aligned(args.output)
    save_random_adapter(aligned, args.output / "task", seed=1, r=8, lora_alpha=16)
    save_random_adapter(aligned, args.output / "safety", seed=2, r=4, lora_alpha=8)
    print(f"Wrote {base}, {aligned}, {args.output / 'task'} and {args.output / 'safety'}. Try:\n"
          f"  safemerge repair --task-adapter {args.output / 'task'} --safety-adapter {args.output / 'safety'} "
          f"--base-model {base} --output {args.output / 'repaired'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
