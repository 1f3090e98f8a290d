"""Adapter variants, each through a full `repair_adapter` run whose output loads with `PeftModel.from_pretrained`.

The oracle is PEFT itself: the expected update of a selected module is `w_t ΔW_t + w_s ΔW_s` with both `ΔW` read by
`get_delta_weight` from the task and safety adapters loaded on the aligned model; unselected modules keep `ΔW_t`.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from safemerge_callback import testing
from safemerge_callback.adapters import load_adapter, pattern_value
from safemerge_callback.repair import REPORT_FILE, repair_adapter


WEIGHTS = (0.8, 0.2)


def expected_deltas(peft_deltas, model_dir, task_dir, safety_dir, selected, weights=WEIGHTS) -> dict:
    """ΔW' per module by the SafeMERGE formula, from PEFT's view of the two input adapters (float64)."""
    task = peft_deltas(model_dir, task_dir)
    safety = peft_deltas(model_dir, safety_dir)
    return {name: weights[0] * task[name] + weights[1] * safety[name] if name in selected else task[name]
            for name in task}


def assert_deltas_match(actual: dict, expected: dict, rel_err, tolerance=1e-6) -> None:
    assert sorted(actual) == sorted(expected)
    errors = {name: rel_err(actual[name], expected[name]) for name in expected}
    assert max(errors.values()) < tolerance, errors


def saved_tensors(directory) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


def saved_config(directory) -> dict:
    return json.loads((directory / "adapter_config.json").read_text())


# --- LoRA variants -------------------------------------------------------------------------------------------------


def test_rslora_task_adapter_with_alpha_not_equal_r(llama_pair, make_adapter, tmp_path, peft_deltas,
                                                    peft_model_loader, rel_err):
    task = make_adapter(llama_pair.aligned, "task", seed=1, r=4, lora_alpha=16, use_rslora=True)  # s = 16/√4 = 8
    safety = make_adapter(llama_pair.aligned, "safety", seed=2, r=4, lora_alpha=8)  # plain LoRA, s = 2

    result = repair_adapter(task, safety, output_dir=tmp_path / "out", threshold=1.0, **llama_pair.kwargs())

    selected = set(result.selected_modules)
    assert selected == {m.name for m in result.modules}
    actual = peft_deltas(llama_pair.aligned, tmp_path / "out")
    assert_deltas_match(actual, expected_deltas(peft_deltas, llama_pair.aligned, task, safety, selected), rel_err)
    assert saved_config(tmp_path / "out")["use_rslora"] is True
    layers = {name: layer for name, layer in peft_model_loader(llama_pair.aligned, tmp_path / "out").named_modules()
              if name.endswith("self_attn.q_proj")}
    assert all(layer.scaling["default"] == pytest.approx(1.0) for layer in layers.values())


def test_per_module_rank_and_alpha_patterns_in_the_task_adapter(llama_pair, make_adapter, tmp_path, peft_deltas,
                                                                rel_err):
    task = make_adapter(llama_pair.aligned, "task", seed=1, r=4, lora_alpha=8, rank_pattern={"v_proj": 6},
                        alpha_pattern={"q_proj": 3, "o_proj": 32})
    safety = make_adapter(llama_pair.aligned, "safety", seed=2, r=4, lora_alpha=16)

    # Layer 1 is skipped, so its modules keep the user's patterns behind the new exact keys.
    result = repair_adapter(task, safety, output_dir=tmp_path / "out", threshold=1.0,
                            module_overrides=[{"pattern": r"layers\.1\.", "skip": True}], **llama_pair.kwargs())

    selected = set(result.selected_modules)
    assert selected == {m.name for m in result.modules if ".layers.0." in m.name}
    actual = peft_deltas(llama_pair.aligned, tmp_path / "out")
    assert_deltas_match(actual, expected_deltas(peft_deltas, llama_pair.aligned, task, safety, selected), rel_err)
    ranks = {m.name: m.rank_after for m in result.modules}
    assert ranks["model.layers.0.self_attn.v_proj"] == 6 + 4
    assert ranks["model.layers.1.self_attn.v_proj"] == 6
    config = saved_config(tmp_path / "out")
    assert config["rank_pattern"][re.escape("model.layers.0.self_attn.v_proj")] == 10
    assert config["rank_pattern"]["v_proj"] == 6
    assert config["alpha_pattern"]["q_proj"] == 3


def test_fan_in_fan_out_gpt2_conv1d(gpt2_pair, make_adapter, tmp_path, peft_deltas, rel_err, read_checkpoint):
    targets = ["c_attn", "c_fc"]
    task = make_adapter(gpt2_pair.aligned, "task", seed=1, target_modules=targets, fan_in_fan_out=True)
    safety = make_adapter(gpt2_pair.aligned, "safety", seed=2, target_modules=targets, fan_in_fan_out=True)

    result = repair_adapter(task, safety, output_dir=tmp_path / "out", threshold=1.0, **gpt2_pair.kwargs())

    base_weights = read_checkpoint(gpt2_pair.base)
    assert tuple(base_weights["transformer.h.0.attn.c_attn.weight"].shape) == (32, 96)  # Conv1D stores (in, out)
    assert {m.name: m.rank_before for m in result.modules}["transformer.h.0.attn.c_attn"] == 4
    selected = set(result.selected_modules)
    assert selected == {m.name for m in result.modules}
    actual = peft_deltas(gpt2_pair.aligned, tmp_path / "out")
    assert_deltas_match(actual, expected_deltas(peft_deltas, gpt2_pair.aligned, task, safety, selected), rel_err)


def test_gpt2_scores_use_the_transposed_alignment_delta(gpt2_pair, make_adapter, read_checkpoint):
    from safemerge_callback.repair import score_adapter
    from safemerge_callback.scoring import dense_alignment_score

    task = make_adapter(gpt2_pair.aligned, "task", seed=1, target_modules=["c_attn"], fan_in_fan_out=True)
    result = score_adapter(task, **gpt2_pair.kwargs())
    base = read_checkpoint(gpt2_pair.base)
    aligned = read_checkpoint(gpt2_pair.aligned)
    adapter = load_adapter(task)
    for module in result.modules:
        key = f"{module.name}.weight"
        delta = (aligned[key].double() - base[key].double()).T  # (in, out) → (out, in)
        lora = adapter.modules[module.name]
        expected = dense_alignment_score(delta, lora.lora_b.double() @ lora.lora_a.double())
        assert module.score == pytest.approx(expected, abs=1e-5)


def test_grouped_query_attention_v_proj_narrower_than_q_proj(llama_pair, task_adapter, safety_adapter, tmp_path,
                                                             peft_deltas, rel_err):
    result = repair_adapter(task_adapter, safety_adapter, output_dir=tmp_path / "out", threshold=1.0,
                            **llama_pair.kwargs())

    shapes = {name: module.shape for name, module in result.adapter.modules.items()}
    assert shapes["model.layers.0.self_attn.q_proj"] == (32, 32)
    assert shapes["model.layers.0.self_attn.v_proj"] == (16, 32)
    assert shapes["model.layers.0.self_attn.k_proj"] == (16, 32)
    selected = set(result.selected_modules)
    assert "model.layers.0.self_attn.v_proj" in selected
    actual = peft_deltas(llama_pair.aligned, tmp_path / "out")
    expected = expected_deltas(peft_deltas, llama_pair.aligned, task_adapter, safety_adapter, selected)
    assert_deltas_match(actual, expected, rel_err)


def test_layers_to_transform(llama_pair, make_adapter, tmp_path, peft_deltas, rel_err):
    task = make_adapter(llama_pair.aligned, "task", seed=1, layers_to_transform=[1])
    safety = make_adapter(llama_pair.aligned, "safety", seed=2, layers_to_transform=[1])

    result = repair_adapter(task, safety, output_dir=tmp_path / "out", threshold=1.0, **llama_pair.kwargs())

    assert len(result.modules) == 4
    assert all(".layers.1." in m.name for m in result.modules)
    assert saved_config(tmp_path / "out")["layers_to_transform"] == [1]
    selected = set(result.selected_modules)
    actual = peft_deltas(llama_pair.aligned, tmp_path / "out")
    assert_deltas_match(actual, expected_deltas(peft_deltas, llama_pair.aligned, task, safety, selected), rel_err)


def logits_with_updates(model_dir, updates: dict[str, torch.Tensor], input_ids) -> torch.Tensor:
    """Logits of the model in `model_dir` with `W += ΔW` applied to every module in `updates` (`(out, in)`)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, update in updates.items():
            model.get_submodule(name).weight.add_(update.to(torch.float32))
        return model(input_ids).logits


