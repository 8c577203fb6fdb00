"""Attention-head reduction: score every head on train data, physically remove the least important ones.

Importance (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"): a gate g_h = 1 multiplies each
head's output where the heads are concatenated (the input of `o_proj`); a head's importance is the expected
|dL/dg_h| of the completion-only SFT loss over train examples, i.e. how much the loss moves when the head is
masked a little. A head whose output never reaches `o_proj` scores exactly 0.

Every layer keeps the same number of heads (transformers' configs hold one `num_attention_heads` for all
layers, so only that stays loadable with plain `from_pretrained`); which heads differ per layer. Layouts:
- DeepSeek MLA (`q_b_proj` or `q_proj`, `kv_b_proj`, `o_proj`): the key/value latent is shared, so any query
  heads can go; a head's rows of `q_b_proj`/`q_proj` (qk_head_dim) and of `kv_b_proj` (qk_nope + v dims) and its
  `o_proj` columns (v_head_dim) are removed.
- Llama-style grouped KV (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `num_key_value_heads`): every kept KV group
  keeps the same number of query heads (transformers repeats each KV head num_heads / num_kv_heads times). The
  (groups kept, queries per group) pair whose product is nearest the target is used, so whole groups (their
  k/v rows) and queries within groups both go; groups are ranked by the summed importance of their best heads.
Other layouts are refused with a message naming the modules found.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights

from ..config.data import TaskSpec
from ..sft_data import build_examples

log = logging.getLogger(__name__)


class HeadLayoutError(ValueError):
    """The attention layout has no known per-head structure to shrink."""


@dataclass(frozen=True)
class Layout:
    """Per-head geometry of one model's attention."""

    kind: str  # "mla" | "gqa"
    heads: int
    kv_heads: int
    q_dim: int  # rows of the query projection per head
    o_dim: int  # o_proj input columns per head
    kv_dim: int  # rows per head (mla: of kv_b_proj) or per KV head (gqa: of k_proj and v_proj)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The `self_attn` module of every decoder layer."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise HeadLayoutError(f"{type(model).__name__}: no model.layers; head pruning needs a decoder stack")
    return [layer.self_attn for layer in layers]


def model_layout(model: nn.Module) -> Layout:
    """The layout of `model`'s attention (see module doc), or HeadLayoutError."""
    config, attn = model.config, attention_modules(model)[0]
    heads = config.num_attention_heads
    if hasattr(attn, "kv_b_proj"):
        qk = config.qk_nope_head_dim + config.qk_rope_head_dim
        return Layout("mla", heads, heads, qk, config.v_head_dim, config.qk_nope_head_dim + config.v_head_dim)
    if all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return Layout("gqa", heads, kv_heads, head_dim, head_dim, head_dim)
    found = sorted(n for n, m in attn.named_children() if isinstance(m, nn.Linear))
    raise HeadLayoutError(
        f"{type(attn).__name__}: attention with linear layers {found}; head pruning knows DeepSeek MLA "
        "(q_b_proj/q_proj, kv_b_proj, o_proj) and q_proj/k_proj/v_proj/o_proj with grouped KV heads"
    )


