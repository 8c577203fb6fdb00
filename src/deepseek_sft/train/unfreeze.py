"""Progressive unfreezing: top layers (and head) train first; lower layers join on a step or epoch schedule.

How it stays correct under DeepSpeed ZeRO: the ZeRO optimizers build their flat fp32 partitions only from the
parameters that require grad when the engine is created, and a parameter left out then can never train later.
So every parameter that will ever train requires grad when the optimizer is built; this callback freezes the
lower layers in `on_train_begin` (after the engine exists) by turning `requires_grad` off, and unfreezes them by
turning it on again. A frozen parameter then gets no gradient (plain torch AdamW skips it; ZeRO feeds it a zero
gradient, so its Adam moments stay 0 and the Adam update is exactly 0), and the weight decay of its optimizer
group is set to 0 while it is frozen - otherwise ZeRO's decoupled decay would still shrink it. Measured: frozen
bytes are unchanged under plain, ZeRO-2 and ZeRO-3 until the unfreeze step (tests/test_train.py).
"""

from __future__ import annotations

import logging

from torch import nn
from transformers import TrainerCallback

from ..config.train import UnfreezeParams
from .moe import layer_index

log = logging.getLogger(__name__)


def unit_of(name: str) -> str:
    """The unfreezing unit of a parameter: `layer_<i>`, `embeddings` or `rest` (head, final norm)."""
    layer = layer_index(name)
    if layer is not None:
        return f"layer_{layer}"
    if "embed_tokens" in name or "wte" in name or "word_embeddings" in name:
        return "embeddings"
    return "rest"


def stage_at(params: UnfreezeParams, step: int, epoch: float) -> int:
    """The schedule stage (0, 1, ...) at a global step / (fractional) epoch."""
    done = step if params.unit == "steps" else int(epoch + 1e-6)
    return done // params.every


def frozen_units(params: UnfreezeParams, num_layers: int, stage: int) -> set[str]:
    """Units frozen at `stage`: the layers below the trainable top, and the embeddings until the bottom layer."""
    trainable = min(num_layers, params.initial_layers + stage * params.layers_per_stage)
    floor = num_layers - trainable
    frozen = {f"layer_{i}" for i in range(floor)}
    if floor > 0 or not params.embeddings_with_last_stage:
        frozen.add("embeddings")
    return frozen


def last_stage(params: UnfreezeParams, num_layers: int) -> int:
    """The first stage at which every layer trains."""
    missing = max(0, num_layers - params.initial_layers)
    return -(-missing // params.layers_per_stage)


class ProgressiveUnfreeze(TrainerCallback):
    """Applies `frozen_units` for the current stage at train begin (also after a resume) and on every change."""

    def __init__(self, model: nn.Module, params: UnfreezeParams, num_layers: int, trainable: set[str]):
        self.model = model
        self.params = params
        self.num_layers = num_layers
        self.trainable = trainable  # parameter names meant to train at some point
        self.stage: int | None = None
        self.events: list[tuple[int, int, int]] = []  # (global step, stage, trainable layers)

    def apply(self, stage: int, optimizer=None, step: int = 0) -> None:
        """Set requires_grad (and optimizer-group weight decay) for `stage`."""
        frozen = frozen_units(self.params, self.num_layers, stage)
        for name, param in self.model.named_parameters():
            if name in self.trainable:
                param.requires_grad_(unit_of(name) not in frozen)
        for group in getattr(optimizer, "param_groups", None) or []:
            if "unit" in group:
                group["weight_decay"] = 0.0 if group["unit"] in frozen else group["initial_weight_decay"]
        layers = self.num_layers - len([u for u in frozen if u.startswith("layer_")])
        self.events.append((step, stage, layers))
        log.info(
            "unfreeze: step %d stage %d -> %d/%d top layers trainable", step, stage, layers, self.num_layers
        )
        self.stage = stage

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.apply(stage_at(self.params, state.global_step, state.epoch or 0.0), optimizer, state.global_step)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        stage = stage_at(self.params, state.global_step, state.epoch or 0.0)
        if stage != self.stage:
            self.apply(stage, optimizer, state.global_step)


def initially_frozen(model: nn.Module, params: UnfreezeParams, num_layers: int) -> set[str]:
    """Parameter names frozen at stage 0 (for the preflight intent)."""
    frozen = frozen_units(params, num_layers, 0)
    return {name for name, _ in model.named_parameters() if unit_of(name) in frozen}


def never_unfrozen(model: nn.Module, params: UnfreezeParams) -> set[str]:
    """Parameter names that stay frozen for the whole run (embeddings when embeddings_with_last_stage is off)."""
    if params.embeddings_with_last_stage:
        return set()
    return {name for name, _ in model.named_parameters() if unit_of(name) == "embeddings"}
