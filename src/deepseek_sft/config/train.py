"""Params of stage train. Field names follow transformers.TrainingArguments where one exists."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Section

# TrainParams fields passed to TrainingArguments under the same name (the rest are ours).
TRAINING_ARGUMENTS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "weight_decay",
    "max_grad_norm",
    "label_smoothing_factor",
    "bf16",
    "fp16",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "gradient_checkpointing",
    "train_sampling_strategy",
)

LORA_MODULES = [
    "q_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]
LORA_EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


class UnfreezeParams(Section):
    """Progressive unfreezing: the top layers train first, lower layers join on a schedule."""

    enabled: bool = Field(default=False, description="start with only the top layers (and head) trainable")
    initial_layers: int = Field(
        default=1, ge=0, description="decoder layers (counted from the top) trainable from step 0"
    )
    layers_per_stage: int = Field(default=1, ge=1, description="layers unfrozen at each stage")
    every: int = Field(default=100, ge=1, description="a stage lasts this many `unit`s")
    unit: Literal["steps", "epochs"] = Field(default="steps", description="what `every` counts")
    embeddings_with_last_stage: bool = Field(
        default=True,
        description="the input embeddings unfreeze with the bottom layer (else they stay frozen)",
    )


class LoraParams(Section):
    """LoRA adapters (peft) on attention, dense MLP and the fused 3-D expert weights; merged at the end."""

    enabled: bool = Field(default=False, description="train LoRA adapters instead of all weights")
    r: int = Field(default=16, ge=1, le=1024, description="adapter rank")
    alpha: int = Field(default=32, ge=1, description="scaling numerator (scale = alpha / r)")
    dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="adapter input dropout (must be 0 with target_parameters)"
    )
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_MODULES),
        description="nn.Linear module names (suffixes) that get adapters; names absent in a model are skipped",
    )
    target_parameters: list[str] = Field(
        default_factory=lambda: list(LORA_EXPERT_PARAMETERS),
        description="nn.Parameter names (e.g. transformers 5 fused expert tensors) that get adapters",
    )
    merge: bool = Field(
        default=True,
        description="merge the adapters into a plain model in models/sft (else save the adapter)",
    )


class TrainParams(Section):
    """Stage train: HF Trainer (+ DeepSpeed) SFT of models/base on the processed train split."""

    learning_rate: float = Field(default=2.0e-3, gt=0.0, le=1.0, description="peak learning rate")
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = Field(default="cosine", description="transformers scheduler after warmup")
    warmup_steps: int = Field(default=30, ge=0, description="linear warmup steps")
    per_device_train_batch_size: int = Field(
        default=16, ge=1, description="examples per process per micro-step (one packed row when packing)"
    )
    per_device_eval_batch_size: int = Field(
        default=16,
        ge=1,
        description="examples per process per eval step (a packed row: attention is quadratic)",
    )
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="micro-steps per optimizer step")
    num_train_epochs: float = Field(default=2.0, gt=0.0, description="passes over the train examples")
    max_steps: int = Field(default=-1, ge=-1, description="optimizer steps; -1 = from num_train_epochs")
    target_tokens: int | None = Field(
        default=None,
        ge=1,
        description="train on about this many input tokens (steps from the data's tokens per step, logged "
        "before training); null = num_train_epochs",
    )
    min_steps: int = Field(
        default=0,
        ge=0,
        description="at least this many optimizer steps (small data gets more epochs); 0 = off",
    )
    weight_decay: float = Field(default=0.01, ge=0.0, lt=1.0, description="AdamW decoupled weight decay")
    max_grad_norm: float = Field(default=1.0, ge=0.0, description="gradient clipping norm (0 = off)")
    label_smoothing_factor: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="label smoothing of the token loss (training only)"
    )
    bf16: bool = Field(default=False, description="bf16 mixed precision; disabled with a note if unsupported")
    fp16: bool = Field(
        default=False, description="fp16 mixed precision (CUDA only); disabled with a note if not"
    )
    logging_steps: int = Field(
        default=10, ge=1, description="log loss / lr / grad norm / expert load every N steps"
    )
    save_steps: int = Field(
        default=100, ge=1, description="checkpoint every N steps (resume point after a kill)"
    )
    save_total_limit: int | None = Field(default=2, ge=1, description="checkpoints kept; null = all")
    eval_steps: int | None = Field(
        default=None, ge=1, description="held-out loss every N steps; null = only before and after training"
    )
    eval_base: bool = Field(
        default=True, description="measure the base model's held-out loss before training"
    )
    gradient_checkpointing: bool = Field(default=False, description="recompute activations (saves memory)")
    max_length: int = Field(default=256, ge=8, le=131072, description="token cap of prompt + answer")
    truncation: Literal["truncate", "drop", "error"] = Field(
        default="truncate", description="what happens to longer examples (see sft_data)"
    )
    packing: bool = Field(default=True, description="padding-free packing of each batch into one row")
    train_sampling_strategy: Literal["random", "group_by_length", "batch_rebalance"] = Field(
        default="batch_rebalance",
        description="batch_rebalance: each optimizer step's examples split so every process gets about the same"
        " tokens (the same examples per step as random; no process waits for a longer row)",
    )
    dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="attention (and any hidden) dropout set on the model config"
    )
    deepspeed: str | None = Field(
        default="configs/deepspeed/zero0.json",
        description="DeepSpeed config (configs/deepspeed/*.json); null = plain single-process Trainer",
    )
    num_processes: int = Field(
        default=2, ge=1, le=4096, description="processes launched per node (deepspeed --num_gpus)"
    )
    master_port: int | None = Field(
        default=None,
        ge=1024,
        le=65535,
        description="rendezvous port of the launcher (python -m deepseek_sft.train.launch); null = a free one",
    )
    threads_per_process: int | None = Field(
        default=None, ge=1, description="torch CPU threads per process; null = usable cores / num_processes"
    )
    freeze_router: bool = Field(
        default=False, description="freeze MoE router weights (mlp.gate.weight, e_score_correction_bias)"
    )
    router_aux_loss_coef: float = Field(
        default=0.01, ge=0.0, le=10.0, description="weight of the load-balancing loss added to the LM loss"
    )
    resume: bool = Field(
        default=True, description="resume from the newest compatible checkpoint in the checkpoint directory"
    )
    unfreeze: UnfreezeParams = Field(default_factory=UnfreezeParams)
    lora: LoraParams = Field(default_factory=LoraParams)

    @model_validator(mode="after")
    def _check_combinations(self):
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are exclusive; choose one")
        if self.deepspeed is None and self.num_processes != 1:
            raise ValueError(
                f"deepspeed: null runs a plain single process, but num_processes={self.num_processes}; "
                "set num_processes: 1 or choose a configs/deepspeed/*.json"
            )
        if self.deepspeed is not None and not self.deepspeed.endswith(".json"):
            raise ValueError(
                f"deepspeed={self.deepspeed!r}: expected a path to a DeepSpeed JSON config or null"
            )
        if self.max_steps > 0 and (self.target_tokens is not None or self.min_steps > 0):
            raise ValueError(
                f"max_steps={self.max_steps} fixes the run length; set target_tokens: null and min_steps: 0, "
                "or max_steps: -1 to use them"
            )
        if self.unfreeze.enabled and self.lora.enabled:
            raise ValueError("unfreeze and lora are exclusive: LoRA already freezes every base weight")
        if self.lora.enabled and not (self.lora.target_modules or self.lora.target_parameters):
            raise ValueError("lora.enabled needs target_modules or target_parameters")
        if self.lora.target_parameters and self.lora.dropout > 0.0:
            # peft's ParamWrapper (LoRA on nn.Parameters such as the fused experts) has no dropout
            raise ValueError("lora.dropout must be 0.0 when lora.target_parameters is set (peft limitation)")
        return self
