"""`repair_adapter` / `score_adapter` end to end: methods, rank policies, degenerate modules, files and atomicity."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file

from safemerge_callback import repair as repair_module
from safemerge_callback.adapters import load_adapter
from safemerge_callback.config import MERGE_METHODS, SafeMergeConfig
from safemerge_callback.repair import CONFIG_FILE, REPORT_FILE, repair_adapter, score_adapter
from safemerge_callback.subspace import AlignmentSubspace


WEIGHTS = (0.8, 0.2)
OUTPUT_FILES = {"adapter_model.safetensors", "adapter_config.json", REPORT_FILE, CONFIG_FILE}


def saved(directory) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


def factor_keys(name: str) -> list[str]:
    return [f"base_model.model.{name}.lora_A.weight", f"base_model.model.{name}.lora_B.weight"]


def svd_truncation(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank], (torch.sum(s[rank:] ** 2) / torch.sum(s**2)).sqrt().item()


# --- every method leaves unselected modules alone ----------------------------------------------------------------


@pytest.mark.parametrize("rank_policy", ["exact", "keep"])
@pytest.mark.parametrize("method", MERGE_METHODS)
def test_unselected_modules_are_bit_identical_for_every_method(method, rank_policy, llama_pair, task_adapter,
                                                               safety_adapter, middle_threshold, tmp_path):
    safety = None if method == "safelora" else safety_adapter
    result = repair_adapter(task_adapter, safety, output_dir=tmp_path / "out", method=method, rank_policy=rank_policy,
                            threshold=middle_threshold, **llama_pair.kwargs())

    selected = set(result.selected_modules)
    unselected = {m.name for m in result.modules} - selected
    assert len(selected) == len(unselected) == 4
    before, after = saved(task_adapter), saved(tmp_path / "out")
    assert sorted(after) == sorted(before)
    for name in unselected:
        for key in factor_keys(name):
            assert torch.equal(after[key], before[key]), key
            assert after[key].dtype == before[key].dtype
    for name in selected:
        assert not torch.equal(after[factor_keys(name)[1]], before[factor_keys(name)[1]])
    assert all(m.method is None for m in result.modules if m.name in unselected)
    assert all(m.method == method for m in result.modules if m.name in selected)


def test_only_selected_modules_get_rank_pattern_entries(llama_pair, task_adapter, safety_adapter, middle_threshold,
                                                        tmp_path):
    result = repair_adapter(task_adapter, safety_adapter, output_dir=tmp_path / "out", threshold=middle_threshold,
                            **llama_pair.kwargs())
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    expected = {re.escape(name) for name in result.selected_modules}
    assert set(config["rank_pattern"]) == expected
    assert set(config["alpha_pattern"]) == expected
    assert config["r"] == 4


# --- linear ------------------------------------------------------------------------------------------------------


def test_linear_repair_is_exact_on_selected_and_identity_on_the_rest(llama_pair, task_adapter, safety_adapter,
                                                                    middle_threshold, tmp_path, peft_deltas,
                                                                    rel_err):
    result = repair_adapter(task_adapter, safety_adapter, output_dir=tmp_path / "out", threshold=middle_threshold,
                            **llama_pair.kwargs())

    task, safety = peft_deltas(llama_pair.aligned, task_adapter), peft_deltas(llama_pair.aligned, safety_adapter)
    actual = peft_deltas(llama_pair.aligned, tmp_path / "out")
    for name in result.selected_modules:
        assert rel_err(actual[name], WEIGHTS[0] * task[name] + WEIGHTS[1] * safety[name]) < 1e-6, name
    for name in set(task) - set(result.selected_modules):
        assert torch.equal(actual[name], task[name]), name
    assert all(m.realisation_error == 0.0 for m in result.modules)
    assert result.rank_policy == "exact"


def test_module_override_weights_apply_to_matching_modules(llama_pair, task_adapter, safety_adapter, tmp_path,
                                                           peft_deltas, rel_err):
    overrides = [{"pattern": r"\.v_proj$", "weights": (0.5, 0.5)}]
    result = repair_adapter(task_adapter, safety_adapter, output_dir=tmp_path / "out", threshold=1.0,
                            module_overrides=overrides, **llama_pair.kwargs())
    task, safety = peft_deltas(llama_pair.aligned, task_adapter), peft_deltas(llama_pair.aligned, safety_adapter)
    actual = peft_deltas(llama_pair.aligned, tmp_path / "out")
    for name in result.selected_modules:
        weights = (0.5, 0.5) if name.endswith("v_proj") else WEIGHTS
        assert rel_err(actual[name], weights[0] * task[name] + weights[1] * safety[name]) < 1e-6, name


def test_lowest_k_selects_the_k_lowest_scores(llama_pair, task_adapter, safety_adapter, task_scores):
    result = repair_adapter(task_adapter, safety_adapter, selection="lowest_k", num_selected=3, **llama_pair.kwargs())
    lowest = sorted(task_scores, key=task_scores.get)[:3]
    assert sorted(result.selected_modules) == sorted(lowest)


# --- parity with PEFT --------------------------------------------------------------------------------------------


def test_peft_linear_reproduces_add_weighted_adapter_linear(llama_pair, task_adapter, safety_adapter,
                                                            middle_threshold, tmp_path, peft_model_loader,
                                                            peft_deltas, rel_err):
    result = repair_adapter(task_adapter, safety_adapter, output_dir=tmp_path / "out", method="peft_linear",
                            weights=WEIGHTS, threshold=middle_threshold, **llama_pair.kwargs())

    reference = peft_model_loader(llama_pair.aligned, task_adapter, adapter_name="task")
    reference.load_adapter(safety_adapter, adapter_name="safety")
    reference.add_weighted_adapter(["task", "safety"], list(WEIGHTS), "merged", combination_type="linear")
    actual = peft_deltas(llama_pair.aligned, tmp_path / "out")
    assert result.selected_modules
    for name in result.selected_modules:
        with torch.no_grad():
            expected = reference.get_submodule(f"base_model.model.{name}").get_delta_weight("merged")
        assert rel_err(actual[name], expected) < 1e-6, name
    assert all(m.realisation_error > 0.0 for m in result.modules if m.selected)  # cross terms, by design


def test_ties_repair_factors_peft_ties_of_the_two_updates(llama_pair, task_adapter, safety_adapter, tmp_path,
                                                          peft_deltas, rel_err):
    from peft.utils.merge_utils import ties

    result = repair_adapter(task_adapter, safety_adapter, output_dir=tmp_path / "out", method="ties", density=0.5,
                            threshold=1.0, rank_policy="keep", **llama_pair.kwargs())

    task, safety = peft_deltas(llama_pair.aligned, task_adapter), peft_deltas(llama_pair.aligned, safety_adapter)
    actual = peft_deltas(llama_pair.aligned, tmp_path / "out")
    for module in result.modules:
        dense = ties([task[module.name].float(), safety[module.name].float()], torch.tensor(WEIGHTS), 0.5)
        approximation, error = svd_truncation(dense, module.rank_before)
        assert module.rank_after == module.rank_before
        assert module.realisation_error == pytest.approx(error, abs=1e-4)
        assert rel_err(actual[module.name], approximation) < 1e-4


# --- rank policy keep -------------------------------------------------------------------------------------------


def test_keep_policy_keeps_rank_and_reports_the_svd_truncation_error(llama_pair, task_adapter, safety_adapter,
                                                                     tmp_path, peft_deltas, rel_err):
    result = repair_adapter(task_adapter, safety_adapter, output_dir=tmp_path / "out", threshold=1.0,
                            rank_policy="keep", **llama_pair.kwargs())

    task, safety = peft_deltas(llama_pair.aligned, task_adapter), peft_deltas(llama_pair.aligned, safety_adapter)
    actual = peft_deltas(llama_pair.aligned, tmp_path / "out")
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    reported = {m["name"]: m["realisation_error"] for m in report["modules"]}
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    tensors = saved(tmp_path / "out")

    assert result.rank_policy == "keep"
    assert report["rank_policy"] == "keep"
    assert not config["rank_pattern"]
    assert len(result.selected_modules) == 8
    for module in result.modules:
        merged = WEIGHTS[0] * task[module.name] + WEIGHTS[1] * safety[module.name]
        approximation, error = svd_truncation(merged, 4)
        assert module.rank_after == module.rank_before == 4
        assert tensors[factor_keys(module.name)[0]].shape[0] == 4
        assert module.realisation_error > 0.0
        assert module.realisation_error == pytest.approx(error, abs=1e-5)
        assert reported[module.name] == module.realisation_error
        assert rel_err(actual[module.name], approximation) < 1e-4
    assert report["totals"]["max_realisation_error"] == max(reported.values())


# --- DARE --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_repair_is_identical_across_reruns(method, llama_pair, task_adapter, safety_adapter, tmp_path):
    kwargs = dict(method=method, density=0.3, seed=5, threshold=1.0, **llama_pair.kwargs())
    torch.manual_seed(0)
    repair_adapter(task_adapter, safety_adapter, output_dir=tmp_path / "first", **kwargs)
    torch.manual_seed(1)
    torch.rand(1000)
    repair_adapter(task_adapter, safety_adapter, output_dir=tmp_path / "second", **kwargs)
    first, second = saved(tmp_path / "first"), saved(tmp_path / "second")
    assert sorted(first) == sorted(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_dare_repair_depends_on_the_seed(llama_pair, task_adapter, safety_adapter):
    kwargs = dict(method="dare_ties", density=0.3, threshold=1.0, **llama_pair.kwargs())
    one = repair_adapter(task_adapter, safety_adapter, seed=1, **kwargs).adapter.modules
    two = repair_adapter(task_adapter, safety_adapter, seed=2, **kwargs).adapter.modules
    assert any(not torch.equal(one[name].lora_b, two[name].lora_b) for name in one)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("density", [0.01, 0.3, 1.0])
def test_dare_repair_is_finite_for_every_valid_density(method, density, llama_pair, task_adapter, safety_adapter):
    result = repair_adapter(task_adapter, safety_adapter, method=method, density=density, threshold=1.0,
                            **llama_pair.kwargs())
    assert len(result.selected_modules) == 8
    for module in result.adapter.modules.values():
        assert torch.isfinite(module.lora_a).all()
        assert torch.isfinite(module.lora_b).all()


def test_dare_linear_repair_with_density_one_is_the_weighted_sum(llama_pair, task_adapter, safety_adapter, tmp_path,
                                                                 peft_deltas, rel_err):
    result = repair_adapter(task_adapter, safety_adapter, output_dir=tmp_path / "out", method="dare_linear",
                            density=1.0, threshold=1.0, **llama_pair.kwargs())
    task, safety = peft_deltas(llama_pair.aligned, task_adapter), peft_deltas(llama_pair.aligned, safety_adapter)
    actual = peft_deltas(llama_pair.aligned, tmp_path / "out")
    for name in result.selected_modules:
        assert rel_err(actual[name], WEIGHTS[0] * task[name] + WEIGHTS[1] * safety[name]) < 1e-5, name


# --- safelora --------------------------------------------------------------------------------------------------


def test_safelora_projects_b_of_selected_modules_without_a_safety_adapter(llama_pair, task_adapter, middle_threshold,
                                                                          rel_err):
    result = repair_adapter(task_adapter, method="safelora", threshold=middle_threshold, **llama_pair.kwargs())
    task = load_adapter(task_adapter).modules
    subspace = AlignmentSubspace(str(llama_pair.base), str(llama_pair.aligned))
    assert result.selected_modules
    for name in result.selected_modules:
        delta = subspace.delta(name, task[name].shape).double()
        projected = delta @ (delta.T @ task[name].lora_b.double()) / torch.linalg.vector_norm(delta)
        assert rel_err(result.adapter.modules[name].lora_b, projected) < 1e-6
        assert torch.allclose(result.adapter.modules[name].lora_a, task[name].lora_a, rtol=1e-6, atol=0)


def test_merge_methods_need_a_safety_adapter(llama_pair, task_adapter):
    message = "method 'linear' merges with a safety adapter, but none was given."
    with pytest.raises(ValueError, match=re.escape(message)):
        repair_adapter(task_adapter, **llama_pair.kwargs())


# --- in-memory inputs --------------------------------------------------------------------------------------------


def test_in_memory_adapters_give_the_same_result_as_directories(llama_pair, task_adapter, safety_adapter,
                                                                middle_threshold, peft_model_loader):
    from_dirs = repair_adapter(task_adapter, safety_adapter, threshold=middle_threshold, **llama_pair.kwargs())
    task_model = peft_model_loader(llama_pair.aligned, task_adapter)
    from_memory = repair_adapter(task_model, load_adapter(safety_adapter), threshold=middle_threshold,
                                 **llama_pair.kwargs())
    assert sorted(from_memory.selected_modules) == sorted(from_dirs.selected_modules)  # files list keys sorted
    for name, module in from_dirs.adapter.modules.items():
        assert torch.equal(from_memory.adapter.modules[name].lora_a, module.lora_a), name
        assert torch.equal(from_memory.adapter.modules[name].lora_b, module.lora_b), name


# --- degenerate modules ------------------------------------------------------------------------------------------


ZERO_B_MODULE = "model.layers.1.self_attn.q_proj"


def test_zero_update_and_zero_alignment_delta_have_defined_outcomes(llama_pair_with_unaligned_module, unaligned_module,
                                                                    make_adapter, tmp_path):
    pair, UNALIGNED_MODULE = llama_pair_with_unaligned_module, unaligned_module  # noqa: N806
    task = make_adapter(pair.aligned, "task", seed=1, zero_lora_b=[ZERO_B_MODULE])
    safety = make_adapter(pair.aligned, "safety", seed=2)

    with pytest.warns(UserWarning, match=re.escape("1 module(s) have identical base and aligned weights (V = 0), so "
                                                   "they carry no alignment signal and are left as they are: "
                                                   f"['{UNALIGNED_MODULE}']")):
        result = repair_adapter(task, safety, output_dir=tmp_path / "out", threshold=1.0, **pair.kwargs())

    by_name = {m.name: m for m in result.modules}
    assert by_name[UNALIGNED_MODULE].score is None
    assert by_name[UNALIGNED_MODULE].undefined_reason == "no_alignment_signal"
    assert by_name[UNALIGNED_MODULE].selected is False
    assert by_name[ZERO_B_MODULE].score is None
    assert by_name[ZERO_B_MODULE].undefined_reason == "zero_update"
    assert by_name[ZERO_B_MODULE].selected is False
    assert set(result.selected_modules) == set(by_name) - {UNALIGNED_MODULE, ZERO_B_MODULE}
    before, after = saved(task), saved(tmp_path / "out")
    for name in (UNALIGNED_MODULE, ZERO_B_MODULE):
        for key in factor_keys(name):
            assert torch.equal(after[key], before[key]), key
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert report["totals"]["undefined_scores"] == 2
    assert {m["name"]: m["undefined_reason"] for m in report["modules"] if m["undefined_reason"]} == {
        UNALIGNED_MODULE: "no_alignment_signal", ZERO_B_MODULE: "zero_update"}


@pytest.mark.parametrize("selection", [{"threshold": 1.0}, {"selection": "lowest_k", "num_selected": 8}])
def test_untrained_adapter_is_never_selected_and_saved_unchanged(selection, llama_pair, make_adapter, safety_adapter,
                                                                 tmp_path, peft_model_loader):
    task = make_adapter(llama_pair.aligned, "task", untrained=True)  # PEFT's initialisation: every lora_B is zero

    result = repair_adapter(task, safety_adapter, output_dir=tmp_path / "out", **selection, **llama_pair.kwargs())

    assert result.selected_modules == []
    assert {m.undefined_reason for m in result.modules} == {"zero_update"}
    before, after = saved(task), saved(tmp_path / "out")
    assert sorted(after) == sorted(before)
    for key in before:
        assert torch.equal(after[key], before[key]), key
    peft_model_loader(llama_pair.aligned, tmp_path / "out")


# --- files: inputs untouched, atomic complete output -------------------------------------------------------------


def test_repair_never_modifies_input_files(llama_pair, task_adapter, safety_adapter, tmp_path, file_hashes):
    inputs = (llama_pair.base, llama_pair.aligned, task_adapter, safety_adapter)
    before = file_hashes(*inputs)

    repair_adapter(task_adapter, safety_adapter, output_dir=tmp_path / "exact", threshold=1.0, **llama_pair.kwargs())
    repair_adapter(task_adapter, safety_adapter, output_dir=tmp_path / "keep", threshold=1.0, rank_policy="keep",
                   **llama_pair.kwargs())
    repair_adapter(task_adapter, output_dir=tmp_path / "safelora", threshold=1.0, method="safelora",
                   **llama_pair.kwargs())
    score_adapter(task_adapter, **llama_pair.kwargs())

    assert file_hashes(*inputs) == before


def test_output_directory_is_complete(llama_pair, task_adapter, safety_adapter, middle_threshold, tmp_path):
    output = tmp_path / "nested" / "out"
    result = repair_adapter(task_adapter, safety_adapter, output_dir=output, threshold=middle_threshold,
                            **llama_pair.kwargs())

    assert OUTPUT_FILES <= {path.name for path in output.iterdir()}
    assert [path.name for path in output.parent.iterdir()] == ["out"]  # no staging directory left behind
    assert SafeMergeConfig.from_dict(json.loads((output / CONFIG_FILE).read_text())) == result.config
    report = json.loads((output / REPORT_FILE).read_text())
    assert report["selected_modules"] == result.selected_modules
    assert report["method"] == "linear"
    assert report["dry_run"] is False
    assert [m["score"] for m in report["modules"]] == [m.score for m in result.modules]


def test_failed_write_leaves_no_output_and_keeps_an_existing_one(llama_pair, task_adapter, safety_adapter, tmp_path,
                                                                 monkeypatch, file_hashes):
    def broken_save(adapter, directory):
        (directory / "adapter_model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(repair_module, "save_adapter", broken_save)
    with pytest.raises(OSError, match="disk full"):
        repair_adapter(task_adapter, safety_adapter, output_dir=tmp_path / "new", **llama_pair.kwargs())
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    repair_adapter(task_adapter, safety_adapter, output_dir=tmp_path / "old", **llama_pair.kwargs())
    before = file_hashes(tmp_path / "old")
    monkeypatch.setattr(repair_module, "save_adapter", broken_save)
    with pytest.raises(OSError, match="disk full"):
        repair_adapter(task_adapter, safety_adapter, output_dir=tmp_path / "old", overwrite=True,
                       **llama_pair.kwargs())
    assert file_hashes(tmp_path / "old") == before
    assert [path.name for path in tmp_path.iterdir()] == ["old"]


def test_existing_output_raises_unless_overwrite(llama_pair, task_adapter, safety_adapter, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "stale.txt").write_text("old")

    with pytest.raises(FileExistsError, match=re.escape(f"Output directory {str(output)!r} already exists; pass "
                                                        "overwrite=True (CLI: --overwrite) to replace it")):
        repair_adapter(task_adapter, safety_adapter, output_dir=output, **llama_pair.kwargs())
    assert [path.name for path in output.iterdir()] == ["stale.txt"]

    repair_adapter(task_adapter, safety_adapter, output_dir=output, overwrite=True, **llama_pair.kwargs())
    assert {path.name for path in output.iterdir()} >= OUTPUT_FILES
    assert not (output / "stale.txt").exists()


@pytest.mark.parametrize("where", ["inside_task", "inside_safety", "inside_aligned", "equal_to_task",
                                   "parent_of_task"])
def test_output_overlapping_an_input_directory_raises(where, llama_pair, task_adapter, safety_adapter, copy_dir,
                                                      tmp_path, file_hashes):
    task, safety = copy_dir(task_adapter, "task"), copy_dir(safety_adapter, "safety")
    aligned = copy_dir(llama_pair.aligned, "aligned")
    output, overlapped = {
        "inside_task": (task / "repaired", task),
        "inside_safety": (safety / "repaired", safety),
        "inside_aligned": (aligned / "repaired", aligned),
        "equal_to_task": (task, task),
        "parent_of_task": (tmp_path, task),
    }[where]
    before = file_hashes(tmp_path)

    with pytest.raises(ValueError, match=re.escape(
        f"The output directory {str(output)!r} is, contains or lies inside the input {str(overlapped.resolve())!r}; "
        "inputs are never modified. Choose another output directory."
    )):
        repair_adapter(task, safety, output_dir=output, overwrite=True, base_model=str(llama_pair.base),
                       aligned_model=str(aligned), progress=False)
    assert file_hashes(tmp_path) == before


# --- dry run -----------------------------------------------------------------------------------------------------


def test_score_adapter_changes_nothing_and_matches_repair_scores(llama_pair, task_adapter, safety_adapter,
                                                                 middle_threshold, file_hashes):
    inputs = (llama_pair.base, llama_pair.aligned, task_adapter)
    before = file_hashes(*inputs)
    task = load_adapter(task_adapter)

    dry = score_adapter(task_adapter, threshold=middle_threshold, **llama_pair.kwargs())
    repaired = repair_adapter(task_adapter, safety_adapter, threshold=middle_threshold, **llama_pair.kwargs())

    assert file_hashes(*inputs) == before
    assert dry.dry_run is True
    assert dry.rank_policy == "none"
    assert [m.name for m in dry.modules] == [m.name for m in repaired.modules]
    assert [m.score for m in dry.modules] == [m.score for m in repaired.modules]
    assert dry.selected_modules == repaired.selected_modules
    assert all(m.method is None for m in dry.modules)
    assert all(m.rank_after == m.rank_before for m in dry.modules)
    for name, module in task.modules.items():
        assert torch.equal(dry.adapter.modules[name].lora_a, module.lora_a)
        assert torch.equal(dry.adapter.modules[name].lora_b, module.lora_b)


def test_score_adapter_needs_the_base_model(task_adapter, llama_pair):
    with pytest.raises(ValueError, match=re.escape("Scoring needs the base model (before alignment) and the aligned "
                                                   "model")):
        score_adapter(task_adapter, aligned_model=str(llama_pair.aligned), progress=False)


def test_report_to_dict_is_json_serialisable(llama_pair, task_adapter, safety_adapter, middle_threshold):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = repair_adapter(task_adapter, safety_adapter, threshold=middle_threshold, **llama_pair.kwargs())
    report = json.loads(json.dumps(result.to_dict()))
    assert report["totals"]["modules"] == 8
    assert report["totals"]["selected"] == 4
    assert report["totals"]["min_score"] == min(m.score for m in result.modules)
    assert report["config"]["threshold"] == middle_threshold
    assert "torch" in report["versions"]
