#!/usr/bin/env bash
# Install everything into ./.venv, then run the test suite (CPU only; GPU tests are deselected).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -m "not gpu" -q -p no:cacheprovider "$@"
