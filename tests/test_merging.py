"""Merge rules as tensor functions: exact linear, TIES/DARE against PEFT's merge_utils, DARE determinism, SVD."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from safemerge_callback import merging
from safemerge_callback.config import SafeMergeConfig
from safemerge_callback.scoring import delta_projection


def factors(out_features, in_features, rank, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    lora_a = scale * torch.randn(rank, in_features, generator=generator)
    lora_b = scale * torch.randn(out_features, rank, generator=generator)
    return lora_a, lora_b


def dense_update(lora_a, lora_b, scaling=1.0) -> torch.Tensor:
    return scaling * lora_b.double() @ lora_a.double()


def rel_error(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    return (torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected)).item()


def two_updates(out_features=16, in_features=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(out_features, in_features, generator=generator),
            torch.randn(out_features, in_features, generator=generator))


# --- linear ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [(0.8, 0.2), (0.5, 0.5), (1.0, -1.0), (0.0, 1.0)])
@pytest.mark.parametrize("task_rank,safety_rank", [(4, 4), (16, 8), (2, 6)])
def test_linear_merge_equals_weighted_sum_of_updates_float32(weights, task_rank, safety_rank):
    task_a, task_b = factors(16, 32, task_rank, 0)
    safety_a, safety_b = factors(16, 32, safety_rank, 1)
    task_scaling, safety_scaling = 8 / task_rank, 16 / safety_rank

    merged = merging.merge_linear((task_a, task_b, task_scaling), (safety_a, safety_b, safety_scaling), weights)

    expected = weights[0] * dense_update(task_a, task_b, task_scaling) + weights[1] * dense_update(
        safety_a, safety_b, safety_scaling)
    assert merged.lora_a.dtype == torch.float32
    assert merged.lora_b.dtype == torch.float32
    assert rel_error(merged.lora_b.double() @ merged.lora_a.double(), expected) < 1e-6
    assert merged.realisation_error == 0.0


def test_linear_merge_has_rank_task_plus_safety_and_documented_factors():
    task_a, task_b = factors(16, 32, 4, 0)
    safety_a, safety_b = factors(16, 32, 8, 1)
    merged = merging.merge_linear((task_a, task_b, 2.0), (safety_a, safety_b, 0.5), (0.8, 0.2))
    assert merged.rank == 12
    assert torch.equal(merged.lora_a, torch.cat([0.8 * 2.0 * task_a, 0.2 * 0.5 * safety_a]))
    assert torch.equal(merged.lora_b, torch.cat([task_b, safety_b], dim=1))


def test_linear_merge_does_not_modify_its_inputs():
    task_a, task_b = factors(16, 32, 4, 0)
    safety_a, safety_b = factors(16, 32, 4, 1)
    copies = [t.clone() for t in (task_a, task_b, safety_a, safety_b)]
    merging.merge_linear((task_a, task_b, 2.0), (safety_a, safety_b, 4.0), (0.8, 0.2))
    for tensor, copy in zip((task_a, task_b, safety_a, safety_b), copies, strict=True):
        assert torch.equal(tensor, copy)


def test_config_rejects_negative_weights():
    with pytest.raises(ValueError, match=re.escape(
        "`weights` must be non-negative, got (1.0, -1.0). A negative weight subtracts an adapter, which SafeMERGE "
        "does not define."
    )):
        SafeMergeConfig(weights=(1.0, -1.0))


def test_config_rejects_negative_override_weights():
    with pytest.raises(ValueError, match=re.escape("`module_overrides['q_proj'].weights` must be non-negative")):
        SafeMergeConfig(module_overrides=[{"pattern": "q_proj", "weights": (-0.5, 1.0)}])


def test_config_rejects_all_zero_weights():
    with pytest.raises(ValueError, match=re.escape("`weights` must not be all zero")):
        SafeMergeConfig(weights=(0.0, 0.0))


# --- TIES / DARE ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("majority_sign_method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9, 1.0])
def test_ties_matches_peft_merge_utils_on_dense_tensors(density, majority_sign_method):
    from peft.utils.merge_utils import ties

    updates = two_updates(seed=3)
    weights = (0.8, 0.2)

    ours = merging.merge_dense(updates, weights, "ties", density, majority_sign_method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that density 1.0 prunes nothing
        reference = ties(list(updates), torch.tensor(weights), density, majority_sign_method)

    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, rtol=1e-6, atol=1e-7)


def test_ties_keeps_exactly_the_density_fraction_by_magnitude():
    update = two_updates(seed=4)[0]
    trimmed = merging.trim_by_magnitude(update, 0.25)
    kept = trimmed != 0
    assert int(kept.sum()) == int(0.25 * update.numel())
    assert update.abs()[kept].min() >= update.abs()[~kept].max()


def test_dare_linear_with_density_one_equals_weighted_sum():
    updates = two_updates(seed=5)
    merged = merging.merge_dense(updates, (0.8, 0.2), "dare_linear", 1.0,
                                 generator=merging.module_generator(0, "m"))
    assert torch.allclose(merged, 0.8 * updates[0] + 0.2 * updates[1], rtol=1e-6, atol=1e-7)


def test_dare_ties_with_density_one_equals_ties_with_density_one():
    updates = two_updates(seed=6)
    dare_ties = merging.merge_dense(updates, (0.8, 0.2), "dare_ties", 1.0, generator=merging.module_generator(0, "m"))
    ties = merging.merge_dense(updates, (0.8, 0.2), "ties", 1.0)
    assert torch.equal(dare_ties, ties)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("density", [0.01, 0.3, 1.0])
def test_dare_output_is_finite_for_every_valid_density(method, density):
    updates = two_updates(seed=7)
    merged = merging.merge_dense(updates, (0.8, 0.2), method, density, generator=merging.module_generator(0, "m"))
    assert torch.isfinite(merged).all()


def test_dare_keeps_about_density_of_entries_and_rescales_them():
    tensor = torch.ones(200, 200)
    dropped = merging.drop_and_rescale(tensor, 0.3, merging.module_generator(0, "m"))
    kept = dropped != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert torch.allclose(dropped[kept], torch.full_like(dropped[kept], 1 / 0.3))


def test_dare_needs_a_generator():
    with pytest.raises(ValueError, match=re.escape("method 'dare_ties' needs a seeded torch.Generator")):
        merging.merge_dense(two_updates(), (0.8, 0.2), "dare_ties", 0.5)


def test_dare_same_seed_gives_identical_masks_across_reruns_whatever_the_global_rng():
    updates = two_updates(seed=8)
    torch.manual_seed(1)
    first = merging.merge_dense(updates, (0.8, 0.2), "dare_ties", 0.3, generator=merging.module_generator(7, "m.q"))
    torch.manual_seed(2)
    torch.rand(100)
    second = merging.merge_dense(updates, (0.8, 0.2), "dare_ties", 0.3, generator=merging.module_generator(7, "m.q"))
    assert torch.equal(first, second)


def test_dare_masks_differ_between_seeds_and_between_modules():
    ones = torch.ones(32, 32)
    reference = merging.drop_and_rescale(ones, 0.5, merging.module_generator(7, "model.layers.0.self_attn.q_proj"))
    other_seed = merging.drop_and_rescale(ones, 0.5, merging.module_generator(8, "model.layers.0.self_attn.q_proj"))
    other_module = merging.drop_and_rescale(ones, 0.5, merging.module_generator(7, "model.layers.1.self_attn.q_proj"))
    assert not torch.equal(reference, other_seed)
    assert not torch.equal(reference, other_module)


DARE_SCRIPT = """
import sys
import torch
from safetensors.torch import save_file
from safemerge_callback import merging

