"""Perturb one LoRA tensor on rank 1 only and check that the rank-agreement digest names it on every rank.

Usage (torchrun, 2 processes): disagreement.py WORKDIR. Each rank writes `WORKDIR/disagreement-rank-<r>.json`.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from safemerge_callback import testing
from safemerge_callback.distributed import find_rank_disagreement
from safemerge_callback.live import read_live_adapter


def main() -> None:
    workdir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = AutoModelForCausalLM.from_pretrained(workdir / "aligned", dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    testing.fill_lora_weights(model, seed=3)
    if rank == 1:
        with torch.no_grad():
            model.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight[0, 0] += 1e-3

    adapter = read_live_adapter(model, "default", "ddp")
    tensors = {f"{name}.lora_{factor}": getattr(module, f"lora_{factor.lower()}")
               for name, module in adapter.modules.items() for factor in ("A", "B")}
    differing = find_rank_disagreement(tensors)
    (workdir / f"disagreement-rank-{rank}.json").write_text(json.dumps({"rank": rank, "differing": differing}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
