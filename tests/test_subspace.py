"""`AlignmentSubspace`: V = W_aligned − W_base paired by full name; sharded, single-file and pickle checkpoints."""

from __future__ import annotations

import pickle
import re
import shutil
import warnings

import pytest
import torch

from safemerge_callback.adapters import load_adapter
from safemerge_callback.repair import score_adapter
from safemerge_callback.scoring import dense_alignment_score
from safemerge_callback.subspace import AlignmentSubspace


class RecordingSubspace(AlignmentSubspace):
    """An `AlignmentSubspace` that records every projection `G = V Vᵀ B` it hands out, with its `B`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def projection(self, module_name, shape, lora_b, fan_in_fan_out=False):
        projected, norm = super().projection(module_name, shape, lora_b, fan_in_fan_out)
        self.calls.append((module_name, projected, lora_b))
        return projected, norm


# --- pairing by name ---------------------------------------------------------------------------------------------


def test_qwen2_regex_targets_pair_each_lora_module_with_its_own_weight(qwen2_pair, make_adapter, read_checkpoint):
    task = make_adapter(qwen2_pair.aligned, "task", seed=1, target_modules=r".*\.(q_proj|v_proj)")
    adapter = load_adapter(task)
    subspace = RecordingSubspace(str(qwen2_pair.base), str(qwen2_pair.aligned))

    result = score_adapter(task, subspace=subspace, progress=False)

    base, aligned = read_checkpoint(qwen2_pair.base), read_checkpoint(qwen2_pair.aligned)
    expected_names = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert adapter.config["target_modules"] == r".*\.(q_proj|v_proj)"
    assert sorted(adapter.modules) == sorted(expected_names)
    assert all(f"{name}.bias" in base for name in expected_names)  # the biases are there to be mistaken for weights
    assert len(subspace.calls) == len(adapter.modules)
    assert [name for name, _, _ in subspace.calls] == list(adapter.modules)
    assert [m.name for m in result.modules] == list(adapter.modules)
    for name, projected, lora_b in subspace.calls:
        assert subspace.base.find_weight(name) == f"{name}.weight"
        assert subspace.aligned.find_weight(name) == f"{name}.weight"
        delta = aligned[f"{name}.weight"].double() - base[f"{name}.weight"].double()
        expected = delta @ (delta.T @ lora_b.double())
        assert torch.allclose(projected.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def test_qwen2_regex_target_adapter_repairs_and_loads(qwen2_pair, make_adapter, tmp_path, peft_deltas, rel_err):
    from safemerge_callback.repair import repair_adapter

    task = make_adapter(qwen2_pair.aligned, "task", seed=1, target_modules=r".*\.(q_proj|v_proj)")
    safety = make_adapter(qwen2_pair.aligned, "safety", seed=2, target_modules=r".*\.(q_proj|v_proj)")
    result = repair_adapter(task, safety, output_dir=tmp_path / "out", threshold=1.0, **qwen2_pair.kwargs())

    task_deltas, safety_deltas = peft_deltas(qwen2_pair.aligned, task), peft_deltas(qwen2_pair.aligned, safety)
    actual = peft_deltas(qwen2_pair.aligned, tmp_path / "out")
    assert len(result.selected_modules) == 4
    for name in result.selected_modules:
        assert rel_err(actual[name], 0.8 * task_deltas[name] + 0.2 * safety_deltas[name]) < 1e-6


def test_tied_lm_head_resolves_to_the_embedding_delta(tied_llama_pair, make_adapter, read_checkpoint):
    base, aligned = read_checkpoint(tied_llama_pair.base), read_checkpoint(tied_llama_pair.aligned)
    embedding_delta = aligned["model.embed_tokens.weight"].float() - base["model.embed_tokens.weight"].float()
    subspace = AlignmentSubspace(str(tied_llama_pair.base), str(tied_llama_pair.aligned))

    assert "lm_head.weight" not in base
    assert subspace.base.find_weight("lm_head") == "model.embed_tokens.weight"
    assert subspace.aligned.find_weight("lm_head") == "model.embed_tokens.weight"
    assert torch.equal(subspace.delta("lm_head", tuple(embedding_delta.shape)), embedding_delta)


def test_tied_lm_head_lora_is_scored_against_the_embedding_delta(tied_llama_pair, make_adapter, read_checkpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about LoRA on a tied layer
        task = make_adapter(tied_llama_pair.aligned, "task", seed=1, target_modules=["lm_head", "q_proj"])
    base, aligned = read_checkpoint(tied_llama_pair.base), read_checkpoint(tied_llama_pair.aligned)
    embedding_delta = aligned["model.embed_tokens.weight"].double() - base["model.embed_tokens.weight"].double()
    lora = load_adapter(task).modules["lm_head"]

    result = score_adapter(task, **tied_llama_pair.kwargs())

    lm_head = {m.name: m for m in result.modules}["lm_head"]
    assert lm_head.delta_norm == pytest.approx(torch.linalg.vector_norm(embedding_delta).item(), rel=1e-6)
    expected = dense_alignment_score(embedding_delta, lora.lora_b.double() @ lora.lora_a.double())
    assert lm_head.score == pytest.approx(expected, abs=1e-6)


# --- checkpoint formats ------------------------------------------------------------------------------------------


def test_sharded_and_single_file_checkpoints_give_identical_deltas_and_scores(llama_pair, llama_single_file_pair,
                                                                              task_adapter):
    assert (llama_pair.base / "model.safetensors.index.json").is_file()
    assert len(list(llama_pair.base.glob("model-*-of-*.safetensors"))) > 1
    assert (llama_single_file_pair.base / "model.safetensors").is_file()
    assert not (llama_single_file_pair.base / "model.safetensors.index.json").exists()

    sharded = AlignmentSubspace(str(llama_pair.base), str(llama_pair.aligned))
    single = AlignmentSubspace(str(llama_single_file_pair.base), str(llama_single_file_pair.aligned))
    for name, module in load_adapter(task_adapter).modules.items():
        assert torch.equal(sharded.delta(name, module.shape), single.delta(name, module.shape))

    sharded_scores = [m.score for m in score_adapter(task_adapter, **llama_pair.kwargs()).modules]
    single_scores = [m.score for m in score_adapter(task_adapter, **llama_single_file_pair.kwargs()).modules]
    assert sharded_scores == single_scores


@pytest.fixture
def pickle_only_base(llama_pair, read_checkpoint, tmp_path):
    """`llama_pair.base` re-saved as a single `pytorch_model.bin` (plus config.json), no safetensors."""
    directory = tmp_path / "pickle-base"
    directory.mkdir()
    torch.save(read_checkpoint(llama_pair.base), directory / "pytorch_model.bin")
    shutil.copy(llama_pair.base / "config.json", directory / "config.json")
    return directory


PICKLE_REFUSAL = ("has only pickle weights (pytorch_model.bin), which can run code when loaded. Convert it with "
                  "`save_pretrained(..., safe_serialization=True)`, or set `allow_pickle=True` if you trust its "
                  "source.")


def test_pickle_only_checkpoint_is_refused_by_default(pickle_only_base, llama_pair):
    with pytest.raises(ValueError, match=re.escape(f"The base model {str(pickle_only_base)!r} {PICKLE_REFUSAL}")):
        AlignmentSubspace(str(pickle_only_base), str(llama_pair.aligned))


def test_pickle_only_checkpoint_is_refused_by_score_adapter(pickle_only_base, llama_pair, task_adapter):
    with pytest.raises(ValueError, match=re.escape(PICKLE_REFUSAL)):
        score_adapter(task_adapter, base_model=str(pickle_only_base), aligned_model=str(llama_pair.aligned),
                      progress=False)


def test_pickle_only_checkpoint_with_allow_pickle_gives_the_same_scores(pickle_only_base, llama_pair, task_adapter,
                                                                        task_scores):
    result = score_adapter(task_adapter, base_model=str(pickle_only_base), aligned_model=str(llama_pair.aligned),
                           allow_pickle=True, progress=False)
    assert {m.name: m.score for m in result.modules} == task_scores


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_allow_pickle_still_refuses_pickles_that_run_code(llama_pair, tmp_path):
    directory = tmp_path / "evil"
    directory.mkdir()
    marker = tmp_path / "code-ran"
    torch.save({"model.layers.0.self_attn.q_proj.weight": _RunsCode(marker)}, directory / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        AlignmentSubspace(str(directory), str(llama_pair.aligned), allow_pickle=True)
    assert not marker.exists()


# --- errors ------------------------------------------------------------------------------------------------------


def test_check_modules_lists_every_missing_module_and_shape_mismatch(llama_pair):
    subspace = AlignmentSubspace(str(llama_pair.base), str(llama_pair.aligned))
    with pytest.raises(ValueError) as error:
        subspace.check_modules({"model.layers.0.self_attn.q_proj": (16, 32), "model.layers.7.mlp.up_proj": (64, 32)})
    message = str(error.value)
    assert message.startswith("The base/aligned checkpoints do not match the adapter's LoRA modules:")
    assert ("model.layers.0.self_attn.q_proj: base model weight model.layers.0.self_attn.q_proj.weight has shape "
            "(32, 32), adapter implies (out, in) = (16, 32)") in message
    assert f"model.layers.7.mlp.up_proj: no weight in the base model ({llama_pair.base})" in message
    assert f"model.layers.7.mlp.up_proj: no weight in the aligned model ({llama_pair.aligned})" in message


def test_missing_local_directory_is_a_clear_error(llama_pair, tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=re.escape(f"The base model directory {missing!r} does not exist.")):
        AlignmentSubspace(missing, str(llama_pair.aligned))


def test_unknown_hub_id_offline_is_a_clear_error(llama_pair):
    with pytest.raises(ValueError, match=re.escape("Could not fetch the base model 'safemerge-test/no-such-model' "
                                                   "from the Hugging Face hub")):
        AlignmentSubspace("safemerge-test/no-such-model", str(llama_pair.aligned))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_checkpoint_is_reported(bad_value, llama_pair, read_checkpoint, tmp_path):
    from safetensors.torch import save_file

    tensors = read_checkpoint(llama_pair.aligned)
    tensors["model.layers.0.self_attn.q_proj.weight"][5, 7] = bad_value
    directory = tmp_path / "corrupt"
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    subspace = AlignmentSubspace(str(llama_pair.base), str(directory))
    message = re.escape("The alignment delta of 'model.layers.0.self_attn.q_proj' has NaN or Inf entries")

    with pytest.raises(ValueError, match=message):
        subspace.delta("model.layers.0.self_attn.q_proj", (32, 32))
    with pytest.raises(ValueError, match=message):
        subspace.projection("model.layers.0.self_attn.q_proj", (32, 32), torch.ones(32, 4))


# --- streamed projection ------------------------------------------------------------------------------------------


def test_projection_matches_materialised_delta(llama_pair, task_adapter):
    subspace = AlignmentSubspace(str(llama_pair.base), str(llama_pair.aligned))
    for name, module in load_adapter(task_adapter).modules.items():
        delta, delta_norm = subspace.delta_and_norm(name, module.shape)
        expected = delta.double() @ (delta.double().T @ module.lora_b.double())

        projected, norm = subspace.projection(name, module.shape, module.lora_b)

        assert projected.dtype == torch.float32
        assert projected.shape == module.lora_b.shape
        assert torch.allclose(projected.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
        assert norm == pytest.approx(delta_norm, rel=1e-6)


def test_projection_of_gpt2_conv1d_uses_transposed_delta(gpt2_pair, make_adapter, read_checkpoint):
    task = make_adapter(gpt2_pair.aligned, "task", seed=1, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    base, aligned = read_checkpoint(gpt2_pair.base), read_checkpoint(gpt2_pair.aligned)
    subspace = AlignmentSubspace(str(gpt2_pair.base), str(gpt2_pair.aligned))
    for name, module in load_adapter(task).modules.items():
        delta = (aligned[f"{name}.weight"].double() - base[f"{name}.weight"].double()).T  # stored (in, out)
        expected = delta @ (delta.T @ module.lora_b.double())

        projected, norm = subspace.projection(name, module.shape, module.lora_b, fan_in_fan_out=True)

        assert projected.shape == (delta.shape[0], module.rank)
        assert torch.allclose(projected.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
        assert norm == pytest.approx(torch.linalg.vector_norm(delta).item(), rel=1e-6)


def test_cache_bytes_is_deprecated_and_ignored():
    from safemerge_callback.config import SafeMergeConfig

    with pytest.warns(FutureWarning, match=re.escape("`cache_bytes` is deprecated and has no effect")):
        config = SafeMergeConfig(cache_bytes=1 << 30)
    assert config.cache_bytes == 1 << 30
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SafeMergeConfig()
