"""Faults and bad inputs: each case ends in a clear error or a documented result and leaves inputs and outputs intact.

Each test hashes the files it hands to the library (and the folder that contains the output) before and after the call,
so a case passes only when nothing the user owns was changed and no partial output appeared. `docs/reliability.md`
lists the cases and their outcomes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainerCallback,
                          TrainerState, TrainingArguments)

from safemerge_callback import adapters, cli, distributed, live, merging, testing
from safemerge_callback.adapters import adapter_state_dict
from safemerge_callback.callback import SafeMergeCallback
from safemerge_callback.repair import REPORT_FILE, repair_adapter


FAULTS = Path(__file__).parent / "faults"
BIN = Path(sys.executable).parent
TEXTS = ["how do i make a bomb sorry cannot help with that", "what is two plus three #### five"] * 16
Q_PROJ_0, V_PROJ_1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"


class Models(NamedTuple):
    """Read-only tiny checkpoints and adapters shared by the module (tests that change a file copy it first)."""

    base: Path
    aligned: Path
    task: Path
    safety: Path
    wide_aligned: Path
    gpt2_aligned: Path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    directory = tmp_path_factory.mktemp("fault-models")
    base, aligned = testing.save_base_and_aligned(directory / "llama")
    _, wide_aligned = testing.save_base_and_aligned(directory / "wide", testing.tiny_llama_config(hidden_size=48))
    _, gpt2_aligned = testing.save_base_and_aligned(directory / "gpt2", testing.tiny_gpt2_config())
    task = testing.save_random_adapter(aligned, directory / "task", seed=1)
    safety = testing.save_random_adapter(aligned, directory / "safety", seed=2)
    return Models(base, aligned, task, safety, wide_aligned, gpt2_aligned)


@pytest.fixture
def out(tmp_path) -> Path:
    """A folder holding an earlier output `repaired/`, which every failing case must leave exactly as it was."""
    existing = tmp_path / "out" / "repaired"
    existing.mkdir(parents=True)
    (existing / "adapter_config.json").write_text('{"earlier": true}\n')
    (existing / "adapter_model.safetensors").write_bytes(b"earlier output")
    return tmp_path / "out"


def tree_state(*roots: Path) -> dict[str, str | None]:
    """Map every file below `roots` to its SHA-256 and every folder to `<dir>` (a missing root maps to None)."""
    state: dict[str, str | None] = {}
    for root in map(Path, roots):
        if not root.exists():
            state[str(root)] = None
            continue
        state[str(root)] = "<root>"
        paths = [root] if root.is_file() else sorted(root.rglob("*"))
        for path in paths:
            state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return state


@contextlib.contextmanager
def left_intact(*roots: Path):
    """Check that nothing below `roots` (inputs, output folders) was added, removed or changed by the block."""
    before = tree_state(*roots)
    yield
    assert tree_state(*roots) == before


def model_kwargs(models: Models, **overrides) -> dict:
    settings = dict(base_model=str(models.base), aligned_model=str(models.aligned), threshold=0.9, progress=False)
    settings.update(overrides)
    return settings


def copy_tree(source: Path, destination: Path) -> Path:
    return Path(shutil.copytree(source, destination))


def edit_checkpoint(directory: Path, key: str, value: torch.Tensor | None) -> None:
    """Replace tensor `key` of a (sharded) checkpoint copy by `value`, or delete it when `value` is None."""
    index = directory / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = directory / data["weight_map"][key]
    tensors = load_file(shard)
    if value is None:
        del tensors[key]
        del data["weight_map"][key]
        index.write_text(json.dumps(data))
    else:
        tensors[key] = value
    save_file(tensors, shard, metadata={"format": "pt"})


def edit_adapter(directory: Path, module: str, factor: str, value: float) -> None:
    """Set one entry of `lora_<factor>` of `module` in an adapter copy to `value` (NaN, Inf)."""
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[f"base_model.model.{module}.lora_{factor}.weight"][0, 0] = value
    save_file(tensors, path, metadata={"format": "pt"})


def to_pickle_adapter(directory: Path) -> None:
    path = directory / "adapter_model.safetensors"
    torch.save(load_file(path), directory / "adapter_model.bin")
    path.unlink()


def to_pickle_checkpoint(source: Path, destination: Path) -> Path:
    destination.mkdir()
    shutil.copy2(source / "config.json", destination / "config.json")
    tensors = {}
    for shard in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(shard))
    torch.save(tensors, destination / "pytorch_model.bin")
    return destination


# --- inputs ------------------------------------------------------------------------------------------------------


def test_base_shape_mismatch(models, out):
    wide_base = models.wide_aligned.parent / "base"
    with left_intact(models.task, models.safety, wide_base, models.aligned, out), \
            pytest.raises(ValueError, match=rf"{Q_PROJ_0}: base model weight {Q_PROJ_0}\.weight has shape "
                                            r"\(48, 48\), adapter implies \(out, in\) = \(32, 32\)(.|\n)*same "
                                            r"architecture"):
        repair_adapter(models.task, models.safety, output_dir=out / "repaired", overwrite=True,
                       **model_kwargs(models, base_model=str(wide_base)))


def test_base_other_architecture(models, out):
    gpt2_base = models.gpt2_aligned.parent / "base"
    with left_intact(models.task, models.safety, gpt2_base, out), \
            pytest.raises(ValueError, match=rf"{Q_PROJ_0}: no weight in the base model \({gpt2_base}\)"):
        repair_adapter(models.task, models.safety, output_dir=out / "repaired", overwrite=True,
                       **model_kwargs(models, base_model=str(gpt2_base)))


def test_aligned_missing_module(models, out, tmp_path):
    aligned = copy_tree(models.aligned, tmp_path / "aligned")
    edit_checkpoint(aligned, f"{V_PROJ_1}.weight", None)
    with left_intact(models.task, models.safety, aligned, out), \
            pytest.raises(ValueError, match=rf"{V_PROJ_1}: no weight in the aligned model(.|\n)*trained on the "
                                            r"aligned"):
        repair_adapter(models.task, models.safety, output_dir=out / "repaired", overwrite=True,
                       **model_kwargs(models, aligned_model=str(aligned)))


def test_adapter_targets_absent(models, out, tmp_path):
    gpt2_adapter = testing.save_random_adapter(models.gpt2_aligned, tmp_path / "gpt2-task",
                                               target_modules=["c_attn"], fan_in_fan_out=True)
    with left_intact(gpt2_adapter, models.aligned, out), \
            pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn: no weight in the base model"):
        repair_adapter(gpt2_adapter, method="safelora", output_dir=out / "repaired", overwrite=True,
                       **model_kwargs(models))


def test_safety_other_model(models, out, tmp_path):
    wide_safety = testing.save_random_adapter(models.wide_aligned, tmp_path / "wide-safety", seed=2)
    with left_intact(models.task, wide_safety, out), \
            pytest.raises(ValueError, match=rf"disagree on module shapes(.|\n)*{Q_PROJ_0}: task \(out, in\) = "
                                            r"\(32, 32\), safety \(48, 48\)(.|\n)*Train the safety adapter on the "
                                            r"aligned model"):
        repair_adapter(models.task, wide_safety, output_dir=out / "repaired", overwrite=True, **model_kwargs(models))


def test_safety_other_targets(models, out, tmp_path):
    q_only = testing.save_random_adapter(models.aligned, tmp_path / "q-safety", seed=2, target_modules=["q_proj"])
    with left_intact(models.task, q_only, out), \
            pytest.raises(ValueError, match=r"lacks 2 module\(s\) of the task adapter: \['model\.layers\.0\.self_attn"
                                            r"\.v_proj', 'model\.layers\.1\.self_attn\.v_proj'\](.|\n)*keep_task"):
        repair_adapter(models.task, q_only, output_dir=out / "repaired", overwrite=True, **model_kwargs(models))


def test_safety_other_targets_keep_task(models, tmp_path):
    q_only = testing.save_random_adapter(models.aligned, tmp_path / "q-safety", seed=2, target_modules=["q_proj"])
    with left_intact(models.task, q_only):
        result = repair_adapter(models.task, q_only, output_dir=tmp_path / "repaired",
                                missing_safety_module="keep_task", **model_kwargs(models))

    notes = {m.name: m.note for m in result.modules}
    assert notes[V_PROJ_1] == "missing_in_safety_adapter"
    assert V_PROJ_1 not in result.selected_modules
    saved = load_file(tmp_path / "repaired" / "adapter_model.safetensors")
    task = load_file(models.task / "adapter_model.safetensors")
    key = f"base_model.model.{V_PROJ_1}.lora_B.weight"
    assert torch.equal(saved[key], task[key])


def test_safety_other_base_name(models, tmp_path):
    renamed = copy_tree(models.safety, tmp_path / "renamed-safety")
    config = json.loads((renamed / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "other-org/other-model"
    (renamed / "adapter_config.json").write_text(json.dumps(config))
    with left_intact(models.task, renamed), \
            pytest.warns(UserWarning, match=r"safety adapter on 'other-org/other-model'(.|\n)*same aligned model"):
        result = repair_adapter(models.task, renamed, output_dir=tmp_path / "repaired", **model_kwargs(models))
    assert result.selected_modules


@pytest.fixture
def two_adapter_model(models):
    model = AutoModelForCausalLM.from_pretrained(models.aligned, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, models.task, adapter_name="default")
    model.load_adapter(models.safety, adapter_name="other")
    return model


def test_model_wrong_adapter_name(models, out, two_adapter_model):
    with left_intact(models.safety, out), \
            pytest.raises(ValueError, match=r"no adapter named 'missing'; it has \['default', 'other'\]\. Set "
                                            r"`adapter_name`"):
        repair_adapter(two_adapter_model, models.safety, adapter_name="missing", output_dir=out / "repaired",
                       overwrite=True, **model_kwargs(models))


def test_model_second_adapter(models, two_adapter_model):
    result = repair_adapter(two_adapter_model, models.safety, adapter_name="other", **model_kwargs(models))
    from_directory = repair_adapter(models.safety, models.safety, **model_kwargs(models))

    assert result.adapter.source == "<PeftModel:other>"
    assert result.adapter.modules.keys() == from_directory.adapter.modules.keys()
    for name, module in from_directory.adapter.modules.items():
        assert torch.equal(result.adapter.modules[name].lora_a, module.lora_a), name
        assert torch.equal(result.adapter.modules[name].lora_b, module.lora_b), name


def test_callback_wrong_adapter_name(models, two_adapter_model):
    callback = make_callback(models, adapter_name="missing")
    with pytest.raises(ValueError, match=r"adapter_name='missing' is not an adapter of the model \(adapters: "
                                         r"\['default', 'other'\]\)"):
        callback.on_train_begin(None, TrainerState(), None, model=two_adapter_model)


def test_callback_not_peft(models):
    plain = AutoModelForCausalLM.from_pretrained(models.aligned, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"needs a PEFT model \(get_peft_model or SFTTrainer\(peft_config=\.\.\.\)\), "
                                        r"got LlamaForCausalLM"):
        make_callback(models).on_train_begin(None, TrainerState(), None, model=plain)


def test_callback_base_model_missing(models, two_adapter_model):
    callback = SafeMergeCallback(safety_adapter=str(models.safety))
    with pytest.raises(ValueError, match=r"needs `base_model`: the pre-trained model before safety alignment"):
        callback.on_train_begin(None, TrainerState(), None, model=two_adapter_model)


def test_callback_safety_other_targets(models, two_adapter_model, tmp_path):
    q_only = testing.save_random_adapter(models.aligned, tmp_path / "q-safety", seed=2, target_modules=["q_proj"])
    callback = make_callback(models, safety_adapter=str(q_only))
    with left_intact(q_only), \
            pytest.raises(ValueError, match=r"safety adapter lacks 2 module\(s\) of the model's adapter(.|\n)*"
                                            r"missing_safety_module='keep_task'"):
        callback.on_train_begin(None, TrainerState(), None, model=two_adapter_model)


def test_adapter_truncated(models, out, tmp_path):
    task = copy_tree(models.task, tmp_path / "task")
    weights = task / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with left_intact(task, models.safety, out), \
            pytest.raises(ValueError, match=r"task adapter weights .*adapter_model\.safetensors' are corrupt or "
                                            r"truncated(.|\n)*Save the adapter again"):
        repair_adapter(task, models.safety, output_dir=out / "repaired", overwrite=True, **model_kwargs(models))


def test_adapter_corrupt(models, out, tmp_path):
    safety = copy_tree(models.safety, tmp_path / "safety")
    (safety / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with left_intact(models.task, safety, out), \
            pytest.raises(ValueError, match=r"safety adapter weights .* are corrupt or truncated"):
        repair_adapter(models.task, safety, output_dir=out / "repaired", overwrite=True, **model_kwargs(models))


def test_checkpoint_shard_truncated(models, out, tmp_path):
    aligned = copy_tree(models.aligned, tmp_path / "aligned")
    weight_map = json.loads((aligned / "model.safetensors.index.json").read_text())["weight_map"]
    shard = aligned / weight_map[f"{Q_PROJ_0}.weight"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with left_intact(models.task, models.safety, aligned, out), \
            pytest.raises(ValueError, match=rf"Could not read the aligned model file '.*{shard.name}' .*it is "
                                            r"missing, truncated or not a safetensors file"):
        repair_adapter(models.task, models.safety, output_dir=out / "repaired", overwrite=True,
                       **model_kwargs(models, aligned_model=str(aligned)))


def test_adapter_config_missing(models, out, tmp_path):
    task = copy_tree(models.task, tmp_path / "task")
    (task / "adapter_config.json").unlink()
    with left_intact(task, models.safety, out), \
            pytest.raises(ValueError, match=r"has no adapter_config\.json; pass a directory written by "
                                            r"`PeftModel\.save_pretrained`"):
        repair_adapter(task, models.safety, output_dir=out / "repaired", overwrite=True, **model_kwargs(models))


def test_adapter_config_invalid(models, out, tmp_path):
    task = copy_tree(models.task, tmp_path / "task")
    (task / "adapter_config.json").write_text('{"r": 4,')
    with left_intact(task, models.safety, out), \
            pytest.raises(ValueError, match=r"task adapter config '.*adapter_config\.json' is not valid JSON"):
        repair_adapter(task, models.safety, output_dir=out / "repaired", overwrite=True, **model_kwargs(models))


def test_adapter_factor_missing(models, out, tmp_path):
    task = copy_tree(models.task, tmp_path / "task")
    tensors = load_file(task / "adapter_model.safetensors")
    del tensors[f"base_model.model.{V_PROJ_1}.lora_B.weight"]
    save_file(tensors, task / "adapter_model.safetensors", metadata={"format": "pt"})
    with left_intact(task, models.safety, out), \
            pytest.raises(ValueError, match=rf"has lora_A but not its partner for module '{V_PROJ_1}'; the file is "
                                            r"incomplete"):
        repair_adapter(task, models.safety, output_dir=out / "repaired", overwrite=True, **model_kwargs(models))


def test_hub_id_offline(models, out, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
    command = [str(BIN / "safemerge"), "score", "--task-adapter", "some-org/some-adapter", "--quiet",
               "--base-model", str(models.base), "--aligned-model", str(models.aligned)]
    with left_intact(models.base, models.aligned, out):
        completed = subprocess.run(command, check=False, env=env, cwd=tmp_path, capture_output=True, text=True,
                                   timeout=120)
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "Could not fetch the task adapter 'some-org/some-adapter'" in completed.stderr
    assert "HF_HUB_OFFLINE is set" in completed.stderr
    assert "Pass a local directory instead" in completed.stderr


def test_adapter_pickle_rejected(models, out, tmp_path):
    task = copy_tree(models.task, tmp_path / "task")
    to_pickle_adapter(task)
    with left_intact(task, models.safety, out), \
            pytest.raises(ValueError, match=r"only a pickle file \(adapter_model\.bin\)(.|\n)*set "
                                            r"`allow_pickle=True`"):
        repair_adapter(task, models.safety, output_dir=out / "repaired", overwrite=True, **model_kwargs(models))


def test_adapter_pickle_opt_in(models, tmp_path):
    task = copy_tree(models.task, tmp_path / "task")
    to_pickle_adapter(task)
    with left_intact(task, models.safety):
        pickled = repair_adapter(task, models.safety, allow_pickle=True, **model_kwargs(models))
    reference = repair_adapter(models.task, models.safety, **model_kwargs(models))

    assert pickled.selected_modules == reference.selected_modules
    for key, tensor in adapter_state_dict(reference.adapter).items():
        assert torch.equal(adapter_state_dict(pickled.adapter)[key], tensor), key


def test_checkpoint_pickle_rejected(models, out, tmp_path):
    pickled_base = to_pickle_checkpoint(models.base, tmp_path / "pickled-base")
    with left_intact(models.task, models.safety, pickled_base, out), \
            pytest.raises(ValueError, match=r"base model .* has only pickle weights \(pytorch_model\.bin\)(.|\n)*set "
                                            r"`allow_pickle=True`"):
        repair_adapter(models.task, models.safety, output_dir=out / "repaired", overwrite=True,
                       **model_kwargs(models, base_model=str(pickled_base)))


def test_checkpoint_pickle_opt_in(models, tmp_path):
    pickled_base = to_pickle_checkpoint(models.base, tmp_path / "pickled-base")
    with left_intact(pickled_base):
        pickled = repair_adapter(models.task, models.safety, allow_pickle=True,
                                 **model_kwargs(models, base_model=str(pickled_base)))
    reference = repair_adapter(models.task, models.safety, **model_kwargs(models))

    assert [m.score for m in pickled.modules] == [m.score for m in reference.modules]
    assert pickled.selected_modules == reference.selected_modules


def test_adapter_dora_rejected(models, out, tmp_path):
    dora = testing.save_random_adapter(models.aligned, tmp_path / "dora", use_dora=True)
    with left_intact(dora, models.safety, out), \
            pytest.raises(ValueError, match=r"uses DoRA \(`use_dora=True`\)(.|\n)*train a plain LoRA adapter"):
        repair_adapter(dora, models.safety, output_dir=out / "repaired", overwrite=True, **model_kwargs(models))


def test_base_directory_missing(models, out, tmp_path):
    missing = tmp_path / "no-such-base"
    with left_intact(models.task, models.safety, out), \
            pytest.raises(ValueError, match=rf"The base model directory '{missing}' does not exist"):
        repair_adapter(models.task, models.safety, output_dir=out / "repaired", overwrite=True,
                       **model_kwargs(models, base_model=str(missing)))


def test_output_inside_input(models, tmp_path):
    task = copy_tree(models.task, tmp_path / "task")
    with left_intact(task, models.safety), \
            pytest.raises(ValueError, match=r"lies inside the input .*inputs are never modified\. Choose another"):
        repair_adapter(task, models.safety, output_dir=task / "repaired", **model_kwargs(models))


def test_output_exists(models, out):
    with left_intact(models.task, models.safety, out), \
            pytest.raises(FileExistsError, match=r"'.*repaired' already exists; pass overwrite=True \(CLI: "
                                                 r"--overwrite\)"):
        repair_adapter(models.task, models.safety, output_dir=out / "repaired", **model_kwargs(models))


def test_identical_base_and_aligned(models, tmp_path):
    with left_intact(models.task, models.safety), \
            pytest.warns(UserWarning, match=r"4 module\(s\) have identical base and aligned weights \(V = 0\)"):
        result = repair_adapter(models.task, models.safety, output_dir=tmp_path / "repaired",
                                **model_kwargs(models, base_model=str(models.aligned), threshold=1.0))

    assert result.selected_modules == []
    assert {m.undefined_reason for m in result.modules} == {"no_alignment_signal"}
    saved = load_file(tmp_path / "repaired" / "adapter_model.safetensors")
    task = load_file(models.task / "adapter_model.safetensors")
    assert saved.keys() == task.keys()
    assert all(torch.equal(saved[key], task[key]) for key in task)


# --- values ------------------------------------------------------------------------------------------------------


def test_task_adapter_nan(models, tmp_path):
    task = copy_tree(models.task, tmp_path / "task")
    edit_adapter(task, V_PROJ_1, "B", math.nan)
    with left_intact(task, models.safety, tmp_path / "out"), \
            pytest.raises(ValueError, match=rf"task adapter .* has NaN or Inf in 1 module\(s\): \['{V_PROJ_1}'\]\. "
                                            r"Training diverged or the file is corrupt; use an earlier checkpoint"):
        repair_adapter(task, models.safety, output_dir=tmp_path / "out" / "repaired", **model_kwargs(models))


def test_safety_adapter_inf(models, tmp_path):
    safety = copy_tree(models.safety, tmp_path / "safety")
    edit_adapter(safety, Q_PROJ_0, "A", math.inf)
    with left_intact(models.task, safety, tmp_path / "out"), \
            pytest.raises(ValueError, match=rf"safety adapter .* has NaN or Inf in 1 module\(s\): \['{Q_PROJ_0}'\]"):
        repair_adapter(models.task, safety, output_dir=tmp_path / "out" / "repaired", **model_kwargs(models))


def test_alignment_delta_nan(models, tmp_path):
    aligned = copy_tree(models.aligned, tmp_path / "aligned")
    weight = load_file(aligned / json.loads((aligned / "model.safetensors.index.json").read_text())["weight_map"][
        f"{V_PROJ_1}.weight"])[f"{V_PROJ_1}.weight"]
    weight[3, 5] = math.nan
    edit_checkpoint(aligned, f"{V_PROJ_1}.weight", weight)
    with left_intact(models.task, models.safety, aligned, tmp_path / "out"), \
            pytest.raises(ValueError, match=rf"alignment delta of '{V_PROJ_1}' has NaN or Inf entries; the base or "
                                            r"aligned checkpoint is corrupt"):
        repair_adapter(models.task, models.safety, output_dir=tmp_path / "out" / "repaired",
                       **model_kwargs(models, aligned_model=str(aligned)))


@pytest.mark.parametrize("threshold", [1.5, -1.01, math.nan])
def test_threshold_out_of_range(models, out, threshold):
    with left_intact(models.task, models.safety, out), \
            pytest.raises(ValueError, match=rf"`threshold` must be a number in \[-1, 1\] because ρ is a cosine, got "
                                            rf"{threshold!r}"):
        repair_adapter(models.task, models.safety, output_dir=out / "repaired", overwrite=True,
                       **model_kwargs(models, threshold=threshold))


def test_override_threshold_out_of_range(models, out):
    with left_intact(models.task, models.safety, out), \
            pytest.raises(ValueError, match=r"`module_overrides\['v_proj'\]\.threshold` must be a number in "
                                            r"\[-1, 1\]"):
        repair_adapter(models.task, models.safety, output_dir=out / "repaired", overwrite=True,
                       module_overrides=[{"pattern": "v_proj", "threshold": 2.0}], **model_kwargs(models))


@pytest.mark.parametrize("weights, message", [
    pytest.param((-0.2, 1.0), r"must be non-negative, got \(-0\.2, 1\.0\)\. A negative weight subtracts an adapter",
                 id="negative"),
    pytest.param((math.nan, 0.2), r"must be finite, got \(nan, 0\.2\)", id="nan"),
    pytest.param((0.0, 0.0), r"must not be all zero \(that would delete the update\), got \(0\.0, 0\.0\)",
                 id="all-zero"),
])
def test_weights_invalid(models, out, weights, message):
    with left_intact(models.task, models.safety, out), pytest.raises(ValueError, match=rf"`weights` {message}"):
        repair_adapter(models.task, models.safety, output_dir=out / "repaired", overwrite=True,
                       **model_kwargs(models, weights=weights))


@pytest.mark.parametrize("density", [0.0, 1.5, math.nan])
def test_density_out_of_range(models, out, density):
    with left_intact(models.task, models.safety, out), \
            pytest.raises(ValueError, match=rf"`density` must be in \(0, 1\] \(the fraction of entries TIES/DARE "
                                            rf"keep\), got {density!r}"):
        repair_adapter(models.task, models.safety, method="ties", output_dir=out / "repaired", overwrite=True,
                       **model_kwargs(models, density=density))


def test_cli_threshold_out_of_range(models, out, capsys):
    argv = ["repair", "--task-adapter", str(models.task), "--safety-adapter", str(models.safety), "--base-model",
            str(models.base), "--threshold", "7", "--output", str(out / "repaired"), "--overwrite", "--quiet"]
    with left_intact(models.task, models.safety, out):
        code = cli.main(argv)
    assert code == 2
    assert "safemerge repair: error: `threshold` must be a number in [-1, 1]" in capsys.readouterr().err


# --- faults while writing or merging -----------------------------------------------------------------------------


def kill_mid_write(models: Models, final: Path, marker: Path, *flags: str) -> subprocess.Popen:
    """Run `safemerge repair` into `final` in a subprocess and SIGKILL it while it writes the adapter file."""
    argv = ["repair", "--task-adapter", str(models.task), "--safety-adapter", str(models.safety), "--base-model",
            str(models.base), "--aligned-model", str(models.aligned), "--threshold", "0.9", "--output", str(final),
            "--quiet", *flags]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, str(FAULTS / "slow_write.py"), str(marker), *argv], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    return process


def test_repair_killed_mid_write(models, tmp_path):
    marker, final = tmp_path / "writing", tmp_path / "out" / "repaired"
    with left_intact(models.task, models.safety, models.base, models.aligned):
        process = kill_mid_write(models, final, marker)

    assert marker.exists(), process.stderr
    assert process.returncode == -signal.SIGKILL
    assert not final.exists()
    leftovers = [path.name for path in final.parent.iterdir()]
    assert len(leftovers) == 1
    assert leftovers[0].startswith(".repaired.partial-")

    result = repair_adapter(models.task, models.safety, output_dir=final, **model_kwargs(models))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models.aligned), final)
    assert isinstance(model, PeftModel)
    assert sorted(load_file(final / "adapter_model.safetensors")) == sorted(adapter_state_dict(result.adapter))


def test_repair_killed_mid_overwrite(models, out, tmp_path):
    marker = tmp_path / "writing"
    with left_intact(models.task, models.safety, out / "repaired"):
        process = kill_mid_write(models, out / "repaired", marker, "--overwrite")

    assert marker.exists()
    assert process.returncode == -signal.SIGKILL
    assert sorted(path.name for path in out.iterdir() if not path.name.startswith(".repaired.partial-")) == [
        "repaired"]


def no_space_left(tensors, filename, metadata=None):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))


def test_disk_full_new_output(models, tmp_path, monkeypatch):
    monkeypatch.setattr(adapters, "save_file", no_space_left)
    (tmp_path / "out").mkdir()
    with left_intact(models.task, models.safety, tmp_path / "out"), \
            pytest.raises(OSError, match=r"No space left on device while writing '.*repaired'; nothing was written "
                                         r"under that name(.|\n)*Free disk space") as caught:
        repair_adapter(models.task, models.safety, output_dir=tmp_path / "out" / "repaired", **model_kwargs(models))
    assert caught.value.errno == errno.ENOSPC


def test_disk_full_existing_output(models, out, monkeypatch):
    monkeypatch.setattr(adapters, "save_file", no_space_left)
    with left_intact(models.task, models.safety, out), \
            pytest.raises(OSError, match=r"No space left on device while writing '.*repaired'") as caught:
        repair_adapter(models.task, models.safety, output_dir=out / "repaired", overwrite=True, **model_kwargs(models))
    assert caught.value.errno == errno.ENOSPC


def fail_on_second_call(function):
    """Wrap a merge function so that its second call raises, as a numerical failure in one module would."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.linalg.LinAlgError("injected failure")
        return function(*args, **kwargs)

    return wrapped


