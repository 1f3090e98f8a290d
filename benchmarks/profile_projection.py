"""Time each step of `scoring.delta_projection` on one weight shape, against copying the two weights.

The weights are random bf16 tensors in memory (no file), so the numbers show the arithmetic alone. Each step runs
over all column blocks of `V`, as `delta_projection` runs it, and is timed on its own on blocks that are already in
cache. The whole call also pays one Python dispatch per operation and block, so it takes longer than the steps' sum.

Example:

    python benchmarks/profile_projection.py --shape 4096 4096 --rank 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from safemerge_callback.scoring import block_width, delta_projection


def median_ms(step, repeats: int) -> float:
    """Return the median wall time of `step()` in milliseconds, after one untimed call."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def step_timings(out_features: int, in_features: int, rank: int, repeats: int) -> dict[str, float]:
    """Return the median milliseconds of each step of `delta_projection` and of the copy it is compared with."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(out_features, in_features, generator=generator).bfloat16()
    aligned = (base.float() + 0.01 * torch.randn(out_features, in_features, generator=generator)).bfloat16()
    lora_b = torch.randn(out_features, rank, generator=generator)

    width = block_width(out_features, in_features)
    starts = range(0, in_features, width)
    buffer, base_buffer = torch.empty(out_features, width), torch.empty(out_features, width)
    lora_b_t = lora_b.T.contiguous()
    projected_t = torch.zeros(rank, out_features)
    left = torch.zeros(rank, width)

    def blockwise(operation):
        def run():
            for start in starts:
                operation(start, min(start + width, in_features))
        return run

    def convert_aligned(start, stop):
        buffer[:, : stop - start].copy_(aligned[:, start:stop])

    def convert_base(start, stop):
        base_buffer[:, : stop - start].copy_(base[:, start:stop])

    def subtract(start, stop):
        buffer[:, : stop - start].sub_(base_buffer[:, : stop - start])

    def norm(start, stop):
        torch.linalg.vector_norm(buffer[:, : stop - start], dim=1).square().sum(dtype=torch.float64)

    def left_product(start, stop):
        torch.mm(lora_b_t, buffer[:, : stop - start], out=left[:, : stop - start])

    def right_product(start, stop):
        projected_t.addmm_(left[:, : stop - start], buffer[:, : stop - start].T)

    return {
        "copy both weights (clone)": median_ms(lambda: (aligned.clone(), base.clone()), repeats),
        "delta_projection, whole call": median_ms(lambda: delta_projection(aligned, base, lora_b), repeats),
        "convert aligned block to float32": median_ms(blockwise(convert_aligned), repeats),
        "convert base block to float32": median_ms(blockwise(convert_base), repeats),
        "subtract": median_ms(blockwise(subtract), repeats),
        "row norms": median_ms(blockwise(norm), repeats),
        "Bᵀ V_c": median_ms(blockwise(left_product), repeats),
        "Gᵀ += (Bᵀ V_c) V_cᵀ": median_ms(blockwise(right_product), repeats),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=2, default=(4096, 4096), metavar=("OUT", "IN"),
                        help="weight shape (out_features, in_features)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls of each step")
    args = parser.parse_args(argv)
    for flag, values in (("--shape", args.shape), ("--rank", [args.rank]), ("--repeats", [args.repeats])):
        if min(values) < 1:
            parser.error(f"{flag} must be positive, got {' '.join(map(str, values))}.")

    out_features, in_features = args.shape
    width = block_width(out_features, in_features)
    print(f"shape ({out_features}, {in_features}), r = {args.rank}, blocks of {width} columns, "
          f"{torch.get_num_threads()} torch threads")
    for step, milliseconds in step_timings(out_features, in_features, args.rank, args.repeats).items():
        print(f"{step:<36} {milliseconds:8.2f} ms")


if __name__ == "__main__":
    main()
