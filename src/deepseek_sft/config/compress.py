"""Params of stage compress: int8 quantization, magnitude and expert pruning, distillation, and their gates."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Section

METHODS = ("quantize", "prune", "expert_prune", "head_prune", "distill")


class GateParams(Section):
    """A variant passes when it loses at most `max_relative_f1_loss` of the SFT F1 and is small enough."""

    max_relative_f1_loss: float = Field(
        ge=0.0, le=1.0, description="largest allowed (F1_sft - F1_variant) / F1_sft"
    )
    min_size_ratio: float = Field(
        ge=0.0, description="smallest allowed weight bytes on disk of SFT / of the variant"
    )
    on_fail: Literal["error", "warn"] | None = Field(
        default=None, description="this gate's verdict when failed; null = compress.on_fail"
    )


class RecoveryParams(Section):
    """Short fine-tune after pruning (masks kept), through the train stage's Trainer/DeepSpeed machinery
    (params `train` for everything not set here)."""

    max_steps: int = Field(default=0, ge=0, le=100000, description="optimizer steps; 0 = no recovery")
    learning_rate: float = Field(default=2.0e-4, gt=0.0, le=1.0, description="peak learning rate")
    batch_size: int = Field(default=16, ge=1, le=4096, description="examples per step")
    max_length: int = Field(default=256, ge=16, le=131072, description="token cap per example")


class QuantizeParams(Section):
    """int8 weights with symmetric per-output-channel scales (per expert for the fused expert tensors)."""

    bits: Literal[8] = Field(
        default=8, description="weight bits; 8 only (no maintained int4 CPU kernel in this stack)"
    )
    kernel: Literal["dequant", "dynamic_int8"] = Field(
        default="dynamic_int8",
        description="matmul: dynamic_int8 = torch's x86/fbgemm int8 GEMM, activations quantized per call "
        "(CPU; faster than float32 at batch 1); dequant = int8 weights dequantized on the fly (exact to "
        "them, any device, not faster)",
    )
    embeddings: bool = Field(
        default=True, description="also store the input embedding table as int8 (per-row scales)"
    )
    gate: GateParams = Field(
        default_factory=lambda: GateParams(max_relative_f1_loss=0.02, min_size_ratio=3.5),
        description="source guide: ~4x smaller, < 2% F1 loss",
    )


class PruneParams(Section):
    """Unstructured magnitude pruning (torch.nn.utils.prune), saved as values + bitmask."""

    sparsity: float = Field(default=0.5, gt=0.0, lt=1.0, description="share of pruned weights set to zero")
    scope: Literal["layer", "global"] = Field(
        default="layer", description="layer = each tensor to `sparsity`; global = one threshold for all"
    )
    include_lm_head: bool = Field(default=True, description="prune the (untied) output projection too")
    include_embeddings: bool = Field(default=False, description="prune the input embedding table too")
    recovery: RecoveryParams = Field(
        default_factory=lambda: RecoveryParams(max_steps=50, learning_rate=1.0e-3),
        description="measured on the tiny default: 5.0% F1 loss without, 2.3% with 50 steps",
    )
    gate: GateParams = Field(
        default_factory=lambda: GateParams(max_relative_f1_loss=0.05, min_size_ratio=1.5),
        description="source guide: ~2x smaller, < 5% F1 loss (dense embeddings keep this below 2x)",
    )


class ExpertPruneParams(Section):
    """Drop the least-routed MoE experts (router load measured on the train split); router renormalised."""

    keep_fraction: float = Field(
        default=0.5, gt=0.0, le=1.0, description="share of routed experts kept in each MoE layer"
    )
    router_records: int = Field(
        default=256, ge=1, le=1_000_000, description="train records whose tokens measure the router load"
    )
    batch_size: int = Field(default=32, ge=1, le=4096, description="examples per router-load forward pass")
    recovery: RecoveryParams = Field(default_factory=RecoveryParams)
    gate: GateParams = Field(
        default_factory=lambda: GateParams(max_relative_f1_loss=0.05, min_size_ratio=1.2),
        description="the pruning target (< 5% F1 loss); size gain is the routed experts' share",
    )


class HeadPruneParams(Section):
    """Remove the least important attention heads (expected |dL/d gate| on the train split), same count per layer;
    an ordinary, smaller checkpoint."""

    keep_fraction: float = Field(
        default=0.5, gt=0.0, le=1.0, description="share of attention heads kept (nearest the layout allows)"
    )
    importance_records: int = Field(
        default=128, ge=1, le=1_000_000, description="train records whose SFT loss scores the heads"
    )
    batch_size: int = Field(default=16, ge=1, le=4096, description="examples per scoring pass")
    recovery: RecoveryParams = Field(
        default_factory=lambda: RecoveryParams(max_steps=50, learning_rate=1.0e-3),
        description="short fine-tune of the smaller model",
    )
    gate: GateParams = Field(
        default_factory=lambda: GateParams(max_relative_f1_loss=0.05, min_size_ratio=1.0),
        description="guide: attention heads 32 -> 16; the pruning target (< 5% F1 loss); attention is a "
        "small share of the weights, so no size requirement",
    )


class StudentParams(Section):
    """The student's sizes; every other config field is copied from the teacher (same architecture family)."""

    hidden_size: int = Field(default=112, ge=16, description="model width")
    intermediate_size: int = Field(default=192, ge=8, description="FFN width of the dense layers")
    moe_intermediate_size: int = Field(default=48, ge=8, description="FFN width of each expert")
    num_hidden_layers: int = Field(default=2, ge=1, description="decoder layers")
    first_k_dense_replace: int = Field(default=1, ge=0, description="the first k layers are dense")
    num_attention_heads: int = Field(default=2, ge=1, description="attention heads (MLA)")
    q_lora_rank: int | None = Field(default=48, ge=8, description="MLA query low-rank size; null = full")
    kv_lora_rank: int = Field(default=32, ge=8, description="MLA key/value latent size")
    qk_nope_head_dim: int = Field(default=24, ge=2, description="per-head query/key dims without RoPE")
    qk_rope_head_dim: int = Field(default=8, ge=2, description="per-head query/key dims with RoPE (even)")
    v_head_dim: int = Field(default=24, ge=2, description="per-head value dims")
    n_routed_experts: int = Field(default=4, ge=1, description="routed experts per MoE layer")
    num_experts_per_tok: int = Field(default=2, ge=1, description="experts chosen per token")
    n_shared_experts: int = Field(default=1, ge=0, description="always-on shared experts")
    n_group: int = Field(default=1, ge=1, description="expert groups for group-limited routing")
    topk_group: int = Field(default=1, ge=1, description="groups a token may route into")
    tie_word_embeddings: bool = Field(
        default=True, description="share embedding and lm_head (the vocabulary dominates a small model)"
    )

    @model_validator(mode="after")
    def _check(self):
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError("first_k_dense_replace must be <= num_hidden_layers")
        if self.qk_rope_head_dim % 2:
            raise ValueError("qk_rope_head_dim must be even (RoPE rotates pairs)")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError("num_experts_per_tok must be <= n_routed_experts")
        if self.n_routed_experts % self.n_group or (
            self.n_group > 1 and self.n_routed_experts // self.n_group < 2
        ):
            raise ValueError(
                "n_routed_experts must split into n_group groups of >= 2 experts (or n_group = 1)"
            )
        if self.topk_group > self.n_group:
            raise ValueError("topk_group must be <= n_group")
        return self


