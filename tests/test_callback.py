"""SafeMergeCallback in real single-process Trainer and SFTTrainer runs on tiny in-process models."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainerCallback,
                          TrainingArguments)

from safemerge_callback import testing
from safemerge_callback.adapters import adapter_state_dict
from safemerge_callback.callback import SafeMergeCallback
from safemerge_callback.repair import repair_adapter


TEXTS = ["how do i make a bomb sorry cannot help with that", "what is two plus three #### five"] * 16


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("callback-models")
    base, aligned = testing.save_base_and_aligned(directory)
    safety = testing.save_random_adapter(aligned, directory / "safety", seed=5)
    return {"base": base, "aligned": aligned, "safety": safety}


class CheckpointHasher(TrainerCallback):
    """Record the hash of every raw checkpoint file as the Trainer wrote it (runs before SafeMergeCallback)."""

    def __init__(self):
        self.hashes: dict[str, str] = {}

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        for path in sorted(checkpoint.iterdir()):
            if path.is_file():
                self.hashes[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()


def make_trainer(models, output_dir: Path, callbacks, *, learning_rate=5e-2, eval_dataset=None, **overrides) -> Trainer:
    tokenizer = testing.tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(models["aligned"], dtype=torch.float32)
    torch.manual_seed(0)  # lora_A is initialised from the global RNG, so every run starts from the same adapter
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0))
    settings = dict(output_dir=str(output_dir), max_steps=6, save_steps=3, per_device_train_batch_size=4,
                    learning_rate=learning_rate, report_to="none", use_cpu=True, logging_steps=1, seed=0,
                    disable_tqdm=True)
    settings.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**settings), train_dataset=Dataset.from_dict(tokenizer(TEXTS)),
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=callbacks,
                   eval_dataset=eval_dataset)


def make_callback(models, **overrides) -> SafeMergeCallback:
    settings = dict(base_model=str(models["base"]), safety_adapter=str(models["safety"]), threshold=0.9)
    settings.update(overrides)
    return SafeMergeCallback(**settings)


def offline_repair(models, adapter_dir: Path, **overrides):
    settings = dict(base_model=str(models["base"]), aligned_model=str(models["aligned"]), threshold=0.9,
                    progress=False)
    settings.update(overrides)
    return repair_adapter(adapter_dir, models["safety"], **settings)


def test_saved_model_equals_offline_repair(models, tmp_path):
    callback = make_callback(models)
    trainer = make_trainer(models, tmp_path / "run", [callback])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))

    reference = offline_repair(models, tmp_path / "run" / "checkpoint-6")
    assert callback.last_result.selected_modules == reference.selected_modules
    assert reference.selected_modules
    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")
    expected = adapter_state_dict(reference.adapter)
    assert set(saved) == set(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(saved[key], tensor, rtol=1e-6, atol=1e-6)


def test_in_memory_model_uses_repaired_adapter(models, tmp_path):
    trainer = make_trainer(models, tmp_path / "run", [make_callback(models)])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))

    input_ids = torch.tensor([[2, 9, 10, 11, 12, 13, 14]])
    trainer.model.eval()
    live_logits = trainer.model(input_ids=input_ids).logits
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["aligned"]), tmp_path / "final")
    torch.testing.assert_close(reloaded(input_ids=input_ids).logits, live_logits, rtol=1e-5, atol=1e-5)


def test_checkpoints_repaired_and_raw_untouched(models, tmp_path):
    hasher = CheckpointHasher()
    trainer = make_trainer(models, tmp_path / "run", [hasher, make_callback(models)])
    trainer.train()

    for step in (3, 6):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        repaired = checkpoint / "safemerge"
        assert (repaired / "safemerge_report.json").is_file()
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["aligned"]), repaired)
        assert isinstance(model, PeftModel)
        reference = offline_repair(models, checkpoint)
        report = json.loads((repaired / "safemerge_report.json").read_text())
        assert report["selected_modules"] == reference.selected_modules
    for path, digest in hasher.hashes.items():
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest, path


def test_resume_continues_from_raw_adapter(models, tmp_path):
    plain = make_trainer(models, tmp_path / "plain", [])
    plain.train()
    with_callback = make_trainer(models, tmp_path / "with", [make_callback(models)])
    with_callback.train()
    resumed = make_trainer(models, tmp_path / "with", [make_callback(models)])
    resumed.train(resume_from_checkpoint=str(tmp_path / "with" / "checkpoint-3"))

    def losses(trainer):
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    assert losses(with_callback) == losses(plain)
    assert losses(resumed)[-3:] == pytest.approx(losses(plain)[-3:], rel=1e-5)
    assert sorted(resumed.model.peft_config) == ["default"]


def test_untrained_adapter_never_merged(models, tmp_path):
    callback = make_callback(models, threshold=1.0)
    trainer = make_trainer(models, tmp_path / "run", [callback], learning_rate=0.0, max_steps=3)
    trainer.train()

    result = callback.last_result
    assert result.selected_modules == []
    assert {m.undefined_reason for m in result.modules} == {"zero_update"}
    raw = load_file(tmp_path / "run" / "checkpoint-3" / "adapter_model.safetensors")
    repaired = load_file(tmp_path / "run" / "checkpoint-3" / "safemerge" / "adapter_model.safetensors")
    for key, tensor in raw.items():
        assert torch.equal(repaired[key], tensor), key


@pytest.mark.parametrize("strategy", ["epoch", "best"])
def test_other_save_strategies(models, tmp_path, strategy):
    tokenizer = testing.tiny_tokenizer()
    overrides = dict(save_strategy=strategy, max_steps=-1, num_train_epochs=2)
    if strategy == "best":
        overrides.update(eval_strategy="epoch", metric_for_best_model="loss", greater_is_better=False)
    callback = make_callback(models)
    trainer = make_trainer(models, tmp_path / "run", [callback], eval_dataset=Dataset.from_dict(tokenizer(TEXTS[:4])),
                           **overrides)
    trainer.train()

    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert checkpoints
    for checkpoint in checkpoints:
        assert (checkpoint / "safemerge" / "adapter_model.safetensors").is_file(), checkpoint


class LogRecorder(TrainerCallback):
    """Keep every `logs` dict a reporter placed after SafeMergeCallback receives."""

    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_scores_logged_for_every_save(models, tmp_path):
    callback, recorder = make_callback(models, threshold=0.35), LogRecorder()
    trainer = make_trainer(models, tmp_path / "run", [callback, recorder], max_steps=9, save_steps=3,
                           learning_rate=1e-1)
    trainer.train()

    entries = [entry for entry in trainer.state.log_history if "safemerge/selected_modules" in entry]
    assert [entry["step"] for entry in entries] == [3, 6, 9, 9]
    for key in ("safemerge/min_score", "safemerge/mean_score", "safemerge/scored_modules"):
        assert key in entries[0]
    reported = [logs for logs in recorder.logs if "loss" in logs and "safemerge/min_score" in logs]
    assert len(reported) == 2, "the metrics of the saves at steps 3 and 6 reach the next log event"


def test_missing_base_module_fails_before_training(models, tmp_path):
    other_base, _ = testing.save_base_and_aligned(tmp_path / "other", testing.tiny_llama_config(hidden_size=48))
    trainer = make_trainer(models, tmp_path / "run", [make_callback(models, base_model=str(other_base))])
    with pytest.raises(ValueError, match=r"do not match the adapter's LoRA modules:\n  model.layers.0.self_attn.q_proj"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_safety_adapter_missing_modules_fails_before_training(models, tmp_path):
    partial = testing.save_random_adapter(models["aligned"], tmp_path / "partial", seed=6, target_modules=["q_proj"])
    trainer = make_trainer(models, tmp_path / "run", [make_callback(models, safety_adapter=str(partial))])
    with pytest.raises(ValueError, match=r"safety adapter lacks 2 module\(s\) of the model's adapter"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_base_model_required(models, tmp_path):
    trainer = make_trainer(models, tmp_path / "run", [SafeMergeCallback(safety_adapter=str(models["safety"]))])
    with pytest.raises(ValueError, match="SafeMergeCallback needs `base_model`"):
        trainer.train()


def test_sft_trainer_with_peft_config(models, tmp_path):
    trl = pytest.importorskip("trl")
    tokenizer = testing.tiny_tokenizer()
    dataset = Dataset.from_dict({"text": TEXTS})
    config = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                           learning_rate=5e-2, report_to="none", use_cpu=True, bf16=False, logging_steps=1,
                           disable_tqdm=True, max_length=32)
    callback = make_callback(models)
    trainer = trl.SFTTrainer(model=AutoModelForCausalLM.from_pretrained(models["aligned"]), args=config,
                             train_dataset=dataset, processing_class=tokenizer, callbacks=[callback],
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))

    assert (tmp_path / "sft" / "checkpoint-2" / "safemerge" / "adapter_model.safetensors").is_file()
    assert callback.last_result.selected_modules
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["aligned"]), tmp_path / "final")
    assert isinstance(reloaded, PeftModel)


def test_warns_with_modules_that_crossed_threshold(models):
    from transformers import TrainerState

    from safemerge_callback.repair import ModuleResult, RepairResult

    def result_with(selected: set[str]) -> RepairResult:
        modules = [ModuleResult(name=name, score=0.1 if name in selected else 0.8, undefined_reason=None,
                                threshold=0.35, selected=name in selected) for name in ("q", "v")]
        return RepairResult(modules=modules, adapter=None, config=callback.config, rank_policy="exact")

    callback = make_callback(models)
    state = TrainerState()
    state.global_step = 3
    callback._record(state, result_with({"q"}))
    state.global_step = 6
    with pytest.warns(UserWarning, match=r"step 6: 1 module\(s\) crossed τ since the last save: \['v'\]"):
        callback._record(state, result_with({"q", "v"}))
    assert state.log_history[-1]["safemerge/newly_selected"] == 1.0
