"""Evaluate stage: batched greedy generation (identical to a naive loop, and faster), perplexity, latency."""

from __future__ import annotations

import math
import time

import pytest
import torch

from deepseek_sft import base_model as bm
from deepseek_sft.base_model import load_model_and_tokenizer
from deepseek_sft.config import load_section
from deepseek_sft.config.evaluate import EvaluateParams
from deepseek_sft.evaluate.constrain import (
    EchoConstraint,
    TagConstraint,
    character_tokens,
    constrained_scores,
    echo_constraint,
    mark_token_ids,
)
from deepseek_sft.evaluate.core import evaluate_model
from deepseek_sft.evaluate.efficiency import PeakMemory, measure_latency, size_on_disk
from deepseek_sft.evaluate.generate import (
    cut_at_eos,
    decode_answers,
    eos_token_ids,
    generate_batched,
    generate_naive,
    left_pad,
)
from deepseek_sft.evaluate.perplexity import perplexity_by_task, response_nll
from deepseek_sft.evaluate.prefix import answer_stop, viable_prefix
from deepseek_sft.sft_data import build_examples, encode_prompt
from deepseek_sft.tasks import parse_response
from test_evaluate import processed_records

from conftest import tiny_params

torch.set_num_threads(1)  # tiny matrices: extra OpenMP threads only add sync (and stall on shared cores)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    model, tokenizer = load_model_and_tokenizer(tiny_checkpoint)
    return model, tokenizer


@pytest.fixture(scope="module")
def tasks():
    return load_section("evaluate").tasks


def test_left_pad_puts_every_prompt_at_the_right_edge():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_cut_at_eos():
    assert cut_at_eos([4, 5, 2, 6, 2], eos_ids=[2]) == [4, 5]
    assert cut_at_eos([4, 5], eos_ids=[2]) == [4, 5]


def test_batched_generation_equals_naive_loop_and_is_faster(loaded, tasks):
    model, tokenizer = loaded
    records = processed_records(32, seed=9)
    generate_batched(model, tokenizer, [[1, 2, 3]] * 4, 2, 4)  # warm-up (allocator, kernels)
    batched_s = naive_s = 0.0
    for name in ("intent", "entities"):
        prompts = [encode_prompt(tokenizer, tasks[name], r["text"]) for r in records]
        assert len({len(p) for p in prompts}) > 5  # different lengths: left padding really happens
        for stop in (None, answer_stop(tasks[name], tokenizer)):
            started = time.perf_counter()
            naive = generate_naive(model, tokenizer, prompts, max_new_tokens=12, stop=stop)
            naive_s += time.perf_counter() - started
            for rebatch in (None, 4):  # one generate() per batch, or finished rows leaving every 4 tokens
                started = time.perf_counter()
                batched = generate_batched(
                    model, tokenizer, prompts, 12, 64, stop=stop, rebatch_every=rebatch
                )
                batched_s += (time.perf_counter() - started) / 2
                assert batched == naive, (name, stop, rebatch)
            assert decode_answers(tokenizer, batched) == decode_answers(tokenizer, naive)
    assert naive_s >= 5 * batched_s, f"batched {batched_s:.2f}s vs naive {naive_s:.2f}s"


def test_generation_stops_once_the_answer_cannot_parse(loaded, tasks):
    model, tokenizer = loaded  # untrained: its answers are garbage
    # items format: garbage soon stops parsing there (an inline answer is any text, so rarely stops early)
    task = tasks["entities"].model_copy(update={"answer_format": "items"})
    prompts = [encode_prompt(tokenizer, task, r["text"]) for r in processed_records(16, seed=9)]
    full = generate_batched(model, tokenizer, prompts, max_new_tokens=12, batch_size=16)
    stopped = generate_batched(model, tokenizer, prompts, 12, 16, stop=answer_stop(task, tokenizer))
    assert sum(map(len, stopped)) < sum(map(len, full))
    for short, long in zip(stopped, full, strict=True):
        assert long[: len(short)] == short  # the same greedy tokens, only fewer
        text = decode_answers(tokenizer, [short])[0]
        assert not viable_prefix(task, text) or len(short) == len(long)
        assert all(viable_prefix(task, decode_answers(tokenizer, [short[:k]])[0]) for k in range(len(short)))


