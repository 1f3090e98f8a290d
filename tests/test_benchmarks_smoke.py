"""Smoke tests of the benchmark scripts: the quick modes run end to end and our scores match the dense baseline.

Timings are printed by the script but never asserted, because they depend on the machine and its load.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def quick_output(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench") / "quick.json"
    completed = subprocess.run([sys.executable, str(BENCHMARKS / "bench_repair.py"), "--quick", "--json", str(output)],
                               capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return json.loads(output.read_text())


def test_quick_runs_every_method(quick_output):
    methods = quick_output["summary"]["methods"]
    assert set(methods) == {"floor", "floor-reused", "ours-score", "ours-repair", "dense"}
    for stats in methods.values():
        assert len(stats["seconds"]) == 1
        assert stats["peak_rss_gib"] > 0


def test_quick_scores_match_dense(quick_output):
    agreement = quick_output["summary"]["score_agreement"]
    for method in ("ours-score", "ours-repair"):
        assert agreement[method]["against"] == "dense"
        assert agreement[method]["compared"] == agreement[method]["modules"] == 4
        assert agreement[method]["max_abs_diff"] < 1e-4


def test_quick_repair_selects_some(quick_output):
    # The generated task adapter spreads its scores over [0, 1], so the default τ = 0.35 selects some modules.
    selected = quick_output["runs"]["ours-repair"][0]["selected"]
    assert 1 <= selected < 4


def test_checkpoint_layout(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import make_checkpoints
    finally:
        sys.path.remove(str(BENCHMARKS))
    output = make_checkpoints.generate(tmp_path / "data", "small", layers=1, ranks=(8,), targets=("qv",))
    index = json.loads((output / "base" / "model.safetensors.index.json").read_text())
    assert "model.layers.0.self_attn.q_proj.weight" in index["weight_map"]
    assert all(name.startswith("model-0000") for name in index["weight_map"].values())
    config = json.loads((output / "adapters" / "task-r8-qv" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == 8
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.slow
def test_callback_overhead_quick(tmp_path):
    output = tmp_path / "callback.json"
    completed = subprocess.run([sys.executable, str(BENCHMARKS / "bench_callback_overhead.py"), "--quick",
                                "--json", str(output)], capture_output=True, text=True, timeout=600,
                               check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    summary = json.loads(output.read_text())["summary"]
    assert summary["checkpoints"] == 2
    assert summary["on_save_per_checkpoint_s"] > 0
    assert summary["plain_save_per_checkpoint_s"] > 0


def test_profile_projection_small_shape():
    completed = subprocess.run([sys.executable, str(BENCHMARKS / "profile_projection.py"), "--shape", "64", "96",
                                "--rank", "4", "--repeats", "1"], capture_output=True, text=True, timeout=120,
                               check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[0].startswith("shape (64, 96), r = 4, blocks of 96 columns")
    assert len(lines) == 9
    assert lines[2].startswith("delta_projection, whole call")
