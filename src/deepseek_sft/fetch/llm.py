"""fetch.source: llm — synthetic records from an OpenAI-compatible chat-completions endpoint.

For every label in `fetch.llm.prompts` (a label of `fetch.llm.label_field`), `records_per_label` requests
are sent (llm_client.py: concurrency cap, token bucket, retries with backoff / Retry-After). Each reply
must be one JSON object matching `reply_schema` (jsonschema)::

    {"text": "...", "entities": [{"text": "招商银行", "type": "ORG", "start": 0, "end": 4}, ...]}

start/end are optional; when given they must cover the entity text, otherwise the entity is located in
the text left to right (tasks.locate_spans). A kept reply becomes a raw record with the single
annotator "llm" holding the asked label, `fixed_labels` and the entity spans (one annotator: label_qa has
no agreement to measure for it). Everything else goes to the rejects file with its reason.

Side outputs (side_dir, next to records.jsonl):
- llm_rejects.jsonl: {id, label, index, reason, detail, reply} per rejected request;
- llm_review_queue.jsonl: a seeded sample (`review_fraction`) of kept records for people to check.
Cost: tokens from the API's `usage` (rejected replies cost too) times the per-1k prices.
The API key is read from the environment variable `api_key_env` and only ever sent as a header.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import random
import re
from pathlib import Path

import httpx
import jsonschema

from ..config import ParamsError, StageParams, TaskSpec
from ..config.sources import LlmParams
from ..io import write_jsonl
from ..tasks import locate_spans
from .llm_client import ChatClient, Reply

VERSION = "llm-chat-v1"
SIDE_OUTPUTS = ("llm_rejects.jsonl", "llm_review_queue.jsonl")
DEFAULT_SIDE_DIR = Path("data/raw")
ANNOTATOR = "llm"

FORMAT_INSTRUCTION = (
    '\n只输出一个 JSON 对象，格式为 {{"text": "<生成的文本>"{entities}}}。不要输出 JSON 以外的任何内容。'
)
ENTITY_INSTRUCTION = (
    ', "entities": [{{"text": "<实体原文>", "type": "<类型>"}}]'
    "，实体类型只能是 {types}，实体原文必须逐字出现在 text 中，没有实体时输出空列表"
)


def reply_schema(entity_types: list[str] | None, with_entities: bool) -> dict:
    """JSON schema of a reply; entities are required when asked for."""
    entity = {
        "type": "object",
        "required": ["text", "type"],
        "properties": {
            "text": {"type": "string", "minLength": 1},
            "type": {"type": "string", **({"enum": entity_types} if entity_types else {})},
            "start": {"type": "integer", "minimum": 0},
            "end": {"type": "integer", "minimum": 1},
        },
        "additionalProperties": False,
    }
    properties = {"text": {"type": "string", "minLength": 1, "pattern": r"\S"}}
    if with_entities:
        properties["entities"] = {"type": "array", "items": entity}
    return {
        "type": "object",
        "required": ["text", "entities"] if with_entities else ["text"],
        "properties": properties,
        "additionalProperties": False,
    }


# --- params ------------------------------------------------------------------------------------------


def extraction_task(tasks: dict[str, TaskSpec]) -> TaskSpec | None:
    """The first extraction task (where entity spans are stored), if any."""
    return next((t for t in tasks.values() if t.type == "extraction"), None)


def _check_label(tasks: dict[str, TaskSpec], field: str, value: str, key: str) -> None:
    task = next((t for t in tasks.values() if t.field == field), None)
    if task is None or task.type != "classification":
        raise ParamsError(f"{key}: {field!r} is not a classification field of params tasks")
    if task.labels is not None and value not in task.labels:
        raise ParamsError(f"{key}: label {value!r} is not in tasks labels of {field!r}")


def check_params(llm: LlmParams, tasks: dict[str, TaskSpec]) -> None:
    """Fail before any request when the params cannot work."""
    if llm.base_url is None:
        raise ParamsError("fetch.source='llm' needs fetch.llm.base_url")
    if not llm.prompts:
        raise ParamsError("fetch.source='llm' needs fetch.llm.prompts (label -> prompt template)")
    for label, template in llm.prompts.items():
        _check_label(tasks, llm.label_field, label, f"fetch.llm.prompts.{label}")
        try:
            template.format(label=label, index=0, entity_types="")
        except (KeyError, IndexError, ValueError) as e:
            raise ParamsError(
                f"fetch.llm.prompts.{label}: bad placeholder {e}; allowed: {{label}}, {{index}}, {{entity_types}}"
            ) from None
    for field, value in llm.fixed_labels.items():
        _check_label(tasks, field, value, f"fetch.llm.fixed_labels.{field}")
    if llm.with_entities and extraction_task(tasks) is None:
        raise ParamsError(
            "fetch.llm.with_entities: params tasks have no extraction task to store entities in"
        )


def api_key(llm: LlmParams) -> str:
    """The key from the environment (never from params, never logged)."""
    key = os.environ.get(llm.api_key_env, "")
    if not key:
        raise ParamsError(f"environment variable {llm.api_key_env} (fetch.llm.api_key_env) is not set")
    return key


# --- requests ----------------------------------------------------------------------------------------


def request_body(llm: LlmParams, label: str, index: int, entity_types: list[str], seed: int) -> dict:
    """The chat-completions body of request `index` for `label`."""
    types = "、".join(entity_types)
    prompt = llm.prompts[label].format(label=label, index=index, entity_types=types)
    entities = ENTITY_INSTRUCTION.format(types=types) if llm.with_entities else ""
    body = {
        "model": llm.model,
        "messages": [
            {"role": "system", "content": llm.system_prompt},
            {"role": "user", "content": prompt + FORMAT_INSTRUCTION.format(entities=entities)},
        ],
        "temperature": llm.temperature,
        "max_tokens": llm.max_tokens,
        # a per-request seed: providers that honour it return the same replies for the same params
        "seed": random.Random(f"{seed}:llm:{label}:{index}").randrange(2**31),
    }
    if llm.json_mode:
        body["response_format"] = {"type": "json_object"}
    return body


class Rejected(Exception):
    """A reply that cannot become a record; `reason` is a short key, the message the detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def parse_reply(content: str, schema: dict) -> dict:
    """The reply's JSON object, validated against `schema` (a ```json fence around it is tolerated)."""
    text = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", content)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise Rejected("invalid_json", f"{e.msg} at char {e.pos}") from None
    try:
        jsonschema.validate(obj, schema)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise Rejected("schema", f"{where}: {e.message}") from None
    return obj