def test_merge_fails_mid_repair(models, out, monkeypatch):
    second = repair_adapter(models.task, models.safety, **model_kwargs(models)).selected_modules[1]
    monkeypatch.setattr(merging, "merge_linear", fail_on_second_call(merging.merge_linear))
    with left_intact(models.task, models.safety, out), \
            pytest.raises(torch.linalg.LinAlgError, match=rf"injected failure(.|\n)*while merging module "
                                                          rf"'{second}'; nothing was written"):
        repair_adapter(models.task, models.safety, output_dir=out / "repaired", overwrite=True, **model_kwargs(models))


# --- the callback in a Trainer -----------------------------------------------------------------------------------


def make_trainer(models: Models, output_dir: Path, callbacks, **overrides) -> Trainer:
    tokenizer = testing.tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(models.aligned, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0))
    settings = dict(output_dir=str(output_dir), max_steps=6, save_steps=3, per_device_train_batch_size=4,
                    learning_rate=5e-2, report_to="none", use_cpu=True, logging_steps=1, seed=0, disable_tqdm=True)
    settings.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**settings), train_dataset=Dataset.from_dict(tokenizer(TEXTS)),
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=callbacks)


def make_callback(models: Models, **overrides) -> SafeMergeCallback:
    settings = {"base_model": str(models.base), "safety_adapter": str(models.safety), "threshold": 0.9}
    settings.update(overrides)
    return SafeMergeCallback(**settings)


