# /// script
# dependencies = ["safemerge-callback[trl]"]
# ///
"""Train the safety adapter: a LoRA on the aligned model that maps harmful requests to refusals.

Use the same `--lora_target_modules` as the task adapter, so SafeMERGE can merge module by module.

    python recipes/train_safety_adapter.py --model_name_or_path meta-llama/Llama-2-7b-chat-hf \\
        --prompts walledai/AdvBench --prompt_column prompt --output_dir runs/safety-lora --max_steps 200

`--prompts` is a hub dataset id or a local CSV / JSON / JSONL file. With `--response_column`, its responses are used;
otherwise each prompt gets one of the refusals below, chosen by a seeded generator.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from datasets import Dataset, load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser
from trl import SFTConfig, SFTTrainer


logger = logging.getLogger(__name__)

REFUSALS = [
    "I'm sorry, but I can't help with that. It could cause real harm to people.",
    "I can't assist with this request because it could be used to hurt someone.",
    "I won't help with that. If you have a different question, I'm happy to help.",
    "Sorry, I cannot provide that. It would be unsafe and could break the law.",
    "I must decline. Helping with this could put people at risk.",
    "I'm not able to help with this request. Let me know if there is something safe I can do instead.",
]


@dataclass
class SafetyArguments:
    """Model, data and LoRA settings of the safety adapter."""

    model_name_or_path: str = field(default="meta-llama/Llama-2-7b-chat-hf",
                                    metadata={"help": "aligned model the task adapter is trained on"})
    prompts: str = field(default="walledai/AdvBench", metadata={"help": "hub dataset id or local CSV/JSON/JSONL"})
    prompt_column: str = field(default="prompt", metadata={"help": "column holding the harmful request"})
    response_column: str | None = field(default=None, metadata={"help": "column holding a refusal, if any"})
    split: str = field(default="train", metadata={"help": "dataset split"})
    max_samples: int | None = field(default=None, metadata={"help": "use at most this many prompts"})
    dtype: str = field(default="bfloat16", metadata={"help": "model dtype"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_target_modules: str = field(default="q_proj,v_proj", metadata={"help": "comma-separated module names"})


def load_refusal_pairs(args: SafetyArguments, seed: int) -> Dataset:
    """Return `messages` conversations: harmful request → refusal."""
    if args.prompts.endswith((".csv", ".json", ".jsonl")):
        kind = "csv" if args.prompts.endswith(".csv") else "json"
        rows = load_dataset(kind, data_files=args.prompts, split="train")
    else:
        rows = load_dataset(args.prompts, split=args.split)
    if args.prompt_column not in rows.column_names:
        raise ValueError(f"--prompt_column {args.prompt_column!r} is not a column of {args.prompts!r}; columns: "
                         f"{rows.column_names}.")
    if args.response_column is not None and args.response_column not in rows.column_names:
        raise ValueError(f"--response_column {args.response_column!r} is not a column of {args.prompts!r}; columns: "
                         f"{rows.column_names}.")
    generator = random.Random(seed)
    conversations = []
    for row in rows.select(range(min(len(rows), args.max_samples or len(rows)))):
        refusal = row[args.response_column] if args.response_column else generator.choice(REFUSALS)
        conversations.append([{"role": "user", "content": row[args.prompt_column]},
                              {"role": "assistant", "content": refusal}])
    return Dataset.from_dict({"messages": conversations})


def main(args: SafetyArguments, training_args: SFTConfig) -> SFTTrainer:
    """Train the safety LoRA and save it to `output_dir`."""
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=args.lora_target_modules.split(","),
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=training_args, processing_class=tokenizer, peft_config=lora,
                         train_dataset=load_refusal_pairs(args, training_args.seed))
    trainer.train()
    trainer.save_model(training_args.output_dir)
    logger.info("Saved the safety adapter to %s.", training_args.output_dir)
    return trainer


def make_parser() -> HfArgumentParser:
    """Return the parser of the safety-adapter arguments and TRL's SFTConfig."""
    return HfArgumentParser((SafetyArguments, SFTConfig))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(*make_parser().parse_args_into_dataclasses())
