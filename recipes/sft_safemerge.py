# /// script
# dependencies = ["safemerge-callback[trl]"]
# ///
"""Fine-tune a chat model with LoRA on GSM8K or PubMedQA through TRL's SFTTrainer, repaired by SafeMergeCallback.

Every checkpoint gets a repaired copy in `checkpoint-N/safemerge/`, and the final adapter in `output_dir` is repaired
in place before it is saved.

Single GPU (the paper's setting: Llama-2-7B-Chat aligned from Llama-2-7B):

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/sft_safemerge.py \\
        --safety_adapter path/to/safety-lora --dataset gsm8k --output_dir runs/llama2-gsm8k

Eight GPUs with DeepSpeed ZeRO-3:

    accelerate launch --config_file recipes/accelerate/deepspeed_zero3.yaml recipes/sft_safemerge.py \\
        --safety_adapter path/to/safety-lora --dataset pubmedqa --output_dir runs/llama2-pubmedqa

Any other aligned/base pair: `--model_name_or_path Qwen/Qwen2-7B-Instruct --base_model Qwen/Qwen2-7B`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser
from trl import SFTConfig, SFTTrainer

from safemerge_callback import SafeMergeCallback, SafeMergeConfig


logger = logging.getLogger(__name__)

HUB_DATASETS = {"gsm8k": ("openai/gsm8k", "main"), "pubmedqa": ("qiaojin/PubMedQA", "pqa_labeled")}


@dataclass
class ScriptArguments:
    """Model, data, LoRA and SafeMERGE settings of the recipe."""

    model_name_or_path: str = field(default="meta-llama/Llama-2-7b-chat-hf",
                                    metadata={"help": "aligned chat model to fine-tune (hub id or directory)"})
    base_model: str = field(default="meta-llama/Llama-2-7b-hf",
                            metadata={"help": "pre-trained model before safety alignment, or 'auto'"})
    safety_adapter: str | None = field(default=None, metadata={"help": "LoRA safety adapter trained on the aligned "
                                                                       "model (recipes/train_safety_adapter.py)"})
    dataset: str = field(default="gsm8k", metadata={"help": "gsm8k or pubmedqa"})
    dataset_path: str | None = field(default=None, metadata={"help": "local file instead of the hub: GSM8K JSONL "
                                                                     "(question, answer) or PubMedQA ori_pqal.json"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use at most this many examples"})
    dtype: str = field(default="bfloat16", metadata={"help": "model dtype: bfloat16, float16 or float32"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(default="q_proj,v_proj", metadata={"help": "comma-separated module names"})
    threshold: float = field(default=0.35, metadata={"help": "τ: modules with score below it are merged"})
    merge_weights: str = field(default="0.8,0.2", metadata={"help": "w_task,w_safety"})
    merge_method: str = field(default="linear", metadata={"help": "linear, ties, dare_linear, dare_ties, "
                                                                  "peft_linear or safelora"})


def load_task_dataset(name: str, path: str | None, limit: int | None) -> Dataset:
    """Return the task data as conversations (`messages`: user question, assistant answer)."""
    if name not in HUB_DATASETS:
        raise ValueError(f"--dataset must be one of {sorted(HUB_DATASETS)}, got {name!r}.")
    if name == "gsm8k":
        rows = _read_jsonl(path) if path else load_dataset(*HUB_DATASETS[name], split="train")
        pairs = [(row["question"], row["answer"]) for row in rows]
    else:
        rows = _read_pubmedqa(path) if path else load_dataset(*HUB_DATASETS[name], split="train")
        pairs = [(_pubmedqa_prompt(row), f"{row['long_answer']}\nAnswer: {row['final_decision']}") for row in rows]
    if limit is not None:
        pairs = pairs[:limit]
    return Dataset.from_dict({"messages": [[{"role": "user", "content": question},
                                            {"role": "assistant", "content": answer}] for question, answer in pairs]})


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _read_pubmedqa(path: str) -> list[dict]:
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    return [{"question": r["QUESTION"], "context": {"contexts": r["CONTEXTS"]}, "long_answer": r["LONG_ANSWER"],
             "final_decision": r["final_decision"]} for r in records.values()]


def _pubmedqa_prompt(row: dict) -> str:
    context = " ".join(row["context"]["contexts"])
    return f"{context}\nQuestion: {row['question']}\nAnswer yes, no or maybe."


def main(script_args: ScriptArguments, training_args: SFTConfig) -> SFTTrainer:
    """Train, let the callback repair checkpoints and the final adapter, and save the repaired adapter."""
    weights = tuple(float(w) for w in script_args.merge_weights.split(","))
    callback = SafeMergeCallback(SafeMergeConfig(
        base_model=script_args.base_model, aligned_model=script_args.model_name_or_path,
        safety_adapter=script_args.safety_adapter, threshold=script_args.threshold, weights=weights,
        method=script_args.merge_method,
    ))
    model = AutoModelForCausalLM.from_pretrained(script_args.model_name_or_path, dtype=script_args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lora = LoraConfig(r=script_args.lora_r, lora_alpha=script_args.lora_alpha, lora_dropout=script_args.lora_dropout,
                      target_modules=script_args.lora_target_modules.split(","), task_type="CAUSAL_LM")
    dataset = load_task_dataset(script_args.dataset, script_args.dataset_path, script_args.max_train_samples)

    trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora, callbacks=[callback])
    trainer.train()
    trainer.save_model(training_args.output_dir)
    result = callback.last_result
    logger.info("Saved the repaired adapter to %s (%d of %d modules merged).", training_args.output_dir,
                len(result.selected_modules), len(result.modules))
    return trainer


def make_parser() -> HfArgumentParser:
    """Return the parser of the recipe's arguments and TRL's SFTConfig."""
    return HfArgumentParser((ScriptArguments, SFTConfig))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(*make_parser().parse_args_into_dataclasses())
