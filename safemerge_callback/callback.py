"""`SafeMergeCallback`: SafeMERGE repair at every checkpoint and at the end of training, on one process or many."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import distributed, live
from .adapters import LoraAdapter, load_adapter
from .config import SafeMergeConfig
from .report import trainer_metrics
from .repair import REPORT_FILE, RepairResult, check_compatible, repair_adapter, score_modules, write_result
from .subspace import AlignmentSubspace


logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "safemerge"


class SafeMergeCallback(TrainerCallback):
    """Repair the LoRA adapter with SafeMERGE (arXiv 2503.17239) at every save and when training ends.

    At each checkpoint it writes `checkpoint-N/safemerge/`, a repaired adapter that stock `PeftModel.from_pretrained`
    loads, with its report. The training weights and the raw checkpoint stay untouched, so training and
    `resume_from_checkpoint` continue from the raw adapter. When training ends it repairs the live adapter in place,
    so a following `trainer.save_model()` / `push_to_hub()` stores the repaired adapter. Scores of every save go
    into `state.log_history` (`safemerge/selected_modules`, `safemerge/min_score`, ...).

    Args:
        config (`SafeMergeConfig`, *optional*): settings; keyword arguments (any `SafeMergeConfig` field) are
            applied on top, e.g. `SafeMergeCallback(base_model="meta-llama/Llama-2-7b-hf", safety_adapter="...")`.
            `aligned_model` defaults to the PEFT model's `base_model_name_or_path`.

    Example:

    ```python
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, peft_config=lora_config,
                         callbacks=[SafeMergeCallback(base_model="meta-llama/Llama-2-7b-hf",
                                                      safety_adapter="path/to/safety-lora")])
    trainer.train()
    trainer.save_model()  # writes the repaired adapter
    ```
    """

    def __init__(self, config: SafeMergeConfig | None = None, **overrides: Any):
        config = config or SafeMergeConfig()
        self.config = dataclasses.replace(config, **overrides) if overrides else config

        # Built in on_train_begin.
        self.subspace: AlignmentSubspace | None = None
        self.safety: LoraAdapter | None = None
        self.backend: str | None = None
        self.results: list[tuple[int, RepairResult]] = []
        self._previous_selected: set[str] | None = None
        self._pending_metrics: dict[str, float] = {}

    @property
    def last_result(self) -> RepairResult | None:
        """The `RepairResult` of the most recent save or train end."""
        return self.results[-1][1] if self.results else None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Validate the whole setup and open the alignment subspace, so a bad setup fails before training starts."""
        if model is None:
            raise ValueError("SafeMergeCallback received no model in on_train_begin; use it with a transformers Trainer.")
        peft_model = live.unwrap_peft_model(model)
        self._drop_reloaded_checkpoint_adapter(peft_model)
        self.backend = distributed.detect_backend(model)

        adapter_name = self.config.adapter_name
        if adapter_name not in peft_model.peft_config:
            raise ValueError(f"SafeMergeConfig.adapter_name={adapter_name!r} is not an adapter of the model "
                             f"(adapters: {sorted(peft_model.peft_config)}).")
        aligned = self.config.aligned_model or peft_model.peft_config[adapter_name].base_model_name_or_path
        if self.config.base_model is None:
            raise ValueError("SafeMergeCallback needs `base_model`: the pre-trained model before safety alignment "
                             f"(for example the base of {aligned!r}), or 'auto' for well-known chat models.")
        if self.config.rank_policy == "exact" and self.backend in distributed.SHARDED_BACKENDS:
            raise ValueError(f"rank_policy='exact' changes parameter shapes, which {self.backend} cannot do in place. "
                             "Use rank_policy='auto' (keep under sharded training, exact elsewhere) or 'keep'.")
        self.config = dataclasses.replace(self.config, aligned_model=aligned)

        from .known_models import resolve_base_model

        self.subspace = AlignmentSubspace(resolve_base_model(self.config.base_model, aligned), aligned,
                                          revision=self.config.revision, allow_pickle=self.config.allow_pickle)
        if self.config.needs_safety_adapter:
            if self.config.safety_adapter is None:
                raise ValueError(f"method {self.config.method!r} needs `safety_adapter`; pass one, or use "
                                 "method='safelora', which needs none.")
            self.safety = load_adapter(self.config.safety_adapter, role="safety adapter",
                                       revision=self.config.revision, allow_pickle=self.config.allow_pickle)
        self._validate_against_model(model)
        logger.info("SafeMERGE ready: backend %s, aligned %s, base %s.", self.backend, aligned, self.config.base_model)

    def on_save(self, args, state, control, model=None, **kwargs):
        """Write `checkpoint-N/safemerge/` after the Trainer wrote `checkpoint-N/` (all ranks take part)."""
        if not self.config.repair_on_save or self.subspace is None:
            return
        # Ranks reach on_save before the writer has finished the checkpoint, so wait for it.
        distributed.barrier()
        policy = "keep" if self.config.rank_policy == "keep" else "exact"
        result = self._repair_live(model, policy)
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        # NOTE: with `push_to_hub` the Trainer starts its asynchronous upload of checkpoint-N before `on_save`, so the
        # upload may or may not contain `safemerge/`; upload that folder yourself where the hub copy must have it.
        if distributed.is_writer(args.save_on_each_node):
            if checkpoint.is_dir():
                result.adapter.directory = checkpoint
                write_result(result, checkpoint / CHECKPOINT_SUBDIR, overwrite=True)
            else:
                logger.warning("Checkpoint directory %s not found; skipped writing its SafeMERGE copy.", checkpoint)
        self._record(state, result)
        distributed.barrier()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        """Repair the live adapter in place and write the report to `output_dir`."""
        if not self.config.repair_on_train_end or self.subspace is None:
            return
        policy = self._train_end_policy()
        result = self._repair_live(model, policy)
        live.write_live_adapter(model, result, self.config.adapter_name, self.backend)
        self._verify_live(model, result)

        if distributed.is_writer(args.save_on_each_node):
            output_dir = Path(args.output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / REPORT_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        self._record(state, result)
        logger.info("SafeMERGE repaired %d of %d modules in place (rank policy %s); save the model to keep them.",
                    len(result.selected_modules), len(result.modules), policy)
        distributed.barrier()

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the metrics of the latest save to the next log event (for reporters that run after this callback)."""
        if self._pending_metrics and logs is not None:
            logs.update(self._pending_metrics)
            self._pending_metrics = {}

    def _train_end_policy(self) -> str:
        if self.config.rank_policy != "auto":
            return self.config.rank_policy
        return "keep" if self.backend in distributed.SHARDED_BACKENDS else "exact"

    @torch.no_grad()
    def _repair_live(self, model, policy: str) -> RepairResult:
        """Gather the live adapter, score its modules shared out across ranks, agree, and merge on every rank."""
        task = live.read_live_adapter(model, self.config.adapter_name, self.backend)
        config = dataclasses.replace(self.config, rank_policy=policy)
        rank, world = distributed.rank_and_world()

        names = list(task.modules)[rank::world]
        mine = score_modules(task, self.subspace, config, names=names, progress=distributed.is_writer())
        scores = [result for part in distributed.all_gather_objects(mine) for result in part]
        return repair_adapter(task, self.safety, config=config, subspace=self.subspace, module_results=scores,
                              progress=False)

    def _verify_live(self, model, result: RepairResult) -> None:
        """Check that every rank has the repaired values (no shard left unwritten, no rank diverged)."""
        after = live.read_live_adapter(model, self.config.adapter_name, self.backend)
        wrong = []
        for name in result.selected_modules:
            expected, actual = result.adapter.modules[name], after.modules[name]
            if not (torch.equal(expected.lora_a.to(actual.lora_a.dtype), actual.lora_a)
                    and torch.equal(expected.lora_b.to(actual.lora_b.dtype), actual.lora_b)):
                wrong.append(name)
        tensors = {f"{n}.lora_A": m.lora_a for n, m in after.modules.items()}
        tensors.update({f"{n}.lora_B": m.lora_b for n, m in after.modules.items()})
        differing = distributed.find_rank_disagreement(tensors)
        if wrong or differing:
            raise RuntimeError(f"SafeMERGE write-back failed verification on backend {self.backend}: modules not "
                               f"holding the repaired values {wrong[:10]}, tensors differing across ranks "
                               f"{differing[:10]}. The live model is inconsistent; do not save it.")

    def _record(self, state, result: RepairResult) -> None:
        metrics = trainer_metrics(result, self._previous_selected)
        newly = sorted(set(result.selected_modules) - (self._previous_selected or set()))
        if newly and self._previous_selected is not None and distributed.is_writer():
            warnings.warn(f"SafeMERGE at step {state.global_step}: {len(newly)} module(s) crossed τ since the last "
                          f"save: {newly[:10]}.", stacklevel=2)
        self._previous_selected = set(result.selected_modules)
        self.results.append((state.global_step, result))
        state.log_history.append({**metrics, "step": state.global_step})
        self._pending_metrics = metrics

    def _validate_against_model(self, model) -> None:
        """Fail fast: read the live adapter once and check modules, shapes and the safety adapter."""
        task = live.read_live_adapter(model, self.config.adapter_name, self.backend)
        self.subspace.check_modules({name: m.shape for name, m in task.modules.items()}, task.fan_in_fan_out)
        if self.safety is None:
            return
        check_compatible(task, self.safety)
        missing = sorted(set(task.modules) - set(self.safety.modules))
        if missing and self.config.missing_safety_module == "error":
            raise ValueError(f"The safety adapter lacks {len(missing)} module(s) of the model's adapter: {missing[:10]}. "
                             "Train it with the same target_modules, or set missing_safety_module='keep_task'.")

    def _drop_reloaded_checkpoint_adapter(self, peft_model) -> None:
        """Delete the `safemerge` adapter that `resume_from_checkpoint` loads from `checkpoint-N/safemerge/`.

        The Trainer loads every adapter subfolder of a checkpoint when resuming. The repaired copy is an output, not
        part of the training state, so training continues from the raw adapter only.
        """
        if CHECKPOINT_SUBDIR in peft_model.peft_config and CHECKPOINT_SUBDIR != self.config.adapter_name:
            peft_model.delete_adapter(CHECKPOINT_SUBDIR)
            logger.info("Removed the '%s' adapter loaded from the resumed checkpoint; training uses the raw adapter.",
                        CHECKPOINT_SUBDIR)
