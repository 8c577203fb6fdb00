"""Task formats: targets render the way answers are parsed back, and off-format answers are flagged."""

from __future__ import annotations

import pytest

from deepseek_sft.config import TaskSpec
from deepseek_sft.tasks import (
    NO_ENTITY,
    build_messages,
    format_response,
    locate_spans,
    parse_response,
    tagged_markup,
)

INTENT = TaskSpec(
    type="classification", field="intent", instruction="意图？", labels=["card_loss", "transfer"]
)
ENTITIES = TaskSpec(type="extraction", field="entities", instruction="实体？", entity_types=["ORG", "MONEY"])
SUMMARY = TaskSpec(type="generation", field="summary", instruction="摘要？")

TEXT = "招商银行转账5000元失败"
RECORD = {
    "text": TEXT,
    "intent": "transfer",
    "entities": [{"start": 6, "end": 11, "type": "MONEY"}, {"start": 0, "end": 4, "type": "ORG"}],
}


def test_messages_hold_instruction_and_text():
    assert build_messages(INTENT, TEXT) == [{"role": "user", "content": f"意图？\n{TEXT}"}]


def test_entity_target_is_in_reading_order_and_round_trips():
    answer = format_response(ENTITIES, RECORD)
    assert answer == "ORG:招商银行|MONEY:5000元"
    parsed = parse_response(ENTITIES, answer, TEXT)
    assert parsed.ok
    assert [(s["start"], s["end"], s["type"]) for s in parsed.spans] == [(0, 4, "ORG"), (6, 11, "MONEY")]


def test_no_entities_renders_and_parses_as_empty():
    assert format_response(ENTITIES, {**RECORD, "entities": []}) == NO_ENTITY
    parsed = parse_response(ENTITIES, NO_ENTITY, TEXT)
    assert parsed.ok and parsed.value == [] and parsed.spans == []


@pytest.mark.parametrize(
    ("answer", "error"),
    [("", "empty answer"), ("ORG招商银行", "not TYPE:text"), ("BANK:招商银行", "unknown entity type 'BANK'")],
)
def test_off_format_entity_answers_are_not_ok(answer, error):
    parsed = parse_response(ENTITIES, answer, TEXT)
    assert not parsed.ok
    assert error in parsed.error


def test_unknown_label_is_not_ok_but_kept_for_the_error_report():
    parsed = parse_response(INTENT, "card_lost", TEXT)
    assert not parsed.ok and parsed.value == "card_lost" and "unknown label" in parsed.error
    assert parse_response(INTENT, " transfer\n", TEXT).ok


def test_surface_not_in_text_yields_no_span():
    assert locate_spans([("ORG", "工商银行"), ("MONEY", "5000元")], TEXT) == [
        {"start": 6, "end": 11, "type": "MONEY", "text": "5000元"}
    ]


def test_repeated_surface_maps_to_successive_occurrences():
    spans = locate_spans([("MONEY", "5元"), ("MONEY", "5元")], "付5元又付5元")
    assert [s["start"] for s in spans] == [1, 5]


def test_generation_answer_is_the_text():
    assert format_response(SUMMARY, {"summary": "转账失败"}) == "转账失败"
    assert parse_response(SUMMARY, "转账失败").ok
    assert not parse_response(SUMMARY, "  ").ok


INLINE = TaskSpec(
    type="extraction",
    field="entities",
    instruction="实体？",
    entity_types=["ORG", "MONEY"],
    answer_format="inline",
)


def test_inline_target_echoes_the_text_and_parses_to_exact_spans():
    answer = format_response(INLINE, RECORD)
    assert answer == "⟦ORG:招商银行⟧转账⟦MONEY:5000元⟧失败"
    parsed = parse_response(INLINE, answer, TEXT)
    assert parsed.ok and parsed.value == [("ORG", "招商银行"), ("MONEY", "5000元")]
    assert [(s["start"], s["end"], s["type"]) for s in parsed.spans] == [(0, 4, "ORG"), (6, 11, "MONEY")]
    unmarked = parse_response(INLINE, TEXT, TEXT)  # an echo without marks: no entities, and well-formed
    assert unmarked.ok and unmarked.value == [] and unmarked.spans == []


