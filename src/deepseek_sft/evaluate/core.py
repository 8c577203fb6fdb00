"""The one evaluation code path: base, SFT and every compressed variant go through `evaluate_model`.

Predictions come from batched greedy generation and are parsed with tasks.parse_response; an answer that
does not parse counts as wrong (classification: the `<unparseable>` class) and is kept, never dropped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config.data import TaskSpec
from ..config.evaluate import EvaluateParams
from ..io import DataError, read_jsonl
from ..sft_data import build_examples, encode_prompt
from ..tasks import answer_budget, format_response, parse_response
from . import metrics as M
from .constrain import echo_constraints
from .efficiency import PeakMemory, measure_latency, parameter_stats, sample_prompts, size_on_disk
from .generate import decode_answers, eos_token_ids, generate_batched, pad_token_id
from .perplexity import perplexity_by_task, response_nll
from .prefix import answer_stop

log = logging.getLogger(__name__)


@dataclass
class ModelResults:
    """Everything measured about one model: prediction rows, metrics per task, details, efficiency."""

    name: str
    rows: list[dict]
    metrics: dict[str, dict[str, float]]
    details: dict[str, dict] = field(default_factory=dict)
    efficiency: dict[str, float] = field(default_factory=dict)

    def flat(self) -> dict[str, dict]:
        """Nested metrics as written to metrics.json: {task: {metric: value}, efficiency: {...}}."""
        return {**self.metrics, "efficiency": self.efficiency}


def check_records(records: list[dict], tasks: dict[str, TaskSpec], source: str = "records") -> None:
    """Every record has an id, a text and each task's field; else DataError naming record and key."""
    for i, record in enumerate(records, start=1):
        for key in ("id", "text", *(t.field for t in tasks.values())):
            if key not in record:
                raise DataError(f"{source}: record {i} (id={record.get('id', '?')}): missing key {key!r}")


def read_split(path: str | Path, tasks: dict[str, TaskSpec]) -> list[dict]:
    """A processed split (JSONL), checked to hold every field the tasks need."""
    records = read_jsonl(path)
    check_records(records, tasks, str(path))
    return records


def resolve_device(choice: str) -> torch.device:
    """`auto` picks CUDA when available."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("evaluate.device=cuda but no CUDA device is available")
    return torch.device(
        "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"
    )


def max_new_tokens(task: TaskSpec, params: EvaluateParams, longest_text_tokens: int = 0) -> int:
    """The generation budget of a task's type (an inline extraction also echoes its text)."""
    return answer_budget(task, getattr(params.max_new_tokens, task.type), longest_text_tokens)


def _row(record: dict, name: str, task: TaskSpec, answer: str) -> dict:
    parsed = parse_response(task, answer, record["text"])
    row = {"id": record["id"], "task": name, "type": task.type, "text": record["text"], "answer": answer}
    row |= {"ok": parsed.ok, "error": parsed.error}
    if task.type == "classification":
        gold, pred = str(record[task.field]), parsed.value if parsed.ok else M.UNPARSEABLE
        return row | {"gold": gold, "pred": pred, "correct": pred == gold}
    reference = format_response(task, record)
    if task.type == "generation":
        return row | {
            "gold": reference,
            "pred": answer.strip(),
            "correct": parsed.ok and answer.strip() == reference,
        }
    spans = parsed.spans if parsed.ok else []
    located = {(s["type"], s["text"]) for s in spans}
    unlocated = [list(item) for item in parsed.value if tuple(item) not in located] if parsed.ok else []
    gold_spans = [
        {k: s[k] for k in ("start", "end", "type")} | {"text": record["text"][s["start"] : s["end"]]}
        for s in record[task.field]
    ]
    gold_keys = {M.span_key(s) for s in M.canonical_spans(len(record["text"]), gold_spans)}
    pred_keys = {M.span_key(s) for s in M.canonical_spans(len(record["text"]), spans)}
    correct = parsed.ok and not unlocated and gold_keys == pred_keys
    return row | {
        "gold": gold_spans,
        "pred": spans,
        "unlocated": unlocated,
        "reference": reference,
        "correct": correct,
    }


def task_metrics(task: TaskSpec, rows: list[dict]) -> tuple[dict[str, float], dict]:
    """Flat metrics and details (per class/type, confusion) of one task's prediction rows."""
    n = len(rows)
    unparseable = sum(not r["ok"] for r in rows) / n if n else 0.0
    if task.type == "classification":
        report = M.classification_metrics([r["gold"] for r in rows], [r["pred"] for r in rows], task.labels)
        details = {k: report.pop(k) for k in ("per_class", "confusion")}
        return report, details
    if task.type == "generation":
        hyps, refs = [r["pred"] for r in rows], [r["gold"] for r in rows]
        flat = {"n": n, "bleu": M.bleu(hyps, refs), "chrf": M.chrf(hyps, refs)}
        return flat | {
            "exact_match": sum(r["correct"] for r in rows) / n if n else 0.0,
            "unparseable_rate": unparseable,
        }, {}
    texts = [r["text"] for r in rows]
    # an unparseable answer credits no entity and costs one false positive, so it is wrong even on 无 records
    extra_fp = [len(r["unlocated"]) + (not r["ok"]) for r in rows]
    report = M.entity_metrics(texts, [r["gold"] for r in rows], [r["pred"] for r in rows], extra_fp)
    details = {"per_type": report.pop("per_type")}
    # seqeval cross-check: it sees only spans located in the text, so it ignores the extra false positives
    # above; equal to our exact-span F1 when every answer parsed and named only strings of the text
    report["seqeval_f1_located"] = M.seqeval_entity_metrics(
        texts, [r["gold"] for r in rows], [r["pred"] for r in rows]
    )["f1"]
    report["bleu"] = M.bleu([r["answer"].strip() for r in rows], [r["reference"] for r in rows])
    report["unparseable_rate"] = unparseable
    return report, details


