#!/usr/bin/env bash
# Create ./.venv and install the project with its test and demo extras.
# torch goes first and pinned, so no other requirement pulls a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${SAFEMERGE_TORCH_SPEC:-torch==2.13.0}"

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# A finished install records the hash of what it installed from, so reruns (offline ones too) skip pip.
stamp=.venv/.safemerge-installed
wanted="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e ".[test]"

# deepspeed ships as an sdist only; building without its CUDA ops keeps the installed torch (for the ZeRO-3 test).
if ! .venv/bin/python -c "import deepspeed" >/dev/null 2>&1; then
    DS_BUILD_OPS=0 .venv/bin/python -m pip install --quiet --no-build-isolation "deepspeed>=0.15" \
        || echo "deepspeed could not be installed; the ZeRO-3 test will be skipped." >&2
fi
echo "$wanted" > "$stamp"