def test_task_rank_16_and_safety_rank_8_merge_and_reload_to_identical_logits(llama_pair, make_adapter, tmp_path,
                                                                             peft_deltas, peft_model_loader,
                                                                             rel_err):
    task = make_adapter(llama_pair.aligned, "task", seed=1, r=16, lora_alpha=32)
    safety = make_adapter(llama_pair.aligned, "safety", seed=2, r=8, lora_alpha=8)

    result = repair_adapter(task, safety, output_dir=tmp_path / "out", threshold=1.0, **llama_pair.kwargs())

    selected = set(result.selected_modules)
    assert selected == {m.name for m in result.modules}
    assert {m.rank_after for m in result.modules} == {24}
    expected = expected_deltas(peft_deltas, llama_pair.aligned, task, safety, selected)
    assert_deltas_match(peft_deltas(llama_pair.aligned, tmp_path / "out"), expected, rel_err)

    input_ids = torch.randint(0, len(testing.TINY_WORDS), (2, 7), generator=torch.Generator().manual_seed(0))
    in_memory = {name: m.scaling * m.lora_b.double() @ m.lora_a.double() for name, m in result.adapter.modules.items()}
    expected_logits = logits_with_updates(llama_pair.aligned, expected, input_ids)
    in_memory_logits = logits_with_updates(llama_pair.aligned, in_memory, input_ids)
    with torch.no_grad():
        reloaded_logits = peft_model_loader(llama_pair.aligned, tmp_path / "out")(input_ids).logits
    assert torch.allclose(in_memory_logits, expected_logits, atol=1e-5)
    assert torch.allclose(reloaded_logits, in_memory_logits, atol=1e-5)


