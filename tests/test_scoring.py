"""Scores: the low-rank ρ against the dense definition in float64, degenerate cases, selection rules."""

from __future__ import annotations

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
