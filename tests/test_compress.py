"""Stage compress: int8 quantization (share, reload, size), the compressed checkpoint format, gates, the script.

Also holds the helpers the other test_compress_* files import (a tiny MoE model with a real tokenizer).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import deepseek_sft.base_model as bm
from deepseek_sft.compress import is_compressed, load_compressed
from deepseek_sft.compress import quantize as Q
from deepseek_sft.compress.gates import GateError, check_gate, enforce, headline_f1, relative_loss
from deepseek_sft.compress.storage import CompressedCheckpointError
from deepseek_sft.config import ParamsError, load_section
from deepseek_sft.config.compress import CompressParams, GateParams
from deepseek_sft.config.model import TinyDeepseekParams
from test_evaluate import processed_records

from conftest import REPO, edit_params

torch.set_num_threads(2)

# two MoE layers of 4 experts after a dense one; wide enough that per-channel scales are a small overhead
TINY_MOE = TinyDeepseekParams(
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=4,
    n_group=2,
    topk_group=1,
    num_experts_per_tok=2,
    max_position_embeddings=512,
    tokenizer={"vocab_size": 400, "min_frequency": 2},
)


def tasks():
    """The tasks of params.yaml."""
    return load_section("evaluate").tasks


def tiny_model(params: TinyDeepseekParams = TINY_MOE, seed: int = 0, n_records: int = 60):
    """(model, tokenizer, train records): a randomly initialised tiny DeepSeek-V3 MoE and its BPE tokenizer."""
    train = processed_records(n_records, seed=7)
    model, tokenizer = bm.build_tiny(params, train, tasks(), seed)
    model.generation_config = bm.generation_config_for(tokenizer)
    return model, tokenizer, train


def prompt_ids(tokenizer, text: str = "我想把招商银行的5000元转到工商银行") -> torch.Tensor:
    """One encoded prompt as a batch of 1."""
    return torch.tensor([tokenizer(text)["input_ids"]])


@pytest.fixture(scope="module")
def tiny():
    """A tiny float model, its tokenizer and train records."""
    return tiny_model()


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory):
    """The tiny model quantized (dequant kernel) in memory and saved; (model, plan, directory)."""
    _, tokenizer, _ = tiny
    qmodel, _, _ = tiny_model()
    plan = Q.quantize_model(qmodel, "dequant", embeddings=True)
    out = tmp_path_factory.mktemp("q") / "quantize"
    Q.save_quantized(qmodel, tokenizer, out, plan, "dequant")
    return qmodel, plan, out


def test_quantization_covers_linear_layers_and_fused_experts(tiny, quantized):
    qmodel, plan, _ = quantized
    assert len(plan["experts"]) == 2 and len(plan["embedding"]) == 1
    assert not [n for n, m in qmodel.named_modules() if isinstance(m, nn.Linear)]
    assert not [n for n, m in qmodel.named_modules() if Q.is_fused_experts(m)]
    share = Q.quantized_share(qmodel)
    assert share["quantized_share_non_embedding"] >= 0.95
    # the routed experts are most of an MoE's weights: without them the share would collapse
    experts = sum(
        m.gate_up_proj_int8.numel() + m.down_proj_int8.numel()
        for m in qmodel.modules()
        if isinstance(m, Q.Int8Experts)
    )
    embedding = sum(m.weight_int8.numel() for m in qmodel.modules() if isinstance(m, Q.Int8Embedding))
    assert experts / (share["params_int8"] - embedding) > 0.3
    # routers and norms stay float (routing is sensitive and they are tiny)
    assert qmodel.model.layers[1].mlp.gate.weight.dtype == torch.float32


def test_int8_rows_roundtrip_within_half_a_step():
    w = torch.randn(3, 5, 7)
    q, scale = Q.quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (3, 5)
    err = (Q.dequantize_rows(q, scale) - w).abs()
    assert torch.all(err <= scale.unsqueeze(-1) / 2 + 1e-7)
    assert torch.equal(q.abs().amax(dim=-1), torch.full((3, 5), 127, dtype=torch.int8))


def test_quantized_model_reloads_with_identical_answers(tiny, quantized):
    model, tokenizer, _ = tiny
    qmodel, _, out = quantized
    assert is_compressed(out)
    loaded, loaded_tok = load_compressed(out)
    ids = prompt_ids(tokenizer)
    with torch.no_grad():
        float_logits, q_logits, loaded_logits = model(ids).logits, qmodel(ids).logits, loaded(ids).logits
    assert torch.equal(q_logits, loaded_logits)
    assert (q_logits - float_logits).abs().max() < 0.02 * float_logits.abs().max()
    greedy = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    assert torch.equal(qmodel.generate(ids, **greedy), loaded.generate(ids, **greedy))
    assert loaded_tok.get_vocab() == tokenizer.get_vocab()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 8
    assert config["dsft_compression"]["method"] == "quantize"


def test_quantized_weights_are_about_4x_smaller_on_disk(tiny, quantized, tmp_path):
    model, tokenizer, _ = tiny
    _, _, out = quantized
    bm.save_base(model, tokenizer, tmp_path / "float")
    ratio = (tmp_path / "float" / "model.safetensors").stat().st_size / (
        out / "model.safetensors"
    ).stat().st_size
    assert 3.4 < ratio < 4.0
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.int8, torch.float32}


def test_dynamic_int8_kernel_is_close_to_dequant(tiny, quantized):
    _, tokenizer, _ = tiny
    qmodel, _, out = quantized
    if not Q.dynamic_int8_available():
        pytest.skip("no x86/fbgemm/onednn quantized engine in this torch build")
    fast, _ = load_compressed(out, kernel="dynamic_int8")
    ids = prompt_ids(tokenizer)
    with torch.no_grad():
        exact, approx = qmodel(ids).logits, fast(ids).logits
    # activations are quantized too (per token), so the gap is wider than weight-only: measured 3-6%
    assert (approx - exact).abs().max() < 0.1 * exact.abs().max()


def test_a_tied_table_is_quantized_once_and_shared_by_the_head(tmp_path):
    tied = TINY_MOE.model_copy(update={"tie_word_embeddings": True})
    model, tokenizer, _ = tiny_model(tied, n_records=30)
    reference, _, _ = tiny_model(tied, n_records=30)
    plan = Q.quantize_model(model, "dequant", embeddings=True)
    assert plan["embedding"] == ["model.embed_tokens"] and plan["tied_head"] == ["lm_head"]
    assert model.lm_head.weight_int8 is model.model.embed_tokens.weight_int8
    assert Q.quantized_share(model)["quantized_share_all"] > 0.99  # only norms and routers stay float
    Q.save_quantized(model, tokenizer, tmp_path / "q", plan, "dequant")
    bm.save_base(reference, tokenizer, tmp_path / "float")
    stored = load_file(tmp_path / "q" / "model.safetensors")
    assert "lm_head.weight_int8" not in stored and "model.embed_tokens.weight_int8" in stored  # stored once
    size = (tmp_path / "float" / "model.safetensors").stat().st_size / (
        tmp_path / "q" / "model.safetensors"
    ).stat().st_size
    assert 3.4 < size < 4.0  # float32 -> int8 plus a float32 scale per row (of only 32 values here)
    loaded, _ = load_compressed(tmp_path / "q")
    assert loaded.lm_head.weight_int8 is loaded.model.embed_tokens.weight_int8
    ids = prompt_ids(tokenizer)
    with torch.no_grad():
        q_logits, loaded_logits, float_logits = model(ids).logits, loaded(ids).logits, reference(ids).logits
    assert torch.equal(q_logits, loaded_logits)
    assert (q_logits - float_logits).abs().max() < 0.02 * float_logits.abs().max()


def test_a_tied_table_stays_float_when_embeddings_are_not_quantized(tmp_path):
    model, tokenizer, _ = tiny_model(TINY_MOE.model_copy(update={"tie_word_embeddings": True}), n_records=30)
    plan = Q.quantize_model(model, "dequant", embeddings=False)
    assert plan["embedding"] == [] and plan["tied_head"] == [] and "lm_head" not in plan["linear"]
    Q.save_quantized(model, tokenizer, tmp_path / "q", plan, "dequant")
    loaded, _ = load_compressed(tmp_path / "q")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_load_compressed_names_a_missing_tensor(quantized, tmp_path):
    _, _, out = quantized
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in out.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    state = load_file(broken / "model.safetensors")
    del state["model.layers.1.mlp.experts.down_proj_scale"]
    save_file(state, broken / "model.safetensors")
    with pytest.raises(
        CompressedCheckpointError, match=r"missing \['model.layers.1.mlp.experts.down_proj_scale'\]"
    ):
        load_compressed(broken)


def test_load_compressed_refuses_an_unknown_method_and_a_plain_checkpoint(quantized, tiny, tmp_path):
    _, _, out = quantized
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in out.iterdir():
        (odd / f.name).write_bytes(f.read_bytes())
    config = json.loads((odd / "config.json").read_text())
    config["dsft_compression"]["method"] = "zip"
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompressedCheckpointError, match=r"unknown dsft_compression\.method 'zip'"):
        load_compressed(odd)
    model, tokenizer, _ = tiny
    bm.save_base(model, tokenizer, tmp_path / "plain")
    assert not is_compressed(tmp_path / "plain")
    with pytest.raises(CompressedCheckpointError, match="no 'dsft_compression' entry"):
        load_compressed(tmp_path / "plain")


# --- gates ----------------------------------------------------------------------------------------------------


def _metrics(f1_intent: float, f1_compliance: float, f1_entities: float) -> dict:
    return {
        "intent": {"macro_f1": f1_intent},
        "compliance": {"macro_f1": f1_compliance},
        "entities": {"f1": f1_entities},
    }


def test_headline_f1_and_relative_loss():
    assert headline_f1(_metrics(0.6, 0.9, 0.3), tasks()) == pytest.approx(0.6)
    assert relative_loss(0.5, 0.45) == pytest.approx(0.1)
    assert relative_loss(0.0, 0.0) == 0.0


def test_gate_failure_names_the_measured_numbers():
    comparison = {"f1": 0.45, "f1_sft": 0.5, "relative_f1_loss": 0.1, "size_ratio": 3.1}
    outcome = check_gate("quantize", comparison, GateParams(max_relative_f1_loss=0.02, min_size_ratio=3.5))
    assert not outcome.passed
    assert "relative F1 loss 10.00% (F1 0.4500 vs SFT 0.5000) > allowed 2.00%" in outcome.message
    assert "size ratio 3.10x < required 3.50x" in outcome.message
    with pytest.raises(GateError, match=r"gate failed for quantize: relative F1 loss 10\.00%"):
        enforce([outcome], "error")
    enforce([outcome], "warn")  # warn: logged, not raised
    lenient = check_gate(
        "distill", comparison, GateParams(max_relative_f1_loss=0.02, min_size_ratio=3.5, on_fail="warn")
    )
    enforce([lenient], "error")  # the gate's own on_fail wins over the stage's
    ok = check_gate(
        "quantize",
        comparison | {"relative_f1_loss": 0.01, "size_ratio": 3.9},
        GateParams(max_relative_f1_loss=0.02, min_size_ratio=3.5),
    )
    assert ok.passed and "1.00%" in ok.message


def test_params_defaults_follow_the_guide_and_bad_values_fail():
    params = CompressParams()
    assert params.quantize.gate.max_relative_f1_loss == 0.02
    assert params.prune.gate.max_relative_f1_loss == 0.05 and params.prune.sparsity == 0.5
    assert params.distill.gate.max_relative_f1_loss == 0.08
    with pytest.raises(ValueError, match="sparsity"):
        CompressParams.model_validate({"prune": {"sparsity": "0.5"}})
    with pytest.raises(ValueError, match="twice"):
        CompressParams.model_validate({"methods": ["prune", "prune"]})


def test_params_section_loads_from_params_yaml(params_copy):
    edit_params(params_copy, {"compress.prune.sparsity": 1.5})
    with pytest.raises(ParamsError, match=r"compress\.prune\.sparsity"):
        load_section("compress")


# --- the script -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_script_writes_reports_then_fails_the_gate_with_numbers(tiny, params_copy, tmp_path):
    model, tokenizer, train = tiny
    bm.save_base(model, tokenizer, tmp_path / "sft")
    for split, records in (("train", train), ("test", processed_records(12, seed=3))):
        (tmp_path / f"{split}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        )
    edit_params(
        params_copy,
        {
            "compress.methods": ["quantize", "expert_prune", "head_prune"],
            "compress.head_prune.recovery.max_steps": 0,
            "compress.head_prune.importance_records": 8,
            "compress.speed.new_tokens": 4,
            "compress.speed.repeats": 1,
            "compress.on_fail": "error",
            "compress.quantize.gate.min_size_ratio": 10.0,
            "evaluate.max_new_tokens.extraction": 8,
            "evaluate.efficiency.samples": 2,
            "evaluate.efficiency.decode_tokens": 2,
            "evaluate.baseline.enabled": False,
        },
    )
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "compress.py"),
        "--sft",
        str(tmp_path / "sft"),
        "--train",
        str(tmp_path / "train.jsonl"),
        "--test",
        str(tmp_path / "test.jsonl"),
        "--out",
        str(tmp_path / "compressed"),
        "--reports",
        str(tmp_path / "reports"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "gate failed for quantize: size ratio" in proc.stderr and "< required 10.00x" in proc.stderr
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["quantize_gate_passed"] == 0 and metrics["gates_failed"] >= 1
    assert metrics["quantize_quantized_share_non_embedding"] >= 0.95
    assert 3.4 < metrics["quantize_size_ratio"] < 4.0
    assert metrics["expert_prune_experts_after"] == 2
    assert (metrics["head_prune_heads_before"], metrics["head_prune_heads_after"]) == (2, 1)
    for method in ("quantize", "expert_prune", "head_prune"):  # the side-by-side batch-1 run, every variant
        assert metrics[f"{method}_decode_speedup"] > 0 and metrics[f"{method}_prefill_speedup"] > 0
        assert metrics[f"{method}_peak_rss_mb"] > 50
    for name in (
        "comparison.csv",
        "comparison.md",
        "size_vs_f1.csv",
        "latency_vs_f1.csv",
        "plots/size_vs_f1.png",
        "plots/latency_vs_f1.png",
        "plots/summary.png",
    ):
        assert (tmp_path / "reports" / name).stat().st_size > 0
    assert is_compressed(tmp_path / "compressed" / "quantize")
    assert not is_compressed(tmp_path / "compressed" / "expert_prune")
