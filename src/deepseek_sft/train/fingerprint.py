"""The run fingerprint: everything that changes what training computes, so a checkpoint only resumes its own run.

Parts: seed, tasks, the train params that shape the weights, how the base model is loaded, the base model's
weights (content digest, see checkpoint_digest) and every other file of it (config, tokenizer: by content), the
train/val data (by content), the DeepSpeed config, the process count, the library versions and the source of
the modules that compute a training step. Each part is hashed on its own so a refused resume can say which
part changed.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

from ..checkpoint_digest import DIGEST_FILE, base_weights_digest
from ..config import StageParams
from . import checkpoints as ckpt

# train keys that do not change the trained weights: editing them keeps the checkpoints resumable.
NOT_IN_FINGERPRINT = {
    "resume",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "eval_steps",
    "eval_base",
    "threads_per_process",
    "per_device_eval_batch_size",
    "master_port",
}

# Libraries whose numerics or checkpoint formats a resumed run depends on.
LIBRARIES = ("torch", "transformers", "accelerate", "deepspeed", "peft")

# Modules that compute the training step (loss, sampler, attention, routers, unfreezing, LoRA, data); an edit
# to any of them makes old checkpoints another run's. Reports, launch and resume bookkeeping are left out.
_PACKAGE = Path(__file__).resolve().parents[1]
STEP_SOURCES = (
    "sft_data.py",
    "tasks.py",
    "train/trainer.py",
    "train/varlen.py",
    "train/moe.py",
    "train/unfreeze.py",
    "train/lora.py",
    "train/setup.py",
)


def library_versions() -> dict[str, str]:
    """Installed versions of LIBRARIES ("-" for one that is not installed)."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def source_digest() -> str:
    """sha256 over the source of STEP_SOURCES."""
    h = hashlib.sha256()
    for rel in STEP_SOURCES:
        h.update(rel.encode() + b"\0" + (_PACKAGE / rel).read_bytes())
    return h.hexdigest()


def base_files_digest(base: Path) -> dict[str, str]:
    """Content sha256 of every file of the base model except the weights (config, tokenizer, template, ...)."""
    others = [
        f
        for f in sorted(base.rglob("*"))
        if f.is_file() and f.suffix != ".safetensors" and f.name != DIGEST_FILE
    ]
    return {
        str(f.relative_to(base)): d for f, d in zip(others, ckpt.files_digest(others).values(), strict=True)
    }


def run_parts(
    stage: StageParams,
    base: Path,
    data: list[Path],
    load_kwargs: dict,
    ds_config: dict | None,
    world: int,
) -> dict:
    """The fingerprint's parts (JSON-serialisable), each hashed separately by `part_hashes`."""
    return {
        "seed": stage.seed,
        "tasks": {k: t.model_dump() for k, t in stage.tasks.items()},
        "train": stage.section.model_dump(exclude=NOT_IN_FINGERPRINT),
        "load": dict(sorted(load_kwargs.items())),
        "base_weights": base_weights_digest(base),
        "base_files": base_files_digest(base),
        "data": {p.name: d for p, d in zip(data, ckpt.files_digest(data).values(), strict=True)},
        "deepspeed": ds_config,
        "world_size": world,
        "libraries": library_versions(),
        "code": source_digest(),
    }


def part_hashes(parts: dict) -> dict[str, str]:
    """{part: hash of that part}; the run fingerprint is the hash of this mapping."""
    return {name: ckpt.fingerprint(value) for name, value in parts.items()}
