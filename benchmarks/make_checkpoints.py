"""Write synthetic base/aligned checkpoints and LoRA adapters with the file layout of real 7B chat models.

The output directory gets:

    base/      config.json, model-0000X-of-0000N.safetensors, model.safetensors.index.json (bf16, HF Llama keys)
    aligned/   the same keys, each weight = base + a seeded random rank-k perturbation, so V has structure
    adapters/  task-r{r}-{target}/ and safety-r{r}-{target}/ in PEFT's format (adapter_model.safetensors,
               adapter_config.json whose base_model_name_or_path is the aligned directory)

Every tensor comes from a `torch.Generator` seeded from `(seed, tensor name)`, so a checkpoint written with
`--layers 8` contains exactly the first 8 layers of the 32-layer one. The task adapter's `B` mixes the module's
alignment directions with noise at a per-module angle, so its scores spread over [0, 1]; the safety adapter's `B`
lies mostly in those directions.

Example:

    python benchmarks/make_checkpoints.py --shape llama2-7b --modules attn --ranks 8 --targets qv \\
        --output /tmp/safemerge-bench/llama2-7b
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class Shape:
    """Dimensions of one model family, as in its published `config.json`."""

    model_type: str
    architecture: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    qkv_bias: bool
    max_shard_bytes: int

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads


SHAPES = {
    "llama2-7b": Shape("llama", "LlamaForCausalLM", 4096, 11008, 32, 32, 32, 32000, False, 2 << 30),
    "qwen2-7b": Shape("qwen2", "Qwen2ForCausalLM", 3584, 18944, 28, 28, 4, 152064, True, 2 << 30),
    # Small enough for the smoke test, with grouped-query attention and several shards like the 7B layouts.
    "small": Shape("llama", "LlamaForCausalLM", 256, 688, 2, 4, 2, 1000, False, 1 << 20),
}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGETS = {"qv": ("q_proj", "v_proj"), "all-linear": ATTENTION + MLP}
# Weight scale of a trained 7B model (std of its linear weights is about 0.02).
WEIGHT_STD = 0.02


def module_shapes(shape: Shape, layers: int, modules: str) -> dict[str, tuple[int, int]]:
    """Return `(out, in)` of every linear module written, keyed by module name, in checkpoint order."""
    per_layer = {
        "q_proj": (shape.hidden, shape.hidden), "k_proj": (shape.kv_dim, shape.hidden),
        "v_proj": (shape.kv_dim, shape.hidden), "o_proj": (shape.hidden, shape.hidden),
        "gate_proj": (shape.intermediate, shape.hidden), "up_proj": (shape.intermediate, shape.hidden),
        "down_proj": (shape.hidden, shape.intermediate),
    }
    names = ATTENTION if modules == "attn" else ATTENTION + MLP
    result = {}
    for layer in range(layers):
        for name in names:
            group = "self_attn" if name in ATTENTION else "mlp"
            result[f"model.layers.{layer}.{group}.{name}"] = per_layer[name]
    return result


def generator_for(seed: int, name: str) -> torch.Generator:
    """Return a generator seeded from `(seed, name)`, so each tensor is the same whatever else is written."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def alignment_factors(seed: int, name: str, out_features: int, in_features: int,
                      rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(P, Q)`, `(out, k)` and `(k, in)`, with `P Q` the alignment perturbation of module `name`.

    The entries of `P Q` have a standard deviation of `0.1 · WEIGHT_STD`, well above the bf16 rounding step of the
    weights (about `WEIGHT_STD / 256`), so `V = W_aligned − W_base` keeps its low-rank structure after rounding.
    """
    generator = generator_for(seed + 1, name)
    left = torch.randn(out_features, rank, generator=generator)
    right = torch.randn(rank, in_features, generator=generator) * (0.1 * WEIGHT_STD / math.sqrt(rank))
    return left, right


def layer_tensors(shape: Shape, layer: int, modules: str, seed: int, alignment_rank: int,
                  directions: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Return the base and aligned bf16 tensors of one decoder layer, and store each module's `P` in `directions`."""
    base, aligned = {}, {}
    for name, (out_features, in_features) in module_shapes(shape, layer + 1, modules).items():
        if not name.startswith(f"model.layers.{layer}."):
            continue
        weight = torch.randn(out_features, in_features, generator=generator_for(seed, name)) * WEIGHT_STD
        left, right = alignment_factors(seed, name, out_features, in_features, alignment_rank)
        directions[name] = left
        base[f"{name}.weight"] = weight.to(torch.bfloat16)
        aligned[f"{name}.weight"] = (weight + left @ right).to(torch.bfloat16)
        if shape.qkv_bias and name.endswith(("q_proj", "k_proj", "v_proj")):
            bias = (torch.randn(out_features, generator=generator_for(seed, f"{name}.bias")) * WEIGHT_STD)
            base[f"{name}.bias"] = aligned[f"{name}.bias"] = bias.to(torch.bfloat16)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        key = f"model.layers.{layer}.{norm}.weight"
        base[key] = aligned[key] = torch.ones(shape.hidden, dtype=torch.bfloat16)
    return base, aligned


def outer_tensors(shape: Shape, modules: str, seed: int) -> dict[str, torch.Tensor]:
    """Return the final norm, and with `modules="all"` the embedding and `lm_head`, shared by base and aligned."""
    tensors = {"model.norm.weight": torch.ones(shape.hidden, dtype=torch.bfloat16)}
    if modules == "all":
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            values = torch.randn(shape.vocab, shape.hidden, generator=generator_for(seed, key)) * WEIGHT_STD
            tensors[key] = values.to(torch.bfloat16)
    return tensors


class ShardWriter:
    """Collect tensors into shards of at most `max_bytes` and write them as `model-0000X-of-0000N.safetensors`."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory = directory
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending.update(tensors)
        self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        number = len(self.shards) + 1
        save_file(self.pending, str(self.directory / f"shard-{number}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self, total_bytes: int) -> None:
        """Rename the shards to their final `-of-N` names and write `model.safetensors.index.json`."""
        self.flush()
        count = len(self.shards)
        weight_map = {}
        for number, keys in enumerate(self.shards, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            (self.directory / f"shard-{number}.tmp").rename(self.directory / final)
            weight_map.update({key: final for key in keys})
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def model_config(shape: Shape, layers: int) -> dict:
    """Return the `config.json` content of the synthetic model, in the fields `transformers` writes."""
    return {
        "architectures": [shape.architecture], "model_type": shape.model_type, "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate, "num_hidden_layers": layers,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads, "vocab_size": shape.vocab,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }


def write_checkpoints(output: Path, shape: Shape, layers: int, modules: str, seed: int,
                      alignment_rank: int) -> dict[str, torch.Tensor]:
    """Write `output/base` and `output/aligned`, and return each module's alignment directions `P`."""
    writers = {role: ShardWriter(output / role, shape.max_shard_bytes) for role in ("base", "aligned")}
    directions: dict[str, torch.Tensor] = {}
    outer = outer_tensors(shape, modules, seed)
    total_bytes = sum(t.numel() * t.element_size() for t in outer.values())
    # The embedding goes first and lm_head last, as in the index of a saved Llama checkpoint.
    embedding = {key: outer.pop(key) for key in ["model.embed_tokens.weight"] if key in outer}
    for writer in writers.values():
        writer.add(embedding)
    for layer in range(layers):
        base, aligned = layer_tensors(shape, layer, modules, seed, alignment_rank, directions)
        writers["base"].add(base)
        writers["aligned"].add(aligned)
        total_bytes += sum(t.numel() * t.element_size() for t in base.values())
    for writer in writers.values():
        writer.add(outer)
    for role, writer in writers.items():
        writer.finish(total_bytes)
        (output / role / "config.json").write_text(json.dumps(model_config(shape, layers), indent=2) + "\n")
    return directions


def adapter_factors(seed: int, name: str, direction: torch.Tensor, in_features: int, rank: int,
                    role: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(A, B)` of one module: `B = cos θ · P R + sin θ · N` with column norms matched between the parts.

    `θ` is drawn per module from [0, π/2] for the task adapter (scores spread over [0, 1]) and from [0, π/8] for
    the safety adapter (mostly aligned updates).
    """
    generator = generator_for(seed + 2 + rank, f"{role}:{name}")
    out_features, alignment_rank = direction.shape
    limit = math.pi / 2 if role == "task" else math.pi / 8
    angle = float(torch.rand(1, generator=generator)) * limit
    in_span = direction @ torch.randn(alignment_rank, rank, generator=generator)
    noise = torch.randn(out_features, rank, generator=generator)
    in_span = in_span / in_span.norm(dim=0, keepdim=True)
    noise = noise / noise.norm(dim=0, keepdim=True)
    lora_b = (math.cos(angle) * in_span + math.sin(angle) * noise) * 0.01
    lora_a = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
    return lora_a, lora_b


def write_adapter(directory: Path, aligned_dir: Path, module_dims: dict[str, tuple[int, int]],
                  directions: dict[str, torch.Tensor], target: str, rank: int, role: str, seed: int) -> None:
    """Write one PEFT LoRA adapter (`adapter_model.safetensors`, `adapter_config.json`) for `target` modules."""
    suffixes = TARGETS[target]
    tensors = {}
    for name, (_, in_features) in module_dims.items():
        if not name.endswith(suffixes):
            continue
        lora_a, lora_b = adapter_factors(seed, name, directions[name], in_features, rank, role)
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b.contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": sorted(suffixes), "base_model_name_or_path": str(aligned_dir.resolve()),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "inference_mode": True,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def generate(output: str | Path, shape_name: str = "small", *, layers: int | None = None, modules: str = "attn",
             ranks: tuple[int, ...] = (8, 16), targets: tuple[str, ...] = ("qv",), seed: int = 0,
             alignment_rank: int = 16, overwrite: bool = False) -> Path:
    """Write base, aligned and adapter directories under `output` and return `output`.

    Raises:
        ValueError: for an unknown shape or target, a layer count out of range, all-linear adapters on a checkpoint
            written with `modules="attn"`, or an existing `output` without `overwrite`.
    """
    if shape_name not in SHAPES:
        raise ValueError(f"Invalid shape {shape_name!r}: choose one of {sorted(SHAPES)}.")
    shape = SHAPES[shape_name]
    layers = shape.layers if layers is None else layers
    if not 1 <= layers <= shape.layers:
        raise ValueError(f"--layers must be in [1, {shape.layers}] for {shape_name}, got {layers}.")
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"Invalid target(s) {unknown}: choose from {sorted(TARGETS)}.")
    if "all-linear" in targets and modules != "all":
        raise ValueError("Targets 'all-linear' need the MLP weights, which --modules attn leaves out. Pass --modules all, "
                         "or use --targets qv.")
    output = Path(output)
    if output.exists():
        if not overwrite:
            raise ValueError(f"Output directory {str(output)!r} already exists. Pass --overwrite to replace it.")
        shutil.rmtree(output)

    directions = write_checkpoints(output, shape, layers, modules, seed, alignment_rank)
    module_dims = module_shapes(shape, layers, modules)
    for target in targets:
        for rank in ranks:
            for role in ("task", "safety"):
                write_adapter(output / "adapters" / f"{role}-r{rank}-{target}", output / "aligned", module_dims,
                              directions, target, rank, role, seed)
    return output


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="directory to create (put it under /tmp, not in the repo)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small", help="model dimensions")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers to write (default: all of the shape)")
    parser.add_argument("--modules", choices=("attn", "all"), default="attn",
                        help="attn: q/k/v/o weights and norms only; all: also the MLP, embedding and lm_head")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16], help="LoRA ranks of the adapters")
    parser.add_argument("--targets", nargs="+", default=["qv"], choices=sorted(TARGETS), help="adapter targets")
    parser.add_argument("--seed", type=int, default=0, help="seed of every generator")
    parser.add_argument("--alignment-rank", type=int, default=16, help="rank of the base→aligned perturbation")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        output = generate(args.output, args.shape, layers=args.layers, modules=args.modules, ranks=tuple(args.ranks),
                          targets=tuple(args.targets), seed=args.seed, alignment_rank=args.alignment_rank,
                          overwrite=args.overwrite)
    except ValueError as error:
        raise SystemExit(f"make_checkpoints.py: error: {error}") from None
    size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    print(f"wrote {output} ({size / 2**30:.2f} GiB) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