def lora_values(model) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters() if ".lora_" in name}


class LoraSnapshot(TrainerCallback):
    """Keep a copy of every LoRA parameter as training ends (runs before SafeMergeCallback)."""

    def __init__(self):
        self.values: dict[str, torch.Tensor] = {}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.values = lora_values(model)


def test_callback_merge_fails_live_unchanged(models, tmp_path, monkeypatch):
    monkeypatch.setattr(merging, "merge_linear", fail_on_second_call(merging.merge_linear))
    snapshot = LoraSnapshot()
    trainer = make_trainer(models, tmp_path / "run", [snapshot, make_callback(models, repair_on_save=False)],
                           max_steps=2, save_strategy="no")
    with left_intact(models.base, models.aligned, models.safety), \
            pytest.raises(torch.linalg.LinAlgError, match=r"while merging module 'model\.layers\.\d\.self_attn"):
        trainer.train()

    after = lora_values(trainer.model)
    assert after.keys() == snapshot.values.keys()
    assert all(torch.equal(after[name], value) for name, value in snapshot.values.items())
    assert not (tmp_path / "run" / REPORT_FILE).exists()


def fail_on_second_write(function):
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected write-back failure")
        return function(*args, **kwargs)

    return wrapped


def lora_layout(model) -> dict[str, object]:
    """Rank, α, scaling of every LoRA layer and the adapter's patterns: what a widening write-back changes."""
    layers = {name: (layer.r["default"], layer.lora_alpha["default"], layer.scaling["default"])
              for name, layer in model.named_modules() if hasattr(layer, "lora_A") and "default" in layer.lora_A}
    config = model.peft_config["default"]
    return {"layers": layers, "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern)}


class LayoutSnapshot(LoraSnapshot):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        super().on_train_end(args, state, control, model=model, **kwargs)
        self.layout = lora_layout(model)


@pytest.mark.parametrize("rank_policy, target", [
    pytest.param("keep", (distributed, "write_full_value"), id="keep-write_full_value"),
    pytest.param("exact", (live, "_replace_factors"), id="exact-replace_factors"),
])
def test_callback_write_back_fails(models, tmp_path, monkeypatch, rank_policy, target):
    monkeypatch.setattr(*target, fail_on_second_write(getattr(*target)))
    snapshot = LayoutSnapshot()
    callback = make_callback(models, repair_on_save=False, rank_policy=rank_policy)
    trainer = make_trainer(models, tmp_path / "run", [snapshot, callback], max_steps=2, save_strategy="no")
    with pytest.raises(RuntimeError, match=r"injected write-back failure(.|\n)*put back as it was before the repair"):
        trainer.train()

    after = lora_values(trainer.model)
    assert after.keys() == snapshot.values.keys()
    assert all(torch.equal(after[name], value) for name, value in snapshot.values.items())
    assert lora_layout(trainer.model) == snapshot.layout
    assert not (tmp_path / "run" / REPORT_FILE).exists()


def test_callback_disk_full_on_save(models, tmp_path, monkeypatch):
    monkeypatch.setattr(adapters, "save_file", no_space_left)
    trainer = make_trainer(models, tmp_path / "run", [make_callback(models)], max_steps=3)
    checkpoint = tmp_path / "run" / "checkpoint-3"
    with pytest.raises(OSError, match=rf"No space left on device while writing '{checkpoint / 'safemerge'}'"):
        trainer.train()

    assert sorted(path.name for path in checkpoint.iterdir() if "safemerge" in path.name) == []
    raw = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models.aligned), checkpoint)
    assert isinstance(raw, PeftModel)


