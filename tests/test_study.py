"""Tests of the efficacy study: its statistics, the control adapters it writes, and a whole run on a tiny model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safemerge_callback.demo.data import DataSizes
from safemerge_callback.demo.settings import DemoSettings
from safemerge_callback.demo.study import (
    CONTROLS,
    METHODS,
    StudySettings,
    choose_point,
    run_study,
    write_variants,
    write_zero_adapter,
)
from safemerge_callback.demo.study_report import interval, recovery, seed_rows, write_report


DATA_DIR = Path(os.environ.get("SAFEMERGE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def scores(harmful: int, total: int, nll: float) -> dict:
    return {"harmful": [True] * harmful + [False] * (total - harmful), "refused": [], "over_refused": [False],
            "nll": nll, "correct": []}


# --------------------------------------------------------------------------------------------- statistics


def test_recovery_measures_harm_removed_and_gain_kept():
    aligned, finetuned = scores(1, 10, 1.6), scores(6, 10, 1.2)
    removed, kept = recovery(aligned, finetuned, scores(2, 10, 1.3))
    assert removed == pytest.approx((0.6 - 0.2) / (0.6 - 0.1))
    assert kept == pytest.approx((1.6 - 1.3) / (1.6 - 1.2))
    assert recovery(aligned, finetuned, finetuned) == (0.0, 1.0)
    assert recovery(aligned, finetuned, aligned) == (1.0, 0.0)
    assert all(math.isnan(value) for value in recovery(aligned, aligned, finetuned))


def test_interval_is_the_student_t_interval():
    mean, low, high = interval([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4)
    assert high - mean == pytest.approx(4.303 * 0.2 / math.sqrt(3))
    assert mean - low == pytest.approx(high - mean)
    assert math.isnan(interval([0.5])[1])


def test_choose_point_balances_both_aims():
    grid = {"aligned": scores(0, 10, 1.6), "finetuned": scores(6, 10, 1.2),
            "safe_but_useless": scores(0, 10, 1.6), "useful_but_unsafe": scores(6, 10, 1.2),
            "balanced": scores(1, 10, 1.22), "undefined": scores(1, 10, math.nan)}
    points = [{"name": name} for name in grid if name not in ("aligned", "finetuned")]
    choice = choose_point(points, grid, removed_aim=0.75, kept_aim=0.95)
    assert choice["name"] == "balanced"
    assert choice["merit"] == pytest.approx(min((5 / 6) / 0.75, (0.38 / 0.4) / 0.95))
    assert choice["removed"] == pytest.approx(5 / 6)


# --------------------------------------------------------------------------------------------- variants


def test_zero_adapter_keeps_the_layout_with_zero_tensors(safety_adapter, tmp_path):
    zero = write_zero_adapter(safety_adapter, tmp_path / "zero")
    original = load_file(safety_adapter / "adapter_model.safetensors")
    tensors = load_file(zero / "adapter_model.safetensors")
    assert tensors.keys() == original.keys()
    assert all(tensors[k].shape == original[k].shape and not tensors[k].any() for k in tensors)
    assert load_file(safety_adapter / "adapter_model.safetensors")[next(iter(original))].any()


def test_controls_select_as_many_modules_as_the_threshold(llama_pair, task_adapter, safety_adapter,
                                                          middle_threshold, task_scores, tmp_path):
    models = {"base": str(llama_pair.base), "aligned": str(llama_pair.aligned)}
    choice = {"threshold": middle_threshold, "weights": [0.5, 0.5], "safety": "standard"}
    adapters = write_variants(models, task_adapter, {"standard": safety_adapter, "strong": safety_adapter}, choice,
                              seed=3, out=tmp_path)
    expected = {f"{prefix}_{method}" for method in METHODS for prefix in ("safemerge",) + CONTROLS}
    assert expected | {"finetuned", "peft_linear", "safelora", "safemerge_linear_strong_safety"} == set(adapters)

    ordered = sorted(task_scores, key=task_scores.get)
    count = sum(score < middle_threshold for score in task_scores.values())
    selected = {name: set(json.loads((adapters[name] / "safemerge_report.json").read_text())["selected_modules"])
                for name in adapters if name != "finetuned"}
    assert selected["safemerge_linear"] == set(ordered[:count])
    assert selected["highest_linear"] == set(ordered[-count:])
    assert len(selected["random_linear"]) == count
    assert selected["random_ties"] == selected["random_linear"]

    # Scale-only merges with a zero safety adapter: B'A' = w_task ΔW_task on every selected module.
    task = load_file(task_adapter / "adapter_model.safetensors")
    scaled = load_file(adapters["scale_only_linear"] / "adapter_model.safetensors")
    name = ordered[0].replace("model.", "base_model.model.model.", 1)
    a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
    task_delta = task[b_key].double() @ task[a_key].double()
    scaled_delta = scaled[b_key].double() @ scaled[a_key].double()
    # The exact merge stores rank r_t + r_s at α = r (scaling 1); the task adapter has α/r = 2.
    torch.testing.assert_close(scaled_delta, 0.5 * 2.0 * task_delta, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------- whole study


TINY_STUDY = StudySettings(
    demo=DemoSettings(sizes=DataSizes(align_harmful=8, align_benign=4, safety=8, task_train=8, task_eval=4,
                                      eval_harmful=4, eval_benign=4, validation_harmful=4, validation_benign=2,
                                      task_validation=2),
                      max_length=64, align_steps=1, safety_steps=1, task_steps=1, save_steps=1,
                      benign_answer_tokens=2, refusal_tokens=2, task_tokens=2, eval_batch=4),
    seeds=(0, 1), thresholds=(0.5, 1.0), weights=((0.8, 0.2), (1.0, 1.0)), strong_safety_steps=1,
    accuracy_problems=2, nll_answers=2, validation_nll_answers=2, validation_benign=True,
)


@pytest.mark.slow
@pytest.mark.skipif(not (DATA_DIR / "advbench").is_dir(), reason="public data sets not found")
def test_study_on_tiny_model(tiny_base, tmp_path):
    result = run_study(TINY_STUDY, tmp_path, data_dir=DATA_DIR, base_model=str(tiny_base))
    assert set(result["seeds"]) == {"0", "1"}
    assert result["sizes"]["eval_harmful"] == 4
    assert result["sizes"]["validation_harmful"] == 4
    assert len(result["sweep"]["points"]) == 2 * 2 * 2
    assert result["sweep"]["choice"]["name"] in {p["name"] for p in result["sweep"]["points"]}
    assert set(result["reference"]) == {"aligned", "safety_standard", "safety_strong"}
    rows = seed_rows(result)
    assert all(len(values) == 2 for row in rows.values() for values in row.values())

    paths = write_report(result, tmp_path / "report")
    assert [p.name for p in paths] == ["study.md", "pareto.png", "layer_scores.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert "| safemerge_linear |" in paths[0].read_text()

    again = run_study(TINY_STUDY, tmp_path, data_dir=DATA_DIR, base_model=str(tiny_base))
    assert all(stage["cached"] for stage in again["stages"].values())