def test_generation_stops_at_eos(loaded):
    model, tokenizer = loaded
    eos = eos_token_ids(model, tokenizer)

    # force EOS: the head's output favours the EOS token, so every row ends after one token (a hook, not
    # edited weights: the tiny default ties lm_head to the input embeddings)
    def only_eos(module, args, logits):
        forced = torch.full_like(logits, -1e9)
        forced[..., eos[0]] = 0.0
        return forced

    handle = model.lm_head.register_forward_hook(only_eos)
    try:
        prompts = [[tokenizer.bos_token_id, 10, 11], [tokenizer.bos_token_id, 12]]
        assert generate_batched(model, tokenizer, prompts, 20, 2) == [[], []]
        assert generate_naive(model, tokenizer, prompts, 20) == [[], []]
    finally:
        handle.remove()


def test_response_perplexity_matches_the_model_loss(loaded, tasks):
    model, tokenizer = loaded
    examples, _ = build_examples(processed_records(6, seed=9), tasks, tokenizer, 512, "truncate")
    nll = response_nll(model, examples, tokenizer.pad_token_id, batch_size=4)
    for ex, (total, n) in zip(examples[:5], nll[:5], strict=False):
        assert n == sum(label != -100 for label in ex["labels"])  # every response token is scored
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]]))
        assert total / n == pytest.approx(float(out.loss), rel=1e-4)
    ppl = perplexity_by_task(examples, nll)
    assert set(ppl) == set(tasks)
    total = sum(t for (t, _), ex in zip(nll, examples, strict=True) if ex["task"] == "intent")
    count = sum(c for (_, c), ex in zip(nll, examples, strict=True) if ex["task"] == "intent")
    assert ppl["intent"]["perplexity"] == pytest.approx(math.exp(total / count))


def test_latency_and_memory(loaded, tasks, tiny_checkpoint):
    model, tokenizer = loaded
    prompts = [encode_prompt(tokenizer, tasks["intent"], r["text"]) for r in processed_records(3, seed=9)]
    with PeakMemory() as memory:
        lat = measure_latency(
            model, prompts, decode_tokens=4, warmup=1, eos_ids=eos_token_ids(model, tokenizer)
        )
    assert lat["latency_samples"] == 3
    assert 0 < lat["prefill_ms_per_token_p50"] <= lat["prefill_ms_per_token_p95"]
    assert 0 < lat["decode_ms_per_token_p50"] <= lat["decode_ms_per_token_p95"]
    assert lat["decode_tokens_per_s"] == pytest.approx(1000 / lat["decode_ms_per_token_mean"])
    assert memory.stats()["peak_rss_mb"] > 50
    sizes = size_on_disk(tiny_checkpoint)
    assert 0 < sizes["size_weights_bytes"] < sizes["size_dir_bytes"]


def test_evaluate_model_is_deterministic_and_complete(tiny_checkpoint, tasks):
    params = EvaluateParams(
        limit=6,
        batch_size=4,
        max_new_tokens={"classification": 3, "extraction": 5},
        efficiency={"samples": 1, "decode_tokens": 2, "warmup": 0},
    )
    records = processed_records(10, seed=9)
    first = evaluate_model(tiny_checkpoint, records, tasks, params, name="base")
    second = evaluate_model(tiny_checkpoint, records, tasks, params, name="base")
    assert len(first.rows) == 6 * 3
    assert [r["answer"] for r in first.rows] == [r["answer"] for r in second.rows]
    assert first.metrics["intent"]["perplexity"] == second.metrics["intent"]["perplexity"]
    assert first.efficiency["generated_tokens"] > 0


# --- constrained decoding of inline and tagged answers ---------------------------------------------------------------


def test_echo_constraint_allows_only_the_text_and_well_formed_marks():
    # text tokens 10 11 12; opening marks 50 51; closing mark 60; EOS 2
    echo = EchoConstraint([10, 11, 12], open_ids=[50, 51], close_id=60, eos_ids=[2])
    assert sorted(echo.allowed([])) == [10, 50, 51]
    assert sorted(echo.allowed([50])) == [10]  # a mark needs at least one token before it closes
    assert sorted(echo.allowed([50, 10])) == [11, 60]  # no nested marks
    assert sorted(echo.allowed([50, 10, 60])) == [11, 50, 51]
    assert echo.allowed([10, 11, 12]) == [2]  # text used up, outside a mark: only EOS
    assert echo.allowed([10, 11, 51, 12]) == [60]  # text used up inside a mark: close it first
    assert echo.state([51, 10, 11, 60, 12]) == (3, False, 2)


