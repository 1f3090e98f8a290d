"""Layer scores and module selection as pure tensor functions (no model, no I/O).

The score of one LoRA module is `ρ = cos(vec(C ΔW), vec(ΔW))` with the alignment projection `C = V Vᵀ / ‖V‖_F`
(SafeLoRA, arXiv 2405.16833; SafeMERGE, arXiv 2503.17239) and `ΔW = s B A`. `C` is `(out, out)` and is never built:
with `G = V (Vᵀ B)` of shape `(out, r)` and `K = A Aᵀ` of shape `(r, r)`,

    ⟨C BA, BA⟩ = tr(Gᵀ B K) / ‖V‖_F,   ‖C BA‖² = tr(Gᵀ G K) / ‖V‖_F²,   ‖BA‖² = tr(Bᵀ B K),

so `ρ = tr(Gᵀ B K) / sqrt(tr(Gᵀ G K) · tr(Bᵀ B K))`. The LoRA scaling `s` and `‖V‖_F` cancel. Cost O(out·in·r).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


# Bytes of one float32 block of `V` in `delta_projection`. Of 0.5, 1, 2 and 4 MiB, 2 MiB scored the Llama-2-7B and
# Qwen2-7B benchmark checkpoints fastest or within 5% of the fastest on a 2-core AMD EPYC (1 MiB L2 per core).
BLOCK_BYTES = 1 << 21

# Reasons a module has no defined score; such modules are never selected.
ZERO_UPDATE = "zero_update"
NO_ALIGNMENT_SIGNAL = "no_alignment_signal"


@dataclass(frozen=True)
class ScoreTerms:
    """The three inner products behind one score, kept for reports and tests.

    Attributes:
        score (`float | None`): ρ in [0, 1] (`⟨C X, X⟩ ≥ 0` because C is PSD), or None when undefined.
        undefined_reason (`str | None`): `"zero_update"` (ΔW = 0) or `"no_alignment_signal"` (V = 0).
        update_norm (`float`): `‖B A‖_F` without the LoRA scaling.
        delta_norm (`float`): `‖V‖_F`.
    """

    score: float | None
    undefined_reason: str | None
    update_norm: float
    delta_norm: float


def lora_alignment_score(delta: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                         delta_norm: float | None = None) -> ScoreTerms:
    """Compute `ρ = cos(vec(C B A), vec(B A))` from a materialised delta, without forming `C` or `B A`.

    Args:
        delta (`torch.Tensor`): alignment delta `V = W_aligned − W_base`, shape `(out, in)`.
        lora_a (`torch.Tensor`): `A`, shape `(r, in)`.
        lora_b (`torch.Tensor`): `B`, shape `(out, r)`.
        delta_norm (`float`, *optional*): `‖V‖_F` when the caller already has it (saves one pass over `V`).

    Returns:
        `ScoreTerms`. Computed in the dtype of `delta` (float64 in tests, float32 otherwise), whatever the dtype of
        the factors.
    """
    _check_score_shapes(delta.shape, lora_a, lora_b)
    dtype = delta.dtype if delta.dtype in (torch.float32, torch.float64) else torch.float32
    delta = delta.to(dtype)
    if delta_norm is None:
        delta_norm = frobenius_norm(delta)
    projected = delta @ (delta.T @ lora_b.to(dtype))  # G = V Vᵀ B, (out, r)
    return score_from_projection(projected, delta_norm, lora_a, lora_b)


def score_from_projection(projected: torch.Tensor, delta_norm: float, lora_a: torch.Tensor,
                          lora_b: torch.Tensor) -> ScoreTerms:
    """Compute ρ from `G = V Vᵀ B` and `‖V‖_F`, the two quantities that depend on the alignment delta.

    Args:
        projected (`torch.Tensor`): `G`, shape `(out, r)`, as `delta_projection` returns it.
        delta_norm (`float`): `‖V‖_F`.
        lora_a (`torch.Tensor`): `A`, shape `(r, in)`.
        lora_b (`torch.Tensor`): `B`, shape `(out, r)`.

    Returns:
        `ScoreTerms`, computed in the dtype of `projected`.
    """
    dtype = projected.dtype
    lora_a = lora_a.to(dtype)
    lora_b = lora_b.to(dtype)

    gram_a = lora_a @ lora_a.T  # K, (r, r)
    update_sq = torch.sum((lora_b.T @ lora_b) * gram_a).item()  # tr(Bᵀ B K) = ‖B A‖²
    update_norm = math.sqrt(max(update_sq, 0.0))

    if update_sq == 0.0:
        return ScoreTerms(None, ZERO_UPDATE, update_norm, delta_norm)
    if delta_norm == 0.0:
        return ScoreTerms(None, NO_ALIGNMENT_SIGNAL, update_norm, delta_norm)

    inner = torch.sum((projected.T @ lora_b) * gram_a).item()  # tr(Gᵀ B K)
    projected_sq = torch.sum((projected.T @ projected) * gram_a).item()  # tr(Gᵀ G K)

    if projected_sq <= 0.0:
        # The update is orthogonal to every alignment direction: C ΔW = 0, so the cosine is 0 by continuity.
        return ScoreTerms(0.0, None, update_norm, delta_norm)
    score = inner / math.sqrt(projected_sq * update_sq)
    return ScoreTerms(min(max(score, -1.0), 1.0), None, update_norm, delta_norm)


def delta_projection(aligned_weight: torch.Tensor, base_weight: torch.Tensor, lora_b: torch.Tensor, *,
                     transposed: bool = False, block_bytes: int = BLOCK_BYTES) -> tuple[torch.Tensor, float]:
    """Compute `G = V Vᵀ B` and `‖V‖_F` for `V = W_aligned − W_base` in one pass over the weights, never holding `V`.

    `V Vᵀ = Σ_c V_c V_cᵀ` over column blocks `V_c` of `V`, so `G = Σ_c V_c (V_cᵀ B)`. Each block is converted,
    subtracted and used while it sits in cache, so the cost is close to that of reading the two weights once. A
    materialised float32 `V` would be written once and read three more times (norm, `Vᵀ B`, `V (Vᵀ B)`).

    Args:
        aligned_weight (`torch.Tensor`): `W_aligned` as stored: `(out, in)`, or `(in, out)` when `transposed`
            (GPT-2 `Conv1D`). Any float dtype; a memory-mapped tensor is read in place.
        base_weight (`torch.Tensor`): `W_base`, the same shape.
        lora_b (`torch.Tensor`): `B`, shape `(out, r)`.
        transposed (`bool`, defaults to `False`): whether the weights are stored `(in, out)`.
        block_bytes (`int`, defaults to `BLOCK_BYTES`): size of one converted block of `V`, in bytes.

    Returns:
        `(G, ‖V‖_F)`: `G` of shape `(out, r)` in float32 (float64 when the weights are float64). A NaN or Inf entry
        of `V` makes the norm NaN or Inf.
    """
    if aligned_weight.shape != base_weight.shape or aligned_weight.ndim != 2:
        raise ValueError(f"The aligned and base weights must be 2-D and of one shape, got "
                         f"{tuple(aligned_weight.shape)} and {tuple(base_weight.shape)}.")
    dtype = torch.float64 if aligned_weight.dtype == torch.float64 else torch.float32
    out_features, in_features = reversed(aligned_weight.shape) if transposed else aligned_weight.shape
    if lora_b.shape[0] != out_features:
        raise ValueError(f"B has shape {tuple(lora_b.shape)} but must be (out, r) with out = {out_features}, the "
                         "weights' output features.")

    width = block_width(out_features, in_features, torch.finfo(dtype).bits // 8, block_bytes)
    buffer = torch.empty((width, out_features) if transposed else (out_features, width), dtype=dtype)
    base_buffer = torch.empty_like(buffer)
    lora_b_t = lora_b.to(dtype).T.contiguous()  # Bᵀ, (r, out)
    projected_t = torch.zeros(lora_b_t.shape, dtype=dtype)  # Gᵀ, (r, out)
    norm_sq = torch.zeros((), dtype=torch.float64)

    # NOTE: each block runs about 8 torch operations, and each one that torch splits across threads ends in a
    # barrier. On a CPU that other processes keep busy, this ran 3-4x slower with 2 torch threads than with 1
    # (docs/benchmarks.md, "Under CPU contention"). The thread count stays the caller's choice.
    for start in range(0, in_features, width):
        stop = min(start + width, in_features)

        # V_c = W_aligned[:, c] − W_base[:, c] in the compute dtype, (out, stop − start).
        if transposed:
            stored, base_stored = buffer[: stop - start], base_buffer[: stop - start]
            stored.copy_(aligned_weight[start:stop])
            base_stored.copy_(base_weight[start:stop])
        else:
            stored, base_stored = buffer[:, : stop - start], base_buffer[:, : stop - start]
            stored.copy_(aligned_weight[:, start:stop])
            base_stored.copy_(base_weight[:, start:stop])
        stored.sub_(base_stored)
        block = stored.T if transposed else stored

        # Sums along the contiguous dimension: short, so accurate in float32 (see `frobenius_norm`), and fast.
        norm_sq += torch.linalg.vector_norm(stored, dim=1).square().sum(dtype=torch.float64)
        # Gᵀ += (Bᵀ V_c) V_cᵀ. The (r, k) product first, in the operand order that BLAS runs fastest for r ≪ k.
        projected_t.addmm_(lora_b_t @ block, block.T)

    return projected_t.T.contiguous(), math.sqrt(norm_sq.item())


def block_width(out_features: int, in_features: int, element_size: int = 4, block_bytes: int = BLOCK_BYTES) -> int:
    """Return how many columns of `V` (out, in) make one block of about `block_bytes` in `delta_projection`."""
    return max(1, min(in_features, block_bytes // (out_features * element_size)))


def frobenius_norm(matrix: torch.Tensor) -> float:
    """Return `‖M‖_F` of a 2-D tensor, accurate in float32 for large matrices; NaN or Inf entries give NaN or Inf.

    A single float32 `vector_norm` over 16.7M entries (a 4096 × 4096 weight) came out 7.5e-4 low with torch 2.13 on
    CPU; summing the squares of per-row norms keeps each reduction short and the result within 1e-7 of float64.
    """
    return torch.linalg.vector_norm(matrix, dim=1).square().sum().sqrt().item()


def dense_alignment_score(delta: torch.Tensor, update: torch.Tensor) -> float:
    """Compute ρ by the dense definition, building `C = V Vᵀ / ‖V‖_F`; a reference for tests and benchmarks only.

    Args:
        delta (`torch.Tensor`): `V`, shape `(out, in)`.
        update (`torch.Tensor`): `ΔW`, shape `(out, in)`.
    """
    projection = delta @ delta.T / torch.linalg.vector_norm(delta)
    projected = projection @ update
    return torch.nn.functional.cosine_similarity(projected.flatten(), update.flatten(), dim=0).item()


def select_below_threshold(scores: dict[str, float | None], thresholds: dict[str, float]) -> set[str]:
    """Return the modules whose score is defined and strictly below their threshold (`ρ < τ`)."""
    return {name for name, score in scores.items() if score is not None and score < thresholds[name]}


def select_lowest(scores: dict[str, float | None], count: int) -> set[str]:
    """Return the `count` modules with the lowest defined scores (ties broken by module name)."""
    defined = sorted((score, name) for name, score in scores.items() if score is not None)
    return {name for _, name in defined[:count]}


def _check_score_shapes(delta_shape: torch.Size, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    if len(delta_shape) != 2 or lora_a.ndim != 2 or lora_b.ndim != 2:
        raise ValueError(
            f"Scores need 2-D tensors, got V {tuple(delta_shape)}, A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}."
        )
    out_features, in_features = delta_shape
    if lora_a.shape[1] != in_features or lora_b.shape[0] != out_features or lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(
            f"Shape mismatch: V {tuple(delta_shape)} (out, in) does not fit A {tuple(lora_a.shape)} (r, in) and "
            f"B {tuple(lora_b.shape)} (out, r)."
        )
