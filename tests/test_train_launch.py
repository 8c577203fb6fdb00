"""train.launch: a free rendezvous port per run, a killed run's /dev/shm buffers and build locks cleared (or
reported), and two trainings started at once on one host both finishing."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepseek_sft.io import write_jsonl
from deepseek_sft.train import launch
from test_train import REPO, base_models, make_records, paths_for, train_data, write_params  # noqa: F401 - fixtures

OLD = time.time() - 3600


def test_master_port_comes_from_params_or_is_free():
    assert launch.master_port(29611) == 29611
    a, b = launch.master_port(None), launch.master_port(None)
    assert 1024 < a < 65536 and 1024 < b < 65536
    cmd = launch.deepspeed_command(["--num_gpus", "2", "scripts/train.py", "--out", "x.py"], 40001)
    assert cmd[1:] == ["--num_gpus", "2", "--master_port", "40001", "scripts/train.py", "--out", "x.py"]
    given = launch.deepspeed_command(["--master_port", "29501", "scripts/train.py"], 40001)
    assert given[1:] == ["--master_port", "29501", "scripts/train.py"]  # the user's choice stands


def test_only_unmapped_old_shm_buffers_are_removed():
    stem = f"{launch.SHM_PREFIX}{os.getuid()}_127.0.0.1_{os.getpid()}_"
    dead, mapped, young = (launch.SHM_DIR / f"{stem}{i}" for i in range(3))
    for path in (dead, mapped, young):
        path.write_bytes(b"\0" * 4096)
    os.utime(dead, (OLD, OLD))
    os.utime(mapped, (OLD, OLD))
    try:
        with open(mapped, "r+b") as f, mmap.mmap(f.fileno(), 4096):  # a live run's buffer
            removed = launch.remove_stale_shm_buffers()
        assert dead in removed and not dead.exists()
        assert mapped.exists() and young.exists()
    finally:
        for path in (dead, mapped, young):
            path.unlink(missing_ok=True)


def test_a_build_lock_is_removed_only_when_old_and_no_build_works_there(tmp_path, caplog):
    stale, busy, fresh = (tmp_path / "py311_cpu" / name / "lock" for name in ("a_op", "b_op", "c_op"))
    for lock in (stale, busy, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    os.utime(stale, (OLD, OLD))
    os.utime(busy, (OLD, OLD))
    build = subprocess.Popen(["sleep", "30"], cwd=busy.parent)  # stands in for ninja running the build
    try:
        removed, left = launch.clear_stale_extension_locks(tmp_path)
    finally:
        build.kill()
        build.wait()
    assert removed == [stale] and not stale.exists()
    assert left == [busy, fresh] and busy.exists() and fresh.exists()
    assert f"processes [{build.pid}] work in" in caplog.text and f"rm {busy}" in caplog.text


def start(tmp_path: Path, base: Path, data: dict[str, Path]) -> subprocess.Popen:
    """The stage command of dvc.yaml (train.launch -> deepspeed, 2 processes) on a tiny run."""
    params = write_params(
        tmp_path,
        num_processes=2,
        threads_per_process=1,
        max_steps=-1,
        num_train_epochs=1.0,
        deepspeed=str(REPO / "configs/deepspeed/zero0.json"),
        eval_base=False,
    )
    paths = paths_for(tmp_path, base, data)
    cmd = [
        sys.executable,
        "-m",
        "deepseek_sft.train.launch",
        "--num_gpus",
        "2",
        "scripts/train.py",
        "--base",
        str(base),
        "--train",
        str(data["train"]),
        "--val",
        str(data["val"]),
        "--out",
        str(paths.out),
        "--checkpoints",
        str(paths.checkpoints),
        "--reports",
        str(paths.reports),
    ]
    env = {**os.environ, "DSFT_PARAMS": str(params), "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "train.log", "wb")  # noqa: SIM115 - the child writes to it after we return
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


@pytest.mark.slow
def test_two_trainings_started_at_once_on_one_host_both_finish(tmp_path, base_models):  # noqa: F811
    data = {"train": tmp_path / "train.jsonl", "val": tmp_path / "val.jsonl"}
    write_jsonl(data["train"], make_records(40, seed=1))
    write_jsonl(data["val"], make_records(8, seed=2))
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        run.mkdir()
    procs = [start(run, base_models["v3"], data) for run in runs]
    for proc, run in zip(procs, runs, strict=True):
        assert proc.wait(timeout=600) == 0, (run / "train.log").read_text()[-4000:]
    ports = set()
    for run in runs:
        log = (run / "train.log").read_text()
        ports.add(log.split("--master_port ", 1)[1].split()[0])
        metrics = json.loads((run / "reports" / "metrics.json").read_text())
        assert metrics["allreduce_shm"] == 1 and metrics["num_processes"] == 2
        # epochs-based length on the batch_rebalance sampler: the plan made before training is what ran
        assert metrics["plan_steps"] == metrics["global_step"] > 0
        assert metrics["plan_tokens"] == metrics["train_tokens_seen"]
    assert len(ports) == 2  # each run its own port, so its own /dev/shm buffer names
    assert not list(launch.SHM_DIR.glob(f"{launch.SHM_PREFIX}{os.getuid()}_*_{min(ports)}_*"))
