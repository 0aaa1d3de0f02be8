"""`accelerate launch` with accelerate config files, as their users write them, on the CPU.

Every file in launch/accelerate/, and two files shaped exactly as `accelerate config` writes
them (tests/integration/accelerate_configs/), runs as written with the default `strategy=auto`
in real processes (2, or 1 for single_gpu.yaml; multi_node.yaml as two machines of one process
each on this host): the strategy the run reports is the one the file asks for. A `strategy=`
that contradicts the file, and a setting that disagrees with the Hydra config, are refused with
both named."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from pretrain import checkpoint
from tests.conftest import REPO, test_env

ACCELERATE_DIR = REPO / "launch" / "accelerate"
USER_DIR = Path(__file__).with_name("accelerate_configs")
ACCELERATE = str(Path(sys.executable).parent / "accelerate")

# file -> (distributed_type, the strategy it means, processes to run it with)
CONFIGS = {
    ACCELERATE_DIR / "single_gpu.yaml": (DistributedType.NO, "single", 1),
    ACCELERATE_DIR / "multi_gpu.yaml": (DistributedType.MULTI_GPU, "ddp", 2),
    ACCELERATE_DIR / "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, "zero2", 2),
    ACCELERATE_DIR / "deepspeed_zero3.yaml": (DistributedType.DEEPSPEED, "zero3", 2),
    ACCELERATE_DIR / "fsdp.yaml": (DistributedType.FSDP, "fsdp", 2),
    USER_DIR / "deepspeed_zero3_accelerate_config.yaml": (DistributedType.DEEPSPEED, "zero3", 2),
    USER_DIR / "fsdp_accelerate_config.yaml": (DistributedType.FSDP, "fsdp_grad_op", 2),
}


def train_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["-m", "pretrain.train", "experiment=debug", f"data.dir={data}", f"run.dir={run_dir}",
            "train.max_steps=4", "checkpoint.every=4", *extra]  # fmt: skip


def launch(config: Path, nproc: int, *args: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:  # fmt: skip
    # --main_process_port 0: accelerate takes a free port itself when it starts the processes.
    cmd = [ACCELERATE, "launch", "--config_file", str(config), "--num_processes", str(nproc),
           "--main_process_port", "0", *extra, *args]  # fmt: skip
    return subprocess.run(
        cmd, cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=400
    )


def final_state(run_dir: Path) -> dict:
    ckpt = checkpoint.find_resume(run_dir / "checkpoints", "auto")
    assert ckpt is not None, f"no checkpoint in {run_dir}"
    return json.loads((ckpt / "train_state.json").read_text())


def test_every_file_is_a_real_config_of_its_kind() -> None:
    shipped = {p for p in CONFIGS if p.parent == ACCELERATE_DIR} | {
        ACCELERATE_DIR / "multi_node.yaml"
    }
    assert set(ACCELERATE_DIR.glob("*.yaml")) == shipped
    readme = (REPO / "launch" / "README.md").read_text()
    for path, (kind, _, _) in CONFIGS.items():
        cfg = load_config_from_file(str(path))
        assert cfg.distributed_type == kind, path.name
        assert bool(cfg.deepspeed_config) == (kind == DistributedType.DEEPSPEED), path.name
        assert bool(cfg.fsdp_config) == (kind == DistributedType.FSDP), path.name
        if path.parent == ACCELERATE_DIR:
            assert f"launch/accelerate/{path.name}" in readme, path.name
    multi = load_config_from_file(str(ACCELERATE_DIR / "multi_node.yaml"))
    assert multi.distributed_type == DistributedType.MULTI_GPU and multi.num_machines >= 2


@pytest.mark.timeout(450)
@pytest.mark.parametrize("config", list(CONFIGS), ids=lambda p: p.name)
def test_the_config_picks_the_strategy(config: Path, tiny_data: Path, tmp_path: Path) -> None:
    _, strategy, nproc = CONFIGS[config]
    run = tmp_path / "run"
    proc = launch(config, nproc, *train_args(tiny_data, run))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # The banner names the strategy and why: the file, not a default.
    assert f"strategy {strategy} x{nproc} (auto: " in proc.stdout, out[-3000:]
    if nproc > 1:
        assert "accelerate config" in proc.stdout, proc.stdout[-3000:]
    state = final_state(run)
    assert (state["strategy"], state["world_size"], state["step"]) == (strategy, nproc, 4)


@pytest.mark.timeout(450)
def test_multi_node_config_runs_as_two_machines(tiny_data: Path, tmp_path: Path) -> None:
    """multi_node.yaml as written (num_machines 2), each "machine" a process on this host."""
    with socket.socket() as s:  # a port both machines are told (as on a real cluster)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    procs = [
        subprocess.Popen(
            [
                ACCELERATE,
                "launch",
                "--config_file",
                str(ACCELERATE_DIR / "multi_node.yaml"),
                "--num_processes",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                str(port),
                *train_args(tiny_data, run),
            ],
            cwd=REPO,
            env=test_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "strategy ddp x2 (auto: accelerate config: MULTI_GPU)" in outs[0], outs[0][-3000:]
    assert final_state(run)["world_size"] == 2


@pytest.mark.timeout(300)
def test_an_explicit_strategy_must_agree_with_the_config(tiny_data: Path, tmp_path: Path) -> None:
    config = ACCELERATE_DIR / "deepspeed_zero3.yaml"
    proc = launch(config, 2, *train_args(tiny_data, tmp_path / "a", "strategy=ddp"))
    assert proc.returncode != 0
    # Once (every rank refuses; one reports), before accelerate's own report of the exit.
    said = "error: strategy=ddp contradicts the accelerate config: DEEPSPEED zero_stage 3"
    assert proc.stderr.count(said) == 1 and "strategy=zero3" in proc.stderr, proc.stderr[-3000:]
    ok = launch(
        ACCELERATE_DIR / "fsdp.yaml", 2, *train_args(tiny_data, tmp_path / "b", "strategy=fsdp")
    )
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-3000:]
    assert "strategy fsdp x2 (strategy=fsdp, as the accelerate config" in ok.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "config, override, named",
    [
        ("deepspeed_zero2.yaml", "optim.grad_clip=0.5", ("gradient_clipping=1.0", "optim.grad_clip=0.5")),
        ("fsdp.yaml", "train.activation_checkpointing=true",
         ("fsdp_activation_checkpointing=false", "train.activation_checkpointing=True")),
    ],
)  # fmt: skip
def test_a_setting_that_disagrees_stops_the_run(
    config: str, override: str, named: tuple[str, str], tiny_data: Path, tmp_path: Path
) -> None:
    proc = launch(ACCELERATE_DIR / config, 2, *train_args(tiny_data, tmp_path / "run", override))
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1, proc.stderr[-3000:]
    for what in named:
        assert what in ours[0], ours
