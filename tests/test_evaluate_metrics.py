"""Evaluate stage: metric functions against hand-computed cases, error taxonomy, parameter counts, baseline."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from pydantic import ValidationError
from transformers import DeepseekV3ForCausalLM

import deepseek_sft.base_model as bm
from deepseek_sft.config import ParamsError, load_section
from deepseek_sft.config.evaluate import EvaluateParams
from deepseek_sft.evaluate import errors as E
from deepseek_sft.evaluate import metrics as M
from deepseek_sft.evaluate.baseline import evaluate_baseline
from deepseek_sft.evaluate.core import score_answers
from deepseek_sft.evaluate.efficiency import count_parameters, parameter_breakdown, percentiles
from deepseek_sft.evaluate.prefix import viable_prefix
from deepseek_sft.tasks import format_response, parse_response
from test_evaluate import processed_records

from conftest import edit_params, tiny_v3_config

U = M.UNPARSEABLE


def span(start, end, type_):
    return {"start": start, "end": end, "type": type_}


@pytest.fixture(scope="module")
def tasks():
    """The params tasks, entities in the items format (TYPE:text|...) that the hand-written answers use;
    the inline and tagged formats have their own tests (test_tasks.py, and the prefix property test below)."""
    tasks = load_section("evaluate").tasks
    return {**tasks, "entities": tasks["entities"].model_copy(update={"answer_format": "items"})}


# --- classification ---------------------------------------------------------------------------------------


def test_classification_metrics_hand_computed():
    gold = ["a", "a", "b", "b"]
    pred = ["a", "b", "b", U]
    m = M.classification_metrics(gold, pred, ["a", "b"])
    assert m["accuracy"] == 0.5
    # a: P=1/1, R=1/2, F1=2/3;  b: P=1/2, R=1/2, F1=1/2 (the unparseable answer is a miss of b, no class of its own)
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["per_class"]["b"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert m["macro_precision"] == pytest.approx(0.75)
    assert m["weighted_f1"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert m["unparseable_rate"] == 0.25
    assert m["confusion"] == {"labels": ["a", "b", U], "matrix": [[1, 1, 0], [0, 1, 1], [0, 0, 0]]}


def test_classification_weighted_differs_from_macro_and_absent_labels_are_not_averaged():
    gold = ["a", "a", "a", "b"]
    pred = ["a", "a", "a", "a"]
    m = M.classification_metrics(gold, pred, ["a", "b", "never_seen"])
    # a: P=3/4 R=1 F1=6/7; b: F1=0. macro over {a, b} only; weighted by support 3:1
    assert m["macro_f1"] == pytest.approx((6 / 7) / 2)
    assert m["weighted_f1"] == pytest.approx(0.75 * 6 / 7)
    assert "never_seen" not in m["per_class"]
    assert m["confusion"]["labels"] == ["a", "b", "never_seen"]


def test_classification_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="gold has 2 labels but pred has 1"):
        M.classification_metrics(["a", "b"], ["a"])


# --- extraction -------------------------------------------------------------------------------------------


def test_entity_metrics_hand_computed():
    texts = ["招商银行转账5000元", "张三你好"]
    gold = [[span(0, 4, "ORG"), span(6, 11, "MONEY")], [span(0, 2, "PER")]]
    pred = [[span(0, 4, "ORG"), span(6, 10, "MONEY")], [span(0, 2, "PER")]]
    m = M.entity_metrics(texts, gold, pred, extra_fp=[0, 1])
    # tp=2 (ORG, PER); fp = wrong MONEY boundary + 1 extra; fn = the gold MONEY
    assert (m["tp"], m["fp"], m["fn"]) == (2, 2, 1)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert m["exact_match"] == 0.0  # record 2 has an extra false positive
    assert m["per_type"]["MONEY"]["f1"] == 0.0 and m["per_type"]["PER"]["f1"] == 1.0


def test_entity_metrics_overlapping_and_duplicate_predictions_are_canonicalised():
    text = "招商银行"
    pred = [span(0, 4, "ORG"), span(0, 4, "ORG"), span(1, 3, "ORG")]  # duplicate and a nested overlap
    m = M.entity_metrics([text], [[span(0, 4, "ORG")]], [pred])
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 0)


def _random_case(rng: random.Random, n_chars: int = 30) -> tuple[str, list[dict], list[dict]]:
    text = "".join(rng.choice("招商银行张三五千元理财") for _ in range(n_chars))

    def spans():
        out = []
        for _ in range(rng.randint(0, 5)):
            start = rng.randrange(n_chars - 1)
            out.append(
                span(start, min(n_chars, start + rng.randint(1, 6)), rng.choice(["ORG", "PER", "MONEY"]))
            )
        return out

    gold = M.canonical_spans(n_chars, spans())
    pred = [*gold[: rng.randint(0, len(gold))], *spans()]  # some exact hits plus noise, overlaps included
    return text, gold, pred


def test_exact_span_metric_agrees_with_seqeval_on_random_cases():
    rng = random.Random(7)
    cases = [_random_case(rng) for _ in range(200)]
    texts, gold, pred = (list(x) for x in zip(*cases, strict=True))
    ours = M.entity_metrics(texts, gold, pred)
    theirs = M.seqeval_entity_metrics(texts, gold, pred)
    assert ours["tp"] > 20 and ours["fp"] > 20  # the cases exercise both hits and misses
    for key in ("precision", "recall", "f1"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-12)


# --- BLEU / chrF / perplexity -----------------------------------------------------------------------------


def test_bleu_uses_chinese_character_tokenisation():
    assert M.bleu(["招商银行转账"], ["招商银行转账"]) == pytest.approx(100.0)
    # without zh tokenisation the unsegmented strings would be single, different "words" -> 0
    partial = M.bleu(["招商银行办理转账"], ["招商银行转账"])
    assert 0.0 < partial < 100.0
    assert M.bleu([], []) == 0.0


def test_chrf_identical_and_disjoint():
    assert M.chrf(["ORG:招商银行"], ["ORG:招商银行"]) == pytest.approx(100.0)
    assert M.chrf(["甲乙丙"], ["丁戊己"]) == pytest.approx(0.0)


def test_perplexity():
    assert M.perplexity(3 * math.log(4.0), 3) == pytest.approx(4.0)
    assert M.perplexity(1.0, 0) == math.inf


def test_percentiles():
    out = percentiles([1.0, 2.0, 3.0, 4.0, 100.0], "x")
    assert out["x_p50"] == 3.0 and out["x_mean"] == 22.0
    assert out["x_p95"] == pytest.approx(4 + 0.8 * 96)


# --- parsing answers: unparseable counts as wrong and is never dropped --------------------------------------


def test_unparseable_answers_count_as_wrong_and_are_listed(tasks):
    records = [
        {
            "id": "r1",
            "text": "招商银行转账5000元",
            "intent": "transfer",
            "compliance": "compliant",
            "entities": [{**span(0, 4, "ORG"), "text": "招商银行"}],
        },
        {"id": "r2", "text": "你好", "intent": "card_loss", "compliance": "violation", "entities": []},
    ]
    answers = {
        "intent": ["transfer", "card loss please"],  # second: not a label
        "compliance": ["", "violation"],  # first: empty
        "entities": ["ORG:招商银行|MONEY:5000元", "garbage without type"],  # r2 gold is 无: still wrong
    }
    rows, flat, details = score_answers(records, tasks, answers)
    assert len(rows) == 6
    assert flat["intent"]["accuracy"] == 0.5 and flat["intent"]["unparseable_rate"] == 0.5
    assert details["intent"]["confusion"]["labels"][-1] == U
    assert flat["compliance"]["accuracy"] == 0.5
    # r1: ORG right, MONEY spurious; r2: unparseable -> one false positive though gold is empty
    assert (flat["entities"]["tp"], flat["entities"]["fp"], flat["entities"]["fn"]) == (1, 2, 0)
    assert flat["entities"]["exact_match"] == 0.0
    listed = E.unparseable_rows(rows)
    assert sorted((r["id"], r["task"]) for r in listed) == [
        ("r1", "compliance"),
        ("r2", "entities"),
        ("r2", "intent"),
    ]
    assert all(r["error"] for r in listed)


def test_answer_naming_text_absent_from_input_costs_precision(tasks):
    record = {
        "id": "r",
        "text": "张三转账",
        "intent": "transfer",
        "compliance": "compliant",
        "entities": [{**span(0, 2, "PER"), "text": "张三"}],
    }
    rows, flat, _ = score_answers(
        [record],
        tasks,
        {"intent": ["transfer"], "compliance": ["compliant"], "entities": ["PER:张三|ORG:不存在银行"]},
    )
    ent = next(r for r in rows if r["task"] == "entities")
    assert ent["ok"] and ent["unlocated"] == [["ORG", "不存在银行"]] and not ent["correct"]
    assert (flat["entities"]["tp"], flat["entities"]["fp"], flat["entities"]["fn"]) == (1, 1, 0)


# --- error taxonomy ---------------------------------------------------------------------------------------


def test_entity_error_taxonomy():
    text = "招商银行的张三存了五千元在理财产品"
    gold = [span(0, 4, "ORG"), span(5, 7, "PER"), span(9, 12, "MONEY"), span(13, 17, "PRODUCT")]
    pred = [
        span(0, 2, "ORG"),  # boundary: partial ORG
        span(5, 7, "ORG"),  # type: PER span called ORG
        span(9, 11, "DATE"),  # boundary_type
        span(12, 13, "PER"),  # spurious ("在")
    ]  # PRODUCT missed
    errs = E.entity_errors(text, gold, pred, unlocated=[["ORG", "工商银行"]])
    kinds = Counter(e["kind"] for e in errs)
    assert kinds == Counter(boundary=1, type=1, boundary_type=1, spurious=1, missed=1, not_in_text=1)
    boundary = next(e for e in errs if e["kind"] == "boundary")
    assert boundary["pred"]["text"] == "招商" and boundary["gold"]["text"] == "招商银行"
    assert next(e for e in errs if e["kind"] == "missed")["gold"]["text"] == "理财产品"
    assert E.entity_errors(text, gold, gold) == []


def test_confused_pairs_rank_symmetric_confusions_first():
    gold = ["a", "b", "a", "c", "c", "c", "a"]
    pred = ["b", "a", "b", "a", U, "c", "a"]
    pairs = E.confused_pairs(gold, pred)
    assert pairs[0] == {"gold": "a", "pred": "b", "count": 2, "reverse_count": 1, "pair_total": 3}
    assert all(p["pred"] != U for p in pairs)
    assert {(p["gold"], p["pred"]) for p in pairs} == {("a", "b"), ("b", "a"), ("c", "a")}


def test_long_tail_and_buckets():
    per_class = {
        "rare": {"f1": 0.2, "support": 2},
        "mid": {"f1": 0.5, "support": 5},
        "common": {"f1": 0.9, "support": 9},
    }
    table = E.long_tail(per_class, Counter(rare=3, mid=30, common=300))
    assert [r["label"] for r in table] == ["rare", "mid", "common"]
    assert E.frequency_buckets(table) == pytest.approx({"f1_tail": 0.2, "f1_head": 0.9})


# --- parameter counts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{"q_lora_rank": None}, {"q_lora_rank": 16, "attention_bias": True}, {"tie_word_embeddings": True}],
)
def test_parameter_breakdown_matches_the_model(overrides):
    cfg = tiny_v3_config(vocab_size=300, intermediate_size=48, num_hidden_layers=3, **overrides)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg)
    parts = parameter_breakdown(cfg)
    assert parts["total"] == count_parameters(model)
    # 2 MoE layers x 2 idle experts x 3 projections x 32 x 16
    assert parts["total"] - parts["active"] == 2 * 2 * 3 * 32 * 16
    assert parts["active"] == bm.count_parameters(model, cfg)["params_active_per_token"]


def test_parameter_breakdown_is_none_for_other_families():
    from transformers import LlamaConfig

    assert (
        parameter_breakdown(LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2)) is None
    )


# --- baseline and params ----------------------------------------------------------------------------------


def test_tfidf_baseline_learns_the_synthetic_labels(tasks):
    train, test = processed_records(300, seed=1), processed_records(100, seed=2)
    metrics, _, preds = evaluate_baseline(train, test, tasks, EvaluateParams().baseline, seed=0)
    assert set(metrics) == {"intent", "compliance"}  # label tasks only
    chance = 1 / len({r["intent"] for r in train})
    assert metrics["intent"]["accuracy"] > 3 * chance
    assert len(preds["intent"]) == len(test)
    again, _, _ = evaluate_baseline(train, test, tasks, EvaluateParams().baseline, seed=0)
    assert again["intent"]["macro_f1"] == metrics["intent"]["macro_f1"]


def test_params_schema_rejects_bad_values():
    with pytest.raises(ValidationError, match="ngram_min"):
        EvaluateParams(baseline={"ngram_min": 4, "ngram_max": 2})
    with pytest.raises(ValidationError, match="classification"):
        EvaluateParams(max_new_tokens={"classification": 0})


def test_params_typo_is_named(params_copy):
    edit_params(params_copy, {"evaluate.batch_sise": 8})
    with pytest.raises(ParamsError, match=r"evaluate\.batch_sise: unknown key"):
        load_section("evaluate")


def test_params_exponent_string_is_refused(params_copy):
    edit_params(params_copy, {"evaluate.baseline.C": "1e1"})
    with pytest.raises(ParamsError, match=r"evaluate\.baseline\.C: .*write e\.g\. 2\.0e-5"):
        load_section("evaluate")


# --- early stop: a partial answer that can no longer parse --------------------------------------------------


def test_viable_prefix_examples(tasks):
    intent, entities = tasks["intent"], tasks["entities"]
    assert (
        viable_prefix(intent, "")
        and viable_prefix(intent, " card_l")
        and viable_prefix(intent, "card_loss \n")
    )
    assert not viable_prefix(intent, "card_lossx") and not viable_prefix(intent, "卡")
    assert (
        viable_prefix(entities, "无")
        and viable_prefix(entities, "ORG:招商|MO")
        and viable_prefix(entities, "OR")
    )
    assert viable_prefix(entities, "ORG:招商\ufffd")  # a character cut between byte-level tokens
    assert not viable_prefix(entities, "无|") and not viable_prefix(entities, "BANK:")
    assert not viable_prefix(entities, "ORG:|") and not viable_prefix(entities, "招商银行")


def test_a_non_viable_prefix_never_parses_and_gold_answers_stay_viable(tasks):
    """The property early stopping relies on: stopping at a non-viable prefix never changes a score."""
    rng = random.Random(3)
    alphabet = [
        "ORG",
        "PER",
        "MONEY",
        ":",
        "|",
        "无",
        " ",
        "招商",
        "银行",
        "card_loss",
        "_",
        "c",
        "x",
        "\ufffd",
        "⟦",
        "⟦ORG:",
        "⟧",
        "⟨",
        "⟨ORG⟩",
        "⟨+⟩",
        "⟨OR",
        "⟩",
    ]
    tasks = {
        **{name: task for name, task in tasks.items() if name != "entities"},
        **{
            f"entities_{answer_format}": tasks["entities"].model_copy(update={"answer_format": answer_format})
            for answer_format in ("items", "inline", "tagged")
        },
    }
    for name in tasks:
        task = tasks[name]
        for _ in range(3000):
            answer = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
            cut = next((i for i in range(len(answer) + 1) if not viable_prefix(task, answer[:i])), None)
            if cut is not None:
                assert not parse_response(task, answer, "招商银行").ok, (name, answer, answer[:cut])
    for record in processed_records(200, seed=5):
        for task in tasks.values():
            gold = format_response(task, record)
            assert all(viable_prefix(task, gold[:i]) for i in range(len(gold) + 1)), gold
