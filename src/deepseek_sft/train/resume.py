"""Resuming a plain (non-DeepSpeed) run: load the checkpoint's weights the way transformers saved them.

Trainer._load_from_checkpoint reads model.safetensors with `load_state_dict(strict=False)`. transformers 5 saves
MoE experts per expert (`experts.0.gate_proj.weight`) but holds them fused in memory (`experts.gate_up_proj`),
so those keys match nothing and the resumed run silently went on from the base model's experts (its final
model differed from an uninterrupted run's). Under DeepSpeed the engine's own checkpoint holds the in-memory
names and is unaffected.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .trainer import SFTTrainer

log = logging.getLogger(__name__)

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


class ResumableSFTTrainer(SFTTrainer):
    """SFTTrainer whose plain-run resume loads the checkpoint through from_pretrained (weight conversions
    included), strictly: every parameter and buffer must come from the checkpoint."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model if model is not None else self.model
        checkpoint = Path(resume_from_checkpoint)
        plain = not (self.is_fsdp_enabled or hasattr(model, "peft_config"))
        if not plain or not any((checkpoint / name).is_file() for name in _WEIGHTS):
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # adapters, FSDP, other formats
            return
        dtype = next(model.parameters()).dtype
        loaded = type(model).from_pretrained(checkpoint, dtype=dtype, attn_implementation="eager")
        model.load_state_dict(loaded.state_dict(), strict=True)
        log.info("loaded the weights of %s (through from_pretrained: fused experts included)", checkpoint)
