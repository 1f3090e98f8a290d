"""Merge rules for one selected module and their realisation as LoRA factors (pure tensor functions).

Every function returns factors `(A', B')` with `ΔW' = B' A'` (LoRA scaling 1): the caller folds the scaling of the
saved adapter back in. Notation: `A` is `lora_A.weight` `(r, in)`, `B` is `lora_B.weight` `(out, r)`, `s` the LoRA
scaling, `w_t, w_s` the task and safety weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass
class MergedFactors:
    """A merged update as LoRA factors with scaling 1.

    Attributes:
        lora_a (`torch.Tensor`): `A'`, shape `(r', in)`, float32.
        lora_b (`torch.Tensor`): `B'`, shape `(out, r')`, float32.
        realisation_error (`float`): `‖B' A' − M‖_F / ‖M‖_F` where `M` is what the method defines (0.0 when exact).
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    realisation_error: float = 0.0

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


def merge_linear(
    task: tuple[torch.Tensor, torch.Tensor, float],
    safety: tuple[torch.Tensor, torch.Tensor, float],
    weights: tuple[float, float],
) -> MergedFactors:
    """Realise `w_t ΔW_t + w_s ΔW_s` exactly as a rank `r_t + r_s` LoRA.

    `A' = [w_t s_t A_t; w_s s_s A_s]` and `B' = [B_t, B_s]`, so `B' A' = w_t s_t B_t A_t + w_s s_s B_s A_s`.

    Args:
        task (`tuple`): `(A_t, B_t, s_t)`.
        safety (`tuple`): `(A_s, B_s, s_s)`.
        weights (`tuple[float, float]`): `(w_t, w_s)`, any finite values.
    """
    (task_a, task_b, task_scaling), (safety_a, safety_b, safety_scaling) = task, safety
    lora_a = torch.cat([weights[0] * task_scaling * task_a.float(), weights[1] * safety_scaling * safety_a.float()])
    lora_b = torch.cat([task_b.float(), safety_b.float()], dim=1)
    return MergedFactors(lora_a, lora_b, 0.0)


def merge_peft_linear(
    task: tuple[torch.Tensor, torch.Tensor, float],
    safety: tuple[torch.Tensor, torch.Tensor, float],
    weights: tuple[float, float],
) -> MergedFactors:
    """Mix the factors as PEFT's `add_weighted_adapter(combination_type="linear")` does (parity mode).

    `A' = Σ sign(w s) √|w s| A` and `B' = Σ √|w s| B`. The product contains the cross terms `B_t A_s` and `B_s A_t`,
    so it is not `w_t ΔW_t + w_s ΔW_s`; `realisation_error` reports the distance to that formula.
    """
    (task_a, task_b, task_scaling), (safety_a, safety_b, safety_scaling) = task, safety
    if task_a.shape[0] != safety_a.shape[0]:
        raise ValueError(
            f"method 'peft_linear' needs task and safety adapters of equal rank, got r={task_a.shape[0]} and "
            f"r={safety_a.shape[0]}. Use method 'linear', which merges any ranks exactly."
        )
    factors = [weights[0] * task_scaling, weights[1] * safety_scaling]
    roots = [abs(f) ** 0.5 for f in factors]
    signs = [1.0 if f >= 0 else -1.0 for f in factors]
    lora_a = signs[0] * roots[0] * task_a.float() + signs[1] * roots[1] * safety_a.float()
    lora_b = roots[0] * task_b.float() + roots[1] * safety_b.float()

    exact = merge_linear(task, safety, weights)
    error = lowrank_difference_norm(lora_a, lora_b, exact.lora_a, exact.lora_b)
    reference = lowrank_norm(exact.lora_a, exact.lora_b)
    return MergedFactors(lora_a, lora_b, error / reference if reference > 0 else 0.0)


def project_safelora(projected: torch.Tensor, delta_norm: float) -> torch.Tensor:
    """Return SafeLoRA's projected `B ← C B = V Vᵀ B / ‖V‖_F`, shape `(out, r)`, without building `C`.

    Args:
        projected (`torch.Tensor`): `G = V Vᵀ B`, shape `(out, r)`, from `scoring.delta_projection`.
        delta_norm (`float`): `‖V‖_F`, positive.
    """
    return projected.float() / delta_norm


def trim_by_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `int(density · numel)` entries of largest magnitude and zero the rest (TIES "trim")."""
    keep = int(density * tensor.numel())
    if keep >= tensor.numel():
        return tensor.clone()
    mask = torch.zeros(tensor.numel(), dtype=torch.bool)
    if keep > 0:
        mask[torch.topk(tensor.abs().flatten(), keep).indices] = True
    return tensor * mask.view_as(tensor)


def drop_and_rescale(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability `density` and divide the kept ones by `density` (DARE)."""
    if density >= 1.0:
        return tensor.clone()
    mask = torch.rand(tensor.shape, generator=generator, dtype=torch.float32) < density
    return tensor * mask / density


