"""Process setup for training: threads, launch checks, DeepSpeed config, precision, dropout, TrainingArguments."""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch
from torch import nn

from ..config.base import ParamsError
from ..config.train import TRAINING_ARGUMENTS, TrainParams

log = logging.getLogger(__name__)

DROPOUT_KEYS = (
    "attention_dropout",
    "hidden_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
)


def configure_threads(params: TrainParams) -> int:
    """Set torch (and OpenMP) threads per process: threads_per_process, or usable cores / num_processes.

    OMP_NUM_THREADS is exported too: accelerate otherwise resets torch's thread count on CPU-distributed runs.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = params.threads_per_process or max(1, cores // params.num_processes)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    return threads


@contextmanager
def training_threads(params: TrainParams):
    """`configure_threads` for one run inside a longer process, then the caller's thread count back.

    The compress stage evaluates with one thread per process (tiny decode ops only sync more threads), but its
    training runs (recovery, distillation) are big enough matrix work to use every core: one thread leaves the
    second core of a 2-core machine idle for the whole distillation.
    """
    before_threads, before_env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    try:
        yield configure_threads(params)
    finally:
        torch.set_num_threads(before_threads)
        if before_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before_env


def local_process_count() -> int:
    """Processes started on this node by the launcher (deepspeed: LOCAL_SIZE, torchrun: LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)