def entity_spans(obj: dict) -> list[dict]:
    """Spans of the reply's entities in its text; Rejected if one is absent, misplaced or overlapping."""
    text, spans = obj["text"], []
    for item in obj.get("entities", []):
        if "start" in item or "end" in item:
            start, end = item.get("start", -1), item.get("end", -1)
            if start < 0 or end <= start or text[start:end] != item["text"]:
                raise Rejected("span_mismatch", f"text[{start}:{end}] is not {item['text']!r}")
            spans.append({"start": start, "end": end, "type": item["type"]})
            continue
        found = locate_spans([(item["type"], item["text"])], text)
        if not found:
            raise Rejected("entity_not_in_text", f"entity {item['text']!r} does not occur in the text")
        spans.append({"start": found[0]["start"], "end": found[0]["end"], "type": item["type"]})
    spans.sort(key=lambda s: (s["start"], s["end"]))
    for a, b in itertools.pairwise(spans):
        if b["start"] < a["end"]:
            raise Rejected("overlapping_entities", f"spans {a} and {b} overlap")
    return spans


def to_record(
    llm: LlmParams, label: str, index: int, reply: Reply, schema: dict, ent_field: str | None
) -> dict:
    """A raw record from a reply; Rejected when the reply is unusable."""
    if reply.error:
        raise Rejected(reply.error, f"no usable reply after {reply.attempts} attempt(s)")
    obj = parse_reply(reply.content, schema)
    labels: dict = {llm.label_field: label, **llm.fixed_labels}
    if llm.with_entities and ent_field is not None:
        labels[ent_field] = entity_spans(obj)
    return {
        "id": f"llm-{label}-{index:05d}",
        "text": obj["text"],
        "source": "llm",
        "annotations": {ANNOTATOR: labels},
        "meta": {"model": llm.model, "label": label, "index": index, "usage": reply.usage},
    }


