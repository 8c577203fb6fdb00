"""Packed-row (varlen) attention: each packed example sees only itself, exactly as if it ran alone."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3ForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from deepseek_sft.train.varlen import (
    VARLEN_ATTENTION,
    packed_layout,
    use_varlen_attention,
    varlen_attention,
    varlen_sdpa_forward,
)
from test_train import v3_config

torch.set_num_threads(2)

LENGTHS = [5, 9, 3, 7]


@pytest.fixture
def v3():
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(v3_config(vocab_size=64, layers=2)).train()


def _packed_row(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(4, 64, (1, sum(lengths)), generator=torch.Generator().manual_seed(3))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids, positions


def _forward_backward(model, ids, positions) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad()
    out = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False)
    out.loss.backward()
    grad = model.model.layers[0].self_attn.kv_b_proj.weight.grad.clone()
    return out.logits.detach(), grad


def test_packed_layout_pads_each_example_on_the_right():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    gather, real = packed_layout(positions)
    # padding slots read the example's own first token
    assert gather.tolist() == [[0, 1, 2, 0], [3, 4, 3, 3], [5, 6, 7, 8]]
    assert real.tolist() == [0, 1, 2, 4, 5, 8, 9, 10, 11]


def test_packed_layout_starts_a_new_example_at_each_row():
    # two rows that do not restart at 0 (a continuation) still never share attention
    gather, real = packed_layout(torch.tensor([[3, 4, 5], [7, 8, 9]]))
    assert gather.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert real.numel() == 6


def test_varlen_matches_each_example_alone_and_the_masked_sdpa_row(v3):
    ids, positions = _packed_row(LENGTHS)
    v3.eval()
    with torch.no_grad():
        alone = torch.cat(
            [v3(input_ids=chunk, use_cache=False).logits[0] for chunk in torch.split(ids, LENGTHS, dim=1)]
        )
    v3.train()
    sdpa_logits, sdpa_grad = _forward_backward(v3, ids, positions)
    assert use_varlen_attention(v3) == "sdpa"
    varlen_logits, varlen_grad = _forward_backward(v3, ids, positions)

    assert torch.allclose(varlen_logits[0], alone, atol=1e-5)
    assert torch.allclose(varlen_logits, sdpa_logits, atol=1e-5)
    assert torch.allclose(varlen_grad, sdpa_grad, atol=1e-5)
    assert varlen_grad.abs().sum() > 0


def test_varlen_leaves_masked_and_cached_calls_to_sdpa(v3):
    """A padding mask or a KV cache (keys longer than queries) is generation, not a packed row: plain sdpa."""
    attn = v3.model.layers[0].self_attn
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])  # would split each row in two if it were used
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    mask[0, :, :, :2] = False
    mask[0, :, :2, :2] = torch.eye(2, dtype=torch.bool)  # left padding attends to itself
    expected, _ = sdpa_attention_forward(attn, q, k, v, mask)
    got, _ = varlen_sdpa_forward(attn, q, k, v, mask, position_ids=positions)
    assert torch.equal(got, expected)

    step = q[:, :, -1:]  # one new token against 6 cached keys
    expected, _ = sdpa_attention_forward(attn, step, k, v, None)
    got, _ = varlen_sdpa_forward(attn, step, k, v, None, position_ids=positions[:, -1:])
    assert torch.equal(got, expected)


def test_varlen_attention_switches_only_sdpa_and_restores_it(v3):
    eager = DeepseekV3ForCausalLM(v3_config(vocab_size=64, layers=2))
    eager.set_attn_implementation("eager")
    with varlen_attention(v3, eager, None):
        assert v3.config._attn_implementation == VARLEN_ATTENTION
        assert eager.config._attn_implementation == "eager"
    assert v3.config._attn_implementation == "sdpa"
    with varlen_attention(v3, enabled=False):
        assert v3.config._attn_implementation == "sdpa"