def test_inline_marks_of_a_drifted_echo_are_located_in_the_text():
    # the echo dropped "转账": the marked surfaces are still found in the input, as for the items format
    parsed = parse_response(INLINE, "⟦ORG:招商银行⟧⟦MONEY:5000元⟧失败", TEXT)
    assert parsed.ok
    assert [(s["start"], s["end"]) for s in parsed.spans] == [(0, 4), (6, 11)]


TAGGED = INLINE.model_copy(update={"answer_format": "tagged"})


def test_tagged_target_tags_every_entity_character_and_parses_to_exact_spans():
    answer = format_response(TAGGED, RECORD)
    assert answer == "招⟨ORG⟩商⟨+⟩银⟨+⟩行⟨+⟩转账5⟨MONEY⟩0⟨+⟩0⟨+⟩0⟨+⟩元⟨+⟩失败"
    parsed = parse_response(TAGGED, answer, TEXT)
    assert parsed.ok and parsed.value == [("ORG", "招商银行"), ("MONEY", "5000元")]
    assert [(s["start"], s["end"], s["type"], s["text"]) for s in parsed.spans] == [
        (0, 4, "ORG", "招商银行"),
        (6, 11, "MONEY", "5000元"),
    ]
    untagged = parse_response(TAGGED, TEXT, TEXT)
    assert untagged.ok and untagged.value == [] and untagged.spans == []


def span(start, end, kind):
    return {"start": start, "end": end, "type": kind}


def test_tagged_adjacent_entities_stay_apart_and_overlaps_keep_the_first():
    text = "招商5元"
    spans = [span(0, 2, "ORG"), span(1, 3, "MONEY"), span(2, 4, "MONEY")]
    answer = tagged_markup(text, spans)
    assert answer == "招⟨ORG⟩商⟨+⟩5⟨MONEY⟩元⟨+⟩"
    parsed = parse_response(TAGGED, answer, text)
    assert [(s["start"], s["end"], s["type"]) for s in parsed.spans] == [(0, 2, "ORG"), (2, 4, "MONEY")]


def test_tagged_surfaces_of_a_drifted_echo_are_located_in_the_text():
    parsed = parse_response(TAGGED, "招⟨ORG⟩商⟨+⟩银⟨+⟩行⟨+⟩失败", TEXT)  # the echo dropped 转账5000元
    assert parsed.ok and [(s["start"], s["end"]) for s in parsed.spans] == [(0, 4)]


@pytest.mark.parametrize(
    ("task", "answer", "error"),
    [
        (INLINE, "⟦ORG:招商银行转账", "unclosed ⟦"),
        (INLINE, "⟦PER:张三⟧转账", "unknown entity type 'PER'"),
        (INLINE, "⟦ORG招商银行⟧", "is not ⟦TYPE:text⟧"),
        (INLINE, "招商银行⟧转账", "⟧ without ⟦"),
        (INLINE, "", "empty answer"),
        (TAGGED, "⟨ORG⟩招商", "follows no character"),
        (TAGGED, "招⟨ORG⟩⟨+⟩商", "follows no character"),
        (TAGGED, "招⟨+⟩商", "continues no entity"),
        (TAGGED, "招⟨ORG⟩商银⟨+⟩行", "continues no entity"),  # 商 is untagged: 银 cannot continue the entity
        (TAGGED, "招⟨PER⟩商", "unknown entity type 'PER'"),
        (TAGGED, "招⟨ORG商", "unclosed ⟨"),
        (TAGGED, "招商⟩", "⟩ without ⟨"),
        (TAGGED, "", "empty answer"),
    ],
)
def test_off_format_echo_answers_are_not_ok(task, answer, error):
    parsed = parse_response(task, answer, TEXT)
    assert not parsed.ok and error in parsed.error
