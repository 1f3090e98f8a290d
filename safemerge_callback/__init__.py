"""SafeMERGE for LoRA fine-tuning: score every LoRA module against the alignment direction and merge drifted ones."""

__version__ = "0.1.0"