generator = torch.Generator().manual_seed(11)
updates = (torch.randn(16, 24, generator=generator), torch.randn(16, 24, generator=generator))
name = "model.layers.0.self_attn.q_proj"
mask = merging.drop_and_rescale(torch.ones(16, 24), 0.3, merging.module_generator(7, name))
merged = merging.merge_dense(updates, (0.8, 0.2), "dare_ties", 0.3, generator=merging.module_generator(7, name))
save_file({"mask": mask, "merged": merged}, sys.argv[1])
"""


def test_dare_same_seed_gives_identical_masks_across_processes(tmp_path):
    path = tmp_path / "child.safetensors"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # Python's str hash must play no part in the seed
    subprocess.run([sys.executable, "-c", DARE_SCRIPT, str(path)], check=True, env=env, timeout=120)
    child = load_file(path)

    generator = torch.Generator().manual_seed(11)
    updates = (torch.randn(16, 24, generator=generator), torch.randn(16, 24, generator=generator))
    name = "model.layers.0.self_attn.q_proj"
    mask = merging.drop_and_rescale(torch.ones(16, 24), 0.3, merging.module_generator(7, name))
    merged = merging.merge_dense(updates, (0.8, 0.2), "dare_ties", 0.3, generator=merging.module_generator(7, name))

    assert torch.equal(child["mask"], mask)
    assert torch.equal(child["merged"], merged)


def test_merge_dense_rejects_unknown_methods():
    with pytest.raises(ValueError, match=re.escape("merge_dense supports 'ties', 'dare_linear' and 'dare_ties'")):
        merging.merge_dense(two_updates(), (0.8, 0.2), "linear", 0.5)


# --- refactoring into LoRA factors ---------------------------------------------------------------------------------


def svd_truncation(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """Best rank-`rank` approximation (Eckart–Young) and its relative Frobenius error, in float64."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    approximation = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return approximation, (torch.sum(s[rank:] ** 2) / torch.sum(s**2)).sqrt().item()


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_factor_dense_error_is_the_svd_truncation_error(rank):
    update = two_updates(seed=9)[0]
    result = merging.factor_dense(update, rank)
    approximation, error = svd_truncation(update, rank)
    assert result.rank == rank
    assert abs(result.realisation_error - error) < 1e-5
    assert rel_error(result.lora_b @ result.lora_a, approximation) < 1e-5


