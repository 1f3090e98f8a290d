"""Two faults of the callback under torchrun (2 processes, gloo): `rank_policy='exact'` on an FSDP2-sharded model, and
a write-back that rank 1 corrupts after the repair.

Usage: rank_faults.py WORKDIR. WORKDIR contains `base/`, `aligned/` and `safety/`. Each rank writes
`WORKDIR/rank-faults-<r>.json` with the error type and message each phase ended in.
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, TrainerState

from safemerge_callback import live, testing
from safemerge_callback.callback import SafeMergeCallback


def build_peft_model(workdir: Path):
    model = AutoModelForCausalLM.from_pretrained(workdir / "aligned", dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    testing.fill_lora_weights(model, seed=3)
    return model


def make_callback(workdir: Path, **overrides) -> SafeMergeCallback:
    return SafeMergeCallback(base_model=str(workdir / "base"), safety_adapter=str(workdir / "safety"), threshold=0.9,
                             **overrides)


def exact_under_fsdp2(workdir: Path) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_peft_model(workdir)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    callback = make_callback(workdir, rank_policy="exact")
    try:
        callback.on_train_begin(None, TrainerState(), None, model=model)
    except Exception as error:  # the test checks type and message
        return {"error": type(error).__name__, "message": str(error), "backend": callback.backend}
    return {"error": None, "backend": callback.backend}


def sabotaged_write_back(workdir: Path, rank: int) -> dict:
    model = build_peft_model(workdir)
    callback = make_callback(workdir)
    callback.on_train_begin(None, TrainerState(), None, model=model)
    sabotaged = []
    write = live.write_live_adapter

    def write_then_corrupt_on_rank_1(model, result, adapter_name, backend):
        changed = write(model, result, adapter_name, backend)
        if rank == 1:
            sabotaged.append(result.selected_modules[0])
            layer = live.unwrap_peft_model(model).base_model.model.get_submodule(sabotaged[0])
            with torch.no_grad():
                layer.lora_B[adapter_name].weight[0, 0] += 1e-3
        return changed

    live.write_live_adapter = write_then_corrupt_on_rank_1
    output_dir = workdir / "sabotage-out"
    args = SimpleNamespace(output_dir=str(output_dir), save_on_each_node=False)
    try:
        callback.on_train_end(args, TrainerState(), None, model=model)
    except Exception as error:  # the test checks type and message
        return {"error": type(error).__name__, "message": str(error), "sabotaged": sabotaged,
                "backend": callback.backend, "report_written": (output_dir / "safemerge_report.json").exists()}
    finally:
        live.write_live_adapter = write
    return {"error": None, "sabotaged": sabotaged, "backend": callback.backend}


def main() -> None:
    workdir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    record = {"rank": rank, "fsdp2_exact": exact_under_fsdp2(workdir)}
    dist.barrier()
    record["sabotage"] = sabotaged_write_back(workdir, rank)
    (workdir / f"rank-faults-{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
