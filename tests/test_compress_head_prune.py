"""Stage compress, head_prune: importance scores, physical removal (DeepSeek MLA and Llama grouped KV), reload."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from deepseek_sft.compress import head_prune as H
from test_compress import prompt_ids, tasks, tiny_model

torch.set_num_threads(2)


def tiny_llama(seed: int = 0):
    """A random Llama with 6 query heads in 2 KV groups of 3 (SmolLM2's GQA shape, smaller)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=400,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def silence_heads(model, heads_per_layer: dict[int, list[int]], o_dim: int) -> None:
    """Zero the o_proj columns of the given heads: their output never reaches the residual stream."""
    with torch.no_grad():
        for layer, heads in heads_per_layer.items():
            o_proj = model.model.layers[layer].self_attn.o_proj
            for h in heads:
                o_proj.weight[:, h * o_dim : (h + 1) * o_dim] = 0


def random_batches(vocab: int, n: int = 2):
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (n, 4, 12))
    return [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b} for b in ids]


def test_silenced_mla_heads_score_zero_and_removing_them_keeps_the_logits(tmp_path):
    model, tokenizer, _ = tiny_model()
    layout = H.model_layout(model)
    assert (layout.kind, layout.heads) == ("mla", 2)
    silenced = {0: [1], 1: [0], 2: [1]}
    silence_heads(model, silenced, layout.o_dim)
    importance = H.head_importance(model, random_batches(400))
    for layer, (head,) in silenced.items():
        assert importance[layer, head] == 0.0
        assert importance[layer, 1 - head] > 0.0
    pruned, report = H.prune_heads(model, importance, keep_fraction=0.5)
    assert report["kept_heads"] == {"0": [0], "1": [1], "2": [0]}
    assert pruned.config.num_attention_heads == 1
    attn = pruned.model.layers[0].self_attn
    assert attn.q_b_proj.weight.shape[0] == layout.q_dim and attn.kv_b_proj.weight.shape[0] == layout.kv_dim
    ids = prompt_ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    # an ordinary checkpoint: plain transformers reads it back with the same answers
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_llama_removes_a_whole_kv_group_and_queries_within_groups_consistently(tmp_path):
    model = tiny_llama()
    layout = H.model_layout(model)
    assert (layout.kind, layout.heads, layout.kv_heads) == ("gqa", 6, 2)
    # 6 heads, target 3: 1 group x 3 queries or 3 is not reachable other ways than (1, 3); (2, 1) = 2, (2, 2) = 4
    assert H.grouping(layout, 0.5) == (1, 3)
    assert H.grouping(layout, 0.67) == (2, 2)
    # one silent query head per KV group in each layer: keeping 2 of 3 per group drops exactly those
    silence_heads(model, {0: [2, 5], 1: [0, 4]}, layout.o_dim)
    importance = H.head_importance(model, random_batches(400))
    assert importance[0, [2, 5]].abs().sum() == 0 and importance[1, [0, 4]].abs().sum() == 0
    assert (importance[0, [0, 1, 3, 4]] > 0).all()
    ids = torch.randint(3, 400, (2, 10))
    with torch.no_grad():
        reference = model(ids).logits
    two_thirds, report = H.prune_heads(model, importance, keep_fraction=0.67)
    assert report["kept_heads"] == {"0": [0, 1, 3, 4], "1": [1, 2, 3, 5]}
    attn = two_thirds.model.layers[1].self_attn
    assert attn.q_proj.weight.shape[0] == 4 * 8 and attn.k_proj.weight.shape[0] == 2 * 8
    with torch.no_grad():
        torch.testing.assert_close(two_thirds(ids).logits, reference, rtol=1e-5, atol=1e-5)
    # half: the group whose best three heads matter most is kept whole, the other group's k/v rows go
    half, report = H.prune_heads(model, importance, keep_fraction=0.5)
    group_scores = [float(importance[0, :3].sum()), float(importance[0, 3:].sum())]
    assert report["kept_heads"]["0"] == ([0, 1, 2] if group_scores[0] >= group_scores[1] else [3, 4, 5])
    assert (half.config.num_key_value_heads, half.config.num_attention_heads) == (1, 3)
    assert half.model.layers[0].self_attn.k_proj.weight.shape[0] == 8
    two_thirds.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference, rtol=1e-5, atol=1e-5)


def test_an_unknown_attention_layout_is_refused_by_name():
    model = tiny_llama()
    for layer in model.model.layers:
        del layer.self_attn.k_proj
    with pytest.raises(H.HeadLayoutError, match="q_proj/k_proj/v_proj/o_proj"):
        H.model_layout(model)


def test_importance_batches_score_only_the_answers():
    _, tokenizer, train = tiny_model()
    batches = list(H.importance_batches(train[:5], tasks(), tokenizer, 256, 4))
    assert sum(len(b["input_ids"]) for b in batches) == 5 * len(tasks())
    for b in batches:
        assert ((b["labels"] != -100) <= b["attention_mask"].bool()).all()
        assert (b["labels"] != -100).any(dim=1).all()  # every example has answer tokens to score
