"""Stage train: HF Trainer + DeepSpeed SFT with MoE router controls, progressive unfreezing and LoRA.

Modules: runner (the stage), setup (threads, precision, TrainingArguments), trainer (loss, optimizer groups),
moe (router freeze, balance loss, expert load, ZeRO-3 leaves), preflight (parameter table), unfreeze, lora,
checkpoints (resume), callbacks (dvclive, base-model eval), reports (CSV / PNG / metrics.json), varlen (packed-row
attention), profile (configs/profiles overlays).
"""

from __future__ import annotations

__all__ = ["TrainPaths", "run_training"]


def __getattr__(name: str):
    # Lazy: `python -m deepseek_sft.train.profile` must not pay for importing torch and transformers.
    if name in __all__:
        from . import runner

        return getattr(runner, name)
    raise AttributeError(name)