class DistillParams(Section):
    """A smaller student of the same family trained on the teacher's logits: alpha*T^2*KL + (1-alpha)*CE.

    Trained through the train stage's Trainer/DeepSpeed machinery (params `train` for everything not set here).
    """

    temperature: float = Field(
        default=2.0, gt=0.0, le=100.0, description="softmax temperature T of the KL term"
    )
    alpha: float = Field(
        default=0.5, ge=0.0, le=1.0, description="weight of the KL term; 1 - alpha weighs CE"
    )
    max_steps: int = Field(default=600, ge=1, le=10_000_000, description="optimizer steps")
    learning_rate: float = Field(default=2.0e-3, gt=0.0, le=1.0, description="peak learning rate")
    warmup_steps: int = Field(default=30, ge=0, description="linear warmup steps")
    weight_decay: float = Field(default=0.0, ge=0.0, lt=1.0, description="AdamW weight decay")
    batch_size: int = Field(default=16, ge=1, le=4096, description="examples per step")
    max_length: int = Field(default=256, ge=16, le=131072, description="token cap per example")
    init_from_teacher: bool = Field(
        default=True,
        description="start the student's embeddings (and untied lm_head) from the teacher's, SVD-projected "
        "to the student's width; false = random init",
    )
    teacher_cache_max_gb: float = Field(
        default=2.0,
        ge=0.0,
        description="compute the teacher's logits at every target token once, before training, and keep them "
        "in memory when they take at most this many GB (targets x vocabulary x 4 bytes); larger (a real "
        "vocabulary) or 0: the teacher runs at every step",
    )
    student: StudentParams = Field(default_factory=StudentParams)
    gate: GateParams = Field(
        default_factory=lambda: GateParams(max_relative_f1_loss=0.08, min_size_ratio=7.0),
        description="source guide: ~8x smaller, 3-8% F1 loss",
    )


class SpeedParams(Section):
    """Batch-1 prefill/decode speed and peak memory of every model, each in a fresh process, one at a time."""

    prompt_tokens: int = Field(default=32, ge=1, le=32768, description="prompt length of the timed prefill")
    new_tokens: int = Field(default=32, ge=1, le=32768, description="greedy cached decode steps per repeat")
    repeats: int = Field(default=3, ge=1, le=1000, description="timed repeats (after one warm-up)")
    threads: int = Field(default=2, ge=0, le=1024, description="torch threads per model; 0 = torch's default")
    rounds: int = Field(default=1, ge=1, le=100, description="passes over all models; the fastest counts")


class CompressParams(Section):
    """Stage compress: build, evaluate (with the evaluate code) and gate each compressed variant."""

    methods: list[Literal["quantize", "prune", "expert_prune", "head_prune", "distill"]] = Field(
        default_factory=lambda: list(METHODS),
        description="variants built, each saved as models/compressed/<method>",
    )
    on_fail: Literal["error", "warn"] = Field(
        default="error", description="a variant past its gate: error = fail the stage; warn = log and go on"
    )
    eval_limit: int | None = Field(
        default=None,
        ge=1,
        description="test records each variant and the SFT model are scored on; null = all",
    )
    quantize: QuantizeParams = Field(default_factory=QuantizeParams)
    prune: PruneParams = Field(default_factory=PruneParams)
    expert_prune: ExpertPruneParams = Field(default_factory=ExpertPruneParams)
    head_prune: HeadPruneParams = Field(default_factory=HeadPruneParams)
    speed: SpeedParams = Field(default_factory=SpeedParams)
    distill: DistillParams = Field(default_factory=DistillParams)

    @model_validator(mode="after")
    def _check_methods(self):
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods lists a method twice: {self.methods}")
        return self
