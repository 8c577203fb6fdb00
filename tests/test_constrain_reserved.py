"""A text that holds its task's own tag or mark tokens decodes free instead of crashing (issue 15, item 1).

Its echo would read as markup, so no answer has the constrained shape: the constraint's `next(...)` found no
allowed text token and raised StopIteration out of the logits processor, which crashed evaluation and wedged
the service (asyncio cannot carry a StopIteration into a Future).
"""

from __future__ import annotations

import pytest
import torch

from deepseek_sft.config import load_section
from deepseek_sft.evaluate.constrain import (
    EchoConstraint,
    TagConstraint,
    constrained_scores,
    echo_constraints,
    mark_token_ids,
)
from deepseek_sft.evaluate.generate import eos_token_ids, generate_batched
from deepseek_sft.sft_data import encode_prompt
from test_serve import build_tiny_model_dir

from conftest import REPO

CLEAN, TAGGED, MARKED = "给张三转账", "给⟨PER⟩张⟨+⟩三", "给⟦PER:张三⟧转账"


def tiny(tmp_path, answer_format: str):
    """The tiny model and tokenizer built for the `entities` task in `answer_format` (marks = one token)."""
    from deepseek_sft.base_model import load_model_and_tokenizer

    tasks = load_section("serve", REPO / "params.yaml").tasks
    tasks["entities"] = tasks["entities"].model_copy(update={"answer_format": answer_format})
    torch.set_num_threads(1)
    model, tokenizer = load_model_and_tokenizer(build_tiny_model_dir(tmp_path / answer_format, tasks))
    return model, tokenizer, tasks["entities"]


@pytest.mark.parametrize(
    ("answer_format", "reserved_text", "kind"),
    [("tagged", TAGGED, TagConstraint), ("inline", MARKED, EchoConstraint)],
)
def test_texts_holding_markup_tokens_decode_free_and_evaluation_runs(
    tmp_path, answer_format, reserved_text, kind
):
    model, tokenizer, task = tiny(tmp_path, answer_format)
    opens, close = mark_token_ids(task, tokenizer)
    text_ids = set(tokenizer(reserved_text, add_special_tokens=False)["input_ids"])
    assert text_ids & {*opens, close}, "the test text must hold a mark token"

    eos = eos_token_ids(model, tokenizer)
    constraints = echo_constraints(task, tokenizer, [CLEAN, reserved_text], eos)
    assert isinstance(constraints[0], kind) and constraints[1] is None

    prompts = [encode_prompt(tokenizer, task, t) for t in (CLEAN, reserved_text)]
    for draft_block in (None, 8):  # evaluate decodes echo answers with drafts; both paths must run
        answers = generate_batched(
            model, tokenizer, prompts, 24, 2, constraints=constraints, draft_block=draft_block
        )
        assert len(answers) == 2 and all(len(a) <= 24 for a in answers)


def test_a_constraint_with_no_text_token_left_raises_a_clear_value_error():
    """A constraint built by hand on a text whose next token is a mark: ValueError, never StopIteration."""
    constraint = TagConstraint([[10], [20]], start_ids=[20], continue_id=21, eos_ids=[2])
    with pytest.raises(ValueError, match="allows no text token or EOS"):
        constrained_scores(constraint, [10], torch.zeros(32))