def score_answers(
    records: list[dict], tasks: dict[str, TaskSpec], answers: dict[str, list[str]]
) -> tuple[list[dict], dict[str, dict], dict[str, dict]]:
    """Parse and score answer strings: (prediction rows, flat metrics per task, details per task)."""
    rows, flat, details = [], {}, {}
    for name, task in tasks.items():
        task_rows = [_row(r, name, task, a) for r, a in zip(records, answers[name], strict=True)]
        flat[name], details[name] = task_metrics(task, task_rows)
        rows.extend(task_rows)
    return rows, flat, details


def answer_constraints(model, tokenizer, task: TaskSpec, records, params: EvaluateParams) -> list | None:
    """One decoding constraint per record (constrain.py), or None when the task's answers decode freely."""
    if not params.constrained_decoding:
        return None
    return echo_constraints(task, tokenizer, [r["text"] for r in records], eos_token_ids(model, tokenizer))


def predict(model, tokenizer, records, tasks, params: EvaluateParams) -> tuple[dict[str, list[str]], dict]:
    """Answer strings per task (in record order) and generation stats (seconds, new tokens)."""
    answers: dict[str, list[str]] = {}
    stats = {"generate_s": 0.0, "generated_tokens": 0}
    texts = [r["text"] for r in records]
    longest = max((len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]), default=0)
    with tqdm(total=len(records) * len(tasks), desc="generate", unit="prompt", mininterval=2.0) as bar:
        for name, task in tasks.items():
            prompts = [encode_prompt(tokenizer, task, r["text"]) for r in records]
            started = time.perf_counter()
            budget = max_new_tokens(task, params, longest)
            stop = answer_stop(task, tokenizer) if params.stop_when_unparseable else None
            constraints = answer_constraints(model, tokenizer, task, records, params)
            ids = generate_batched(
                model,
                tokenizer,
                prompts,
                budget,
                params.batch_size,
                bar.update,
                stop,
                params.rebatch_every,
                constraints,
                params.draft_block,
            )
            stats["generate_s"] += time.perf_counter() - started
            stats["generated_tokens"] += sum(len(a) for a in ids)
            answers[name] = decode_answers(tokenizer, ids)
    return answers, stats


def perplexities(model, tokenizer, records, tasks, params: EvaluateParams) -> dict[str, dict]:
    """Response-token perplexity per task over the training-format examples of `records`."""
    examples, _ = build_examples(records, tasks, tokenizer, params.max_length, params.truncation)
    pad = pad_token_id(tokenizer, eos_token_ids(model, tokenizer))
    return perplexity_by_task(examples, response_nll(model, examples, pad, params.ppl_batch_size))


def evaluate_loaded(
    model,
    tokenizer,
    records: list[dict],
    tasks: dict[str, TaskSpec],
    params: EvaluateParams,
    *,
    name: str = "model",
    model_dir: str | Path | None = None,
    seed: int = 0,
) -> ModelResults:
    """Evaluate an already loaded model on `records` (first `params.limit` of them) for every task."""
    records = records[: params.limit] if params.limit else list(records)
    check_records(records, tasks)
    started, cpu_started = time.perf_counter(), time.process_time()
    with PeakMemory() as memory:
        answers, gen = predict(model, tokenizer, records, tasks, params)
        t0 = time.perf_counter()
        ppl = perplexities(model, tokenizer, records, tasks, params)
        ppl_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        prompts = [encode_prompt(tokenizer, t, r["text"]) for t in tasks.values() for r in records]
        sample = sample_prompts(prompts, params.efficiency.samples, seed)
        eff = params.efficiency
        latency = measure_latency(
            model, sample, eff.decode_tokens, eff.warmup, eos_token_ids(model, tokenizer)
        )
        latency_s = time.perf_counter() - t0
    rows, task_flat, details = score_answers(records, tasks, answers)
    task_flat = {t: flat | ppl.get(t, {}) for t, flat in task_flat.items()}
    efficiency = {**latency, **memory.stats(), **parameter_stats(model)}
    efficiency |= {"generate_s": gen["generate_s"], "generated_tokens": gen["generated_tokens"]}
    efficiency["batched_tokens_per_s"] = (
        gen["generated_tokens"] / gen["generate_s"] if gen["generate_s"] else 0.0
    )
    efficiency |= {"ppl_s": ppl_s, "latency_s": latency_s, "total_s": time.perf_counter() - started}
    # CPU seconds next to wall seconds: on a shared machine wall time also counts other processes' load
    efficiency["cpu_s"] = time.process_time() - cpu_started
    if model_dir is not None:
        efficiency |= size_on_disk(model_dir)
    log.info(
        "%s: evaluated %d records x %d tasks in %.1fs", name, len(records), len(tasks), efficiency["total_s"]
    )
    return ModelResults(name=name, rows=rows, metrics=task_flat, details=details, efficiency=efficiency)


def evaluate_model(
    model_dir: str | Path,
    records: list[dict],
    tasks: dict[str, TaskSpec],
    params: EvaluateParams,
    *,
    name: str | None = None,
    load_options: dict | None = None,
    seed: int = 0,
) -> ModelResults:
    """Load the model in `model_dir` (base_model.load_model_and_tokenizer) and evaluate it."""
    from ..base_model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_dir, **(load_options or {}))
    model.to(resolve_device(params.device))
    name = name or Path(model_dir).name
    return evaluate_loaded(
        model, tokenizer, records, tasks, params, name=name, model_dir=model_dir, seed=seed
    )
