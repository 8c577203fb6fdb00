"""Packed-row attention without the packed row's quadratic cost, on any device.

For a packed row (several examples, position_ids restarting at 0 for each) transformers' sdpa path builds a
block-diagonal [L, L] mask, and the kernel then scores every pair of positions in the row. A row of 16 examples
of ~57 tokens is ~900 tokens: 16x the attention work of the examples alone, and 43% of a training step in the
bench profile. flash-attn's varlen kernel avoids that on CUDA. This does the same with stock SDPA anywhere:

1. gather the examples of the row into a right-padded [examples, longest] batch,
2. run causal SDPA on it with no mask (a causal query never sees the padding after it),
3. scatter the real positions back into the packed order.

Registered as an attention implementation, not as a mask: transformers then builds no [L, L] mask at all and
hands the attention function the position_ids, which is all it needs. Training switches to it only for packed
batches (`use_varlen_attention`); saved models keep `sdpa`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

VARLEN_ATTENTION = "sdpa_varlen"


def packed_layout(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gather index [examples, longest] into the flattened row(s), and where its real positions are.

    An example starts wherever position_ids is 0 (and at each row start). Padding slots read the example's own
    first token: any finite value works, since no real query attends to them.
    """
    flat = position_ids.reshape(-1)
    total = flat.numel()
    is_start = flat == 0
    is_start[:: position_ids.shape[-1]] = True
    starts = torch.nonzero(is_start).flatten()
    lengths = torch.diff(starts, append=starts.new_tensor([total]))
    offsets = torch.arange(int(lengths.max()), device=flat.device)
    real = offsets[None, :] < lengths[:, None]
    gather = torch.where(real, starts[:, None] + offsets[None, :], starts[:, None])
    return gather, torch.nonzero(real.reshape(-1)).flatten()


def _to_examples(x: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """[rows, heads, L, dim] -> [examples, heads, longest, dim].

    index_select, not advanced indexing: its backward is an index_add, about twice as fast on CPU as the
    accumulating index_put that x[:, gather] backpropagates through.
    """
    rows, heads, length, dim = x.shape
    flat = x.transpose(0, 1).reshape(heads, rows * length, dim)
    return flat.index_select(1, gather.reshape(-1)).view(heads, *gather.shape, dim).transpose(0, 1)


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else torch.nn.functional.pad(x, (0, size - x.shape[-1]))


def varlen_sdpa_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """sdpa_attention_forward's contract ([rows, L, heads, v_dim] out), each packed example attending to itself."""
    # A mask, a KV cache (keys longer than queries) or no positions: not a packed training row.
    if attention_mask is not None or position_ids is None or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows, heads, length, qk_dim = query.shape
    v_dim = value.shape[-1]
    gather, real = packed_layout(position_ids.expand(rows, -1))
    # MLA's values are narrower than its queries/keys (DeepSeek-V3: 128 vs 192); the fused CPU/CUDA kernels need
    # one head size, else SDPA falls back to the unfused math path. Zero columns of V give zero columns out.
    out, _ = sdpa_attention_forward(
        module,
        _to_examples(query, gather),
        _to_examples(key, gather),
        _to_examples(_pad_last(value, qk_dim), gather),
        None,
        **kwargs,
    )
    out = out[..., :v_dim].reshape(-1, heads, v_dim).index_select(0, real)
    return out.reshape(rows, length, heads, v_dim), None


AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_forward)


def use_varlen_attention(model: nn.Module) -> str | None:
    """Switch a packed-batch model from sdpa to the varlen path; return the implementation to restore, or None.

    Only sdpa is replaced: eager keeps its exact numerics for debugging, flash-attn already is varlen.
    """
    current = model.config._attn_implementation
    if current != "sdpa":
        return None
    model.set_attn_implementation(VARLEN_ATTENTION)
    return current


@contextmanager
def varlen_attention(*models: nn.Module | None, enabled: bool = True) -> Iterator[None]:
    """Packed-batch training inside, each model's own attention back outside (generation needs its masks)."""
    switched = [(m, use_varlen_attention(m)) for m in models if m is not None] if enabled else []
    try:
        yield
    finally:
        for model, previous in switched:
            if previous is not None:
                model.set_attn_implementation(previous)