def check_launch(params: TrainParams) -> None:
    """The launcher must start train.num_processes processes, and DeepSpeed needs a process-group env."""
    launched = local_process_count()
    if launched != params.num_processes:
        raise ParamsError(
            f"train.num_processes={params.num_processes} but {launched} process(es) were launched on this node; "
            f"launch with `python -m deepseek_sft.train.launch --num_gpus {params.num_processes} scripts/train.py ...` "
            "(as dvc.yaml does) "
            "or change train.num_processes"
        )
    if params.deepspeed is not None and "RANK" not in os.environ:
        # `python scripts/train.py` with a DeepSpeed config: a one-process group on localhost.
        defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        for key, value in {**defaults, "MASTER_PORT": str(_free_port())}.items():
            os.environ.setdefault(key, value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_deepspeed_config(path: str | None) -> dict | None:
    """The DeepSpeed JSON config (None for a plain run), with a clear error if it is missing or invalid."""
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise ParamsError(
            f"train.deepspeed={path!r}: no such file; the shipped ones are configs/deepspeed/*.json"
        )
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ParamsError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    if "zero_optimization" not in config:
        raise ParamsError(f"{path}: expected a 'zero_optimization' section")
    for section in ("optimizer", "scheduler"):
        if section in config:
            # params.train is the single source of truth, and progressive unfreezing needs the Trainer's
            # optimizer groups (a DeepSpeed-built optimizer gets one flat group).
            raise ParamsError(
                f"{path}: remove the {section!r} section; it comes from params.train (AdamW - DeepSpeedCPUAdam "
                "under ZeRO-Offload - and lr_scheduler_type / warmup_steps)"
            )
    return config


def init_deepspeed_comm() -> bool:
    """Attach deepspeed.comm to the process group accelerate created, then `use_shm_allreduce` where it applies
    (returned: whether it does).

    On CPU accelerate sets up torch.distributed (gloo) itself and leaves deepspeed.comm alone, so ZeRO-3's
    zero.Init (run by from_pretrained) would see a world of 1 and reject the batch size.
    """
    import deepspeed

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed()  # backend from the accelerator: gloo on CPU, nccl on CUDA
    shm = use_shm_allreduce()
    if shm:
        log.info("gradient all-reduce: DeepSpeed's shared-memory kernel (one node, CPU)")
    return shm


def use_shm_allreduce() -> bool:
    """Send DeepSpeed's all-reduces on a one-node CPU run through its shared-memory kernel instead of gloo.

    DeepSpeed sums training gradients with torch.distributed, which is gloo on CPU: 13.5-18 ms per step for the
    tiny default's 16.6 MB of fp32 gradients here, 5-6% of a step. Its shared-memory kernel (built for
    `inference_all_reduce`) sums the same tensor in 3.9 ms, in the same order for two ranks, so training is
    bit-for-bit the same. It serves blocking whole-world SUMs of contiguous fp32 CPU tensors (ZeRO-0/1/2
    gradient buckets); any other call keeps gloo. Returns whether the route is on.
    """
    import deepspeed.comm.comm as ds_comm

    backend = ds_comm.cdb
    if backend is None:
        return False
    if getattr(backend.all_reduce, "shm_route", False):
        return True  # routed by an earlier call in this process
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    kernel = getattr(getattr(torch.ops, "deepspeed", None), "inference_all_reduce_", None)
    usable = (
        not torch.cuda.is_available()
        and world > 1
        and local_process_count() == world  # the shared memory spans this node only
        and kernel is not None
        and getattr(backend, "shm_vector_kernel_level", 0) >= 1  # its fp32 path needs avx2
    )
    if not usable:
        return False
    gloo_all_reduce = backend.all_reduce

    def all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
        if (
            not async_op
            and backend._reduce_op(op) == torch.distributed.ReduceOp.SUM
            and tensor.device.type == "cpu"
            and tensor.dtype == torch.float32
            and tensor.is_contiguous()
            and torch.distributed.get_world_size(group) == world  # the kernel always spans every rank
        ):
            kernel(tensor)
            return None
        return gloo_all_reduce(tensor, op=op, group=group, async_op=async_op)

    all_reduce.shm_route = True
    backend.all_reduce = all_reduce
    return True


def deepspeed_shm_buffer() -> Path | None:
    """This process's DeepSpeed CPU all-reduce buffer, named as deepspeed/ops/csrc/cpu/comm/shm.cpp names it."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr is None or port is None:
        return None
    rank = os.environ.get("RANK", "0")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_deepspeed_shm() -> None:
    """Unlink this process's buffer: DeepSpeed 0.19 creates 66 MB of /dev/shm per process on CPU and never
    unlinks it, so every run leaked it until memory ran out (18 GB after a day of runs here). Peers that still
    map it keep their mapping; only the name goes."""
    buffer = deepspeed_shm_buffer()
    if buffer is not None:
        buffer.unlink(missing_ok=True)


@cache
def release_deepspeed_shm_at_exit() -> None:
    """Register `release_deepspeed_shm` once per process (a SIGKILLed run still leaks its buffer)."""
    atexit.register(release_deepspeed_shm)


def zero_stage(config: dict | None) -> int:
    """The ZeRO stage of a DeepSpeed config (0 for a plain run)."""
    return int((config or {}).get("zero_optimization", {}).get("stage", 0))


def cpu_bf16_supported() -> bool:
    """Whether this CPU has native bf16 (AVX512-BF16 / AMX), the condition for bf16 to pay off on CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(params: TrainParams) -> tuple[bool, bool, list[str]]:
    """(bf16, fp16) this hardware can run, and notes for any request that had to be turned off."""
    notes = []
    bf16, fp16 = params.bf16, params.fp16
    cuda = torch.cuda.is_available()
    if fp16 and not cuda:
        fp16 = False
        notes.append("fp16 requested but there is no CUDA device: training in float32")
    if bf16 and not (torch.cuda.is_bf16_supported() if cuda else cpu_bf16_supported()):
        bf16 = False
        notes.append("bf16 requested but this hardware has no native bf16: training in float32")
    for note in notes:
        log.warning(note)
    return bf16, fp16, notes


def set_dropout(model: nn.Module, p: float) -> dict[str, float]:
    """Set dropout on the config and on the built modules (they copied the value at init); return old values."""
    old = {}
    for key in DROPOUT_KEYS:
        value = getattr(model.config, key, None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            old[key] = float(value)
            setattr(model.config, key, p)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p
    return old


def restore_config(model: nn.Module, old: dict[str, float]) -> None:
    """Put config values back (models/sft should describe the model, not the training regularisation)."""
    for key, value in old.items():
        setattr(model.config, key, value)


def training_arguments(params: TrainParams, seed: int, output_dir: Path, precision: tuple[bool, bool]):
    """TrainingArguments from params.train (same field names) plus the stage's fixed choices.

    Create it before loading the model: under ZeRO-3 transformers then loads straight into partitions.
    """
    from transformers import TrainingArguments

    fields = {name: getattr(params, name) for name in TRAINING_ARGUMENTS}
    fields["bf16"], fields["fp16"] = precision
    if params.deepspeed is not None:
        release_deepspeed_shm_at_exit()
    return TrainingArguments(
        output_dir=str(output_dir),
        **fields,
        seed=seed,
        data_seed=seed,
        deepspeed=params.deepspeed,
        use_cpu=not torch.cuda.is_available(),
        eval_strategy="steps" if params.eval_steps else "no",
        eval_steps=params.eval_steps,
        save_strategy="steps",
        logging_first_step=True,
        report_to="none",  # dvclive is added as a callback, keyed by global step
        prediction_loss_only=True,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        disable_tqdm=False,
        log_level="info",
        log_level_replica="warning",
        dataloader_num_workers=0,
    )
