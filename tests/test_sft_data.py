"""SFT examples: prompt masking, EOS, truncation modes, collators, and packed == padded for DeepseekV3."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV3ForCausalLM

from deepseek_sft.base_model import tiny_config
from deepseek_sft.config.data import TaskSpec
from deepseek_sft.io import DataError
from deepseek_sft.sft_data import (
    IGNORE_INDEX,
    build_examples,
    encode_prompt,
    make_collator,
    render_prompt,
)
from deepseek_sft.tasks import format_response
from deepseek_sft.tokenizer_build import train_bpe_tokenizer, training_texts

from conftest import tiny_params

torch.set_num_threads(2)

TASKS = {
    "intent": TaskSpec(
        type="classification",
        field="intent",
        instruction="判断这条客户请求的业务意图，只输出意图标签。",
        labels=["card_loss", "transfer", "loan_application"],
    ),
    "entities": TaskSpec(
        type="extraction",
        field="entities",
        instruction="抽取文中的实体（ORG 机构、PER 人名、MONEY 金额）。",
        entity_types=["ORG", "PER", "MONEY"],
    ),
}
BANKS = ["招商银行", "工商银行", "建设银行", "平安银行"]
NAMES = ["张伟", "王芳", "李娜"]
PHRASES = {
    "card_loss": "我的卡丢了，请帮我挂失",
    "transfer": "我想给朋友转账",
    "loan_application": "我想申请一笔消费贷款",
}


def make_record(i: int, rng: random.Random, filler: int = 0) -> dict:
    """A processed record: `name`在`bank`<phrase>，金额<money>，plus optional filler text at the end."""
    intent = rng.choice(list(PHRASES))
    name, bank, money = rng.choice(NAMES), rng.choice(BANKS), f"{rng.randint(1, 99) * 100}元"
    parts = [(name, "PER"), ("在", None), (bank, "ORG"), (PHRASES[intent] + "，金额", None), (money, "MONEY")]
    text, entities = "", []
    for surface, kind in parts:
        if kind:
            entities.append(
                {"start": len(text), "end": len(text) + len(surface), "type": kind, "text": surface}
            )
        text += surface
    text += "。" + "谢谢您的帮助" * filler
    return {
        "id": f"rec-{i:03d}",
        "text": text,
        "intent": intent,
        "compliance": "compliant",
        "entities": entities,
    }


@pytest.fixture(scope="module")
def records() -> list[dict]:
    rng = random.Random(7)
    return [make_record(i, rng) for i in range(60)]


@pytest.fixture(scope="module")
def tokenizer(records):
    return train_bpe_tokenizer(
        training_texts(records, TASKS), vocab_size=800, min_frequency=2, model_max_length=512
    )


def test_labels_mask_exactly_the_prompt_and_end_with_eos(records, tokenizer):
    examples, stats = build_examples(records[:10], TASKS, tokenizer, max_length=512)
    assert len(examples) == 20 and stats["examples"] == 20
    for ex in examples:
        record = next(r for r in records if r["id"] == ex["id"])
        task = TASKS[ex["task"]]
        n_prompt = len(encode_prompt(tokenizer, task, record["text"]))
        assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert IGNORE_INDEX not in ex["labels"][n_prompt:]
        assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
        assert ex["labels"][-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ex["labels"][n_prompt:-1]) == format_response(task, record)


def test_example_equals_the_tokenized_full_conversation(records, tokenizer):
    """Prompt ids + response ids + EOS are exactly what the chat template gives for the whole exchange."""
    (ex,), _ = build_examples(records[:1], {"entities": TASKS["entities"]}, tokenizer, max_length=512)
    task, record = TASKS["entities"], records[0]
    messages = [
        {"role": "user", "content": f"{task.instruction}\n{record['text']}"},
        {"role": "assistant", "content": format_response(task, record)},
    ]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert full.startswith(render_prompt(tokenizer, task, record["text"]))
    assert tokenizer(full, add_special_tokens=False)["input_ids"] == ex["input_ids"]


def test_stats_count_tasks_and_tokens(records, tokenizer):
    examples, stats = build_examples(records, TASKS, tokenizer, max_length=512)
    assert stats["records"] == 60 and stats["examples_intent"] == 60 and stats["examples_entities"] == 60
    n_prompt = sum(ex["labels"].count(IGNORE_INDEX) for ex in examples)
    assert stats["prompt_tokens"] == n_prompt
    assert stats["response_tokens"] == sum(len(ex["input_ids"]) for ex in examples) - n_prompt
    assert stats["max_example_tokens"] == max(len(ex["input_ids"]) for ex in examples)
    assert stats["truncated"] == stats["dropped"] == 0


@pytest.fixture(scope="module")
def long_records():
    rng = random.Random(3)
    return [make_record(100 + i, rng, filler=30) for i in range(3)]


def test_truncate_keeps_head_of_text_and_a_whole_consistent_answer(long_records, tokenizer):
    full, _ = build_examples(long_records, TASKS, tokenizer, max_length=4096)
    max_length = min(len(ex["input_ids"]) for ex in full) - 20
    examples, stats = build_examples(
        long_records, TASKS, tokenizer, max_length=max_length, truncation="truncate"
    )
    assert stats["truncated"] == 6 and stats["dropped"] == 0 and len(examples) == 6
    for ex in examples:
        assert len(ex["input_ids"]) <= max_length
        record = next(r for r in long_records if r["id"] == ex["id"])
        n_answer = sum(label != IGNORE_INDEX for label in ex["labels"])
        answer = tokenizer.decode(ex["input_ids"][-n_answer:-1])
        prompt = tokenizer.decode(ex["input_ids"][:-n_answer], skip_special_tokens=True)
        kept_text = prompt.split("\n", 1)[1]
        assert record["text"].startswith(kept_text) and len(kept_text) < len(record["text"])
        # the entities all sit at the start, so a head cut keeps the whole answer
        assert answer == format_response(TASKS[ex["task"]], record)


def test_truncate_drops_entities_that_were_cut_away(tokenizer):
    task = TASKS["entities"]
    text = "请帮我看看" * 40 + "招商银行"
    record = {
        "id": "tail",
        "text": text,
        "entities": [{"start": 200, "end": 204, "type": "ORG", "text": "招商银行"}],
    }
    (ex,), stats = build_examples(
        [record], {"entities": task}, tokenizer, max_length=60, truncation="truncate"
    )
    assert stats["truncated"] == 1
    n_answer = sum(label != IGNORE_INDEX for label in ex["labels"])
    assert tokenizer.decode(ex["input_ids"][-n_answer:-1]) == "无"


def test_drop_removes_and_counts(records, long_records, tokenizer):
    examples, stats = build_examples(
        records[:5] + long_records, TASKS, tokenizer, max_length=80, truncation="drop"
    )
    assert stats["dropped"] == 6 and stats["truncated"] == 0
    assert len(examples) == 10 and {ex["id"] for ex in examples} == {r["id"] for r in records[:5]}
    assert stats["examples"] + stats["dropped"] == 2 * stats["records"]


def test_error_names_record_and_length(long_records, tokenizer):
    with pytest.raises(DataError, match=r"record rec-100, task 'intent': \d+ tokens .* > max_length 80"):
        build_examples(long_records, TASKS, tokenizer, max_length=80, truncation="error")


def test_unfittable_example_is_dropped_and_counted(records, tokenizer):
    _, stats = build_examples(records[:2], TASKS, tokenizer, max_length=5, truncation="truncate")
    assert stats["examples"] == 0 and stats["dropped"] == 4 and stats["dropped_unfittable"] == 4


def test_bad_inputs_raise(records, tokenizer):
    with pytest.raises(ValueError, match="truncation='cut'"):
        build_examples(records[:1], TASKS, tokenizer, max_length=64, truncation="cut")
    broken = {k: v for k, v in records[0].items() if k != "intent"}
    with pytest.raises(DataError, match="record rec-000: missing field 'intent' needed by task 'intent'"):
        build_examples([broken], TASKS, tokenizer, max_length=512)


def test_packing_collator_restarts_positions(records, tokenizer):
    examples, _ = build_examples(records[:3], {"intent": TASKS["intent"]}, tokenizer, max_length=512)
    batch = make_collator(tokenizer)(examples)
    lengths = [len(ex["input_ids"]) for ex in examples]
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(lengths))
    expected_pos = [i for n in lengths for i in range(n)]
    assert batch["position_ids"][0].tolist() == expected_pos
    assert batch["labels"][0].tolist() == [label for ex in examples for label in ex["labels"]]


def test_padding_collator_pads_labels_with_ignore_index(records, tokenizer):
    examples, _ = build_examples(records[:3], {"entities": TASKS["entities"]}, tokenizer, max_length=512)
    batch = make_collator(tokenizer, packing=False)(examples)
    width = max(len(ex["input_ids"]) for ex in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        assert (
            batch["labels"][row, n:].eq(IGNORE_INDEX).all() and batch["attention_mask"][row, n:].eq(0).all()
        )
        assert batch["input_ids"][row, n:].eq(tokenizer.pad_token_id).all()
    tokenizer.padding_side = "left"
    try:
        with pytest.raises(ValueError, match="pads on the right"):
            make_collator(tokenizer, packing=False)
    finally:
        tokenizer.padding_side = "right"


def _tiny_model(tokenizer, attn: str) -> DeepseekV3ForCausalLM:
    params = tiny_params(  # the shared test shape, twice as wide (tests/conftest.py)
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        q_lora_rank=32,
        qk_nope_head_dim=16,
        v_head_dim=16,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    config = tiny_config(params, tokenizer)
    config._attn_implementation = attn
    return DeepseekV3ForCausalLM(config).eval()


def _response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over response tokens / their count."""
    targets = labels[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss / targets.ne(IGNORE_INDEX).sum()


@pytest.fixture(scope="module")
def mixed_examples(records, tokenizer):
    examples, _ = build_examples(records[:3], TASKS, tokenizer, max_length=512)
    return examples


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_padded_loss(mixed_examples, tokenizer, attn):
    model = _tiny_model(tokenizer, attn)
    packed = make_collator(tokenizer, packing=True)(mixed_examples)
    padded = make_collator(tokenizer, packing=False)(mixed_examples)
    with torch.no_grad():
        out_packed = model(**packed, use_cache=False)
        out_padded = model(**padded, use_cache=False)
    loss_packed = _response_loss(out_packed.logits, packed["labels"])
    loss_padded = _response_loss(out_padded.logits, padded["labels"])
    assert (
        loss_packed.item() > 1.0
    )  # an untrained model: the loss is far from 0, so the comparison means something
    assert abs(loss_packed.item() - loss_padded.item()) < 1e-5
    # the model's own loss (what Trainer optimises) agrees as well
    assert abs(out_packed.loss.item() - out_padded.loss.item()) < 1e-5
    assert abs(out_packed.loss.item() - loss_packed.item()) < 1e-5


def _second_example_logits(model, collator, examples) -> torch.Tensor:
    batch = collator(examples)
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    n_first = len(examples[0]["input_ids"])
    return logits[0, n_first : n_first + len(examples[1]["input_ids"])]


def _scrambled(example: dict, vocab: int) -> dict:
    """Same length, different tokens (so only attention across examples could change example 2)."""
    ids = [(i * 7 + 13) % vocab for i in example["input_ids"]]
    return {**example, "input_ids": ids}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_does_not_attend_across_examples(mixed_examples, tokenizer, attn):
    model = _tiny_model(tokenizer, attn)
    collator = make_collator(tokenizer)
    first, second = mixed_examples[0], mixed_examples[3]
    before = _second_example_logits(model, collator, [first, second])
    after = _second_example_logits(model, collator, [_scrambled(first, len(tokenizer)), second])
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    alone = model(input_ids=torch.tensor([second["input_ids"]]), use_cache=False).logits[0]
    torch.testing.assert_close(before, alone, rtol=0, atol=1e-5)


def test_packing_needs_use_cache_false(mixed_examples, tokenizer):
    """transformers skips packed-mask detection when a KV cache exists: why training keeps use_cache=False."""
    model = _tiny_model(tokenizer, "sdpa")
    first, second = mixed_examples[0], mixed_examples[3]
    batch = make_collator(tokenizer)([first, second])
    with torch.no_grad():
        cached = model(**batch, use_cache=True).logits
    uncached = _second_example_logits(model, make_collator(tokenizer), [first, second])
    n_first = len(first["input_ids"])
    assert (cached[0, n_first : n_first + len(second["input_ids"])] - uncached).abs().max() > 1e-3