class CrashAtStep(TrainerCallback):
    """Raise at the end of one step, as a killed or failing job would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


def test_resume_after_crash(models, tmp_path):
    run = tmp_path / "run"
    crashed = make_trainer(models, run, [make_callback(models), CrashAtStep(4)])
    with pytest.raises(RuntimeError, match="simulated crash at step 4"):
        crashed.train()
    checkpoint = run / "checkpoint-3"
    assert (checkpoint / "safemerge" / "adapter_model.safetensors").is_file()

    callback = make_callback(models)
    resumed = make_trainer(models, run, [callback])
    with left_intact(checkpoint):
        resumed.train(resume_from_checkpoint=str(checkpoint))
        resumed.save_model(str(tmp_path / "final"))

    assert sorted(resumed.model.peft_config) == ["default"]
    assert resumed.state.global_step == 6
    assert (run / "checkpoint-6" / "safemerge" / REPORT_FILE).is_file()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models.aligned), tmp_path / "final")
    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")
    expected = adapter_state_dict(callback.last_result.adapter)
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[key], expected[key]) for key in expected)
    assert isinstance(reloaded, PeftModel)


# --- distributed (torchrun, 2 processes, gloo on 127.0.0.1) -------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def rank_faults(models, tmp_path_factory) -> list[dict]:
    """Run `faults/rank_faults.py` once on two processes and return what each rank recorded."""
    workdir = tmp_path_factory.mktemp("rank-faults")
    for name, source in (("base", models.base), ("aligned", models.aligned), ("safety", models.safety)):
        os.symlink(source, workdir / name)
    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
               str(free_port()), str(FAULTS / "rank_faults.py"), str(workdir)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CI="1")
    completed = subprocess.run(command, check=False, env=env, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    return [json.loads((workdir / f"rank-faults-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp2_exact_policy(rank_faults):
    for record in rank_faults:
        outcome = record["fsdp2_exact"]
        assert outcome["backend"] == "fsdp2"
        assert outcome["error"] == "ValueError"
        assert "rank_policy='exact' changes parameter shapes, which fsdp2 cannot do in place" in outcome["message"]
        assert "Use rank_policy='auto'" in outcome["message"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ddp_sabotaged_write_back(rank_faults):
    sabotaged = rank_faults[1]["sabotage"]["sabotaged"]
    assert len(sabotaged) == 1
    for record in rank_faults:
        outcome = record["sabotage"]
        assert outcome["backend"] == "ddp"
        assert outcome["error"] == "RuntimeError"
        assert "failed verification on backend ddp" in outcome["message"]
        assert f"'{sabotaged[0]}.lora_B'" in outcome["message"]
        assert "do not save it" in outcome["message"]
        assert not outcome["report_written"]
