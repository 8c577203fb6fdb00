"""make bench: FLOPs per token, padding fraction, ratios, the shared held-out loss, budget and profile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV3ForCausalLM

from deepseek_sft.base_model import count_parameters
from deepseek_sft.bench.flops import attention_context, flops_per_token, matmul_peak, mfu
from deepseek_sft.bench.heldout import heldout_loss
from deepseek_sft.bench.profile import PartLabels, shares, summarize
from deepseek_sft.bench.report import deepspeed_overhead, derive, flat_metrics, layout_choice, ratios
from deepseek_sft.bench.runs import CountingCollator, batch_layout, budget_examples, padding_fraction
from deepseek_sft.config import ParamsError, load_section
from deepseek_sft.config.bench import parse_layout
from deepseek_sft.sft_data import IGNORE_INDEX, make_collator
from deepseek_sft.tokenizer_build import train_bpe_tokenizer

from conftest import edit_params, tiny_v3_config

torch.set_num_threads(1)


def tiny_config(**overrides):
    """hidden 8, 2 heads (MLA), 2 layers (1 dense + 1 MoE: 4 routed experts, top-2, 1 shared), vocab 10."""
    fields = dict(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        moe_intermediate_size=4,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=4,
        kv_lora_rank=4,
        qk_nope_head_dim=2,
        qk_rope_head_dim=2,
        v_head_dim=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return tiny_v3_config(**(fields | overrides))  # every field given: the hand counts below depend on them


def test_flops_per_token_matches_a_hand_count():
    # attention/layer: q_a 8*4 + q_b 4*(2*4) + kv_a 8*(4+2) + kv_b 4*(2*(2+2)) + o 2*2*8 = 176
    # dense MLP 3*8*16 = 384; MoE layer: (top-2 + 1 shared) * 3*8*4 + router 8*4 = 320; head 8*10 = 80
    flops = flops_per_token(tiny_config(), context=attention_context([3]))
    assert flops["active_matmul_params"] == 2 * 176 + 384 + 320 + 80 == 1136
    # scores: 2 FLOPs x 2 layers x 2 heads x (qk 4 + v 2) x mean causal context (1+2+3)/3 = 2
    assert flops["forward_attention_scores"] == 2 * 2 * 2 * 6 * 2 == 96
    assert flops["forward"] == 2 * 1136 + 96
    assert flops["train"] == 3 * (2 * 1136 + 96) == 7104


def test_flops_weights_are_the_models_active_parameters_minus_lookups_and_norms():
    """Cross-check with the real module: active params (top-k of routed) minus embedding and norm vectors."""
    config = tiny_config(vocab_size=50, hidden_size=16, intermediate_size=32, moe_intermediate_size=8)
    model = DeepseekV3ForCausalLM(config)
    active = count_parameters(model, config)["params_active_per_token"]
    not_matmul = sum(p.numel() for n, p in model.named_parameters() if "norm" in n or "embed_tokens" in n)
    assert flops_per_token(config, context=1.0)["active_matmul_params"] == active - not_matmul


def test_attention_context_is_the_causal_mean():
    assert attention_context([1]) == 1.0
    assert attention_context([4]) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert attention_context([2, 4]) == pytest.approx((3 + 10) / 6)
    assert attention_context([]) == 0.0


def test_matmul_peak_and_mfu():
    peak = matmul_peak(threads=1, size=128, seconds=0.2)
    assert 1e8 < peak < 1e13  # a plausible CPU FLOP/s
    assert torch.get_num_threads() == 1  # restored
    assert mfu(1e6, 2000.0, 4e9) == pytest.approx(0.5)
    assert mfu(1e6, 2000.0, 0.0) == 0.0


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["我想给朋友转账", "我的卡丢了，请帮我挂失", "我想申请一笔消费贷款"] * 5
    return train_bpe_tokenizer(texts, vocab_size=300, min_frequency=1, model_max_length=128)


def test_padding_fraction_of_a_known_batch(tokenizer):
    collate = CountingCollator(make_collator(tokenizer, packing=False))
    features = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE_INDEX] * 3 + [8, 9]},
    ]
    batch = collate(features)
    assert tuple(batch["input_ids"].shape) == (2, 5)
    assert collate.real == 8 and collate.padded == 10 and collate.batch_real == [8]
    assert padding_fraction(collate.real, collate.padded) == pytest.approx(0.2)
    packed = CountingCollator(make_collator(tokenizer, packing=True))
    packed(features)
    assert packed.real == packed.padded == 8 and padding_fraction(packed.real, packed.padded) == 0.0
    assert padding_fraction(0, 0) == 0.0


def _run(name, contender, tokens, seconds, loss=None, processes=1, threads=2, **extra):
    result = {
        "name": name,
        "spec": {"contender": contender, "processes": processes, "threads": threads},
        "window_tokens": tokens,
        "window_seconds": seconds,
        "window_cpu_seconds": seconds * processes,
        "real_tokens": tokens,
        "padded_tokens": tokens * 2,
        "train_seconds": seconds,
        "max_rss_mb": 100.0,
    }
    if loss is not None:
        result |= {"heldout_nll_sum": loss * 1000, "heldout_tokens": 1000}
    return result | extra


def test_ratios_overhead_and_layout_from_a_fake_result_set():
    peaks = {1: 1e10, 2: 2e10}
    raw = {
        "a_ds_2x1": _run("a_ds_2x1", "project", 6000, 1.0, loss=2.50, processes=2, threads=1),
        "a_ds_1x2": _run("a_ds_1x2", "project", 4000, 1.0, loss=2.50),
        "a_plain_1x2": _run("a_plain_1x2", "project", 5000, 1.0, loss=2.50),
        "b": _run("b", "hf", 2000, 1.0, loss=2.60),
        "c": _run("c", "trl", 3000, 2.0, loss=2.40),
    }
    runs = {n: derive(r, 1e6, peaks) for n, r in raw.items()}
    aliases = {
        "a": "a_ds_2x1",
        "b": "b",
        "c": "c",
        "layout_1x2": "a_ds_1x2",
        "layout_2x1": "a_ds_2x1",
        "deepspeed": "a_ds_1x2",
        "plain": "a_plain_1x2",
    }
    assert runs["c"]["tokens_per_second"] == 1500.0
    assert runs["a_ds_2x1"]["mfu"] == pytest.approx(1e6 * 6000 / (2 * 1e10))
    assert runs["b"]["padding_fraction"] == 0.5 and runs["b"]["heldout_loss"] == pytest.approx(2.6)
    r = ratios(runs, aliases)
    assert r["tokens_per_second_a_over_b"] == 3.0
    assert r["tokens_per_second_a_over_c"] == 4.0
    assert r["tokens_per_cpu_second_a_over_b"] == 1.5  # a used 2 processes for its 1 s: 3000 per CPU-second
    assert r["heldout_loss_a_minus_b"] == pytest.approx(-0.1)
    assert r["heldout_loss_a_minus_c"] == pytest.approx(0.1)
    overhead = deepspeed_overhead(runs, aliases)
    assert overhead["overhead_fraction"] == pytest.approx(0.2)
    assert layout_choice(runs, aliases) == {
        "tokens_per_second": {"1x2": 4000.0, "2x1": 6000.0},
        "fastest": "2x1",
    }
    flat = flat_metrics(
        {"runs": runs, "aliases": aliases, "ratios": r, "deepspeed_overhead": overhead, "bench_seconds": 12.0}
    )
    assert flat["a_tokens_per_second"] == 6000.0 and flat["tokens_per_second_a_over_c"] == 4.0
    assert all(isinstance(v, int | float) for v in flat.values())


def test_failed_runs_give_no_ratio():
    runs = {"a": {"name": "a", "error": "exit 1"}, "b": derive(_run("b", "hf", 2000, 1.0), 1e6, {2: 1e10})}
    assert ratios(runs, {"a": "a", "b": "b"})["tokens_per_second_a_over_b"] is None
    assert layout_choice({}, {"layout_1x2": "missing"})["fastest"] is None


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(tiny_config(vocab_size=40, hidden_size=16)).eval()


def test_heldout_loss_equals_a_manual_per_example_computation(tiny_model):
    gen = torch.Generator().manual_seed(1)
    examples = []
    for n_prompt, n_answer in [(5, 2), (3, 4), (8, 1), (2, 2)]:
        ids = torch.randint(3, 40, (n_prompt + n_answer,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:  # one unpadded sequence at a time, full logits
            logits = tiny_model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            targets = torch.tensor(ex["labels"][1:])
            total += F.cross_entropy(logits[:-1], targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((targets != IGNORE_INDEX).sum())
    assert count == 9
    assert heldout_loss(tiny_model, examples, pad_id=0, batch_size=3) == pytest.approx(
        total / count, rel=1e-5
    )
    assert not tiny_model.training


def test_heldout_loss_without_targets_is_nan(tiny_model):
    assert math.isnan(heldout_loss(tiny_model, [{"input_ids": [3, 4], "labels": [IGNORE_INDEX] * 2}], 0))


def test_budget_is_a_seeded_prefix_with_enough_tokens():
    examples = [{"input_ids": [1] * n, "labels": [1] * n, "i": i} for i, n in enumerate([5, 7, 3, 9, 4, 6])]
    chosen = budget_examples(examples, budget_tokens=15, seed=3)
    assert sum(len(e["input_ids"]) for e in chosen) >= 15
    assert sum(len(e["input_ids"]) for e in chosen[:-1]) < 15
    assert chosen == budget_examples(examples, budget_tokens=15, seed=3)
    with pytest.raises(ValueError, match="holds only 34 tokens"):
        budget_examples(examples, budget_tokens=100, seed=3)


def test_batch_layout_keeps_the_global_batch():
    assert batch_layout(32, 16, 2) == (16, 1)
    assert batch_layout(32, 16, 1) == (16, 2)
    assert batch_layout(24, 16, 2) == (12, 1)
    with pytest.raises(ValueError, match="not divisible"):
        batch_layout(33, 16, 2)


def test_layouts_are_validated(params_copy):
    assert parse_layout("2x1") == (2, 1)
    with pytest.raises(ValueError, match="PROCESSESxTHREADS"):
        parse_layout("2 by 1")
    edit_params(params_copy, {"bench.layouts": ["1x2", "two"]})
    with pytest.raises(ParamsError, match=r"bench\.layouts"):
        load_section("bench")
    edit_params(params_copy, {"bench.layouts": ["1x2"], "bench.budget_tokens": "4e4"})
    with pytest.raises(ParamsError, match=r"bench\.budget_tokens"):
        load_section("bench")


def test_profile_attributes_forward_and_backward_to_model_parts(tiny_model):
    from torch.profiler import ProfilerActivity, profile, schedule

    model = DeepseekV3ForCausalLM(tiny_config(vocab_size=40, hidden_size=16)).train()
    labels = PartLabels(model)
    ids = torch.randint(3, 40, (2, 12))
    with profile(
        activities=[ProfilerActivity.CPU], schedule=schedule(wait=0, warmup=1, active=2), acc_events=True
    ) as prof:
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            prof.step()
    labels.remove()
    ms = summarize(prof.events())
    for part in ("attention", "experts_routed", "experts_shared", "router", "mlp_dense", "embedding"):
        assert ms[f"forward/{part}"] > 0, part
    for part in ("attention", "experts_routed", "mlp_dense", "head_loss"):
        assert ms[f"backward/{part}"] > 0, part
    parts = sum(v for k, v in ms.items() if k != "step_total")
    assert parts == pytest.approx(ms["step_total"], rel=0.02)
    assert sum(shares(ms).values()) == pytest.approx(1.0, abs=0.01)
