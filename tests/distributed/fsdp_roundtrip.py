"""Repair a sharded tiny PEFT model in place under raw torch FSDP1 or FSDP2 on gloo, and check every shard.

Usage (torchrun, 2 processes): fsdp_roundtrip.py WORKDIR {1|2}. WORKDIR holds `base/`, `aligned/` and `safety/`.
Each rank writes `WORKDIR/fsdp<version>-rank-<r>.json` with what it checked.
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, TrainerState

from safemerge_callback import testing
from safemerge_callback.callback import SafeMergeCallback
from safemerge_callback.live import read_live_adapter


def build_peft_model(workdir: Path):
    model = AutoModelForCausalLM.from_pretrained(workdir / "aligned", dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    testing.fill_lora_weights(model, seed=3)
    return model


def shard(model, version: int):
    if version == 1:
        from peft.utils.other import fsdp_auto_wrap_policy
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=False,
                                        auto_wrap_policy=fsdp_auto_wrap_policy(model))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def main() -> None:
    workdir, version = Path(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    reference = build_peft_model(workdir)
    expected_before = read_live_adapter(reference, "default", "single")
    model = shard(build_peft_model(workdir), version)

    callback = SafeMergeCallback(base_model=str(workdir / "base"), safety_adapter=str(workdir / "safety"),
                                 threshold=0.9)
    callback.on_train_begin(None, TrainerState(), None, model=model)
    gathered_before = read_live_adapter(model, "default", callback.backend)
    read_ok = all(torch.equal(gathered_before.modules[n].lora_a, m.lora_a)
                  and torch.equal(gathered_before.modules[n].lora_b, m.lora_b)
                  for n, m in expected_before.modules.items())

    args = SimpleNamespace(output_dir=str(workdir / f"fsdp{version}-out"), save_on_each_node=False)
    callback.on_train_end(args, TrainerState(), None, model=model)
    result = callback.last_result
    after = read_live_adapter(model, "default", callback.backend)
    write_ok = all(torch.equal(after.modules[n].lora_a, result.adapter.modules[n].lora_a)
                   and torch.equal(after.modules[n].lora_b, result.adapter.modules[n].lora_b)
                   for n in result.selected_modules)

    # One optimizer step on the repaired shards must run (parameters stay valid training state).
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = model(input_ids=torch.tensor([[2, 4, 9, 10, 11, 3]]), labels=torch.tensor([[2, 4, 9, 10, 11, 3]])).loss
    loss.backward()
    optimizer.step()

    record = {"rank": rank, "backend": callback.backend, "rank_policy": result.rank_policy,
              "selected": result.selected_modules, "read_ok": read_ok, "write_ok": write_ok,
              "loss_finite": bool(torch.isfinite(loss).item())}
    (workdir / f"fsdp{version}-rank-{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
