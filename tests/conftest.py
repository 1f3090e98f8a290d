"""Shared fixtures: tiny base/aligned checkpoints and LoRA adapters built in temporary directories, nothing downloaded.

Checkpoints and the default task/safety adapters are session-scoped and read-only: every test that needs to change a
file copies it first (`test_repair.py::test_repair_never_modifies_input_files` checks that no repair writes to them).
Oracles (`peft_deltas`) load adapters with stock PEFT and return float64 `ΔW` in `(out, in)` layout.
"""

from __future__ import annotations

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import hashlib  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from safemerge_callback import testing  # noqa: E402
from safemerge_callback.repair import score_adapter  # noqa: E402


ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class ModelPair(NamedTuple):
    """Directories of a tiny base model and its "aligned" copy (weights differ by a seeded low-rank perturbation)."""

    base: Path
    aligned: Path

    def kwargs(self) -> dict:
        """Keyword arguments that point `repair_adapter` / `score_adapter` at this pair, without progress bars."""
        return {"base_model": str(self.base), "aligned_model": str(self.aligned), "progress": False}


def _pair(tmp_path_factory, name: str, config=None, **kwargs) -> ModelPair:
    return ModelPair(*testing.save_base_and_aligned(tmp_path_factory.mktemp(name), config, **kwargs))


