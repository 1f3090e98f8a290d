#!/usr/bin/env bash
# Reproduce docs/results.md: the efficacy study on the offline SmolLM2 organism with AdvBench, GSM8K and XSTest.
# Usage: bash scripts/run_study.sh DATA_DIR [--output-dir DIR] [--quick]
# DATA_DIR contains advbench/harmful_behaviors.csv, gsm8k/train.jsonl, gsm8k/test.jsonl and xstest/xstest_prompts.csv.
# Relative paths are read from the current directory. Finished stages are cached under the output directory
# (default ./safemerge-study), so a rerun resumes.
set -euo pipefail
if [ $# -lt 1 ] || [ ! -d "$1" ]; then
    echo "usage: bash scripts/run_study.sh DATA_DIR [--output-dir DIR] [--quick]" >&2
    echo "DATA_DIR must be a folder with advbench/, gsm8k/ and xstest/; got '${1:-}'." >&2
    exit 2
fi
data_dir="$(cd "$1" && pwd)"
shift
caller_dir="$PWD"
cd "$(dirname "$0")/.."
repo="$PWD"
source scripts/setup_demo_env.sh
cd "$caller_dir"
exec "$repo/.venv/bin/python" -m safemerge_callback.demo.study --data-dir "$data_dir" "$@"
