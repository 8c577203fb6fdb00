"""Weight-only int8 quantization of every linear layer, the fused MoE expert tensors and the embedding table.

Why not `torch.ao.quantization.quantize_dynamic`: it only swaps `nn.Linear`, while transformers 5 stores a
DeepSeek-V3 layer's routed experts as two 3-D parameters (`experts.gate_up_proj` [E, 2I, H] and
`experts.down_proj` [E, H, I]), which hold most of an MoE model's weights. So each weight here gets symmetric
per-output-channel scales (per expert and output channel for the 3-D tensors): q = round(w / s), s = max|w| / 127.

Compute (`kernel`):
- ``dynamic_int8`` (default): torch's x86/fbgemm int8 GEMM (`quantized::linear_dynamic`), activations quantized
  per row at each call: a real int8 kernel, faster than float32 at batch 1 on CPU (the reason to quantize here).
  It needs torch's quantized tensor type, which torch 2.13 deprecates but still ships. Off the CPU it falls back
  to ``dequant``.
- ``dequant``: the matmul runs on the int8 weights converted to the activation dtype on the fly, the scale applied
  to the output (x @ q^T * s == x @ (q * s)^T); exact to the int8 weights on any device, not faster.

Why not torchao (the library transformers integrates, `TorchAoConfig`), checked with torchao 0.18.0 on torch 2.13:
its CPU int8 paths are slower than float32 in eager mode at batch 1 (per linear of SmolLM2's shapes,
`Int8DynamicActivationInt8WeightConfig` 4-8x slower, `Int8WeightOnlyConfig` (dequantize-then-matmul) 2x slower,
fbgemm 2.7-4x faster); and its configs quantize `nn.Linear` only: an `FqnToConfig` entry can turn the fused 3-D
expert tensors (`experts.gate_up_proj`) into an `Int8Tensor`, but transformers' expert forward then fails
(`aten.transpose` is not implemented for it). So the checkpoint stays in this project's format, which plain
`from_pretrained` refuses with a message saying how to load it (storage.py).
int4 is not offered: torch has only private int4 CPU kernels (`_weight_int4pack_mm_for_cpu`).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

QMAX = 127
KERNELS = ("dequant", "dynamic_int8")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 along the last dim: (q int8 of weight's shape, scale float32 of shape weight.shape[:-1])."""
    w = weight.detach().to(torch.float32)
    scale = (w.abs().amax(dim=-1) / QMAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale.unsqueeze(-1)).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight an int8 tensor and its per-row scales stand for."""
    return q.to(dtype) * scale.to(dtype).unsqueeze(-1)


def dynamic_int8_available() -> bool:
    """True when torch has a CPU int8 GEMM engine (x86 / fbgemm / onednn) for `quantized::linear_dynamic`."""
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm", "onednn"))


def _prepack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    zeros = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # torch 2.13 deprecates its quantized tensor type; it is still the only built-in int8 GEMM on CPU
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
        wq = torch._make_per_channel_quantized_tensor(q.cpu(), scale.cpu().double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(wq, None if bias is None else bias.detach().float().cpu())


def int8_linear(x, q, scale, bias, kernel: str, cache: dict, key) -> torch.Tensor:
    """x @ (q * scale)^T + bias with the chosen kernel (dynamic_int8 falls back to dequant off the CPU)."""
    if kernel == "dynamic_int8" and x.device.type == "cpu":
        if key not in cache:
            cache[key] = _prepack(q, scale, bias)
        out = torch.ops.quantized.linear_dynamic(x.float(), cache[key], True)
        return out.to(x.dtype)
    out = F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    return out if bias is None else out + bias.to(x.dtype)


class Int8Linear(nn.Module):
    """`nn.Linear` with an int8 weight and per-output-channel scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool, kernel: str = "dequant"):
        super().__init__()
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._packed: dict = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str) -> Int8Linear:
        """Quantize a float `nn.Linear`."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, kernel)
        module.weight_int8, module.weight_scale = quantize_rows(linear.weight)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight_int8, self.weight_scale, self.bias, self.kernel, self._packed, 0)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}"


class Int8Experts(nn.Module):
    """DeepSeek-V3 routed experts (fused 3-D tensors) with int8 weights, scaled per expert and output channel."""

    def __init__(
        self, num_experts: int, hidden_dim: int, intermediate_dim: int, act_fn, kernel: str = "dequant"
    ):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.act_fn, self.kernel = act_fn, kernel
        e, h, i = num_experts, hidden_dim, intermediate_dim
        self.register_buffer("gate_up_proj_int8", torch.zeros(e, 2 * i, h, dtype=torch.int8))
        self.register_buffer("gate_up_proj_scale", torch.ones(e, 2 * i, dtype=torch.float32))
        self.register_buffer("down_proj_int8", torch.zeros(e, h, i, dtype=torch.int8))
        self.register_buffer("down_proj_scale", torch.ones(e, h, dtype=torch.float32))
        self._packed: dict = {}

    @classmethod
    def from_experts(cls, experts: nn.Module, kernel: str) -> Int8Experts:
        """Quantize a transformers experts module holding `gate_up_proj` and `down_proj` as 3-D parameters."""
        e, two_i, h = experts.gate_up_proj.shape
        module = cls(e, h, two_i // 2, experts.act_fn, kernel)
        module.gate_up_proj_int8, module.gate_up_proj_scale = quantize_rows(experts.gate_up_proj)
        module.down_proj_int8, module.down_proj_scale = quantize_rows(experts.down_proj)
        return module

    def forward(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        """The eager expert loop of transformers' DeepseekV3Experts, on int8 weights."""
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            slot, token = torch.where(mask[e])
            x = hidden_states[token]
            gate_up = int8_linear(
                x,
                self.gate_up_proj_int8[e],
                self.gate_up_proj_scale[e],
                None,
                self.kernel,
                self._packed,
                (e, 0),
            )
            gate, up = gate_up.chunk(2, dim=-1)
            y = int8_linear(
                self.act_fn(gate) * up,
                self.down_proj_int8[e],
                self.down_proj_scale[e],
                None,
                self.kernel,
                self._packed,
                (e, 1),
            )
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, inter={self.intermediate_dim}, kernel={self.kernel}"


