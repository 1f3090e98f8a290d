"""`safemerge` command line: repair, score, recipes with overriding flags, clear errors with exit code 2, env."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from safemerge_callback import __version__
from safemerge_callback.cli import main
from safemerge_callback.repair import CONFIG_FILE, REPORT_FILE, repair_adapter


OUTPUT_FILES = {"adapter_model.safetensors", "adapter_config.json", REPORT_FILE, CONFIG_FILE}


def run(argv, capsys) -> tuple[int, str, str]:
    """Run `safemerge argv` in-process; argparse errors (SystemExit) are returned as exit codes too."""
    try:
        code = main([str(arg) for arg in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def model_args(llama_pair, safety_adapter):
    return ["--base-model", llama_pair.base, "--aligned-model", llama_pair.aligned, "--safety-adapter", safety_adapter]


def console_script() -> Path:
    script = Path(sys.executable).parent / "safemerge"
    if not script.is_file():
        found = shutil.which("safemerge")
        if found is None:
            pytest.skip("the `safemerge` console script is not installed (pip install -e .)")
        script = Path(found)
    return script


# --- repair and score --------------------------------------------------------------------------------------------


def test_cli_repair_writes_a_stock_loadable_adapter_and_a_report(llama_pair, task_adapter, safety_adapter,
                                                                 middle_threshold, model_args, tmp_path, capsys,
                                                                 peft_model_loader):
    output = tmp_path / "out"
    code, out, err = run(["repair", "--task-adapter", task_adapter, "--output", output, "--threshold",
                          middle_threshold, "--quiet", *model_args], capsys)

    assert code == 0, err
    assert f"Wrote the repaired adapter to {output}" in out
    assert "selected 4 of 8 modules" in out
    assert OUTPUT_FILES <= {path.name for path in output.iterdir()}
    expected = repair_adapter(task_adapter, safety_adapter, threshold=middle_threshold, **llama_pair.kwargs())
    report = json.loads((output / REPORT_FILE).read_text())
    assert report["selected_modules"] == expected.selected_modules
    model = peft_model_loader(llama_pair.aligned, output)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[2, 9, 10, 11]])).logits).all()


def test_cli_score_writes_json_and_plot_and_nothing_else(llama_pair, task_adapter, middle_threshold, model_args,
                                                         tmp_path, capsys, file_hashes):
    inputs = (llama_pair.base, llama_pair.aligned, task_adapter)
    before = file_hashes(*inputs)

    code, out, err = run(["score", "--task-adapter", task_adapter, "--json", tmp_path / "scores.json", "--plot",
                          tmp_path / "scores.png", "--threshold", middle_threshold, "--quiet", *model_args], capsys)

    assert code == 0, err
    assert "selected 4 of 8 modules" in out
    report = json.loads((tmp_path / "scores.json").read_text())
    assert report["dry_run"] is True
    assert len(report["modules"]) == 8
    assert (tmp_path / "scores.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["scores.json", "scores.png"]
    assert file_hashes(*inputs) == before


def test_console_script_repair_and_score(llama_pair, task_adapter, model_args, tmp_path, peft_model_loader):
    script = console_script()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    repair = subprocess.run([str(script), "repair", "--task-adapter", str(task_adapter), "--output",
                             str(tmp_path / "out"), "--threshold", "1.0", "--quiet", *map(str, model_args)],
                            capture_output=True, text=True, env=env, timeout=300)
    score = subprocess.run([str(script), "score", "--task-adapter", str(task_adapter), "--json",
                            str(tmp_path / "scores.json"), "--quiet", *map(str, model_args)],
                           capture_output=True, text=True, env=env, timeout=300)

    assert repair.returncode == 0, repair.stderr
    assert score.returncode == 0, score.stderr
    assert OUTPUT_FILES <= {path.name for path in (tmp_path / "out").iterdir()}
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text())["totals"]["selected"] == 8
    assert json.loads((tmp_path / "scores.json").read_text())["dry_run"] is True
    peft_model_loader(llama_pair.aligned, tmp_path / "out")


# --- recipes -----------------------------------------------------------------------------------------------------


def write_recipe(path: Path, llama_pair, safety_adapter, **fields) -> Path:
    recipe = {"base_model": str(llama_pair.base), "aligned_model": str(llama_pair.aligned),
              "safety_adapter": str(safety_adapter), "threshold": 0.9, "weights": [0.5, 0.5], **fields}
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cli_recipe_is_read(llama_pair, task_adapter, safety_adapter, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", llama_pair, safety_adapter)
    code, _, err = run(["repair", "--task-adapter", task_adapter, "--output", tmp_path / "out", "--config", recipe,
                        "--quiet"], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "out" / CONFIG_FILE).read_text())
    assert config["threshold"] == 0.9
    assert config["weights"] == [0.5, 0.5]
    assert config["safety_adapter"] == str(safety_adapter)


def test_cli_flags_override_the_recipe(llama_pair, task_adapter, safety_adapter, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", llama_pair, safety_adapter, method="ties", density=0.3)
    code, _, err = run(["repair", "--task-adapter", task_adapter, "--output", tmp_path / "out", "--config", recipe,
                        "--threshold", "0.1", "--method", "linear", "--quiet"], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "out" / CONFIG_FILE).read_text())
    assert config["threshold"] == 0.1
    assert config["method"] == "linear"
    assert config["weights"] == [0.5, 0.5]
    assert config["density"] == 0.3
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text())["method"] == "linear"


# --- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,message", [
    (["--threshold", "2"], "`threshold` must be a number in [-1, 1] because ρ is a cosine, got 2.0."),
    (["--weights", "1", "-1"], "`weights` must be non-negative, got [1.0, -1.0]. A negative weight subtracts an "
                               "adapter, which SafeMERGE does not define."),
    (["--method", "magic"], "`method` must be one of ['linear', 'ties', 'dare_linear', 'dare_ties', 'peft_linear', "
                            "'safelora'], got 'magic'."),
    (["--density", "0"], "`density` must be in (0, 1] (the fraction of entries TIES/DARE keep), got 0.0."),
], ids=["threshold", "weights", "method", "density"])
def test_cli_bad_value_prints_a_clear_error_and_exits_2(flags, message, task_adapter, model_args, tmp_path, capsys):
    code, out, err = run(["repair", "--task-adapter", task_adapter, "--output", tmp_path / "out", *flags, "--quiet",
                          *model_args], capsys)
    assert code == 2
    assert err.strip() == f"safemerge repair: error: {message}"
    assert not (tmp_path / "out").exists()


def test_cli_unparsable_value_exits_2(task_adapter, model_args, capsys):
    code, _, err = run(["score", "--task-adapter", task_adapter, "--threshold", "abc", *model_args], capsys)
    assert code == 2
    assert "safemerge score: error: argument --threshold: invalid float value: 'abc'" in err


def test_cli_missing_recipe_exits_2(task_adapter, tmp_path, capsys):
    code, _, err = run(["score", "--task-adapter", task_adapter, "--config", tmp_path / "missing.yaml"], capsys)
    assert code == 2
    assert err.startswith("safemerge score: error: [Errno 2] No such file or directory")
    assert "Traceback" not in err


def test_cli_invalid_yaml_recipe_exits_2(task_adapter, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("threshold: [0.3\n")
    code, _, err = run(["score", "--task-adapter", task_adapter, "--config", recipe], capsys)
    assert code == 2
    assert err.startswith(f"safemerge score: error: Recipe {recipe} is not valid YAML:")


def test_cli_unknown_recipe_field_exits_2(task_adapter, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("thresold: 0.3\n")
    code, _, err = run(["score", "--task-adapter", task_adapter, "--config", recipe], capsys)
    assert code == 2
    assert err.startswith("safemerge score: error: Unknown SafeMergeConfig field(s) ['thresold']; valid fields are")


def test_cli_existing_output_needs_overwrite(task_adapter, model_args, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    code, _, err = run(["repair", "--task-adapter", task_adapter, "--output", output, "--quiet", *model_args], capsys)
    assert code == 2
    assert "already exists; pass overwrite=True (CLI: --overwrite)" in err
    code, _, err = run(["repair", "--task-adapter", task_adapter, "--output", output, "--overwrite", "--quiet",
                        *model_args], capsys)
    assert code == 0, err
    assert OUTPUT_FILES <= {path.name for path in output.iterdir()}


# --- env ---------------------------------------------------------------------------------------------------------


def test_cli_env_prints_versions(capsys):
    import peft
    import transformers

    code, out, _ = run(["env"], capsys)
    versions = dict(line.split(maxsplit=1) for line in out.strip().splitlines())
    assert code == 0
    assert versions["safemerge_callback"] == __version__
    assert versions["torch"] == torch.__version__
    assert versions["transformers"] == transformers.__version__
    assert versions["peft"] == peft.__version__
    assert "python" in versions


def test_tiny_model_writer_feeds_repair(tmp_path, capsys):
    from safemerge_callback import testing
    from safemerge_callback.cli import main as cli_main

    assert testing.main([str(tmp_path / "tiny")]) == 0
    assert "safemerge repair --task-adapter" in capsys.readouterr().out
    code = cli_main(["repair", "--task-adapter", str(tmp_path / "tiny" / "task"), "--safety-adapter",
                     str(tmp_path / "tiny" / "safety"), "--base-model", str(tmp_path / "tiny" / "base"),
                     "--output", str(tmp_path / "tiny" / "repaired"), "--quiet"])
    assert code == 0
    assert (tmp_path / "tiny" / "repaired" / "safemerge_report.json").is_file()
