"""Efficiency: batch-1 latency (prefill and cached decode, ms/token), throughput, memory, size, parameters."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import psutil
import torch

from .generate import greedy_one

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _attention_params(c) -> int:
    h, nh = c.hidden_size, c.num_attention_heads
    qk_head = c.qk_nope_head_dim + c.qk_rope_head_dim
    bias = bool(getattr(c, "attention_bias", False))
    q_rank = getattr(c, "q_lora_rank", None)
    # q_a (+ bias) + q_a_layernorm + q_b with a query low-rank; one q_proj without
    q = (h + bias + 1 + nh * qk_head) * q_rank if q_rank else h * nh * qk_head
    kv_a = (h + bias) * (c.kv_lora_rank + c.qk_rope_head_dim)
    kv_b = c.kv_lora_rank * nh * (c.qk_nope_head_dim + c.v_head_dim)
    o = nh * c.v_head_dim * h + bias * h
    return q + kv_a + c.kv_lora_rank + kv_b + o  # + kv_a_layernorm


def _is_moe_layer(c, idx: int) -> bool:
    if not getattr(c, "n_routed_experts", None):
        return False
    # DeepSeek-V2 configs add moe_layer_freq; V3 makes every layer after the dense prefix MoE
    return idx >= c.first_k_dense_replace and idx % getattr(c, "moe_layer_freq", 1) == 0


def parameter_breakdown(config) -> dict[str, int] | None:
    """Parameter counts of a DeepSeek-V2/V3 (MLA + MoE) config by part, with `total` and `active` per token.

    Active = everything a token passes through: embeddings, head, attention, norms, dense FFNs, routers,
    shared experts and only `num_experts_per_tok` routed experts. None for configs of other families.
    """
    if not hasattr(config, "kv_lora_rank") or not hasattr(config, "qk_nope_head_dim"):
        return None
    c, h = config, config.hidden_size
    layers = range(c.num_hidden_layers)
    moe_layers = sum(_is_moe_layer(c, i) for i in layers)
    expert = 3 * h * c.moe_intermediate_size  # gate, up, down projections of one expert
    parts = {
        "embeddings": c.vocab_size * h,
        "lm_head": 0 if c.tie_word_embeddings else c.vocab_size * h,
        "attention": c.num_hidden_layers * _attention_params(c),
        "norms": (2 * c.num_hidden_layers + 1) * h,
        "dense_mlp": (c.num_hidden_layers - moe_layers) * 3 * h * c.intermediate_size,
        "router": moe_layers * c.n_routed_experts * h,
        "shared_experts": moe_layers * (c.n_shared_experts or 0) * expert,
        "routed_experts": moe_layers * c.n_routed_experts * expert,
    }
    parts["total"] = sum(parts.values())
    parts["active"] = parts["total"] - moe_layers * (c.n_routed_experts - c.num_experts_per_tok) * expert
    return parts


def count_parameters(model) -> int:
    """Parameters actually held by the model (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def parameter_stats(model) -> dict[str, int]:
    """Total and per-token active parameter counts (from the config when it is a DeepSeek MoE, else counted)."""
    counted = count_parameters(model)
    parts = parameter_breakdown(model.config)
    if parts is None:
        return {"params_total": counted, "params_active_per_token": counted, "params_counted": counted}
    return {
        "params_total": parts["total"],
        "params_active_per_token": parts["active"],
        "params_counted": counted,
    }


def size_on_disk(model_dir: str | Path) -> dict[str, int]:
    """Bytes of the weight files and of the whole model directory."""
    files = [p for p in Path(model_dir).rglob("*") if p.is_file()]
    weights = sum(p.stat().st_size for p in files if p.name.endswith(WEIGHT_SUFFIXES))
    return {"size_weights_bytes": weights, "size_dir_bytes": sum(p.stat().st_size for p in files)}


class PeakMemory:
    """Context manager sampling this process's RSS (psutil) in a thread; also the CUDA peak when on GPU."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.peak_rss = 0
        self.peak_gpu = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.peak_rss = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
        if torch.cuda.is_available():
            self.peak_gpu = int(torch.cuda.max_memory_allocated())
        return False

    def stats(self) -> dict[str, float]:
        """Peak resident memory (MiB) and peak GPU memory (MiB, 0 on CPU)."""
        return {"peak_rss_mb": self.peak_rss / 2**20, "peak_gpu_mb": self.peak_gpu / 2**20}


def percentiles(values: Sequence[float], prefix: str) -> dict[str, float]:
    """p50/p95/mean of `values` under keys prefix_p50 etc. (0 when empty)."""
    if not values:
        return {f"{prefix}_p50": 0.0, f"{prefix}_p95": 0.0, f"{prefix}_mean": 0.0}
    arr = np.asarray(values, dtype=float)
    return {
        f"{prefix}_p50": float(np.percentile(arr, 50)),
        f"{prefix}_p95": float(np.percentile(arr, 95)),
        f"{prefix}_mean": float(arr.mean()),
    }


def measure_latency(
    model, prompts: Sequence[Sequence[int]], decode_tokens: int, warmup: int, eos_ids: Sequence[int]
) -> dict[str, float]:
    """Batch-1 latency over `prompts`: prefill ms per prompt token and decode ms per generated token.

    Decoding runs a fixed `decode_tokens` steps (ignoring EOS) so every prompt contributes equally.
    """
    if not prompts:
        return {}
    for p in list(prompts)[:warmup]:
        greedy_one(model, p, min(decode_tokens, 2), eos_ids, stop_at_eos=False)
    prefill, decode = [], []
    for p in prompts:
        _, seconds = greedy_one(model, p, decode_tokens + 1, eos_ids, stop_at_eos=False)
        prefill.append(1000.0 * seconds[0] / len(p))
        decode.extend(1000.0 * s for s in seconds[1:])
    out = {**percentiles(prefill, "prefill_ms_per_token"), **percentiles(decode, "decode_ms_per_token")}
    out["decode_tokens_per_s"] = 1000.0 / out["decode_ms_per_token_mean"] if decode else 0.0
    out["latency_samples"] = len(prompts)
    return out


def sample_prompts(prompts: Sequence[Sequence[int]], n: int, seed: int) -> list[Sequence[int]]:
    """`n` prompts picked with a seeded generator (all of them when there are fewer)."""
    if len(prompts) <= n:
        return list(prompts)
    rng = np.random.default_rng(seed)
    return [prompts[i] for i in sorted(rng.choice(len(prompts), size=n, replace=False))]