class Int8Embedding(nn.Module):
    """`nn.Embedding` with int8 rows and one scale per row (rows are dequantized after the lookup)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, dtype=torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.out_dtype = dtype
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=torch.float32))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        """Quantize a float `nn.Embedding` row by row."""
        module = cls(
            embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, embedding.weight.dtype
        )
        module.weight_int8, module.weight_scale = quantize_rows(embedding.weight)
        return module

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input_ids, self.weight_int8).to(self.out_dtype)
        return rows * self.weight_scale[input_ids].unsqueeze(-1).to(self.out_dtype)


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers MoE experts module storing its weights as 3-D `gate_up_proj` / `down_proj` parameters."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def tied_head(embedding: Int8Embedding, kernel: str) -> Int8Linear:
    """An lm_head sharing the int8 table and per-row scales of a tied embedding: a row's scale is also that
    output channel's scale, so the tie survives quantization and the table is stored once."""
    head = Int8Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False, kernel=kernel)
    head.weight_int8, head.weight_scale = embedding.weight_int8, embedding.weight_scale
    return head


def plan_quantization(model: nn.Module, embeddings: bool) -> dict[str, list[str]]:
    """Module names to quantize by kind: linear, experts, embedding, and tied_head (an lm_head tied to the
    embedding, which then shares the embedding's int8 table)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    input_embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    plan: dict[str, list[str]] = {"linear": [], "experts": [], "embedding": [], "tied_head": []}
    for name, module in model.named_modules():
        if tied and module is output:
            if embeddings:  # else the tied table stays float, as the head's weight too
                plan["tied_head"].append(name)
        elif isinstance(module, nn.Linear):
            plan["linear"].append(name)
        elif is_fused_experts(module):
            plan["experts"].append(name)
        elif module is input_embedding and embeddings:
            plan["embedding"].append(name)
    return plan


def apply_plan(model: nn.Module, plan: dict[str, list[str]], kernel: str, quantize: bool = True) -> None:
    """Swap the planned modules for int8 ones (quantizing their weights, or empty shells to load into)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}; expected one of {', '.join(KERNELS)}")
    for name in plan.get("linear", []):
        old = model.get_submodule(name)
        new = (
            Int8Linear.from_linear(old, kernel)
            if quantize
            else Int8Linear(old.in_features, old.out_features, old.bias is not None, kernel)
        )
        _set_module(model, name, new)
    for name in plan.get("experts", []):
        old = model.get_submodule(name)
        if quantize:
            new = Int8Experts.from_experts(old, kernel)
        else:
            e, two_i, h = old.gate_up_proj.shape
            new = Int8Experts(e, h, two_i // 2, old.act_fn, kernel)
        _set_module(model, name, new)
    for name in plan.get("embedding", []):
        old = model.get_submodule(name)
        new = (
            Int8Embedding.from_embedding(old)
            if quantize
            else Int8Embedding(old.num_embeddings, old.embedding_dim, old.padding_idx, old.weight.dtype)
        )
        _set_module(model, name, new)
    for name in plan.get("tied_head", []):
        _set_module(model, name, tied_head(model.get_input_embeddings(), kernel))


def quantize_model(
    model: nn.Module, kernel: str = "dynamic_int8", embeddings: bool = True
) -> dict[str, list[str]]:
    """Quantize `model` in place; return the plan (what was quantized), which the saved config records."""
    plan = plan_quantization(model, embeddings)
    apply_plan(model, plan, kernel, quantize=True)
    return plan


def quantized_share(model: nn.Module) -> dict[str, float]:
    """Share of weights held as int8: of the non-embedding weights, and of all weights.

    Non-embedding = every parameter except the input embedding table; an untied lm_head is a projection and
    counts as non-embedding, a tied one is the embedding table itself. Norm weights, the router (kept float
    because routing decisions are sensitive) and biases stay float and count against the share.
    """
    embedding = model.get_input_embeddings()
    int8_total = int8_embedding = float_total = float_embedding = 0
    counted: set[int] = set()  # a tied head shares the embedding's int8 table: count it once
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf.dtype == torch.int8 and name.endswith("_int8") and buf.data_ptr() not in counted:
                counted.add(buf.data_ptr())
                int8_total += buf.numel()
                int8_embedding += buf.numel() if module is embedding else 0
    for p in model.parameters():  # shared (tied) tensors are yielded once
        float_total += p.numel()
    if isinstance(embedding, nn.Embedding):
        float_embedding = embedding.weight.numel()
    non_embedding_int8 = int8_total - int8_embedding
    non_embedding = non_embedding_int8 + float_total - float_embedding
    return {
        "quantized_share_non_embedding": non_embedding_int8 / non_embedding if non_embedding else 0.0,
        "quantized_share_all": int8_total / (int8_total + float_total) if int8_total + float_total else 0.0,
        "params_int8": int8_total,
        "params_float": float_total,
    }


def quantization_config(plan: dict[str, list[str]], kernel: str) -> dict:
    """The `quantization_config` written to config.json: what a reader of the checkpoint needs to know."""
    return {
        "quant_method": "dsft_int8",
        "bits": 8,
        "activations": "int8, dynamic per row at each call" if kernel == "dynamic_int8" else "float",
        "symmetric": True,
        "granularity": "per output channel (per expert and output channel for fused experts, per row for "
        "embeddings; a tied lm_head shares the embedding's table and scales)",
        "kernel": kernel,
        "modules": {kind: len(names) for kind, names in plan.items()},
        "loader": "deepseek_sft.compress.load_compressed",
    }


def save_quantized(
    model, tokenizer, out_dir: str | os.PathLike, plan: dict[str, list[str]], kernel: str
) -> None:
    """Save a quantized model: int8 tensors + scales in safetensors, the plan in config.json."""
    from .storage import save_compressed, unique_state_dict

    marker = {"method": "quantize", "plan": plan, "kernel": kernel}
    extra = {"quantization_config": quantization_config(plan, kernel)}
    save_compressed(model, tokenizer, out_dir, unique_state_dict(model), marker, extra)
