"""SFT examples: processed records -> (prompt ids, response ids + EOS) with prompt-masked labels, and collators.

The prompt is tokenized exactly as inference will see it (chat template with the generation prompt, no extra
special tokens), the response separately, so the training targets are the very ids `generate()` must produce.

Truncation (an example longer than `max_length` tokens):
- ``truncate``: the record's *input text* is cut from its end (its head is kept) until the example fits. The
  instruction, the chat markers and the answer format stay intact, and the response is rebuilt from the shortened
  record, so it stays whole and consistent: a classification label is unchanged; an extraction answer keeps the
  entities that lie wholly inside the kept text (the model is never taught to name entities it cannot see). When
  even an empty text does not fit, the example is dropped and counted as ``dropped_unfittable``.
- ``drop``: the example is left out and counted.
- ``error``: DataError naming the record id, the task and the lengths.

Packing (default): `make_collator(packing=True)` uses transformers' DataCollatorWithFlattening, which concatenates
a batch into one row with position_ids restarting at 0 per example and no attention_mask. transformers 5.24's
`masking_utils.create_causal_mask` then detects the restarts (find_packed_sequence_indices) and builds a
block-diagonal causal mask for sdpa, eager and flex attention (flash-attention derives cu_seqlens from the same
position_ids). This only happens when no KV cache is passed: the forward must run with ``use_cache=False`` -
Trainer sets ``model.config.use_cache = args.use_cache`` (False by default); with a cache, examples would
attend to each other.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Literal

from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, PreTrainedTokenizerBase

from .config.data import TaskSpec
from .io import DataError
from .tasks import build_messages, format_response

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
Truncation = Literal["truncate", "drop", "error"]
TRUNCATION_MODES = ("truncate", "drop", "error")
MODEL_KEYS = ("input_ids", "labels")


def render_prompt(tokenizer: PreTrainedTokenizerBase, task: TaskSpec, text: str) -> str:
    """The chat-templated prompt string for `task` on `text`, ending with the assistant generation prompt."""
    return tokenizer.apply_chat_template(
        build_messages(task, text), add_generation_prompt=True, tokenize=False
    )


def encode_prompt(tokenizer: PreTrainedTokenizerBase, task: TaskSpec, text: str) -> list[int]:
    """Prompt token ids exactly as inference feeds them to `generate()` (the template already holds BOS)."""
    return tokenizer(render_prompt(tokenizer, task, text), add_special_tokens=False)["input_ids"]


def encode_response(tokenizer: PreTrainedTokenizerBase, response: str) -> list[int]:
    """Response token ids followed by EOS (the model must learn to stop)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; SFT targets need one to end the answer")
    return [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def make_example(prompt_ids: list[int], response_ids: list[int], task_name: str, record_id: str) -> dict:
    """One training example: labels are IGNORE_INDEX on the prompt and the response ids (incl. EOS) after it."""
    return {
        "input_ids": [*prompt_ids, *response_ids],
        "labels": [IGNORE_INDEX] * len(prompt_ids) + list(response_ids),
        "task": task_name,
        "id": record_id,
    }


def _check_record(record: dict, name: str, task: TaskSpec) -> None:
    rid = record.get("id", "<no id>")
    for key in ("text", task.field):
        if key not in record:
            raise DataError(f"record {rid}: missing field {key!r} needed by task {name!r}")
    if not isinstance(record["text"], str):
        raise DataError(f"record {rid}: field 'text' must be a string, got {type(record['text']).__name__}")


def head_record(record: dict, task: TaskSpec, n_chars: int) -> dict:
    """`record` with its text cut to the first `n_chars` characters; extraction spans outside are dropped."""
    cut = {**record, "text": record["text"][:n_chars]}
    if task.type == "extraction":
        cut[task.field] = [s for s in record[task.field] if s["end"] <= n_chars]
    return cut


def _encode(record: dict, task: TaskSpec, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    return encode_prompt(tokenizer, task, record["text"]), encode_response(
        tokenizer, format_response(task, record)
    )


def _truncate_to_fit(record: dict, task: TaskSpec, tokenizer, max_length: int):
    """Longest head of the text whose example fits; None when not even an empty text fits."""

    def fits(n_chars: int) -> bool:
        return sum(map(len, _encode(head_record(record, task, n_chars), task, tokenizer))) <= max_length

    if not fits(0):
        return None
    lo, hi = 0, len(record["text"])  # invariant: fits(lo); the full text (hi) does not fit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return _encode(head_record(record, task, lo), task, tokenizer)


def build_examples(
    records: Iterable[dict],
    tasks: dict[str, TaskSpec],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    truncation: Truncation = "truncate",
) -> tuple[list[dict], dict[str, int]]:
    """Turn processed records into SFT examples (one per record and task) and return them with counts."""
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation={truncation!r}; expected one of {', '.join(TRUNCATION_MODES)}")
    examples: list[dict] = []
    stats: Counter = Counter()
    for record in records:
        stats["records"] += 1
        for name, task in tasks.items():
            _check_record(record, name, task)
            prompt, response = _encode(record, task, tokenizer)
            if len(prompt) + len(response) > max_length:
                prompt, response = _handle_too_long(
                    record, name, task, tokenizer, max_length, truncation, stats
                )
                if prompt is None:
                    continue
            examples.append(make_example(prompt, response, name, str(record.get("id", ""))))
            stats[f"examples_{name}"] += 1
            stats["prompt_tokens"] += len(prompt)
            stats["response_tokens"] += len(response)
            stats["max_example_tokens"] = max(stats["max_example_tokens"], len(prompt) + len(response))
    stats["examples"] = len(examples)
    return examples, _flat_stats(stats, tasks)


def _handle_too_long(record, name, task, tokenizer, max_length, truncation, stats):
    rid = record.get("id", "<no id>")
    if truncation == "error":
        prompt, response = _encode(record, task, tokenizer)
        raise DataError(
            f"record {rid}, task {name!r}: {len(prompt) + len(response)} tokens (prompt {len(prompt)}, "
            f"response {len(response)}) > max_length {max_length}; raise max_length or use truncation: truncate|drop"
        )
    if truncation == "drop":
        stats["dropped"] += 1
        return None, None
    fitted = _truncate_to_fit(record, task, tokenizer, max_length)
    if fitted is None:
        log.warning(
            "record %s, task %s: does not fit max_length %d even with an empty text", rid, name, max_length
        )
        stats["dropped"] += 1
        stats["dropped_unfittable"] += 1
        return None, None
    stats["truncated"] += 1
    return fitted


def _flat_stats(stats: Counter, tasks: dict[str, TaskSpec]) -> dict[str, int]:
    keys = [
        "records",
        "examples",
        *(f"examples_{n}" for n in tasks),
        "truncated",
        "dropped",
        "dropped_unfittable",
    ]
    keys += ["prompt_tokens", "response_tokens", "max_example_tokens"]
    return {k: int(stats[k]) for k in keys}


def example_lengths(
    records: Iterable[dict], tasks: dict[str, TaskSpec], tokenizer: PreTrainedTokenizerBase
) -> list[tuple[str, int]]:
    """(task, prompt + response tokens) of every record and task, untruncated (to choose max_length)."""
    out = []
    for record in records:
        for name, task in tasks.items():
            _check_record(record, name, task)
            out.append((name, sum(map(len, _encode(record, task, tokenizer)))))
    return out


class SFTCollator:
    """Batches examples for the model: packed (padding-free, the default) or right-padded.

    Keys other than input_ids/labels (task, id) are dropped, so a plain list of examples works as a dataset.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, packing: bool = True, pad_to_multiple_of: int | None = None
    ):
        self.packing = packing
        if packing:
            # Its separator (-100 on each example's first label) never hides a target: position 0 is prompt.
            self._inner = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
            return
        if tokenizer.pad_token_id is None:
            raise ValueError("padding needs tokenizer.pad_token; set one or use packing")
        if tokenizer.padding_side != "right":
            # position_ids default to 0..n-1 without a mask-derived offset, so only right padding is exact.
            raise ValueError(
                f"training pads on the right; tokenizer.padding_side is {tokenizer.padding_side!r}"
            )
        self._inner = DataCollatorForSeq2Seq(
            tokenizer, padding=True, pad_to_multiple_of=pad_to_multiple_of, label_pad_token_id=IGNORE_INDEX
        )

    def __call__(self, features: list[dict]) -> dict:
        """Collate `features` (dicts with input_ids and labels) into model inputs."""
        return self._inner([{k: f[k] for k in MODEL_KEYS} for f in features])


def make_collator(
    tokenizer: PreTrainedTokenizerBase, packing: bool = True, pad_to_multiple_of: int | None = None
) -> SFTCollator:
    """The collator the train/evaluate stages use (packing on by default)."""
    return SFTCollator(tokenizer, packing=packing, pad_to_multiple_of=pad_to_multiple_of)
