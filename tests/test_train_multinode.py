"""Two nodes simulated on one machine: two DeepSpeed per-node launches (node ranks 0 and 1, one process each,
rendezvous on 127.0.0.1, each "node" with its own output directories) run scripts/train.py on the tiny default
model. The shared-memory all-reduce must switch itself off (gloo carries the gradients), only global rank 0
writes checkpoints, reports and the model, and the losses equal a one-node run with the same global batch."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepseek_sft.base_model import build_tiny, save_base
from deepseek_sft.config import load_section
from deepseek_sft.io import write_jsonl
from test_train import DEEPSPEED, REPO, _free_port, make_records, write_params

TRAIN = {
    "num_processes": 1,  # per node
    "threads_per_process": 1,
    "max_steps": 4,
    "save_steps": 2,
    "logging_steps": 1,
    "eval_base": False,
    "per_device_train_batch_size": 8,  # x 2 processes = a global batch of 16 in both layouts
    "deepspeed": str(REPO / "configs/deepspeed/zero0.json"),
}


@pytest.fixture(scope="module")
def tiny_default(tmp_path_factory) -> dict[str, Path]:
    """The embedded default model (params base_model.tiny) built on tiny records, and the records."""
    root = tmp_path_factory.mktemp("multinode")
    train, val = make_records(48, seed=1), make_records(8, seed=2)
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "val.jsonl", val)
    stage = load_section("base_model", REPO / "params.yaml")
    model, tokenizer = build_tiny(stage.section.tiny, train, stage.tasks, stage.seed)
    save_base(model, tokenizer, root / "base")
    return {"base": root / "base", "train": root / "train.jsonl", "val": root / "val.jsonl"}


def script_args(data: dict[str, Path], out: Path) -> list[str]:
    return [
        "scripts/train.py",
        "--base",
        str(data["base"]),
        "--train",
        str(data["train"]),
        "--val",
        str(data["val"]),
        "--out",
        str(out / "sft"),
        "--checkpoints",
        str(out / "checkpoints"),
        "--reports",
        str(out / "reports"),
    ]


def run(cmd: list[str], params: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "DSFT_PARAMS": str(params), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def finished(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]


def losses(out: Path) -> list[float]:
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


@pytest.mark.slow
def test_two_simulated_nodes_train_like_one_node_with_the_same_global_batch(tmp_path, tiny_default):
    one = tmp_path / "one_node"
    (tmp_path / "p1").mkdir()
    params_one = write_params(tmp_path / "p1", **TRAIN | {"num_processes": 2})
    cmd = [
        str(DEEPSPEED),
        "--num_gpus",
        "2",
        "--master_port",
        str(_free_port()),
        *script_args(tiny_default, one),
    ]
    proc = run(cmd, params_one, tmp_path / "one.log")
    finished(proc, tmp_path / "one.log")

    (tmp_path / "p2").mkdir()
    params_two = write_params(tmp_path / "p2", **TRAIN)
    world = base64.urlsafe_b64encode(json.dumps({"node0": [0], "node1": [0]}).encode()).decode()
    port = str(_free_port())
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    procs = []
    for rank, node in enumerate(nodes):
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.launch",
            f"--world_info={world}",
            f"--node_rank={rank}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            *script_args(tiny_default, node),
        ]
        procs.append(run(cmd, params_two, tmp_path / f"node{rank}.log"))
    for rank, proc in enumerate(procs):
        finished(proc, tmp_path / f"node{rank}.log")

    single = json.loads((one / "reports" / "metrics.json").read_text())
    multi = json.loads((nodes[0] / "reports" / "metrics.json").read_text())
    assert single["allreduce_shm"] == 1 and multi["allreduce_shm"] == 0  # across nodes: gloo
    assert single["num_processes"] == multi["num_processes"] == 2 and multi["global_step"] == 4
    # rank 1 wrote no checkpoint, report or model: only Trainer's per-process RNG state, which each rank keeps
    assert {p.name for p in files_under(nodes[1])} == {"rng_state_1.pth"}
    assert not (nodes[1] / "sft").exists() and not (nodes[1] / "reports").exists()
    assert (nodes[0] / "sft" / "model.safetensors").is_file()
    assert (nodes[0] / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file()
    assert len(losses(one)) == 4
    assert losses(nodes[0]) == pytest.approx(losses(one), abs=1e-5)
    assert multi["eval_loss"] == pytest.approx(single["eval_loss"], abs=1e-5)
