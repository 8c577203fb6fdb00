"""Stage train, model-level pieces: MoE routers, balance loss, expert load, preflight, unfreezing, LoRA."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, LlamaForCausalLM

from deepseek_sft.config.train import LoraParams, UnfreezeParams
from deepseek_sft.train.lora import apply_lora, present_targets
from deepseek_sft.train.moe import (
    RouterMonitor,
    balance_metrics,
    find_routers,
    freeze_routers,
    moe_block_classes,
    router_parameter_names,
)
from deepseek_sft.train.preflight import Intent, PreflightError, group_of, parameter_table, preflight
from deepseek_sft.train.unfreeze import ProgressiveUnfreeze, frozen_units, last_stage, stage_at, unit_of
from test_train import llama_config, v3_config

torch.set_num_threads(2)

ALL_TRAIN = Intent(lambda name, group: "train")


@pytest.fixture
def v3():
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(v3_config(vocab_size=64, layers=3)).train()


def _tokens(vocab: int = 64, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def test_find_routers_only_moe_gates(v3):
    routers = find_routers(v3)
    assert [r.name for r in routers] == ["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"]
    assert {(r.layer, r.num_experts, r.top_k, r.sigmoid) for r in routers} == {
        (1, 4, 2, True),
        (2, 4, 2, True),
    }
    assert [c.__name__ for c in moe_block_classes(v3)] == ["DeepseekV3MoE"]
    assert find_routers(LlamaForCausalLM(llama_config(64))) == []


def test_freeze_router_freezes_gate_weight_not_gate_proj(v3):
    assert freeze_routers(v3) == 2
    frozen = {n for n, p in v3.named_parameters() if not p.requires_grad}
    assert frozen == {"model.layers.1.mlp.gate.weight", "model.layers.2.mlp.gate.weight"}
    # dense layer 0 and the shared experts keep their gate_proj trainable
    assert v3.get_parameter("model.layers.0.mlp.gate_proj.weight").requires_grad
    assert v3.get_parameter("model.layers.1.mlp.shared_experts.gate_proj.weight").requires_grad


def test_balance_loss_nonzero_with_gradient_to_router(v3):
    monitor = RouterMonitor.attach(v3)
    monitor.begin(None)
    out = v3(input_ids=_tokens(), use_cache=False)
    monitor.end()
    aux = monitor.balance_loss()
    assert (
        aux is not None and float(aux.detach()) > 0.5
    )  # 1.0 = perfectly balanced; a collapsed router gives up to E
    (out.logits.mean() * 0 + aux).backward()
    gate = v3.get_parameter("model.layers.1.mlp.gate.weight")
    assert gate.grad is not None and float(gate.grad.abs().sum()) > 0
    # captured only while active: another forward outside begin/end adds nothing
    v3(input_ids=_tokens(), use_cache=False)
    assert len(monitor.captures) == 2


def test_balance_loss_is_minimal_when_balanced():
    router = types.SimpleNamespace(num_experts=4, top_k=1, sigmoid=False)
    monitor = RouterMonitor(routers=[router])
    logits = torch.zeros(8, 4)  # uniform probabilities ...
    indices = torch.arange(8).remainder(4).unsqueeze(1)  # ... and every expert gets 2 tokens
    monitor.captures = [types.SimpleNamespace(router=router, logits=logits, indices=indices)]
    assert float(monitor.balance_loss()) == pytest.approx(1.0)
    collapsed = torch.full((8, 1), 0)
    monitor.captures = [
        types.SimpleNamespace(router=router, logits=torch.tensor([[9.0, 0, 0, 0]] * 8), indices=collapsed)
    ]
    assert float(monitor.balance_loss()) > 3.5


def test_expert_load_counts_skip_padding(v3):
    monitor = RouterMonitor.attach(v3)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 6:] = 0  # 6 padding positions
    monitor.begin(mask)
    v3(input_ids=_tokens(), attention_mask=mask, use_cache=False)
    monitor.end()
    monitor.count_load()
    # 18 real tokens x top-2 = 36 routed slots per MoE layer
    assert {layer: int(c.sum()) for layer, c in monitor.counts.items()} == {1: 36, 2: 36}
    metrics = monitor.flush(step=5)
    assert set(metrics) == {f"moe/layer_{i}/{k}" for i in (1, 2) for k in ("max_load", "dead_experts")}
    assert len(monitor.history) == 8 and monitor.history[0][0] == 5
    assert balance_metrics(torch.tensor([10, 0, 0, 0]), "x") == {"x/max_load": 4.0, "x/dead_experts": 3}


def test_v2_router_scores_with_softmax():
    config = DeepseekV2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
    )
    model = DeepseekV2ForCausalLM(config)
    (router,) = find_routers(model)
    assert (router.layer, router.sigmoid) == (1, False)
    assert router_parameter_names(model) == {"model.layers.1.mlp.gate.weight"}


def test_parameter_groups_of_deepseek_v3(v3):
    routers = router_parameter_names(v3)
    groups = {name: group_of(name, routers) for name, _ in v3.named_parameters()}
    assert groups["model.embed_tokens.weight"] == "embeddings"
    assert groups["lm_head.weight"] == "head"
    assert groups["model.layers.1.mlp.gate.weight"] == "router"
    assert groups["model.layers.1.mlp.experts.gate_up_proj"] == "routed_experts"
    assert groups["model.layers.1.mlp.shared_experts.down_proj.weight"] == "shared_experts"
    assert groups["model.layers.0.mlp.gate_proj.weight"] == "dense_mlp"
    assert groups["model.layers.0.self_attn.kv_a_layernorm.weight"] == "norms"
    assert groups["model.layers.0.self_attn.kv_b_proj.weight"] == "attention"
    assert "other" not in groups.values()


def test_preflight_fails_when_a_group_meant_to_train_is_frozen(v3):
    rows = preflight(v3, ALL_TRAIN)
    assert all(r["ok"] for r in rows) and sum(r["params"] for r in rows) == sum(
        p.numel() for p in v3.parameters()
    )
    for name, param in v3.named_parameters():
        if "self_attn" in name and "norm" not in name:
            param.requires_grad_(False)
    with pytest.raises(PreflightError, match=r"attention: model\.layers\.0\.self_attn"):
        preflight(v3, ALL_TRAIN)


def test_preflight_fails_when_router_meant_frozen_is_trainable(v3):
    intent = Intent(lambda name, group: "frozen" if group == "router" else "train")
    with pytest.raises(PreflightError, match=r"router: .* trainable but meant to stay frozen"):
        preflight(v3, intent)
    freeze_routers(v3)
    rows = {r["group"]: r for r in parameter_table(v3, intent)}
    assert (
        rows["router"]["frozen"] == 2 * 4 * 32 and rows["router"]["trainable"] == 0 and rows["router"]["ok"]
    )


def test_unfreeze_schedule_units():
    p = UnfreezeParams(enabled=True, initial_layers=1, layers_per_stage=1, every=10, unit="steps")
    assert frozen_units(p, 3, 0) == {"layer_0", "layer_1", "embeddings"}
    assert frozen_units(p, 3, 1) == {"layer_0", "embeddings"}
    assert frozen_units(p, 3, 2) == set()
    assert last_stage(p, 3) == 2
    assert [stage_at(p, s, 0.0) for s in (0, 9, 10, 25)] == [0, 0, 1, 2]
    by_epoch = UnfreezeParams(enabled=True, every=1, unit="epochs")
    assert stage_at(by_epoch, 500, 0.999999999) == 1 and stage_at(by_epoch, 500, 0.5) == 0
    keep_embed = UnfreezeParams(enabled=True, initial_layers=3, embeddings_with_last_stage=False)
    assert frozen_units(keep_embed, 3, 0) == {"embeddings"}
    assert unit_of("model.layers.2.mlp.gate.weight") == "layer_2" and unit_of("lm_head.weight") == "rest"


def test_unfreeze_callback_flips_requires_grad_at_the_scheduled_step(v3):
    p = UnfreezeParams(enabled=True, initial_layers=1, layers_per_stage=1, every=3, unit="steps")
    trainable = {n for n, _ in v3.named_parameters()}
    callback = ProgressiveUnfreeze(v3, p, 3, trainable)
    optimizer = torch.optim.AdamW(
        [
            {
                "params": [v3.get_parameter("model.layers.0.mlp.gate_proj.weight")],
                "unit": "layer_0",
                "weight_decay": 0.1,
                "initial_weight_decay": 0.1,
            }
        ]
    )
    layer0 = v3.get_parameter("model.layers.0.self_attn.o_proj.weight")
    layer1 = v3.get_parameter("model.layers.1.self_attn.o_proj.weight")
    top = v3.get_parameter("model.layers.2.self_attn.o_proj.weight")
    state = types.SimpleNamespace(global_step=0, epoch=0.0)
    callback.on_train_begin(None, state, None, optimizer=optimizer)
    assert (layer0.requires_grad, layer1.requires_grad, top.requires_grad) == (False, False, True)
    assert not v3.get_parameter("model.embed_tokens.weight").requires_grad
    assert (
        v3.get_parameter("lm_head.weight").requires_grad and optimizer.param_groups[0]["weight_decay"] == 0.0
    )
    flips = []
    for step in range(1, 8):
        state.global_step = step
        callback.on_step_begin(None, state, None, optimizer=optimizer)
        flips.append((layer0.requires_grad, layer1.requires_grad))
    # step 3 -> stage 1 (layer 1 joins), step 6 -> stage 2 (layer 0 and the embeddings join)
    assert flips == [(False, False)] * 2 + [(False, True)] * 3 + [(True, True)] * 2
    assert v3.get_parameter("model.embed_tokens.weight").requires_grad
    assert optimizer.param_groups[0]["weight_decay"] == 0.1
    assert [(s, stage) for s, stage, _ in callback.events] == [(0, 0), (3, 1), (6, 2)]


def test_lora_reaches_fused_expert_parameters_and_merges(v3):
    torch.manual_seed(0)
    experts_before = v3.get_parameter("model.layers.1.mlp.experts.gate_up_proj").detach().clone()
    params = LoraParams(enabled=True, r=4, alpha=8)
    modules, parameters = present_targets(v3, params)
    assert "gate" not in modules and "kv_b_proj" in modules and "q_proj" in modules
    assert parameters == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    peft_model = apply_lora(v3, params)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trainable)
    expert_lora = [n for n in trainable if ".mlp.experts." in n]
    assert len(expert_lora) == 2 * 2 * 2  # 2 MoE layers x (gate_up_proj, down_proj) x (A, B)
    assert not any(".mlp.gate." in n for n in trainable)
    x = _tokens()
    peft_model(input_ids=x, labels=x).loss.backward()
    assert all(peft_model.get_parameter(n).grad is not None for n in expert_lora if "lora_B" in n)
    with torch.no_grad():
        for name in trainable:
            if "lora_B" in name:
                peft_model.get_parameter(name).normal_(0, 0.05)
        expected = peft_model(input_ids=x).logits
    merged = peft_model.merge_and_unload()
    assert isinstance(merged, DeepseekV3ForCausalLM)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, expected, atol=1e-5)
    # the merged expert tensors carry the adapter's update
    assert not torch.equal(merged.get_parameter("model.layers.1.mlp.experts.gate_up_proj"), experts_before)
