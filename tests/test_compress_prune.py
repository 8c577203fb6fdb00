"""Magnitude pruning (sparsity, packed bytes on disk, reload, recovery keeps zeros) and MoE expert pruning."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import deepseek_sft.base_model as bm
from deepseek_sft.compress import expert_prune as X
from deepseek_sft.compress import load_compressed
from deepseek_sft.compress import prune as P
from deepseek_sft.compress.storage import pack_sparse, unpack_sparse
from deepseek_sft.compress.trainer import fine_tune
from deepseek_sft.sft_data import build_examples
from test_compress import TINY_MOE, prompt_ids, tasks, tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """(float model, pruned model, targets, saved directory, tokenizer) at 50% layer-wise sparsity."""
    model, tokenizer, _ = tiny_model()
    pmodel, _, _ = tiny_model()
    targets = P.prune_model(pmodel, 0.5, "layer", include_lm_head=True, include_embeddings=False)
    P.make_permanent(targets)
    out = tmp_path_factory.mktemp("p") / "prune"
    P.save_pruned(pmodel, tokenizer, out, [t[2] for t in targets], 0.5, "layer")
    return model, pmodel, targets, out, tokenizer


def test_every_linear_and_expert_tensor_is_half_zero(pruned):
    _, pmodel, targets, _, _ = pruned
    names = {t[2] for t in targets}
    assert "model.layers.1.mlp.experts.gate_up_proj" in names and "lm_head.weight" in names
    assert "model.embed_tokens.weight" not in names and "model.layers.1.mlp.gate.weight" not in names
    params = dict(pmodel.named_parameters())
    for name in names:
        zero_share = float((params[name] == 0).float().mean())
        assert zero_share == pytest.approx(0.5, abs=1e-3), name
    stats = P.sparsity_stats(pmodel, sorted(names))
    assert stats["sparsity_pruned_tensors"] == pytest.approx(0.5, abs=1e-3)
    assert not any(hasattr(m, "weight_mask") for m in pmodel.modules())  # re-parametrisation removed


def test_pruned_checkpoint_is_really_smaller_and_reloads_dense(pruned, tmp_path):
    model, pmodel, targets, out, tokenizer = pruned
    bm.save_base(model, tokenizer, tmp_path / "dense")
    packed = load_file(out / "model.safetensors")
    names = [t[2] for t in targets]
    params = dict(pmodel.named_parameters())
    dense_bytes = sum(params[n].numel() * params[n].element_size() for n in names)
    packed_bytes = sum(
        t.numel() * t.element_size() for k, t in packed.items() if k.rsplit(".sparse_", 1)[0] in names
    )
    assert packed_bytes / dense_bytes < 0.6
    file_ratio = (out / "model.safetensors").stat().st_size / (
        tmp_path / "dense" / "model.safetensors"
    ).stat().st_size
    assert file_ratio < 0.7  # the dense embedding table is the rest
    loaded, _ = load_compressed(out)
    for name, p in pmodel.named_parameters():
        assert torch.equal(dict(loaded.named_parameters())[name], p), name
    ids = prompt_ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, pmodel(ids).logits)


def test_sparse_packing_roundtrip_and_mask_check():
    w = torch.randn(5, 13)
    w[w.abs() < 0.7] = 0
    values, bits = pack_sparse(w)
    assert bits.dtype == torch.uint8 and bits.numel() == (65 + 7) // 8
    assert torch.equal(unpack_sparse(values, bits, [5, 13]), w)
    with pytest.raises(ValueError, match="mask keeps"):
        unpack_sparse(values[:-1], bits, [5, 13])


def test_global_scope_hits_the_overall_target():
    model, _, _ = tiny_model(n_records=30)
    targets = P.prune_model(model, 0.3, "global", include_lm_head=True, include_embeddings=True)
    P.make_permanent(targets)
    stats = P.sparsity_stats(model, [t[2] for t in targets])
    assert stats["sparsity_pruned_tensors"] == pytest.approx(0.3, abs=1e-3)


@pytest.mark.slow
def test_recovery_fine_tune_keeps_pruned_weights_at_zero():
    model, tokenizer, train = tiny_model(n_records=30)
    targets = P.prune_model(model, 0.5, "layer")
    examples, _ = build_examples(train, tasks(), tokenizer, 128)
    before = {t[2]: getattr(t[0], t[1]).detach().clone() for t in targets}
    _, stats = fine_tune(model, tokenizer, examples, max_steps=2, learning_rate=1e-2, batch_size=8, seed=0)
    P.make_permanent(targets)
    assert stats["steps"] == 2
    params = dict(model.named_parameters())
    for name, old in before.items():
        assert torch.equal(params[name][old == 0], torch.zeros_like(params[name][old == 0])), name
        assert not torch.equal(params[name], old), f"{name} did not train"


# --- expert pruning -----------------------------------------------------------------------------------------


def _routing(model, ids):
    """(layer -> top-k expert indices) of every router on one forward pass."""
    seen = {}
    handles = [
        g.register_forward_hook(lambda m, i, o, idx=idx: seen.__setitem__(idx, o[2].clone()))
        for idx, g in X.routers(model).items()
    ]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return seen


def _masked_topk(router, hidden, kept):
    """The original router's choice among the kept experts only (dropped ones can never win)."""
    scores = torch.nn.functional.linear(hidden.view(-1, hidden.shape[-1]), router.weight).sigmoid()
    choice = scores + router.e_score_correction_bias
    dropped = torch.ones(choice.shape[-1], dtype=torch.bool)
    dropped[kept] = False
    return choice.masked_fill(dropped, float("-inf")).topk(router.top_k, dim=-1).indices


