"""Stage compress: every variant directory loads with plain transformers and matches the project's loader, or
plain transformers refuses it with a message that says how to load it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import deepseek_sft.base_model as bm
from deepseek_sft.compress import expert_prune as X
from deepseek_sft.compress import head_prune as H
from deepseek_sft.compress import prune as P
from deepseek_sft.compress import quantize as Q
from deepseek_sft.compress.gates import check_gate
from deepseek_sft.compress.storage import save_plain
from deepseek_sft.config.compress import CompressParams
from test_compress import prompt_ids, tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def sft():
    """The tiny model standing in for the SFT model, with a prompt."""
    model, tokenizer, _ = tiny_model()
    return model, tokenizer, prompt_ids(tokenizer)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def plain_logits(path, ids):
    """Logits of `path` loaded with nothing but transformers."""
    return logits(AutoModelForCausalLM.from_pretrained(path).eval(), ids)


def project_logits(path, ids):
    return logits(bm.load_model_and_tokenizer(path)[0], ids)


def test_int8_is_refused_by_plain_transformers_with_how_to_load_it(sft, tmp_path):
    model, tokenizer, ids = sft
    qmodel, _, _ = tiny_model()
    plan = Q.quantize_model(qmodel)  # the default kernel: the int8 GEMM
    Q.save_quantized(qmodel, tokenizer, tmp_path / "quantize", plan, "dynamic_int8")
    with pytest.raises(ValueError, match=r"load_compressed\(dir\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "quantize")
    loaded = project_logits(tmp_path / "quantize", ids)
    torch.testing.assert_close(loaded, logits(qmodel, ids))
    assert (loaded - logits(model, ids)).abs().max() < 0.1  # int8 weights and activations: close to float


def test_pruned_packed_dir_names_its_dense_copy_which_plain_transformers_reads(sft, tmp_path):
    _, tokenizer, ids = sft
    model, _, _ = tiny_model()
    targets = P.prune_model(model, 0.5)
    P.make_permanent(targets)
    P.save_pruned(model, tokenizer, tmp_path / "prune", [n for _, _, n in targets], 0.5, "layer")
    with pytest.raises(ValueError, match=r"dense copy .*prune_dense"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "prune")
    expected = logits(model, ids)
    torch.testing.assert_close(project_logits(tmp_path / "prune", ids), expected)
    torch.testing.assert_close(plain_logits(tmp_path / "prune_dense", ids), expected)
    packed = (tmp_path / "prune" / "model.safetensors").stat().st_size
    assert packed < 0.75 * (tmp_path / "prune_dense" / "model.safetensors").stat().st_size


def test_expert_and_head_pruned_variants_are_ordinary_checkpoints(sft, tmp_path):
    model, tokenizer, ids = sft
    load = {layer: torch.arange(r.weight.shape[0]) for layer, r in X.routers(model).items()}
    experts, report = X.prune_experts(model, load, 0.5)
    save_plain(experts, tokenizer, tmp_path / "expert_prune", {"dsft_expert_pruning": report})
    importance = torch.rand(model.config.num_hidden_layers, model.config.num_attention_heads)
    heads, report = H.prune_heads(model, importance, 0.5)
    save_plain(heads, tokenizer, tmp_path / "head_prune", {"dsft_head_pruning": report})
    for name, variant in (("expert_prune", experts), ("head_prune", heads)):
        plain = plain_logits(tmp_path / name, ids)
        torch.testing.assert_close(plain, project_logits(tmp_path / name, ids))
        torch.testing.assert_close(plain, logits(variant, ids))


def test_head_prune_gate_fails_past_five_percent():
    gate = CompressParams().head_prune.gate
    comparison = {"relative_f1_loss": 0.06, "f1": 0.80, "f1_sft": 0.851, "size_ratio": 1.1}
    outcome = check_gate("head_prune", comparison, gate)
    assert not outcome.passed and "relative F1 loss 6.00%" in outcome.message and "5.00%" in outcome.message
    assert check_gate("head_prune", comparison | {"relative_f1_loss": 0.04}, gate).passed
