"""`safemerge demo`: an offline end-to-end run of SafeMERGE on SmolLM2-135M-Instruct (or any small chat model).

Importing this package is cheap; torch, transformers and TRL load only when the demo runs.
"""

from .cli import add_parser


__all__ = ["add_parser"]
