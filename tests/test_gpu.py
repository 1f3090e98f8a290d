"""The callback under accelerate's own FSDP and DeepSpeed launchers, which need two CUDA devices."""

import json
import sys

import pytest
import torch

from test_distributed import (SCRIPTS, check_final_matches_offline_repair, free_port, launch_env, read_ranks,  # noqa: F401
                              run_launcher, workdir)


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.multiprocess,
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]

RECIPES = SCRIPTS.parents[1] / "recipes" / "accelerate"


# NOTE: these launches have not run on the CPU-only machines the project is developed on; the same callback code
# paths run on CPU in test_distributed.py through raw torch FSDP1/FSDP2 and DeepSpeed with DS_ACCELERATOR=cpu.
@pytest.mark.parametrize("config", ["fsdp", "deepspeed_zero3", "multi_gpu"])
def test_accelerate_launch_on_gpus(workdir, tmp_path, config):
    output = tmp_path / config
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(RECIPES / f"{config}.yaml"),
               "--num_processes", "2", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               str(SCRIPTS / "train_tiny.py"), str(workdir), str(output),
               json.dumps({"training_args": {"use_cpu": False}})]
    run_launcher(command, launch_env(), tmp_path)

    ranks = read_ranks(output)
    assert ranks[0]["digests"] == ranks[1]["digests"]
    expected_policy = "exact" if config == "multi_gpu" else "keep"
    assert {r["rank_policy"] for r in ranks} == {expected_policy}
    check_final_matches_offline_repair(workdir, output, expected_policy)