def test_factor_dense_is_exact_for_a_low_rank_update():
    lora_a, lora_b = factors(16, 24, 3, 10)
    update = (lora_b @ lora_a).float()
    result = merging.factor_dense(update, 6)
    assert rel_error(result.lora_b @ result.lora_a, update) < 1e-5
    assert result.realisation_error < 1e-6


@pytest.mark.parametrize("rank", [1, 4, 7])
def test_truncate_factors_equals_dense_svd_truncation(rank):
    task_a, task_b = factors(16, 32, 4, 11)
    safety_a, safety_b = factors(16, 32, 4, 12)
    merged = merging.merge_linear((task_a, task_b, 2.0), (safety_a, safety_b, 4.0), (0.8, 0.2))

    truncated = merging.truncate_factors(merged, rank)

    approximation, error = svd_truncation(merged.lora_b.double() @ merged.lora_a.double(), rank)
    assert truncated.rank == rank
    assert abs(truncated.realisation_error - error) < 1e-5
    assert rel_error(truncated.lora_b @ truncated.lora_a, approximation) < 1e-5


def test_truncate_factors_leaves_a_small_enough_merge_alone():
    lora_a, lora_b = factors(16, 32, 4, 13)
    merged = merging.MergedFactors(lora_a, lora_b)
    assert merging.truncate_factors(merged, 4) is merged


def test_lowrank_norms_match_dense_norms():
    a1, b1 = factors(16, 32, 4, 14)
    a2, b2 = factors(16, 32, 6, 15)
    assert abs(merging.lowrank_norm(a1, b1) - torch.linalg.vector_norm(dense_update(a1, b1)).item()) < 1e-4
    difference = torch.linalg.vector_norm(dense_update(a1, b1) - dense_update(a2, b2)).item()
    assert abs(merging.lowrank_difference_norm(a1, b1, a2, b2) - difference) < 1e-4


# --- peft_linear and safelora --------------------------------------------------------------------------------------


def test_peft_linear_mixes_factors_with_square_roots_of_weighted_scalings():
    task_a, task_b = factors(16, 32, 4, 16)
    safety_a, safety_b = factors(16, 32, 4, 17)
    weights, scalings = (0.8, 0.2), (2.0, 4.0)

    merged = merging.merge_peft_linear((task_a, task_b, scalings[0]), (safety_a, safety_b, scalings[1]), weights)

    roots = [(w * s) ** 0.5 for w, s in zip(weights, scalings, strict=True)]
    assert torch.allclose(merged.lora_a, roots[0] * task_a + roots[1] * safety_a, rtol=1e-6, atol=1e-7)
    assert torch.allclose(merged.lora_b, roots[0] * task_b + roots[1] * safety_b, rtol=1e-6, atol=1e-7)
    exact = weights[0] * dense_update(task_a, task_b, scalings[0]) + weights[1] * dense_update(
        safety_a, safety_b, scalings[1])
    assert abs(merged.realisation_error - rel_error(merged.lora_b @ merged.lora_a, exact)) < 1e-5


def test_peft_linear_rejects_unequal_ranks():
    task_a, task_b = factors(16, 32, 4, 18)
    safety_a, safety_b = factors(16, 32, 8, 19)
    with pytest.raises(ValueError, match=re.escape(
        "method 'peft_linear' needs task and safety adapters of equal rank, got r=4 and r=8. Use method 'linear', "
        "which merges any ranks exactly."
    )):
        merging.merge_peft_linear((task_a, task_b, 2.0), (safety_a, safety_b, 1.0), (0.8, 0.2))


def test_safelora_projection_equals_dense_alignment_projection_times_b():
    generator = torch.Generator().manual_seed(20)
    delta = torch.randn(16, 32, generator=generator, dtype=torch.float64)
    lora_b = torch.randn(16, 4, generator=generator, dtype=torch.float64)
    projection = delta @ delta.T / torch.linalg.vector_norm(delta)
    projected, delta_norm = delta_projection(delta, torch.zeros_like(delta), lora_b)
    assert rel_error(merging.project_safelora(projected, delta_norm), projection @ lora_b) < 1e-6
