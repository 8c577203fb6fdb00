"""LoRA through peft, including the fused 3-D expert tensors of transformers 5.x MoE models, and merging.

transformers 5.24 stores DeepSeek V2/V3 routed experts as two nn.Parameters per MoE layer,
`mlp.experts.gate_up_proj` [E, 2*I, H] and `mlp.experts.down_proj` [E, H, I], not as nn.Linear modules, so
`target_modules` cannot reach them; peft's `target_parameters` wraps those parameters (one low-rank update per
expert). The router (`mlp.gate`) is never targeted.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from torch import nn

from ..config.train import LoraParams

log = logging.getLogger(__name__)


def present_targets(model: nn.Module, params: LoraParams) -> tuple[list[str], list[str]]:
    """The configured target module and parameter names that exist in `model` (others are skipped, logged)."""
    module_leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    modules = [t for t in params.target_modules if t in module_leaves and t != "gate"]
    param_names = [name for name, _ in model.named_parameters()]
    parameters = [t for t in params.target_parameters if any(n.endswith(t) for n in param_names)]
    skipped = sorted(set(params.target_modules) - set(modules)) + sorted(
        set(params.target_parameters) - set(parameters)
    )
    if skipped:
        log.info("LoRA: targets not in this model, skipped: %s", ", ".join(skipped))
    if not modules and not parameters:
        raise ValueError(
            "lora: none of train.lora.target_modules / target_parameters exist in the model; "
            f"its linear layers are named {sorted(module_leaves)}"
        )
    return modules, parameters


def apply_lora(model: nn.Module, params: LoraParams):
    """Wrap `model` in a peft LoRA model (base weights frozen, adapters trainable)."""
    from peft import LoraConfig, get_peft_model

    modules, parameters = present_targets(model, params)
    config = LoraConfig(
        r=params.r,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=modules or None,
        target_parameters=parameters or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft warns that its own internal rank/alpha patterns for target_parameters matched nothing.
        warnings.filterwarnings("ignore", message=".*pattern keys did not match.*")
        peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info(
        "LoRA: %s trainable of %s parameters (%.2f%%)",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    return peft_model


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, load_kwargs: dict):
    """Load the base model, apply the saved adapter and merge it: a plain transformers model."""
    from peft import PeftModel

    from ..base_model import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(base_dir, **load_kwargs)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return merged.eval()
