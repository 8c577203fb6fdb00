"""Packed-row training speed: varlen attention (each packed example sees only itself, exactly as if it ran
alone) and the sampler that gives every process the same tokens per step."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data import RandomSampler
from transformers import DeepseekV3ForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.trainer_pt_utils import BatchRebalanceSampler

from deepseek_sft.sft_data import make_collator
from deepseek_sft.train.trainer import PackedRebalanceSampler, SFTTrainer
from deepseek_sft.train.varlen import (
    VARLEN_ATTENTION,
    example_lengths,
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


def test_example_lengths_split_a_row_where_positions_restart():
    assert example_lengths(torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 3])) == [3, 2, 4]
    # a row that does not start at 0 (it continues an example) still never shares attention with the row before
    assert example_lengths(torch.tensor([3, 4, 0, 1])) == [2, 2]
    assert example_lengths(torch.tensor([7, 8, 9])) == [3]


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


def _word_tokenizer():
    """A tokenizer with a pad token, for collators over hand-made token ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1}, "[UNK]"))
    )
    tokenizer.pad_token = "[PAD]"
    return tokenizer


def _rank_tokens(sampler_cls, lengths, world: int, batch: int) -> list[list[int]]:
    """Tokens each rank gets per optimizer step, and a check that every example is used exactly once."""
    per_rank = []
    seen = []
    for rank in range(world):
        sampler = sampler_cls(
            lengths=lengths,
            effective_batch_size=world * batch,
            dp_size=world,
            grad_accum=1,
            seed=7,
            rank=rank,
        )
        batches = list(sampler)
        seen += [i for b in batches for i in b]
        per_rank.append([sum(lengths[i] for i in b) for b in batches])
    assert sorted(seen) == list(range(len(lengths)))
    return per_rank


def test_packed_rebalance_gives_each_process_the_same_tokens():
    lengths = torch.randint(20, 170, (32 * 40,), generator=torch.Generator().manual_seed(0)).tolist()
    spread = {}
    for cls in (BatchRebalanceSampler, PackedRebalanceSampler):
        rank0, rank1 = _rank_tokens(cls, lengths, world=2, batch=16)
        spread[cls] = sum(abs(a - b) / (a + b) for a, b in zip(rank0, rank1, strict=True)) / len(rank0)
    # the padded cost model (examples x longest) balances the wrong quantity for packed rows
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(1)).tolist()
    halves = [
        (sum(lengths[i] for i in order[k : k + 16]), sum(lengths[i] for i in order[k + 16 : k + 32]))
        for k in range(0, len(order), 32)
    ]
    spread["random"] = sum(abs(a - b) / (a + b) for a, b in halves) / len(halves)
    assert spread[PackedRebalanceSampler] < 0.005
    assert spread[PackedRebalanceSampler] < spread["random"] / 10
    assert spread["random"] < spread[BatchRebalanceSampler]


def test_sft_trainer_rebalances_packed_batches_by_tokens_and_one_group_not_at_all(v3, tmp_path):
    from transformers import TrainingArguments

    tokenizer = _word_tokenizer()
    examples = [{"input_ids": [5] * n, "labels": [5] * n} for n in (4, 9, 6, 3)]

    def sampler(packing: bool, accumulation: int):
        args = TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=accumulation,
            train_sampling_strategy="batch_rebalance",
            report_to="none",
            use_cpu=True,
        )
        collator = make_collator(tokenizer, packing=packing)
        return SFTTrainer(
            model=v3, args=args, train_dataset=examples, data_collator=collator
        )._get_train_sampler()

    # two micro-batches per step (here: accumulation; across processes alike) are balanced
    assert type(sampler(packing=True, accumulation=2)) is PackedRebalanceSampler
    assert type(sampler(packing=False, accumulation=2)) is BatchRebalanceSampler
    # one micro-batch per step has nothing to balance: the plain shuffle
    assert type(sampler(packing=True, accumulation=1)) is RandomSampler


def test_training_runs_packed_rows_through_varlen_and_restores_sdpa(v3):
    """The train stage's preparation and the compress stage's short runs both train on the varlen path."""
    from transformers import TrainerCallback

    from deepseek_sft.compress.trainer import fine_tune
    from deepseek_sft.config import load_section
    from deepseek_sft.train.runner import prepare_model

    stage = load_section("train")
    assert prepare_model(v3, stage, None).attention == "sdpa"
    assert v3.config._attn_implementation == VARLEN_ATTENTION
    v3.set_attn_implementation("sdpa")
    unpacked = dataclasses.replace(stage, section=stage.section.model_copy(update={"packing": False}))
    assert prepare_model(v3, unpacked, None).attention is None
    assert v3.config._attn_implementation == "sdpa"

    seen = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.append(model.config._attn_implementation)

    tokenizer = _word_tokenizer()
    examples = [
        {"input_ids": [5 + i % 7] * n, "labels": [5 + i % 7] * n} for i, n in enumerate((4, 9, 6, 3) * 2)
    ]
    fine_tune(
        v3, tokenizer, examples, max_steps=2, learning_rate=1e-3, batch_size=4, seed=0, callbacks=[Watch()]
    )
    assert seen == [VARLEN_ATTENTION, VARLEN_ATTENTION]
    assert v3.config._attn_implementation == "sdpa"


def test_varlen_splits_each_row_of_a_batch_on_its_own(v3):
    """Two packed rows with different example boundaries: the same logits as sdpa's per-row block masks."""
    ids = torch.randint(4, 64, (2, 10), generator=torch.Generator().manual_seed(9))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]])
    v3.eval()
    with torch.no_grad():
        expected = v3(input_ids=ids, position_ids=positions, use_cache=False).logits
        with varlen_attention(v3):
            got = v3(input_ids=ids, position_ids=positions, use_cache=False).logits
    assert torch.allclose(got, expected, atol=1e-5)
