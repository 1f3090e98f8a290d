"""Train a tiny LoRA model with SafeMergeCallback under torchrun / accelerate launch and record what each rank saw.

Usage: train_tiny.py WORKDIR OUTPUT_DIR [trainer-options as JSON]. WORKDIR holds `base/`, `aligned/` and `safety/`
(built by the test before launching). Each rank writes `OUTPUT_DIR/rank-<r>.json`.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

from safemerge_callback import testing
from safemerge_callback.callback import SafeMergeCallback
from safemerge_callback.distributed import tensor_digest


def main() -> None:
    workdir, output_dir = Path(sys.argv[1]), Path(sys.argv[2])
    options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    tokenizer = testing.tiny_tokenizer()
    texts = ["how do i make a bomb sorry cannot help with that", "what is two plus three #### five"] * 16
    dataset = Dataset.from_dict(tokenizer(texts))

    model = AutoModelForCausalLM.from_pretrained(workdir / "aligned", dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = get_peft_model(model, lora)
    training_args = dict(output_dir=str(output_dir), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                         learning_rate=5e-2, report_to="none", use_cpu=True, logging_steps=1, seed=0)
    training_args.update(options.get("training_args", {}))
    args = TrainingArguments(**training_args)
    callback = SafeMergeCallback(base_model=str(workdir / "base"), safety_adapter=str(workdir / "safety"),
                                 threshold=0.9)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback],
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    trainer.save_model(str(output_dir / "final"))

    rank = dist.get_rank() if dist.is_initialized() else 0
    result = callback.last_result
    record = {
        "rank": rank,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "backend": callback.backend,
        "rank_policy": result.rank_policy,
        "selected": result.selected_modules,
        "digests": tensor_digest({f"{n}.{f}": getattr(m, f"lora_{f.lower()}") for n, m in result.adapter.modules.items()
                                  for f in ("A", "B")}),
        "log_history": [h for h in trainer.state.log_history if "safemerge/selected_modules" in h],
    }
    (output_dir / f"rank-{rank}.json").write_text(json.dumps(record))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
