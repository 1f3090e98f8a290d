"""Settings of a demo run: data sizes, training doses, SafeMERGE settings and evaluation lengths."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .data import DataSizes


@dataclass(frozen=True)
class DemoSettings:
    """Every number a demo run depends on (all of them enter the stage hashes).

    Args:
        seed (`int`): seed of the data generator, the Trainer and the LoRA initialisation.
        sizes (`DataSizes`): examples per split.
        max_length (`int`): longest training sequence in tokens (longer pairs are cut).
        align_steps / align_batch / align_lr: full fine-tune of the transformer blocks and final norm (the tied
            embeddings stay frozen) on harmful → refusal and benign → base-model answer pairs.
        benign_answer_tokens (`int`): length of the base model's own answers to the benign alignment prompts.
        safety_steps / safety_batch / safety_lr: LoRA safety adapter on the aligned model.
        safety_benign_fraction (`float`): benign pairs added to the safety data, as a fraction of its harmful pairs,
            so the safety adapter does not learn to refuse everything.
        task_steps / task_batch / task_lr: LoRA task fine-tune on arithmetic (the dose that erodes refusals).
        save_steps (`int`): checkpoint interval of the task run; SafeMERGE repairs each checkpoint.
        lora_rank / lora_alpha: LoRA size of both adapters (`q_proj` and `v_proj`).
        threshold (`float`): τ in [-1, 1]; modules with ρ < τ are merged. The demo uses 0.5 (the library
            default is 0.35) because the small model's scores sit near 0.35, so τ = 0.35 leaves half the drifted
            modules untouched.
        weights (`tuple[float, float]`): `(w_task, w_safety)` of the SafeMERGE merge; the demo uses (0.5, 0.5).
        refusal_tokens / task_tokens: new tokens generated per harmful/benign prompt and per task problem.
        eval_batch (`int`): prompts per `generate` call.
    """

    seed: int = 0
    sizes: DataSizes = field(default_factory=DataSizes)
    max_length: int = 160
    align_steps: int = 84
    align_batch: int = 4
    align_lr: float = 5e-5
    benign_answer_tokens: int = 64
    safety_steps: int = 30
    safety_batch: int = 4
    safety_lr: float = 3e-4
    safety_benign_fraction: float = 0.25
    task_steps: int = 100
    task_batch: int = 4
    task_lr: float = 6e-4
    save_steps: int = 50
    lora_rank: int = 8
    lora_alpha: int = 16
    threshold: float = 0.5
    weights: tuple[float, float] = (0.5, 0.5)
    refusal_tokens: int = 24
    task_tokens: int = 56
    eval_batch: int = 16

    def __post_init__(self) -> None:
        for name in ("max_length", "align_steps", "align_batch", "safety_steps", "safety_batch", "task_steps",
                     "task_batch", "save_steps", "lora_rank", "refusal_tokens", "task_tokens", "eval_batch",
                     "benign_answer_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DemoSettings.{name} must be an integer >= 1, got {value!r}.")
        for name in ("align_lr", "safety_lr", "task_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DemoSettings.{name} must be > 0, got {getattr(self, name)!r}.")
        if not 0.0 <= self.safety_benign_fraction <= 1.0:
            raise ValueError("DemoSettings.safety_benign_fraction must be in [0, 1], got "
                             f"{self.safety_benign_fraction!r}.")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["weights"] = list(self.weights)
        return data

    def replace(self, **changes) -> "DemoSettings":
        return dataclasses.replace(self, **changes)


def quick_settings(seed: int = 0) -> DemoSettings:
    """Return the settings of `--quick`: a smoke run of every stage in a few minutes, too short to show effects."""
    sizes = DataSizes(align_harmful=40, align_benign=32, safety=40, task_train=160, task_eval=6, eval_harmful=16,
                      eval_benign=8)
    return DemoSettings(seed=seed, sizes=sizes, max_length=128, align_steps=16, benign_answer_tokens=40,
                        safety_steps=10, task_steps=16, save_steps=8, refusal_tokens=20, task_tokens=48)