# --- checkpoints -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory) -> ModelPair:
    """Tiny Llama with grouped-query attention (q/o 32×32, k/v 16×32), saved sharded with an index."""
    return _pair(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def llama_single_file_pair(tmp_path_factory) -> ModelPair:
    """The same tiny Llama (same seeds, so identical weights) saved as one `model.safetensors` per model."""
    return _pair(tmp_path_factory, "llama-single", max_shard_size=None)


@pytest.fixture(scope="session")
def qwen2_pair(tmp_path_factory) -> ModelPair:
    """Tiny Qwen2: q/k/v projections carry biases."""
    return _pair(tmp_path_factory, "qwen2", testing.tiny_qwen2_config())


@pytest.fixture(scope="session")
def gpt2_pair(tmp_path_factory) -> ModelPair:
    """Tiny GPT-2: `Conv1D` layers whose weights are stored `(in, out)`."""
    return _pair(tmp_path_factory, "gpt2", testing.tiny_gpt2_config())


@pytest.fixture(scope="session")
def tied_llama_pair(tmp_path_factory) -> ModelPair:
    """Tiny Llama with `tie_word_embeddings=True`: the checkpoints store no `lm_head.weight`."""
    return _pair(tmp_path_factory, "llama-tied", testing.tiny_llama_config(tie_word_embeddings=True))


UNALIGNED_MODULE = "model.layers.0.self_attn.v_proj"


@pytest.fixture(scope="session")
def unaligned_module() -> str:
    """The module whose aligned weight equals its base weight in `llama_pair_with_unaligned_module`."""
    return UNALIGNED_MODULE


@pytest.fixture(scope="session")
def llama_pair_with_unaligned_module(llama_pair, tmp_path_factory) -> ModelPair:
    """`llama_pair` whose aligned model has the base weight of `UNALIGNED_MODULE` (V = 0 there)."""
    from transformers import AutoModelForCausalLM

    aligned = AutoModelForCausalLM.from_pretrained(llama_pair.aligned, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(llama_pair.base, dtype=torch.float32)
    with torch.no_grad():
        aligned.get_submodule(UNALIGNED_MODULE).weight.copy_(base.get_submodule(UNALIGNED_MODULE).weight)
    directory = tmp_path_factory.mktemp("llama-unaligned") / "aligned"
    aligned.save_pretrained(directory)
    return ModelPair(llama_pair.base, directory)


# --- adapters --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def task_adapter(llama_pair, tmp_path_factory) -> Path:
    """Random task adapter on `llama_pair.aligned`: r=4, α=8, all four attention projections (8 modules)."""
    return testing.save_random_adapter(llama_pair.aligned, tmp_path_factory.mktemp("adapters") / "task", seed=1,
                                       r=4, lora_alpha=8, target_modules=ATTENTION_TARGETS)


@pytest.fixture(scope="session")
def safety_adapter(llama_pair, tmp_path_factory) -> Path:
    """Random safety adapter, same modules and rank as `task_adapter` but α=16 (a different scaling)."""
    return testing.save_random_adapter(llama_pair.aligned, tmp_path_factory.mktemp("adapters") / "safety", seed=2,
                                       r=4, lora_alpha=16, target_modules=ATTENTION_TARGETS)


@pytest.fixture(scope="session")
def task_scores(task_adapter, llama_pair) -> dict[str, float]:
    """ρ of every module of `task_adapter` (all defined)."""
    result = score_adapter(task_adapter, **llama_pair.kwargs())
    return {module.name: module.score for module in result.modules}


@pytest.fixture(scope="session")
def middle_threshold(task_scores) -> float:
    """A τ that selects the lower half of `task_adapter`'s modules and leaves the upper half unselected."""
    scores = sorted(task_scores.values())
    half = len(scores) // 2
    assert scores[half - 1] < scores[half], "the fixture adapter needs distinct middle scores"
    return (scores[half - 1] + scores[half]) / 2


@pytest.fixture
def make_adapter(tmp_path):
    """Return `make(model_dir, name, seed=..., zero_lora_b=(), untrained=False, **lora_kwargs) -> Path`.

    Saves a random LoRA adapter under the test's `tmp_path` (see `testing.save_random_adapter` for the keyword
    arguments). `zero_lora_b` lists module names whose `lora_B` is set to zero afterwards, as PEFT initialises it;
    `untrained=True` saves PEFT's own initialisation (every `lora_B` zero).
    """

    def make(model_dir, name: str, *, seed: int = 1, zero_lora_b=(), untrained: bool = False, **lora_kwargs) -> Path:
        lora_kwargs.setdefault("target_modules", ATTENTION_TARGETS)
        directory = tmp_path / name
        if untrained:
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM

            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            targets = lora_kwargs.pop("target_modules")
            targets = targets if isinstance(targets, str) else list(targets)
            get_peft_model(model, LoraConfig(target_modules=targets, **lora_kwargs)).save_pretrained(directory)
            return directory
        testing.save_random_adapter(model_dir, directory, seed=seed, **lora_kwargs)
        if zero_lora_b:
            path = directory / "adapter_model.safetensors"
            tensors = load_file(path)
            for module in zero_lora_b:
                key = f"base_model.model.{module}.lora_B.weight"
                assert key in tensors, f"{key} not in the adapter"
                tensors[key] = torch.zeros_like(tensors[key])
            save_file(tensors, path, metadata={"format": "pt"})
        return directory

    return make


@pytest.fixture
def copy_dir(tmp_path):
    """Return `copy(source, name) -> Path`: a private copy of a (session-scoped) directory for tests that write."""

    def copy(source: Path, name: str) -> Path:
        return Path(shutil.copytree(source, tmp_path / name))

    return copy


# --- oracles -------------------------------------------------------------------------------------------------


def load_peft_model(model_dir: Path, adapter_dir: Path, adapter_name: str = "default"):
    """Load `model_dir` in float32 and the adapter with stock `PeftModel.from_pretrained`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name).eval()


def lora_layers(peft_model, adapter_name: str = "default") -> dict:
    """LoRA layers of `adapter_name` by module name (without the `base_model.model.` prefix)."""
    prefix = "base_model.model."
    return {name[len(prefix):]: module for name, module in peft_model.named_modules()
            if hasattr(module, "get_delta_weight") and adapter_name in getattr(module, "lora_A", {})}


def delta_weights(peft_model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """`get_delta_weight` of every LoRA layer as float64, transposed to `(out, in)` for `fan_in_fan_out` layers."""
    deltas = {}
    with torch.no_grad():
        for name, layer in lora_layers(peft_model, adapter_name).items():
            delta = layer.get_delta_weight(adapter_name).double()
            deltas[name] = delta.T if layer.fan_in_fan_out else delta
    return deltas


@pytest.fixture(scope="session")
def peft_model_loader():
    """Return `load_peft_model(model_dir, adapter_dir, adapter_name="default")`."""
    return load_peft_model


@pytest.fixture(scope="session")
def peft_deltas():
    """Return `deltas(model_dir, adapter_dir) -> {module: ΔW float64 (out, in)}`, read through stock PEFT."""

    def deltas(model_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
        return delta_weights(load_peft_model(model_dir, adapter_dir))

    return deltas


@pytest.fixture(scope="session")
def read_checkpoint():
    """Return `read(model_dir) -> {key: tensor}` over every `*.safetensors` file of a (sharded) checkpoint."""

    def read(model_dir: Path) -> dict[str, torch.Tensor]:
        tensors = {}
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            tensors.update(load_file(path))
        return tensors

    return read


@pytest.fixture(scope="session")
def file_hashes():
    """Return `hashes(*directories) -> {path: sha256}` over every file below the directories."""

    def hashes(*directories: Path) -> dict[str, str]:
        result = {}
        for directory in directories:
            for path in sorted(Path(directory).rglob("*")):
                if path.is_file():
                    result[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        return result

    return hashes


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """`‖actual − expected‖_F / ‖expected‖_F` in float64."""
    actual, expected = actual.double(), expected.double()
    return (torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected)).item()


@pytest.fixture(scope="session")
def rel_err():
    """Return `relative_error(actual, expected)`: relative Frobenius error in float64."""
    return relative_error


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny Llama with its tokenizer saved as one model directory, the base model of whole-pipeline runs."""
    directory = tmp_path_factory.mktemp("tiny") / "base"
    testing.build_model(testing.tiny_llama_config()).save_pretrained(directory)
    testing.tiny_tokenizer().save_pretrained(directory)
    return directory
