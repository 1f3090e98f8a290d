"""`AlignmentSubspace`: stream `V = W_aligned − W_base` per LoRA module from two checkpoints, paired by name.

Only the weights of LoRA-carrying modules are read, one pair at a time, through `safetensors.safe_open` (memory
mapped), so a 7B pair never has to fit in memory. Tensors are paired by their full parameter name, never by order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .files import download_hub_files, resolve_directory
from .scoring import delta_projection, frobenius_norm


logger = logging.getLogger(__name__)

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# Input-embedding names, used when `lm_head` is a LoRA target and the checkpoint stores it tied to the embedding.
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight")


class CheckpointReader:
    """Lazy, name-addressed access to the tensors of one model checkpoint (local directory or hub id).

    Args:
        name_or_path (`str`): local directory or hub id.
        role (`str`): the checkpoint's role for error messages (`"base model"`, `"aligned model"`).
        revision (`str`, *optional*): hub revision.
        allow_pickle (`bool`, defaults to `False`): accept `pytorch_model.bin` checkpoints (read with
            `torch.load(weights_only=True, mmap=True)`).
    """

    def __init__(self, name_or_path: str, *, role: str, revision: str | None = None, allow_pickle: bool = False):
        self.name_or_path = str(name_or_path)
        self.role = role
        self.revision = revision
        self.allow_pickle = allow_pickle
        self.directory = resolve_directory(
            name_or_path, role=role, revision=revision,
            allow_patterns=["config.json", SAFETENSORS_INDEX, SAFETENSORS_SINGLE],
        )
        self._is_hub = not Path(name_or_path).expanduser().is_dir()
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self.weight_map = self._build_weight_map()

    def _build_weight_map(self) -> dict[str, str]:
        index = self.directory / SAFETENSORS_INDEX
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        single = self.directory / SAFETENSORS_SINGLE
        if single.is_file():
            try:
                with safe_open(str(single), framework="pt", device="cpu") as handle:
                    return {key: SAFETENSORS_SINGLE for key in handle.keys()}
            except (SafetensorError, OSError) as error:
                raise ValueError(f"Could not read the {self.role} file {str(single)!r} ({error}); it is truncated or "
                                 "not a safetensors file.") from None
        if (self.directory / PICKLE_SINGLE).is_file() or (self.directory / PICKLE_INDEX).is_file():
            if not self.allow_pickle:
                raise ValueError(
                    f"The {self.role} {self.name_or_path!r} has only pickle weights (pytorch_model.bin), which can run "
                    "code when loaded. Convert it with `save_pretrained(..., safe_serialization=True)`, or set "
                    "`allow_pickle=True` if you trust its source."
                )
            return self._load_pickled()
        raise ValueError(f"The {self.role} {self.name_or_path!r} has no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}.")

    def _load_pickled(self) -> dict[str, str]:
        if (self.directory / PICKLE_INDEX).is_file():
            files = sorted(set(json.loads((self.directory / PICKLE_INDEX).read_text())["weight_map"].values()))
        else:
            files = [PICKLE_SINGLE]
        self._pickled = {}
        for name in files:
            self._pickled.update(torch.load(self.directory / name, map_location="cpu", weights_only=True, mmap=True))
        return {key: PICKLE_SINGLE for key in self._pickled}

    def _local_path(self, key: str) -> Path:
        """Return the local file that stores `key`, downloading that shard first for a hub id."""
        path = self.directory / self.weight_map[key]
        if not path.is_file() and self._is_hub:
            download_hub_files(self.name_or_path, [path.name], revision=self.revision)
            path = Path(resolve_directory(self.name_or_path, role=self.role, revision=self.revision,
                                          allow_patterns=[path.name])) / path.name
        return path

    @contextlib.contextmanager
    def _open(self, key: str):
        # One short-lived handle per read: safetensors memory-maps the whole file, and pages read through a handle
        # that stays open count towards the process's resident memory until it is closed.
        path = self._local_path(key)
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as error:
            raise ValueError(f"Could not read the {self.role} file {str(path)!r} ({error}); it is missing, "
                             "truncated or not a safetensors file.") from None
        with handle:
            yield handle

    def shape(self, key: str) -> tuple[int, ...]:
        """Return the shape of tensor `key` from the file header, without reading its data."""
        if self._pickled is not None:
            return tuple(self._pickled[key].shape)
        if key not in self._shapes:
            with self._open(key) as handle:
                self._shapes[key] = tuple(handle.get_slice(key).get_shape())
        return self._shapes[key]

    @contextlib.contextmanager
    def mapped(self, key: str):
        """Yield tensor `key` backed by the memory-mapped file. It is valid only inside the `with` block and read-only."""
        if self._pickled is not None:
            yield self._pickled[key]
            return
        with self._open(key) as handle:
            try:
                stored = handle.get_tensor(key)
            except SafetensorError as error:
                raise ValueError(f"Could not read {key!r} from the {self.role} ({error}); the file may be "
                                 "truncated.") from None
            yield stored

    def tensor(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read tensor `key` as a new tensor that shares no memory with the file (converted to `dtype` if given)."""
        with self.mapped(key) as stored:
            return stored.to(dtype or stored.dtype, copy=True)

    def find_weight(self, module_name: str) -> str | None:
        """Return the checkpoint key of `module_name`'s weight, or None when the checkpoint has no such module.

        Tries `<module>.weight`, then the name with or without a leading `model.` (checkpoints saved from the bare
        backbone class), then, for `lm_head`, the tied input embedding.
        """
        candidates = [f"{module_name}.weight"]
        if module_name.startswith("model."):
            candidates.append(f"{module_name[len('model.'):]}.weight")
        else:
            candidates.append(f"model.{module_name}.weight")
        for key in candidates:
            if key in self.weight_map:
                return key
        if module_name.split(".")[-1] == "lm_head":
            embeddings = [key for key in self.weight_map if key.endswith(EMBEDDING_SUFFIXES)]
            if len(embeddings) == 1:
                logger.info("%s: %s has no lm_head weight; using the tied embedding %s.", self.role,
                            self.name_or_path, embeddings[0])
                return embeddings[0]
        return None