def test_repairing_a_repaired_adapter_stays_loadable(llama_pair, task_adapter, safety_adapter, tmp_path, peft_deltas,
                                                     rel_err):
    """A second exact repair widens the same modules again; its exact pattern keys must replace the first ones."""
    once, twice = tmp_path / "once", tmp_path / "twice"
    repair_adapter(task_adapter, safety_adapter, output_dir=once, threshold=1.0, **llama_pair.kwargs())
    result = repair_adapter(once, safety_adapter, output_dir=twice, threshold=1.0, **llama_pair.kwargs())

    assert {m.rank_after for m in result.modules} == {12}
    selected = set(result.selected_modules)
    assert_deltas_match(peft_deltas(llama_pair.aligned, twice),
                        expected_deltas(peft_deltas, llama_pair.aligned, once, safety_adapter, selected), rel_err)


# --- the safety adapter lacks a module --------------------------------------------------------------------------


MISSING = ["model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj",
           "model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.o_proj"]


def test_safety_adapter_missing_a_module_raises_naming_the_modules(llama_pair, task_adapter, make_adapter, tmp_path):
    safety = make_adapter(llama_pair.aligned, "safety", seed=2, target_modules=["q_proj", "k_proj"])

    with pytest.raises(ValueError) as error:
        repair_adapter(task_adapter, safety, output_dir=tmp_path / "out", threshold=1.0, **llama_pair.kwargs())

    message = str(error.value)
    assert message.startswith(f"The safety adapter {str(safety)!r} lacks 4 module(s) of the task adapter: [")
    assert all(repr(name) in message for name in MISSING)
    assert message.endswith("Train the safety adapter with the same target_modules, or set "
                            "`missing_safety_module='keep_task'` to leave those modules unmerged (they are listed in "
                            "the report).")
    assert not (tmp_path / "out").exists()


def test_safety_adapter_missing_a_module_with_keep_task(llama_pair, task_adapter, make_adapter, tmp_path,
                                                        peft_deltas, rel_err):
    safety = make_adapter(llama_pair.aligned, "safety", seed=2, target_modules=["q_proj", "k_proj"])

    result = repair_adapter(task_adapter, safety, output_dir=tmp_path / "out", threshold=1.0,
                            missing_safety_module="keep_task", **llama_pair.kwargs())

    by_name = {m.name: m for m in result.modules}
    assert all(by_name[name].selected is False for name in MISSING)
    assert all(by_name[name].note == "missing_in_safety_adapter" for name in MISSING)
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert {m["name"] for m in report["modules"] if m["note"] == "missing_in_safety_adapter"} == set(MISSING)
    before, after = saved_tensors(task_adapter), saved_tensors(tmp_path / "out")
    for name in MISSING:
        for factor in ("lora_A", "lora_B"):
            key = f"base_model.model.{name}.{factor}.weight"
            assert torch.equal(after[key], before[key])
    selected = set(result.selected_modules)
    assert selected == set(by_name) - set(MISSING)
    task = peft_deltas(llama_pair.aligned, task_adapter)
    safety_deltas = peft_deltas(llama_pair.aligned, safety)
    expected = {name: WEIGHTS[0] * task[name] + WEIGHTS[1] * safety_deltas[name] if name in selected else task[name]
                for name in task}
    assert_deltas_match(peft_deltas(llama_pair.aligned, tmp_path / "out"), expected, rel_err)