async def request_all(llm: LlmParams, key: str, jobs: list[tuple[str, int]], seed: int, types: list[str]):
    """Replies for every (label, index) job, in job order, plus the client's counters."""
    async with httpx.AsyncClient() as http:
        client = ChatClient(llm, key, http)
        replies = await asyncio.gather(
            *(client.chat(request_body(llm, label, index, types, seed)) for label, index in jobs)
        )
    return replies, client


# --- outputs -----------------------------------------------------------------------------------------


def review_sample(records: list[dict], fraction: float, seed: int) -> list[dict]:
    """A seeded sample of kept records for human review, each with a pending review slot."""
    if not records or fraction <= 0:
        return []
    k = min(len(records), math.ceil(fraction * len(records)))
    chosen = sorted(random.Random(f"{seed}:llm-review").sample(range(len(records)), k))
    return [{**records[i], "review": {"status": "pending", "reviewer": None, "notes": ""}} for i in chosen]


def cost_stats(llm: LlmParams, usage: dict, kept: int) -> dict:
    """Token totals and cost (in `llm.currency`); cost per kept record when any was kept."""
    cost = (
        usage["prompt_tokens"] / 1000 * llm.price_per_1k_prompt_tokens
        + usage["completion_tokens"] / 1000 * llm.price_per_1k_completion_tokens
    )
    stats = {
        "llm_prompt_tokens": usage["prompt_tokens"],
        "llm_completion_tokens": usage["completion_tokens"],
        "llm_cost": round(cost, 6),
    }
    if kept:
        stats["llm_cost_per_kept_record"] = round(cost / kept, 8)
    return stats


def fetch_records(
    params: StageParams, side_dir: str | os.PathLike | None = None, stats: dict | None = None
) -> list[dict]:
    """Generate records per `fetch.llm`; write rejects and the review queue to `side_dir`; add to `stats`."""
    llm: LlmParams = params.section.llm
    check_params(llm, params.tasks)
    key = api_key(llm)
    ent_task = extraction_task(params.tasks)
    types = (ent_task.entity_types or []) if ent_task else []
    schema = reply_schema(ent_task.entity_types if ent_task else None, llm.with_entities)
    jobs = [(label, i) for label in llm.prompts for i in range(llm.records_per_label)]
    replies, client = asyncio.run(request_all(llm, key, jobs, params.seed, types))
    records, rejects = [], []
    for (label, index), reply in zip(jobs, replies, strict=True):
        try:
            records.append(to_record(llm, label, index, reply, schema, ent_task.field if ent_task else None))
        except Rejected as e:
            rid = f"llm-{label}-{index:05d}"
            rejects.append({"id": rid, "label": label, "index": index, "reason": e.reason, "detail": str(e)})
            rejects[-1]["reply"] = reply.content
    side = Path(side_dir) if side_dir is not None else DEFAULT_SIDE_DIR
    queue = review_sample(records, llm.review_fraction, params.seed)
    write_jsonl(side / "llm_rejects.jsonl", rejects)
    write_jsonl(side / "llm_review_queue.jsonl", queue)
    numbers = {
        "llm_requests": len(jobs),
        "llm_http_calls": client.http_calls,
        "llm_retries": client.retries,
        "llm_kept": len(records),
        "llm_rejected": len(rejects),
        "llm_review_queue": len(queue),
        **{
            f"llm_rejected_{r}": sum(x["reason"] == r for x in rejects)
            for r in sorted({x["reason"] for x in rejects})
        },
        **cost_stats(llm, client.usage_total, len(records)),
    }
    if stats is not None:
        stats.update(numbers)
    return records
