"""Scores: the low-rank ρ against the dense definition in float64, degenerate cases, selection rules."""

from __future__ import annotations

import math
import re

import pytest
import torch

from safemerge_callback import scoring
from safemerge_callback.scoring import dense_alignment_score, lora_alignment_score


# (out, in, r): square, GQA-like k/v projections (out < in), tall MLP-like, rank 1, rank above out.
SHAPES = [(32, 32, 4), (16, 32, 4), (8, 48, 1), (40, 12, 6), (6, 10, 8), (64, 128, 16), (128, 32, 2)]


def independent_score(delta: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> float:
    """ρ = cos(vec(C ΔW), vec(ΔW)) with C = V Vᵀ / ‖V‖_F built densely, in float64, without library code."""
    delta, lora_a, lora_b = delta.double(), lora_a.double(), lora_b.double()
    projection = delta @ delta.T / torch.sqrt(torch.sum(delta * delta))
    update = scaling * lora_b @ lora_a
    projected = projection @ update
    inner = torch.sum(projected * update)
    return (inner / torch.sqrt(torch.sum(projected * projected) * torch.sum(update * update))).item()


def random_case(out_features, in_features, rank, seed, *, low_rank_delta: bool, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    if low_rank_delta:  # what alignment produces: a few strong directions plus noise
        delta = torch.randn(out_features, 3, generator=generator, dtype=dtype) @ torch.randn(
            3, in_features, generator=generator, dtype=dtype
        ) + 0.01 * torch.randn(out_features, in_features, generator=generator, dtype=dtype)
    else:
        delta = torch.randn(out_features, in_features, generator=generator, dtype=dtype)
    lora_a = torch.randn(rank, in_features, generator=generator, dtype=dtype)
    lora_b = torch.randn(out_features, rank, generator=generator, dtype=dtype)
    return delta, lora_a, lora_b


@pytest.mark.parametrize("low_rank_delta", [True, False], ids=["low-rank-V", "full-V"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("out_features,in_features,rank", SHAPES)
def test_lowrank_score_equals_dense_definition_in_float64(out_features, in_features, rank, seed, low_rank_delta):
    delta, lora_a, lora_b = random_case(out_features, in_features, rank, seed, low_rank_delta=low_rank_delta)
    scaling = 2.5

    terms = lora_alignment_score(delta, lora_a, lora_b)
    dense_library = dense_alignment_score(delta, scaling * lora_b @ lora_a)
    dense_test = independent_score(delta, lora_a, lora_b, scaling)

    assert terms.undefined_reason is None
    assert abs(terms.score - dense_library) < 1e-10
    assert abs(terms.score - dense_test) < 1e-10


@pytest.mark.parametrize("out_features,in_features,rank", SHAPES)
def test_score_is_a_cosine_of_a_psd_projection_in_unit_interval(out_features, in_features, rank):
    delta, lora_a, lora_b = random_case(out_features, in_features, rank, 7, low_rank_delta=True)
    score = lora_alignment_score(delta, lora_a, lora_b).score
    assert 0.0 <= score <= 1.0


def test_score_ignores_lora_scaling_and_delta_norm():
    delta, lora_a, lora_b = random_case(24, 16, 4, 3, low_rank_delta=True)
    reference = lora_alignment_score(delta, lora_a, lora_b).score
    rescaled = lora_alignment_score(5.0 * delta, 3.0 * lora_a, 0.5 * lora_b).score
    assert abs(rescaled - reference) < 1e-12


def test_score_terms_report_update_and_delta_norms():
    delta, lora_a, lora_b = random_case(24, 16, 4, 4, low_rank_delta=False)
    terms = lora_alignment_score(delta, lora_a, lora_b)
    assert abs(terms.update_norm - torch.linalg.vector_norm(lora_b @ lora_a).item()) < 1e-10
    assert abs(terms.delta_norm - torch.linalg.vector_norm(delta).item()) < 1e-10


def test_float32_score_is_close_to_float64_oracle():
    delta, lora_a, lora_b = random_case(64, 128, 16, 5, low_rank_delta=True)
    score32 = lora_alignment_score(delta.float(), lora_a.float(), lora_b.float()).score
    assert abs(score32 - independent_score(delta, lora_a, lora_b, 1.0)) < 1e-5


def test_bfloat16_factors_are_scored_in_float32():
    delta, lora_a, lora_b = random_case(32, 32, 4, 6, low_rank_delta=True, dtype=torch.float32)
    score = lora_alignment_score(delta, lora_a.bfloat16(), lora_b.bfloat16()).score
    expected = independent_score(delta, lora_a.bfloat16().float(), lora_b.bfloat16().float(), 1.0)
    assert abs(score - expected) < 1e-5


def test_zero_update_has_undefined_score_zero_update():
    delta, lora_a, lora_b = random_case(16, 32, 4, 0, low_rank_delta=True)
    terms = lora_alignment_score(delta, lora_a, torch.zeros_like(lora_b))  # untrained B, as PEFT initialises it
    assert terms.score is None
    assert terms.undefined_reason == scoring.ZERO_UPDATE == "zero_update"
    assert terms.update_norm == 0.0


def test_zero_lora_a_also_gives_zero_update():
    delta, lora_a, lora_b = random_case(16, 32, 4, 0, low_rank_delta=True)
    terms = lora_alignment_score(delta, torch.zeros_like(lora_a), lora_b)
    assert terms.score is None
    assert terms.undefined_reason == "zero_update"


def test_zero_alignment_delta_has_undefined_score_no_alignment_signal():
    delta, lora_a, lora_b = random_case(16, 32, 4, 0, low_rank_delta=True)
    terms = lora_alignment_score(torch.zeros_like(delta), lora_a, lora_b)
    assert terms.score is None
    assert terms.undefined_reason == scoring.NO_ALIGNMENT_SIGNAL == "no_alignment_signal"
    assert terms.delta_norm == 0.0


def test_zero_update_takes_precedence_when_both_are_zero():
    delta, lora_a, lora_b = random_case(16, 32, 4, 0, low_rank_delta=True)
    terms = lora_alignment_score(torch.zeros_like(delta), lora_a, torch.zeros_like(lora_b))
    assert terms.undefined_reason == "zero_update"


def test_update_orthogonal_to_alignment_scores_zero():
    delta, lora_a, lora_b = random_case(16, 32, 4, 0, low_rank_delta=False)
    delta[8:] = 0.0  # V lives in the first 8 output rows ...
    lora_b[:8] = 0.0  # ... and ΔW in the last 8, so C ΔW = 0
    terms = lora_alignment_score(delta, lora_a, lora_b)
    assert terms.undefined_reason is None
    assert terms.score == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_scoring_never_changes_its_inputs(dtype):
    delta, lora_a, lora_b = random_case(16, 32, 4, 9, low_rank_delta=True, dtype=torch.float64)
    delta, lora_a, lora_b = delta.float(), lora_a.to(dtype), lora_b.to(dtype)
    before = [tensor.clone() for tensor in (delta, lora_a, lora_b)]

    lora_alignment_score(delta, lora_a, lora_b)
    dense_alignment_score(delta, lora_b.float() @ lora_a.float())

    assert torch.equal(delta, before[0])
    assert torch.equal(lora_a, before[1])
    assert torch.equal(lora_b, before[2])
    assert delta.dtype == torch.float32
    assert lora_a.dtype == dtype
    assert lora_b.dtype == dtype


def test_mismatched_shapes_raise_with_all_shapes_in_the_message():
    delta, lora_a, lora_b = random_case(16, 32, 4, 0, low_rank_delta=True)
    message = "Shape mismatch: V (16, 32) (out, in) does not fit A (4, 32) (r, in) and B (32, 4) (out, r)."
    with pytest.raises(ValueError, match=re.escape(message)):
        lora_alignment_score(delta, lora_a, torch.zeros(32, 4, dtype=torch.float64))


def test_threshold_selection_is_strict_and_skips_undefined_scores():
    scores = {"at_threshold": 0.35, "below": 0.3499, "above": 0.9, "undefined": None}
    thresholds = dict.fromkeys(scores, 0.35)
    assert scoring.select_below_threshold(scores, thresholds) == {"below"}


def test_threshold_selection_uses_per_module_thresholds():
    scores = {"a": 0.5, "b": 0.5}
    assert scoring.select_below_threshold(scores, {"a": 0.6, "b": 0.4}) == {"a"}


def test_lowest_k_selection_ignores_undefined_and_breaks_ties_by_name():
    scores = {"m.c": 0.1, "m.b": 0.1, "m.a": 0.7, "m.z": None}
    assert scoring.select_lowest(scores, 1) == {"m.b"}
    assert scoring.select_lowest(scores, 2) == {"m.b", "m.c"}
    assert scoring.select_lowest(scores, 10) == {"m.a", "m.b", "m.c"}


# --- streamed projection ------------------------------------------------------------------------------------------


def weight_pair(out_features, in_features, seed, dtype=torch.bfloat16):
    """A base weight and an aligned weight that differs from it by a low-rank delta plus noise, both in `dtype`."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(out_features, in_features, generator=generator)
    delta = torch.randn(out_features, 2, generator=generator) @ torch.randn(2, in_features, generator=generator)
    aligned = base + 0.05 * delta + 0.01 * torch.randn(out_features, in_features, generator=generator)
    return aligned.to(dtype), base.to(dtype)


@pytest.mark.parametrize("out_features,in_features,rank", [(32, 32, 4), (16, 48, 2), (48, 16, 8), (7, 13, 3)])
@pytest.mark.parametrize("block_bytes", [1, 4 * 7 * 5, scoring.BLOCK_BYTES])
def test_delta_projection_matches_float64_oracle(out_features, in_features, rank, block_bytes, rel_err):
    aligned, base = weight_pair(out_features, in_features, seed=out_features + rank)
    lora_b = torch.randn(out_features, rank, generator=torch.Generator().manual_seed(3))
    delta = aligned.double() - base.double()  # exact: the difference of two bf16 values fits in float32
    expected = delta @ (delta.T @ lora_b.double())

    projected, norm = scoring.delta_projection(aligned, base, lora_b, block_bytes=block_bytes)

    assert projected.dtype == torch.float32
    assert rel_err(projected.double(), expected) < 1e-6
    assert norm == pytest.approx(torch.linalg.vector_norm(delta).item(), rel=1e-7)


@pytest.mark.parametrize("block_bytes", [1, 4 * 32 * 3, scoring.BLOCK_BYTES])
def test_delta_projection_of_transposed_weights(block_bytes, rel_err):
    aligned, base = weight_pair(24, 40, seed=5)  # stored (in, out) = (24, 40): V is (40, 24)
    lora_b = torch.randn(40, 4, generator=torch.Generator().manual_seed(6))
    delta = (aligned.double() - base.double()).T
    expected = delta @ (delta.T @ lora_b.double())

    projected, norm = scoring.delta_projection(aligned, base, lora_b, transposed=True, block_bytes=block_bytes)

    assert projected.shape == (40, 4)
    assert rel_err(projected.double(), expected) < 1e-6
    assert norm == pytest.approx(torch.linalg.vector_norm(delta).item(), rel=1e-7)


def test_delta_projection_does_not_modify_inputs():
    aligned, base = weight_pair(16, 24, seed=7)
    lora_b = torch.randn(16, 2, generator=torch.Generator().manual_seed(8))
    copies = [aligned.clone(), base.clone(), lora_b.clone()]
    scoring.delta_projection(aligned, base, lora_b, block_bytes=64)
    assert all(torch.equal(before, after) for before, after in zip(copies, [aligned, base, lora_b]))


def test_delta_projection_in_float64_for_float64_weights(rel_err):
    aligned, base = weight_pair(12, 20, seed=9, dtype=torch.float64)
    lora_b = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    delta = aligned - base
    projected, norm = scoring.delta_projection(aligned, base, lora_b, block_bytes=8 * 12 * 3)
    assert projected.dtype == torch.float64
    assert rel_err(projected, delta @ (delta.T @ lora_b)) < 1e-12
    assert norm == pytest.approx(torch.linalg.vector_norm(delta).item(), rel=1e-12)


def test_delta_projection_scores_like_materialised_delta():
    aligned, base = weight_pair(32, 48, seed=11)
    lora_a = torch.randn(4, 48, generator=torch.Generator().manual_seed(12))
    lora_b = torch.randn(32, 4, generator=torch.Generator().manual_seed(13))
    delta = aligned.double() - base.double()

    projected, norm = scoring.delta_projection(aligned, base, lora_b, block_bytes=4 * 32 * 5)
    terms = scoring.score_from_projection(projected, norm, lora_a, lora_b)

    assert terms.score == pytest.approx(independent_score(delta, lora_a, lora_b, 1.0), abs=1e-6)
    assert terms.delta_norm == pytest.approx(torch.linalg.vector_norm(delta).item(), rel=1e-7)


def test_delta_projection_nan_entry_gives_nan_norm():
    aligned, base = weight_pair(8, 8, seed=14, dtype=torch.float32)
    aligned[3, 5] = float("nan")
    _, norm = scoring.delta_projection(aligned, base, torch.ones(8, 2))
    assert math.isnan(norm)


def test_delta_projection_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=re.escape("The aligned and base weights must be 2-D and of one shape, got "
                                                   "(8, 4) and (4, 8).")):
        scoring.delta_projection(torch.zeros(8, 4), torch.zeros(4, 8), torch.zeros(8, 2))
    with pytest.raises(ValueError, match=re.escape("B has shape (4, 2) but must be (out, r) with out = 8, the weights' output features.")):
        scoring.delta_projection(torch.zeros(8, 4), torch.zeros(8, 4), torch.zeros(4, 2))
