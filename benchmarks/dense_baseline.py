"""Reference SafeMERGE scores computed the dense way, as the comparison point of `bench_repair.py`.

Both checkpoints are loaded whole into memory as float32 state dicts. Every LoRA module gets its dense projection
`C = V Vᵀ / ‖V‖_F` (`(out, out)`) and its dense update `ΔW = s B A`, and its score is `cos(vec(C ΔW), vec(ΔW))`. This is the same math as `safemerge_callback.scoring.lora_alignment_score`, done the way
the code published with the SafeMERGE paper (arXiv 2503.17239) does it, so the benchmark can time both on the same
files. One `C` is alive at a time. Keeping all of them, as a precomputed projection list does, costs more memory.

Example:

    python benchmarks/dense_baseline.py --task DIR/adapters/task-r8-qv --base DIR/base --aligned DIR/aligned
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_fp32_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a (sharded or single-file) safetensors checkpoint as float32."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state_dict = {}
    for name in files:
        for key, tensor in load_file(str(model_dir / name)).items():
            state_dict[key] = tensor.to(torch.float32)
    return state_dict


def load_lora_factors(adapter_dir: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """Return `{module name: (A, B)}` of a PEFT LoRA adapter and its scaling `lora_alpha / r`.

    Only the plain config (`r`, `lora_alpha`) is read: adapters with `rank_pattern`, `alpha_pattern` or rsLoRA are
    outside what this reference handles.
    """
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_rslora"):
        raise ValueError(f"Unsupported adapter config in {adapter_dir}: the dense reference handles plain LoRA configs "
                         "only. Use an adapter without rank_pattern, alpha_pattern and use_rslora.")
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    factors = {}
    for key, tensor in weights.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len("base_model.model."):-len(".lora_A.weight")]
        lora_b = weights[key.replace(".lora_A.weight", ".lora_B.weight")]
        factors[name] = (tensor.to(torch.float32), lora_b.to(torch.float32))
    return factors, config["lora_alpha"] / config["r"]


def dense_score(delta: torch.Tensor, update: torch.Tensor) -> float | None:
    """Return `cos(vec(C ΔW), vec(ΔW))` with the dense `C = V Vᵀ / ‖V‖_F`, or None when `V` or `ΔW` is zero."""
    delta_norm = torch.linalg.vector_norm(delta)
    if delta_norm == 0 or not torch.any(update):
        return None
    projection = delta @ delta.T / delta_norm
    projected = projection @ update
    denominator = torch.linalg.vector_norm(projected) * torch.linalg.vector_norm(update)
    if denominator == 0:
        return 0.0
    return float(torch.sum(projected * update) / denominator)


def dense_scores(task_dir: str | Path, base_dir: str | Path, aligned_dir: str | Path) -> dict[str, float | None]:
    """Score every LoRA module of `task_dir` the dense way, with both models in memory as float32."""
    base = load_fp32_state_dict(base_dir)
    aligned = load_fp32_state_dict(aligned_dir)
    factors, scaling = load_lora_factors(task_dir)
    scores = {}
    for name, (lora_a, lora_b) in factors.items():
        key = f"{name}.weight"
        if key not in base or key not in aligned:
            raise ValueError(f"Weight {key!r} of module {name!r} not found in the base or aligned checkpoint. "
                             "Check that the adapter was trained on this model.")
        delta = aligned[key] - base[key]
        scores[name] = dense_score(delta, scaling * lora_b @ lora_a)
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Dense reference SafeMERGE scores (float32, full models in memory).")
    parser.add_argument("--task", required=True, help="task adapter directory (PEFT format)")
    parser.add_argument("--base", required=True, help="base model directory (safetensors)")
    parser.add_argument("--aligned", required=True, help="aligned model directory (safetensors)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    scores = dense_scores(args.task, args.base, args.aligned)
    elapsed = time.perf_counter() - start
    for name, score in scores.items():
        print(f"{name}\t{'undefined' if score is None else f'{score:.6f}'}")
    defined = [s for s in scores.values() if s is not None and math.isfinite(s)]
    print(f"{len(scores)} modules, {len(defined)} defined scores, {elapsed:.2f} s")


if __name__ == "__main__":
    main()