class AlignmentSubspace:
    """Alignment deltas `V = W_aligned − W_base` of the LoRA modules, streamed from two checkpoints.

    Args:
        base_model (`str`): the model before safety alignment (local directory or hub id).
        aligned_model (`str`): the safety-aligned model the adapters were trained on.
        revision (`str`, *optional*): hub revision for both.
        allow_pickle (`bool`, defaults to `False`): accept `.bin` checkpoints.
    """

    def __init__(self, base_model: str, aligned_model: str, *, revision: str | None = None,
                 allow_pickle: bool = False):
        if base_model is None or aligned_model is None:
            raise ValueError("AlignmentSubspace needs both `base_model` and `aligned_model` (directories or hub ids).")
        self.base = CheckpointReader(base_model, role="base model", revision=revision, allow_pickle=allow_pickle)
        self.aligned = CheckpointReader(aligned_model, role="aligned model", revision=revision,
                                        allow_pickle=allow_pickle)

    def check_modules(self, shapes: dict[str, tuple[int, int]], fan_in_fan_out: bool = False) -> None:
        """Check, from file headers only, that every module exists in both checkpoints with a matching shape.

        Args:
            shapes: `(out, in)` per module name, as the adapter's factors imply.
            fan_in_fan_out: whether the checkpoints store these weights as `(in, out)` (GPT-2 `Conv1D`).

        Raises:
            ValueError: listing every missing module and every shape mismatch at once.
        """
        problems = []
        for name, shape in shapes.items():
            for reader in (self.base, self.aligned):
                key = reader.find_weight(name)
                if key is None:
                    problems.append(f"{name}: no weight in the {reader.role} ({reader.name_or_path})")
                    continue
                stored = reader.shape(key)
                if len(stored) != 2:
                    problems.append(f"{name}: {reader.role} tensor {key} is {len(stored)}-D, not a 2-D weight")
                elif _oriented(stored, shape, fan_in_fan_out) is None:
                    problems.append(f"{name}: {reader.role} weight {key} has shape {stored}, adapter implies "
                                    f"(out, in) = {shape}")
        if problems:
            listing = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
            raise ValueError(
                "The base/aligned checkpoints do not match the adapter's LoRA modules:\n  " + listing + "\nCheck that "
                "the adapter was trained on the aligned model and that the base model has the same architecture."
            )

    def delta(self, module_name: str, shape: tuple[int, int], fan_in_fan_out: bool = False) -> torch.Tensor:
        """Return `V = W_aligned − W_base` for one module as float32 `(out, in)`."""
        return self.delta_and_norm(module_name, shape, fan_in_fan_out)[0]

    def delta_and_norm(self, module_name: str, shape: tuple[int, int],
                       fan_in_fan_out: bool = False) -> tuple[torch.Tensor, float]:
        """Return `V = W_aligned − W_base` as float32 `(out, in)` together with `‖V‖_F`.

        Scoring does not need `V` itself: `projection` streams it at the cost of reading the two weights.

        Raises:
            ValueError: when the module is missing, shapes disagree, or `V` has NaN/Inf entries.
        """
        self.check_modules({module_name: shape}, fan_in_fan_out)
        delta = self.aligned.tensor(self.aligned.find_weight(module_name), torch.float32)
        with self.base.mapped(self.base.find_weight(module_name)) as base_weight:
            delta.sub_(base_weight)  # in place: no second float32 copy
        if _oriented(tuple(delta.shape), shape, fan_in_fan_out) == "transposed":
            delta = delta.T.contiguous()
        return delta, self._checked_norm(module_name, frobenius_norm(delta))

    def projection(self, module_name: str, shape: tuple[int, int], lora_b: torch.Tensor,
                   fan_in_fan_out: bool = False) -> tuple[torch.Tensor, float]:
        """Return `G = V Vᵀ B` (float32, `(out, r)`) and `‖V‖_F` for one module, without materialising `V`.

        Both weights are read block by block from the memory-mapped files (`scoring.delta_projection`), so the
        cost is about that of reading them once and the memory is one block.

        Raises:
            ValueError: when the module is missing, shapes disagree, or `V` has NaN/Inf entries.
        """
        self.check_modules({module_name: shape}, fan_in_fan_out)
        with self.aligned.mapped(self.aligned.find_weight(module_name)) as aligned_weight, \
                self.base.mapped(self.base.find_weight(module_name)) as base_weight:
            transposed = _oriented(tuple(aligned_weight.shape), shape, fan_in_fan_out) == "transposed"
            projected, norm = delta_projection(aligned_weight, base_weight, lora_b, transposed=transposed)
        return projected, self._checked_norm(module_name, norm)

    @staticmethod
    def _checked_norm(module_name: str, norm: float) -> float:
        # A NaN or Inf entry makes the norm NaN or Inf, so the norm that scoring needs also checks every entry.
        if not math.isfinite(norm):
            raise ValueError(f"The alignment delta of {module_name!r} has NaN or Inf entries; the base or aligned "
                             "checkpoint is corrupt. Re-download or re-save it.")
        return norm

    def deltas(self, shapes: dict[str, tuple[int, int]], fan_in_fan_out: bool = False) -> Iterable[tuple[str, torch.Tensor]]:
        """Yield `(module name, V)` one module at a time."""
        for name, shape in shapes.items():
            yield name, self.delta(name, shape, fan_in_fan_out)


def _oriented(stored: tuple[int, ...], shape: tuple[int, int], fan_in_fan_out: bool) -> str | None:
    """Return how a stored weight maps to `(out, in)`: `"as_is"`, `"transposed"` (`Conv1D`, stored `(in, out)`) or None."""
    if fan_in_fan_out:
        return "transposed" if tuple(stored) == (shape[1], shape[0]) else None
    return "as_is" if tuple(stored) == tuple(shape) else None