def elect_sign(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Return the elected sign per entry of stacked updates `(n, out, in)` (TIES "elect"); ties resolve to +1."""
    votes = stacked.sum(dim=0) if method == "total" else stacked.sign().sum(dim=0)
    return torch.where(votes >= 0, 1.0, -1.0)


def disjoint_mean(stacked: torch.Tensor, weight_column: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Average, per entry, the weighted updates whose unweighted sign agrees with `sign` (TIES "disjoint merge").

    Args:
        stacked (`torch.Tensor`): pruned updates `(n, out, in)`.
        weight_column (`torch.Tensor`): weights `(n, 1, 1)`.
        sign (`torch.Tensor`): elected sign `(out, in)` of ±1.
    """
    agrees = stacked.sign() == sign
    total = (stacked * weight_column * agrees).sum(dim=0)
    return total / agrees.sum(dim=0).clamp(min=1)


def merge_dense(
    updates: tuple[torch.Tensor, torch.Tensor],
    weights: tuple[float, float],
    method: str,
    density: float,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Merge two dense updates `ΔW_t, ΔW_s` `(out, in)` with TIES, DARE-linear or DARE-TIES.

    The rules follow PEFT's `merge_utils` (TIES: trim, elect the sign on the unweighted trimmed updates, weight,
    disjoint mean; DARE: random drop with rescale, then a weighted sum or the TIES election), with the DARE mask drawn
    from `generator` instead of the global RNG.
    """
    if method in ("dare_linear", "dare_ties") and generator is None:
        raise ValueError(f"method {method!r} needs a seeded torch.Generator for its drop mask.")
    if method == "ties":
        pruned = [trim_by_magnitude(update.float(), density) for update in updates]
    elif method in ("dare_linear", "dare_ties"):
        pruned = [drop_and_rescale(update.float(), density, generator) for update in updates]
    else:
        raise ValueError(f"merge_dense supports 'ties', 'dare_linear' and 'dare_ties', got {method!r}.")

    stacked = torch.stack(pruned)
    weight_column = torch.tensor(weights, dtype=torch.float32).view(-1, 1, 1)
    if method == "dare_linear":
        return (stacked * weight_column).sum(dim=0)
    sign = elect_sign(stacked, majority_sign_method)
    return disjoint_mean(stacked, weight_column, sign)


def factor_dense(update: torch.Tensor, rank: int) -> MergedFactors:
    """Factor a dense `(out, in)` update into rank-`rank` LoRA factors by truncated SVD.

    The singular values are split evenly (`B' = U √S`, `A' = √S Vᵀ`) so both factors have comparable norms.
    """
    u, s, vh = torch.linalg.svd(update.float(), full_matrices=False)
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    total_sq = float((s**2).sum())
    error = float((s[rank:] ** 2).sum()) / total_sq if total_sq > 0 else 0.0
    return MergedFactors((root[:, None] * vh[:rank]).contiguous(), (u[:, :rank] * root).contiguous(), error**0.5)


def truncate_factors(merged: MergedFactors, rank: int) -> MergedFactors:
    """Reduce `B' A'` to rank `rank` by an SVD computed in the factor space (cost O((out + in)·r'²), no dense ΔW).

    `realisation_error` becomes the combined error against the method's definition: the truncation error and the
    error `merged` already carried are added in quadrature, which is exact when they are orthogonal and an estimate
    otherwise.
    """
    if merged.rank <= rank:
        return merged
    q_b, r_b = torch.linalg.qr(merged.lora_b)  # B' = Q_b R_b
    q_a, r_a = torch.linalg.qr(merged.lora_a.T)  # A'ᵀ = Q_a R_a
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # B' A' = Q_b (R_b R_aᵀ) Q_aᵀ
    root = s[:rank].sqrt()
    lora_b = (q_b @ u[:, :rank]) * root
    lora_a = root[:, None] * (vh[:rank] @ q_a.T)
    total_sq = float((s**2).sum())
    truncation = (float((s[rank:] ** 2).sum()) / total_sq) ** 0.5 if total_sq > 0 else 0.0
    error = (truncation**2 + merged.realisation_error**2) ** 0.5
    return MergedFactors(lora_a.contiguous(), lora_b.contiguous(), error)


def lowrank_norm(lora_a: torch.Tensor, lora_b: torch.Tensor) -> float:
    """Return `‖B A‖_F` from the factors, as `sqrt(tr((Bᵀ B)(A Aᵀ)))`."""
    value = torch.sum((lora_b.T.double() @ lora_b.double()) * (lora_a.double() @ lora_a.double().T)).item()
    return max(value, 0.0) ** 0.5


def lowrank_difference_norm(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> float:
    """Return `‖B1 A1 − B2 A2‖_F` from the factors without forming either product."""
    return lowrank_norm(torch.cat([a1, a2]), torch.cat([b1, -b2], dim=1))


def module_generator(seed: int, module_name: str) -> torch.Generator:
    """Return a CPU generator seeded from `(seed, module_name)`, identical on every process and every run."""
    digest = hashlib.sha256(f"{seed}\0{module_name}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator
