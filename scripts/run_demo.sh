#!/usr/bin/env bash
# Install everything into ./.venv, then run the offline demo: SmolLM2-135M-Instruct as the base model,
# safety tuning, a LoRA task fine-tune with SafeMergeCallback, and the comparison table.
# Extra arguments go to `safemerge demo` (for example --quick, --data-dir DIR, --output-dir DIR, --force).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_demo_env.sh
exec .venv/bin/safemerge demo "$@"
