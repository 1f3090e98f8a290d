"""Two-process runs of the callback on CPU/gloo: DDP, DeepSpeed ZeRO-3 and raw FSDP1/FSDP2 read/write."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safemerge_callback import testing
from safemerge_callback.adapters import adapter_state_dict
from safemerge_callback.repair import repair_adapter


pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

SCRIPTS = Path(__file__).parent / "distributed"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", CI="1",
               OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def run_launcher(command: list[str], env: dict[str, str], cwd: Path, timeout: int = 600) -> None:
    completed = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]


def torchrun(script: Path, *args: str) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), str(script), *args]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("distributed")
    _, aligned = testing.save_base_and_aligned(directory)
    testing.save_random_adapter(aligned, directory / "safety", seed=5)
    return directory


def read_ranks(output: Path, pattern: str = "rank-{}.json") -> list[dict]:
    return [json.loads((output / pattern.format(rank)).read_text()) for rank in (0, 1)]


def check_final_matches_offline_repair(workdir: Path, output: Path, policy: str) -> None:
    """The saved final adapter equals repair_adapter applied to the raw last checkpoint."""
    reference = repair_adapter(output / "checkpoint-4", workdir / "safety", base_model=str(workdir / "base"),
                               aligned_model=str(workdir / "aligned"), threshold=0.9, rank_policy=policy,
                               progress=False)
    saved = load_file(output / "final" / "adapter_model.safetensors")
    expected = adapter_state_dict(reference.adapter)
    assert set(saved) == set(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(saved[key].float(), tensor.float(), rtol=1e-6, atol=1e-6)


def test_ddp_ranks_agree_and_match_offline_repair(workdir, tmp_path):
    output = tmp_path / "ddp"
    run_launcher(torchrun(SCRIPTS / "train_tiny.py", str(workdir), str(output)),
                 launch_env(ACCELERATE_USE_CPU="true"), tmp_path)

    ranks = read_ranks(output)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert {r["distributed_type"] for r in ranks} == {"DistributedType.MULTI_CPU"}
    assert {r["backend"] for r in ranks} == {"ddp"}
    assert {r["rank_policy"] for r in ranks} == {"exact"}
    assert ranks[0]["digests"] == ranks[1]["digests"]
    assert ranks[0]["selected"] == ranks[1]["selected"]
    assert len(ranks[0]["log_history"]) == 3  # saves at steps 2 and 4, then train end
    for step in (2, 4):
        assert (output / f"checkpoint-{step}" / "safemerge" / "adapter_model.safetensors").is_file()
    check_final_matches_offline_repair(workdir, output, "exact")


def deepspeed_launch(config: str, workdir: Path, output: Path) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--use_deepspeed", "--deepspeed_config_file", str(SCRIPTS / config),
            "--num_processes", "2", "--num_machines", "1", "--main_process_ip", "127.0.0.1", "--main_process_port",
            str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPTS / "train_tiny.py"),
            str(workdir), str(output), json.dumps({"training_args": {"use_cpu": False}})]


def test_zero2_widens_like_ddp(workdir, tmp_path):
    pytest.importorskip("deepspeed")
    output = tmp_path / "zero2"
    run_launcher(deepspeed_launch("zero2.json", workdir, output), launch_env(DS_ACCELERATOR="cpu"), tmp_path)

    ranks = read_ranks(output)
    assert {r["distributed_type"] for r in ranks} == {"DistributedType.DEEPSPEED"}
    assert {r["backend"] for r in ranks} == {"ddp"}  # ZeRO-2 keeps whole parameters on every rank
    assert {r["rank_policy"] for r in ranks} == {"exact"}
    assert ranks[0]["digests"] == ranks[1]["digests"]
    check_final_matches_offline_repair(workdir, output, "exact")


def test_zero3_gathers_and_keeps_rank(workdir, tmp_path):
    pytest.importorskip("deepspeed")
    output = tmp_path / "zero3"
    run_launcher(deepspeed_launch("zero3.json", workdir, output), launch_env(DS_ACCELERATOR="cpu"), tmp_path)

    ranks = read_ranks(output)
    assert {r["backend"] for r in ranks} == {"deepspeed"}
    assert {r["rank_policy"] for r in ranks} == {"keep"}
    assert ranks[0]["digests"] == ranks[1]["digests"]
    for path in [output / "final", *(output / f"checkpoint-{s}" / "safemerge" for s in (2, 4))]:
        tensors = load_file(path / "adapter_model.safetensors")
        assert tensors, path
        assert min(t.numel() for t in tensors.values()) > 0, path
    check_final_matches_offline_repair(workdir, output, "keep")


@pytest.mark.parametrize("version", [1, 2])
def test_fsdp_every_shard_written(workdir, tmp_path, version):
    run_launcher(torchrun(SCRIPTS / "fsdp_roundtrip.py", str(workdir), str(version)), launch_env(), tmp_path)

    ranks = read_ranks(workdir, f"fsdp{version}-rank-{{}}.json")
    for record in ranks:
        assert record["backend"] == f"fsdp{version}"
        assert record["rank_policy"] == "keep"
        assert record["read_ok"], record
        assert record["write_ok"], record
        assert record["loss_finite"], record
    assert ranks[0]["selected"] == ranks[1]["selected"]
    assert ranks[0]["selected"]


def test_rank_disagreement_is_reported(workdir, tmp_path):
    run_launcher(torchrun(SCRIPTS / "disagreement.py", str(workdir)), launch_env(), tmp_path)

    for record in read_ranks(workdir, "disagreement-rank-{}.json"):
        assert record["differing"] == ["model.layers.1.self_attn.v_proj.lora_B"]
