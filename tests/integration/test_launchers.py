"""The launchers as launch/README.md tells users to run them, on the CPU: the Accelerate config
files (two real processes through `accelerate launch`) and launch/local.sh (one process, with
--auto-resume after a preemption). The Slurm script has its own tier: tests/slurm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from pretrain import checkpoint
from pretrain.metrics import read_metrics
from tests.conftest import REPO, test_env
from tests.data_fixtures import tiny_data  # noqa: F401

ACCELERATE_DIR = REPO / "launch" / "accelerate"
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
LOCAL_SH = REPO / "launch" / "local.sh"
CONFIGS = (
    "single_gpu.yaml",
    "multi_gpu.yaml",
    "deepspeed_zero2.yaml",
    "deepspeed_zero3.yaml",
    "fsdp.yaml",
    "multi_node.yaml",
)


def train_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "pretrain.train",
        "experiment=debug",
        f"data.dir={data}",
        f"run.dir={run_dir}",
        "logging.wandb=false",
        *extra,
    ]


def finished(proc: subprocess.CompletedProcess[str] | subprocess.Popen[bytes], out: str) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-8000:]}"


def final_state(run_dir: Path) -> dict:
    ckpt = checkpoint.find_resume(run_dir / "checkpoints", "auto")
    assert ckpt is not None, f"no checkpoint in {run_dir}"
    return json.loads((ckpt / "train_state.json").read_text())


def test_accelerate_configs_only_start_processes() -> None:
    """Every config loads in Accelerate and leaves strategy and precision to Hydra."""
    assert sorted(p.name for p in ACCELERATE_DIR.glob("*.yaml")) == sorted(CONFIGS)
    readme = (REPO / "launch" / "README.md").read_text()
    for name in CONFIGS:
        cfg = load_config_from_file(str(ACCELERATE_DIR / name))
        assert cfg.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU), name
        # A second precision or DeepSpeed/FSDP description would fight the Hydra config.
        assert cfg.mixed_precision == "no", name
        assert not cfg.deepspeed_config and not cfg.fsdp_config, name
        assert f"launch/accelerate/{name}" in readme, f"launch/README.md does not show {name}"
    multi = load_config_from_file(str(ACCELERATE_DIR / "multi_node.yaml"))
    assert multi.num_machines >= 2 and multi.main_process_ip and multi.main_process_port


@pytest.mark.timeout(240)
def test_accelerate_single_gpu_config_runs_one_process(
    tiny_data: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """single_gpu.yaml (distributed_type NO): one process, on the CPU when there is no GPU."""
    run_dir = tmp_path / "run"
    cmd = [
        ACCELERATE,
        "launch",
        "--config_file",
        str(ACCELERATE_DIR / "single_gpu.yaml"),
        *train_args(tiny_data, run_dir, "train.max_steps=2"),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=200
    )
    finished(proc, proc.stdout + proc.stderr)
    state = final_state(run_dir)
    assert state["world_size"] == 1 and state["step"] == 2, state


@pytest.mark.timeout(240)
def test_accelerate_multi_gpu_config_runs_two_processes_on_cpu(
    tiny_data: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """`accelerate launch --config_file multi_gpu.yaml` on a machine without GPUs starts two
    gloo processes (unlike `--cpu`, which starts one): a world size 2 DDP run."""
    run_dir = tmp_path / "run"
    cmd = [
        ACCELERATE,
        "launch",
        "--config_file",
        str(ACCELERATE_DIR / "multi_gpu.yaml"),
        "--num_processes",
        "2",
        # 0: accelerate takes a free port itself, when it starts the processes.
        "--main_process_port",
        "0",
        *train_args(tiny_data, run_dir, "strategy=ddp", "train.max_steps=4"),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=200
    )
    finished(proc, proc.stdout + proc.stderr)
    state = final_state(run_dir)
    assert state["world_size"] == 2 and state["step"] == 4, state
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.timeout(240)
def test_local_sh_cpu_auto_resume(tiny_data: Path, tmp_path: Path) -> None:  # noqa: F811
    """launch/local.sh on the CPU: one process; SIGUSR1 to the script makes the trainer save and
    exit 75, --auto-resume starts it again from that checkpoint, and the run completes."""
    run_dir = tmp_path / "run"
    steps = 60
    args = train_args(tiny_data, run_dir, f"train.max_steps={steps}", "logging.every=1")[2:]
    cmd = [
        str(LOCAL_SH),
        "--auto-resume",
        *args,
        "checkpoint.every=100000",
        "checkpoint.resume=none",
    ]
    # No GPU visible, whatever the machine: the CPU path is the one under test.
    env = test_env(CUDA_VISIBLE_DEVICES="")
    out_file = tmp_path / "local.log"
    with open(out_file, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 150
            while not (run_dir / "metrics.jsonl").exists() or not read_metrics(run_dir):
                assert proc.poll() is None, out_file.read_text()[-6000:]
                assert time.monotonic() < deadline, out_file.read_text()[-6000:]
                time.sleep(0.1)
            os.kill(proc.pid, signal.SIGUSR1)
            proc.wait(timeout=200)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = out_file.read_text()
    finished(proc, text)
    assert "local.sh: 1 process(es) on CPU" in text
    assert "training was preempted (exit 75)" in text, text[-6000:]
    saved = [p.name for p in checkpoint.list_checkpoints(run_dir / "checkpoints")]
    assert len(saved) == 2 and saved[-1] == checkpoint.step_dir_name(steps), saved
    stopped_at = int(saved[0].split("_")[1])
    assert 1 <= stopped_at < steps
    # The second start continued from the checkpoint despite checkpoint.resume=none at first.
    assert f"(step {stopped_at})" in text and "resumed from" in text, text[-6000:]
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, steps + 1))
    assert final_state(run_dir)["world_size"] == 1