def test_expert_pruning_keeps_most_routed_and_routes_only_to_them(tmp_path):
    flat = TINY_MOE.model_copy(update={"n_group": 1, "topk_group": 1})  # plain top-k: exact comparison below
    model, tokenizer, train = tiny_model(flat)
    with torch.no_grad():  # spread the routers so that some experts are clearly busier than others
        for router in X.routers(model).values():
            router.e_score_correction_bias.copy_(torch.tensor([0.3, -0.3, 0.2, -0.2]))
    load = X.measure_router_load(model, tokenizer, train, tasks(), 128, 8)
    assert set(load) == {1, 2} and all(int(c.sum()) > 0 for c in load.values())
    pruned, report = X.prune_experts(model, load, 0.5)
    assert report["kept_experts"] == {"1": [0, 2], "2": [0, 2]}
    pruned.save_pretrained(tmp_path / "ep")
    tokenizer.save_pretrained(tmp_path / "ep")
    loaded, _ = bm.load_model_and_tokenizer(tmp_path / "ep")  # an ordinary checkpoint
    assert loaded.config.n_routed_experts == 2 and loaded.config.num_experts_per_tok == 2
    for idx in (1, 2):
        mlp, old = loaded.model.layers[idx].mlp, model.model.layers[idx].mlp
        assert torch.equal(mlp.experts.gate_up_proj, old.experts.gate_up_proj[[0, 2]])
        assert torch.equal(mlp.gate.e_score_correction_bias, old.gate.e_score_correction_bias[[0, 2]])
    ids = prompt_ids(tokenizer)
    routed = _routing(loaded, ids)
    assert all(int(r.max()) < 2 for r in routed.values())
    # same choice as the original router restricted to the kept experts (kept id k -> original id kept[k])
    captured = {}
    hooks = [
        model.model.layers[i].mlp.register_forward_pre_hook(
            lambda m, a, i=i: captured.__setitem__(i, a[0].clone())
        )
        for i in (1, 2)
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    for idx in (1, 2):
        expected = _masked_topk(model.model.layers[idx].mlp.gate, captured[idx], [0, 2])
        mapped = torch.tensor([0, 2])[routed[idx]]
        assert torch.equal(mapped.sort(dim=-1).values, expected.sort(dim=-1).values)


def test_expert_pruning_without_room_for_groups_routes_over_all_kept():
    model, tokenizer, train = tiny_model(n_records=30)  # 4 experts in 2 groups
    load = X.measure_router_load(model, tokenizer, train, tasks(), 128, 8)
    pruned, report = X.prune_experts(model, load, 0.5)
    assert not report["group_routing_kept"] and (pruned.config.n_group, pruned.config.topk_group) == (1, 1)
    with torch.no_grad():
        logits = pruned(prompt_ids(tokenizer)).logits
    assert torch.isfinite(logits).all()


def test_grouping_and_choice_rules():
    assert X.grouping_after(8, 4, 2, keep=4, top_k=2) is None  # 1 expert per group: V3 scores groups by top-2
    assert X.grouping_after(16, 4, 2, keep=8, top_k=2) == (4, 2)
    assert X.kept_count(8, 2, 0.1) == 2 and X.kept_count(8, 2, 0.5) == 4
    load = torch.tensor([5, 9, 1, 1, 7, 3, 0, 8])
    assert X.choose_experts(load, 4) == [0, 1, 4, 7]
    assert X.choose_experts(load, 4, n_group=2) == [0, 1, 4, 7]
    assert X.choose_experts(torch.tensor([9, 8, 7, 1, 0, 0, 2, 1]), 4, n_group=2) == [0, 1, 4 + 2, 4 + 3]


def test_router_load_ignores_padding():
    model, tokenizer, train = tiny_model(n_records=20)
    examples, _ = build_examples(train[:6], tasks(), tokenizer, 128)
    one_by_one = X.router_load(model, X._batches(examples, 1, tokenizer.pad_token_id))
    batched = X.router_load(model, X._batches(examples, 6, tokenizer.pad_token_id))
    tokens = sum(len(e["input_ids"]) for e in examples)
    for idx in one_by_one:
        assert int(batched[idx].sum()) == int(one_by_one[idx].sum()) == tokens * 2  # top-2 per real token