def test_tag_constraint_tags_only_complete_characters_and_continues_only_tagged_ones():
    # characters: [10], [11, 12] (one character, two byte tokens), [13]; start tags 50 51; continuation 60
    tags = TagConstraint([[10], [11, 12], [13]], start_ids=[50, 51], continue_id=60, eos_ids=[2])
    assert tags.allowed([]) == [10]  # nothing to tag before the first character
    assert sorted(tags.allowed([10])) == [11, 50, 51]  # no continuation: the character before is untagged
    assert tags.allowed([10, 50, 11]) == [12]  # inside a character: no tag
    assert sorted(tags.allowed([10, 50, 11, 12])) == [13, 50, 51, 60]
    assert sorted(tags.allowed([10, 11, 12])) == [13, 50, 51]
    assert tags.allowed([10, 50, 11, 12, 60]) == [13]  # one tag per character
    assert sorted(tags.allowed([10, 50, 11, 12, 60, 13])) == [2, 50, 51, 60]  # the last one, then EOS
    assert tags.state([10, 50, 11, 12, 60, 13]) == (4, False, True)


def test_the_text_token_takes_the_probability_of_every_non_mark_token():
    echo = EchoConstraint([10, 11], open_ids=[50], close_id=60, eos_ids=[2])
    probs = torch.full((64,), 0.8 / 62)  # 0.8 spread over the 62 non-mark tokens, 10 among them
    probs[50], probs[60] = 0.15, 0.05  # the opening mark is the likeliest single token
    masked = constrained_scores(echo, [], probs.log())
    assert torch.isfinite(masked).sum() == 2  # only the text token 10 and the opening mark 50
    # going on with the text wins, with all the non-mark mass, not the 0.013 of token 10 alone
    assert masked[10].exp() == pytest.approx(0.8, rel=1e-4) and masked[50].exp() == pytest.approx(0.15)
    assert int(masked.argmax()) == 10


def test_character_tokens_group_byte_tokens_and_keep_multi_character_tokens_whole(loaded):
    _, tokenizer = loaded
    groups = character_tokens(tokenizer, "转账龘")  # a character unseen in training: byte tokens
    assert len(groups) == 3 and len(groups[2]) > 1
    assert [t for g in groups for t in g] == tokenizer("转账龘", add_special_tokens=False)["input_ids"]

    class WordTokens:  # byte tokens 7 8 of one character, then one token for a two-character word
        def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
            return {"input_ids": [7, 8, 9], "offset_mapping": [(0, 1), (0, 1), (1, 3)]}

    assert character_tokens(WordTokens(), "龘转账") == [[7, 8], [9]]


@pytest.mark.parametrize("answer_format", ["inline", "tagged"])
def test_constrained_batched_answers_echo_the_text_and_equal_the_naive_loop(tmp_path, tasks, answer_format):
    task = tasks["entities"].model_copy(update={"answer_format": answer_format})
    # a tokenizer built for this format (its marks or tags single tokens), one token per character as the default
    per_character = tiny_params(tokenizer={"vocab_size": 600, "min_frequency": 2, "split_cjk": True})
    model, tokenizer = bm.build_tiny(
        per_character, processed_records(200, seed=1), {**tasks, "entities": task}, 1
    )
    model.eval()
    assert mark_token_ids(task, tokenizer) is not None  # the tiny tokenizer holds every mark as one token
    records = processed_records(24, seed=4)
    eos_ids = eos_token_ids(model, tokenizer)
    prompts = [encode_prompt(tokenizer, task, r["text"]) for r in records]
    constraints = [echo_constraint(task, tokenizer, r["text"], eos_ids) for r in records]
    assert all(c is not None for c in constraints)
    budget = 3 * max(len(c.text_ids) for c in constraints) + 8  # untrained: marks around many tokens
    naive = generate_naive(model, tokenizer, prompts, budget, constraints=constraints)
    for rebatch, block in ((None, None), (4, None), (None, 4), (None, 16)):  # step by step, then drafts
        batched = generate_batched(
            model, tokenizer, prompts, budget, 8, None, None, rebatch, constraints, block
        )
        assert batched == naive, (rebatch, block)
    assert generate_batched(model, tokenizer, prompts, 5, 8, None, None, None, constraints, 4) == [
        a[:5] for a in naive
    ]  # the budget cuts a drafted answer where it cuts a step-by-step one
    finished = 0
    answers = decode_answers(tokenizer, naive)
    for record, ids, answer, constraint in zip(records, naive, answers, constraints, strict=True):
        parsed = parse_response(task, answer, record["text"])
        echoed, inside_a_mark, _ = constraint.state(ids)
        if echoed == len(constraint.text_ids) and not (answer_format == "inline" and inside_a_mark):
            finished += 1
            assert parsed.ok, answer
            assert all(record["text"][s["start"] : s["end"]] == s["text"] for s in parsed.spans)
    assert finished >= len(records) // 2
