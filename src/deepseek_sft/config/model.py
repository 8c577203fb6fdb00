"""Params of stage base_model: which model to start from, and the sizes of the embedded tiny default."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Section

# The sentinel value of `base_model.name_or_path` that builds the embedded tiny DeepSeek-V3 model.
TINY_DEFAULT = "tiny-deepseek-v3"


class TinyTokenizerParams(Section):
    """Byte-level BPE tokenizer trained (with `tokenizers`) on the train split only."""

    vocab_size: int = Field(
        default=6000, ge=300, le=200_000, description="target vocabulary size (upper bound)"
    )
    min_frequency: int = Field(default=2, ge=1, description="a pair must occur this often to become a merge")
    split_cjk: bool = Field(
        default=False,
        description="one token per CJK character and digit (entities tokenize alike in text and answer; ~3x more tokens)",
    )
    label_tokens: bool = Field(
        default=True, description="every task label and entity type is one token (one decision per label)"
    )


class TinyDeepseekParams(Section):
    """Sizes of the embedded tiny DeepSeek-V3 model (transformers' native DeepseekV3ForCausalLM)."""

    hidden_size: int = Field(default=256, ge=16, description="model width")
    intermediate_size: int = Field(default=768, ge=8, description="FFN width of the dense layers")
    moe_intermediate_size: int = Field(
        default=128, ge=8, description="FFN width of each (routed or shared) expert"
    )
    num_hidden_layers: int = Field(default=4, ge=1, description="decoder layers")
    first_k_dense_replace: int = Field(
        default=1, ge=0, description="the first k layers are dense, the rest MoE"
    )
    num_attention_heads: int = Field(default=4, ge=1, description="attention heads (MLA)")
    q_lora_rank: int | None = Field(
        default=128, ge=8, description="MLA query low-rank size; null = full q_proj"
    )
    kv_lora_rank: int = Field(default=64, ge=8, description="MLA compressed key/value latent size")
    qk_nope_head_dim: int = Field(default=32, ge=2, description="per-head query/key dims without RoPE")
    qk_rope_head_dim: int = Field(default=16, ge=2, description="per-head query/key dims with RoPE (even)")
    v_head_dim: int = Field(default=32, ge=2, description="per-head value dims")
    n_routed_experts: int = Field(default=8, ge=1, description="routed experts per MoE layer")
    num_experts_per_tok: int = Field(default=2, ge=1, description="routed experts chosen per token (top-k)")
    n_shared_experts: int = Field(default=1, ge=0, description="always-on shared experts per MoE layer")
    n_group: int = Field(default=4, ge=1, description="expert groups for group-limited routing")
    topk_group: int = Field(default=2, ge=1, description="groups a token may route into")
    norm_topk_prob: bool = Field(
        default=True, description="renormalise the top-k routing weights to sum to 1"
    )
    routed_scaling_factor: float = Field(
        default=1.0, gt=0.0, description="scale of the routed experts' output"
    )
    max_position_embeddings: int = Field(default=1024, ge=16, description="longest sequence (RoPE table)")
    rope_theta: float = Field(default=10000.0, gt=0.0, description="RoPE base")
    rms_norm_eps: float = Field(default=1.0e-6, gt=0.0, description="RMSNorm epsilon")
    initializer_range: float = Field(default=0.02, gt=0.0, description="std of the normal weight init")
    tie_word_embeddings: bool = Field(default=False, description="share input embedding and lm_head (V3: no)")
    tokenizer: TinyTokenizerParams = Field(default_factory=TinyTokenizerParams)

    @model_validator(mode="after")
    def _check_shapes(self):
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError("first_k_dense_replace must be <= num_hidden_layers")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError("num_experts_per_tok must be <= n_routed_experts")
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"n_routed_experts={self.n_routed_experts} must be divisible by n_group={self.n_group}"
            )
        if self.n_routed_experts // self.n_group < 2:
            # the router scores a group by the sum of its top-2 experts
            raise ValueError("each expert group needs at least 2 experts (n_routed_experts / n_group >= 2)")
        if self.topk_group > self.n_group:
            raise ValueError("topk_group must be <= n_group")
        if self.topk_group * (self.n_routed_experts // self.n_group) < self.num_experts_per_tok:
            raise ValueError("topk_group groups must hold at least num_experts_per_tok experts")
        return self


class BaseModelParams(Section):
    """Stage base_model: the model every later stage starts from (always materialised in models/base)."""

    name_or_path: str = Field(
        default=TINY_DEFAULT,
        description=f"'{TINY_DEFAULT}' (build the embedded tiny model), a local directory, or a hub id",
    )
    revision: str | None = Field(
        default=None,
        description="40-hex commit of the hub repo (required for hub ids, so runs are reproducible)",
    )
    trust_remote_code: bool = Field(
        default=False, description="allow the checkpoint's own modeling code to run"
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        default="float32", description="dtype later stages load the weights in"
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        default="sdpa", description="attention kernel later stages load the model with"
    )
    tiny: TinyDeepseekParams = Field(default_factory=TinyDeepseekParams)
