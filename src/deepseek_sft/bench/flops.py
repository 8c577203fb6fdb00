"""Model FLOPs per trained token (from the parameters a token actually uses) and the machine's matmul peak.

MFU = model FLOPs/token x tokens/s / peak. Model FLOPs follow the usual convention (PaLM appendix B, Megatron):
a training token costs 3 forward passes (forward + backward = 2x forward), a forward costs 2 FLOPs per weight it
multiplies, plus the attention scores. For an MoE layer only the weights a token is routed through count: the
shared experts, its top-k routed experts and the router. The LM head counts on every token (the standard model,
whatever an implementation skips), and attention counts causally, per example (what the model computes, not
what a packed or padded kernel wastes). So MFU ratios between contenders equal their real-tokens/s ratios.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch


def attention_context(lengths: Iterable[int]) -> float:
    """Mean number of positions a token attends to under a causal mask: sum l(l+1)/2 / sum l."""
    lengths = [int(n) for n in lengths if n > 0]
    total = sum(lengths)
    return sum(n * (n + 1) / 2 for n in lengths) / total if total else 0.0


def _get(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def attention_weights(config) -> int:
    """Weights one token multiplies in one attention block (MLA for DeepSeek V2/V3, else q/k/v/o)."""
    h, heads = config.hidden_size, config.num_attention_heads
    if getattr(config, "kv_lora_rank", None):
        qk = config.qk_nope_head_dim + config.qk_rope_head_dim
        q_rank = getattr(config, "q_lora_rank", None)
        q = h * q_rank + q_rank * heads * qk if q_rank else h * heads * qk
        kv = h * (config.kv_lora_rank + config.qk_rope_head_dim)
        kv += config.kv_lora_rank * heads * (config.qk_nope_head_dim + config.v_head_dim)
        return q + kv + heads * config.v_head_dim * h
    head_dim = _get(config, "head_dim", default=h // heads)
    kv_heads = _get(config, "num_key_value_heads", default=heads)
    return h * head_dim * (heads + 2 * kv_heads) + heads * head_dim * h


def attention_score_dims(config) -> int:
    """heads x (query-key dim + value dim): the per-position width of QK^T and attention x V."""
    heads = config.num_attention_heads
    if getattr(config, "kv_lora_rank", None):
        return heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    head_dim = _get(config, "head_dim", default=config.hidden_size // heads)
    return heads * 2 * head_dim


def mlp_weights(config) -> tuple[int, int, int]:
    """(weights per token of a dense MLP layer, of an MoE layer, number of MoE layers)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    dense = 3 * h * config.intermediate_size  # gate, up, down
    n_experts = _get(config, "n_routed_experts", "num_local_experts", "num_experts")
    if not n_experts:
        return dense, 0, 0
    expert = 3 * h * _get(config, "moe_intermediate_size", default=config.intermediate_size)
    shared = _get(config, "n_shared_experts", default=0)
    moe = expert * (config.num_experts_per_tok + shared) + h * n_experts  # + the router
    n_moe = layers - min(_get(config, "first_k_dense_replace", default=0), layers)
    return dense, moe, n_moe


def flops_per_token(config, context: float) -> dict[str, float]:
    """Training FLOPs per token of `config` at mean causal attention `context`, with the forward breakdown."""
    layers = config.num_hidden_layers
    dense, moe, n_moe = mlp_weights(config)
    weights = {
        "attention": layers * attention_weights(config),
        "mlp": (layers - n_moe) * dense + n_moe * moe,
        "lm_head": config.hidden_size * config.vocab_size,
    }
    forward = {k: 2.0 * v for k, v in weights.items()}
    forward["attention_scores"] = 2.0 * layers * attention_score_dims(config) * context
    total_forward = sum(forward.values())
    return {
        "active_matmul_params": float(sum(weights.values())),
        **{f"forward_{k}": v for k, v in forward.items()},
        "forward": total_forward,
        "train": 3.0 * total_forward,
        "attention_context": float(context),
    }


def matmul_peak(threads: int, size: int = 1024, seconds: float = 2.0, dtype=torch.float32) -> float:
    """Best torch.matmul FLOP/s of `size` x `size` operands with `threads` torch threads (restored after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=gen).to(dtype)
        b = torch.randn(size, size, generator=gen).to(dtype)
        out = torch.empty(size, size, dtype=dtype)
        torch.matmul(a, b, out=out)  # first call: kernel selection, page faults
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.matmul(a, b, out=out)
            best = max(best, 2.0 * size**3 / (time.perf_counter() - start))
        return best
    finally:
        torch.set_num_threads(previous)


def mfu(train_flops_per_token: float, tokens_per_second: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the measured peak."""
    return train_flops_per_token * tokens_per_second / peak_flops if peak_flops > 0 else 0.0