def _gate_hook(gate: torch.Tensor, heads: int):
    def hook(_module, args):
        x = args[0]
        shaped = x.view(*x.shape[:-1], heads, x.shape[-1] // heads) * gate.to(x.dtype).unsqueeze(-1)
        return (shaped.view_as(x), *args[1:])

    return hook


def head_importance(model: nn.Module, batches, layout: Layout | None = None) -> torch.Tensor:
    """[layers, heads] expected |dL/dg| over `batches` (dicts of input_ids, attention_mask, labels)."""
    layout = layout or model_layout(model)
    attns = attention_modules(model)
    gates = torch.ones(len(attns), layout.heads, requires_grad=True)
    handles = [
        a.o_proj.register_forward_pre_hook(_gate_hook(gates[i], layout.heads)) for i, a in enumerate(attns)
    ]
    total, count = torch.zeros(len(attns), layout.heads), 0
    was_training = model.training
    model.eval()  # no dropout: the sensitivity of the model that is deployed
    try:
        for batch in batches:
            loss = model(**batch, use_cache=False).loss
            (grad,) = torch.autograd.grad(loss, gates)
            total += grad.abs()
            count += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not count:
        raise ValueError("head importance: no batches (no train examples to score the heads on)")
    return total / count


def grouping(layout: Layout, keep_fraction: float) -> tuple[int, int]:
    """(KV groups kept, query heads kept per group): the product nearest keep_fraction * heads (ties: more)."""
    target = keep_fraction * layout.heads
    per_group = layout.heads // layout.kv_heads
    if layout.kind == "mla":
        return layout.heads, max(1, round(target))  # one shared latent: "groups" are not a constraint
    options = [(g, q) for g in range(1, layout.kv_heads + 1) for q in range(1, per_group + 1)]
    return min(options, key=lambda gq: (abs(gq[0] * gq[1] - target), -gq[0] * gq[1], -gq[0]))


def choose_heads(importance: torch.Tensor, layout: Layout, keep_fraction: float) -> list[list[int]]:
    """Per layer, the kept query heads (ascending), the same count in every layer."""
    groups, per_group = grouping(layout, keep_fraction)
    kept = []
    for scores in importance:
        if layout.kind == "mla":
            order = sorted(range(layout.heads), key=lambda h: (-float(scores[h]), h))
            kept.append(sorted(order[:per_group]))
            continue
        size = layout.heads // layout.kv_heads
        best = []  # per KV group: its best `per_group` heads and their summed importance
        for g in range(layout.kv_heads):
            members = sorted(range(g * size, (g + 1) * size), key=lambda h: (-float(scores[h]), h))[
                :per_group
            ]
            best.append((sum(float(scores[h]) for h in members), g, sorted(members)))
        chosen = sorted(sorted(best, key=lambda b: (-b[0], b[1]))[:groups], key=lambda b: b[1])
        kept.append([h for _, _, members in chosen for h in members])
    return kept


def _rows(per_head: int, heads: list[int]) -> torch.Tensor:
    return torch.tensor([h * per_head + i for h in heads for i in range(per_head)], dtype=torch.long)


def _shrink(state: dict, key: str, index: torch.Tensor, dim: int) -> None:
    if key in state:
        state[key] = state[key].index_select(dim, index).clone()


def sliced_state(model: nn.Module, layout: Layout, kept: list[list[int]]) -> dict[str, torch.Tensor]:
    """The state dict with every attention's projections reduced to its kept heads."""
    state = model.state_dict()
    size = layout.heads // layout.kv_heads
    for idx, heads in enumerate(kept):
        p = f"model.layers.{idx}.self_attn."
        q_rows, o_cols = _rows(layout.q_dim, heads), _rows(layout.o_dim, heads)
        for name in ("q_b_proj", "q_proj"):
            _shrink(state, f"{p}{name}.weight", q_rows, 0)
            _shrink(state, f"{p}{name}.bias", q_rows, 0)
        _shrink(state, f"{p}o_proj.weight", o_cols, 1)
        if layout.kind == "mla":
            _shrink(state, f"{p}kv_b_proj.weight", _rows(layout.kv_dim, heads), 0)
            continue
        kv_rows = _rows(layout.kv_dim, sorted({h // size for h in heads}))
        for name in ("k_proj", "v_proj"):
            _shrink(state, f"{p}{name}.weight", kv_rows, 0)
            _shrink(state, f"{p}{name}.bias", kv_rows, 0)
    return state


def pruned_config(config, layout: Layout, kept: list[list[int]]):
    """A copy of `config` with the kept head counts (head sizes pinned, since some configs derive them)."""
    new = config.__class__.from_dict(config.to_dict())
    heads = len(kept[0])
    new.num_attention_heads = heads
    if layout.kind == "mla":
        new.num_key_value_heads = heads  # MLA expands the latent to one key/value per query head
    else:
        new.num_key_value_heads = len({h // (layout.heads // layout.kv_heads) for h in kept[0]})
        new.head_dim = layout.q_dim
    return new


def prune_heads(model: nn.Module, importance: torch.Tensor, keep_fraction: float) -> tuple[nn.Module, dict]:
    """A new model with each layer's most important heads only, and a report of what was kept."""
    layout = model_layout(model)
    kept = choose_heads(importance, layout, keep_fraction)
    config = pruned_config(model.config, layout, kept)
    with no_init_weights():
        pruned = AutoModelForCausalLM.from_config(
            config, dtype=model.dtype, attn_implementation=model.config._attn_implementation
        )
    pruned.tie_weights()  # no_init_weights skips tying
    pruned.load_state_dict(sliced_state(model, layout, kept), strict=True)
    pruned.generation_config = model.generation_config
    total = importance.sum(dim=1).clamp(min=1e-30)
    kept_share = [float(importance[i, heads].sum() / total[i]) for i, heads in enumerate(kept)]
    report = {
        "layout": layout.kind,
        "heads_before": layout.heads,
        "heads_after": config.num_attention_heads,
        "kv_heads_before": layout.kv_heads,
        "kv_heads_after": config.num_key_value_heads,
        "kept_heads": {str(i): heads for i, heads in enumerate(kept)},
        "importance": [[round(float(v), 8) for v in row] for row in importance],
        "kept_importance_share": kept_share,
    }
    return pruned.eval(), report


def importance_batches(
    records: list[dict], tasks: dict[str, TaskSpec], tokenizer, max_length: int, batch_size: int
):
    """Padded (input_ids, attention_mask, labels) batches of the SFT examples of `records` (loss on answers)."""
    examples, _ = build_examples(records, tasks, tokenizer, max_length, "truncate")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[row, :n], mask[row, :n] = torch.tensor(e["input_ids"]), 1
            labels[row, :n] = torch.tensor(e["labels"])
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}