# --- modules_to_save, rejected variants ----------------------------------------------------------------------------


def test_modules_to_save_are_carried_bit_identically_and_reported(llama_pair, make_adapter, safety_adapter, tmp_path,
                                                                  peft_model_loader):
    task = make_adapter(llama_pair.aligned, "task", seed=1, modules_to_save=["lm_head"])

    repair_adapter(task, safety_adapter, output_dir=tmp_path / "out", threshold=1.0, **llama_pair.kwargs())

    key = "base_model.model.lm_head.weight"
    before, after = saved_tensors(task), saved_tensors(tmp_path / "out")
    assert key in before
    assert torch.equal(after[key], before[key])
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert report["carried_tensors"] == [key]
    loaded = peft_model_loader(llama_pair.aligned, tmp_path / "out")
    assert torch.equal(loaded.base_model.model.lm_head.modules_to_save["default"].weight, before[key])


def test_dora_adapter_is_rejected(llama_pair, make_adapter, safety_adapter, tmp_path):
    task = make_adapter(llama_pair.aligned, "task", seed=1, use_dora=True)
    with pytest.raises(ValueError, match=re.escape(
        f"The task adapter {str(task)!r} uses DoRA (`use_dora=True`). Its update is not `s·B·A` (a magnitude vector "
        "rescales the columns), so the alignment score would be wrong; train a plain LoRA adapter instead."
    )):
        repair_adapter(task, safety_adapter, output_dir=tmp_path / "out", **llama_pair.kwargs())
    assert not (tmp_path / "out").exists()


def test_embedding_lora_is_rejected(llama_pair, make_adapter, safety_adapter, tmp_path):
    task = make_adapter(llama_pair.aligned, "task", seed=1, target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(ValueError) as error:
        repair_adapter(task, safety_adapter, output_dir=tmp_path / "out", **llama_pair.kwargs())
    message = str(error.value)
    assert message.startswith(f"The task adapter {str(task)!r} uses embedding LoRA (`lora_embedding_A/B`) (key "
                              "'base_model.model.model.embed_tokens.lora_embedding_")
    assert message.endswith("SafeMERGE scores and merges plain linear LoRA updates only; retrain without it or leave "
                            "that module out of `target_modules`.")


# --- unit checks of the adapter reader ---------------------------------------------------------------------------


def test_loaded_scaling_follows_rank_alpha_patterns_and_rslora(llama_pair, make_adapter, peft_model_loader):
    task = make_adapter(llama_pair.aligned, "task", seed=1, r=4, lora_alpha=8, use_rslora=True,
                        rank_pattern={"v_proj": 9}, alpha_pattern={"q_proj": 5})
    adapter = load_adapter(task)
    peft_layers = {name: layer for name, layer in peft_model_loader(llama_pair.aligned, task).named_modules()
                   if isinstance(getattr(layer, "scaling", None), dict) and "default" in layer.scaling}
    for name, module in adapter.modules.items():
        assert module.scaling == pytest.approx(peft_layers[f"base_model.model.{name}"].scaling["default"])
    assert adapter.modules["model.layers.0.self_attn.v_proj"].rank == 9


@pytest.mark.parametrize("patterns", [
    {"v_proj": 6},
    {r"model\.layers\.0\.self_attn\.q_proj": 8, "q_proj": 2},
    {r"layers\.1\..*": 3},
    {"proj": 5},
])
def test_pattern_value_resolves_like_peft(patterns):
    from peft.utils.other import get_pattern_key

    names = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    for name in names:
        key = get_pattern_key(patterns.keys(), name)
        assert pattern_value(patterns, name, -1) == patterns.get(key, -1)
