"""Distributed plumbing: backend detection, full-tensor read/write of live LoRA weights, rank agreement.

Every function that gathers or writes is a collective: all ranks call it in the same order with the same modules.

| backend     | LoRA parameter seen by a callback     | read                                  | write                              |
|-------------|---------------------------------------|---------------------------------------|------------------------------------|
| `single`    | full tensor                           | as is                                 | `copy_`                            |
| `ddp`       | full tensor on every rank (DDP, and DeepSpeed ZeRO-1/2) | as is              | `copy_`, identical on every rank   |
| `deepspeed` | ZeRO-3 partition (`shape == (0,)`)    | `GatheredParameters(modifier_rank=None)` | `GatheredParameters(modifier_rank=0)` |
| `fsdp1`     | flat-parameter shard                  | `summon_full_params`                  | `summon_full_params(writeback=True)`, identical on every rank |
| `fsdp2`     | `DTensor` sharded on dim 0            | `full_tensor()`                       | `distribute_tensor(...).to_local()` copied into the shard |
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterator

import torch
import torch.distributed as dist


logger = logging.getLogger(__name__)

SHARDED_BACKENDS = ("deepspeed", "fsdp1", "fsdp2")
# Wrapper segments that FSDP, activation checkpointing and torch.compile insert into parameter names.
WRAPPER_SEGMENTS = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def rank_and_world() -> tuple[int, int]:
    """Return `(global rank, world size)`, `(0, 1)` outside `torch.distributed`."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def all_gather_objects(value):
    """Return the list of `value` from every rank, in rank order (`[value]` in a single process)."""
    rank, world = rank_and_world()
    if world == 1:
        return [value]
    gathered = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def is_writer(save_on_each_node: bool = False) -> bool:
    """Return whether this process writes files: global rank 0, or local rank 0 of each node with `save_on_each_node`.

    The rank comes from `torch.distributed`, not from accelerate, because a DeepSpeed launch on a host without
    accelerators makes accelerate report process index 0 on every rank.
    """
    rank, world = rank_and_world()
    if world == 1:
        return True
    if save_on_each_node:
        return int(os.environ.get("LOCAL_RANK", rank)) == 0
    return rank == 0


def detect_backend(model: torch.nn.Module) -> str:
    """Return how the model's parameters are laid out: `single`, `ddp`, `deepspeed`, `fsdp1` or `fsdp2`."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    parameters = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in parameters):
        return "deepspeed"
    if isinstance(model, FullyShardedDataParallel) or any(
        isinstance(m, FullyShardedDataParallel) for m in model.modules()
    ):
        return "fsdp1"
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor has no FSDP2 either
        DTensor = ()
    if any(isinstance(p, DTensor) for p in parameters):
        return "fsdp2"
    return "ddp" if rank_and_world()[1] > 1 else "single"


def clean_parameter_name(name: str) -> str:
    """Remove the wrapper segments FSDP, checkpointing and `torch.compile` add to parameter names."""
    return WRAPPER_SEGMENTS.sub("", name)


def adapter_parameters(model: torch.nn.Module, adapter_name: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Return `(clean name, parameter)` for every parameter of one adapter (LoRA factors, `modules_to_save` copies)."""
    pattern = re.compile(rf"\.{re.escape(adapter_name)}(\.|$)")
    return [(clean_parameter_name(name), parameter) for name, parameter in model.named_parameters()
            if pattern.search(clean_parameter_name(name))]


@contextlib.contextmanager
def full_adapter_parameters(model: torch.nn.Module, adapter_name: str, backend: str,
                            writeback: bool = False) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
    """Yield the adapter's parameters with their full values visible (collective on sharded backends).

    With `writeback`, values assigned through `write_full_value` inside the block persist in every rank's shard.
    """
    if backend == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, writeback=writeback, recurse=True):
            yield adapter_parameters(model, adapter_name)
    elif backend == "deepspeed":
        import deepspeed

        selected = adapter_parameters(model, adapter_name)
        with deepspeed.zero.GatheredParameters([p for _, p in selected], modifier_rank=0 if writeback else None):
            yield selected
    else:
        yield adapter_parameters(model, adapter_name)


def read_full_value(parameter: torch.nn.Parameter, backend: str) -> torch.Tensor:
    """Return a CPU copy of a parameter's full value (inside `full_adapter_parameters`; collective for FSDP2)."""
    value = parameter.detach()
    if backend == "fsdp2" and hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return value.to("cpu", copy=True)


@torch.no_grad()
def write_full_value(parameter: torch.nn.Parameter, value: torch.Tensor, backend: str) -> None:
    """Assign a full value to a parameter (inside `full_adapter_parameters(writeback=True)`; collective for FSDP2)."""
    if backend == "fsdp2" and hasattr(parameter, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        full = value.to(device=parameter.device, dtype=parameter.dtype)
        parameter.to_local().copy_(distribute_tensor(full, parameter.device_mesh, parameter.placements).to_local())
        return
    if tuple(parameter.shape) != tuple(value.shape):
        raise ValueError(f"Cannot write a {tuple(value.shape)} value into a {tuple(parameter.shape)} parameter; "
                         "on sharded backends the repair must keep the rank (rank_policy='keep').")
    parameter.data.copy_(value.to(device=parameter.device, dtype=parameter.dtype))


def tensor_digest(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Return a SHA-256 digest of each tensor's bytes, to compare ranks exactly."""
    digests = {}
    for name, tensor in tensors.items():
        data = tensor.detach().to("cpu").contiguous()
        digests[name] = hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()
    return digests


def find_rank_disagreement(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Return the names whose values differ between ranks (collective; empty in a single process)."""
    digests = all_gather_objects(tensor_digest(tensors))
    names = set().union(*(d.keys() for d in digests))
    return sorted(name for name in names if len({d.get(name) for d in digests}) > 1)
