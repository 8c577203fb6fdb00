"""`make bench`: prepare the shared data, run every contender in its own subprocess, collect the results."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config.bench import parse_layout
from ..io import read_jsonl, write_json, write_jsonl
from ..sft_data import build_examples
from .flops import attention_context
from .runs import RunSpec, budget_examples

log = logging.getLogger(__name__)
MODEL_KEYS = ("input_ids", "labels", "task", "id")


@dataclass(frozen=True)
class BenchPaths:
    """Inputs and outputs of the bench (from the command line)."""

    base: Path
    train: Path
    val: Path
    out: Path

    @property
    def work(self) -> Path:
        """Scratch directory: the shared examples and each run's logs and results."""
        return self.out / "work"


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_layout(train) -> tuple[int, int]:
    """(processes, threads) the train stage runs with."""
    threads = train.threads_per_process or max(1, usable_cores() // train.num_processes)
    return train.num_processes, threads


def global_batch(train, bench) -> int:
    """Examples per optimizer step for every contender (the train stage's, unless bench overrides it)."""
    if bench.global_batch_size is not None:
        return bench.global_batch_size
    return train.per_device_train_batch_size * train.gradient_accumulation_steps * train.num_processes


def plan_runs(train, bench) -> tuple[list[RunSpec], dict[str, str]]:
    """The runs to launch, and aliases (a role such as 'a' -> the run that plays it)."""
    cores = usable_cores()
    procs, threads = default_layout(train)
    ds = train.deepspeed is not None
    a = RunSpec(f"a_{'ds' if ds else 'plain'}_{procs}x{threads}", "project", procs, threads, ds)
    runs = {a.name: a}
    aliases = {"a": a.name}
    for layout in bench.layouts:
        p, t = parse_layout(layout)
        spec = RunSpec(f"a_ds_{p}x{t}", "project", p, t, True)
        runs.setdefault(spec.name, spec)
        aliases[f"layout_{layout}"] = spec.name
    if bench.deepspeed_overhead:
        for spec in (
            RunSpec(f"a_ds_1x{cores}", "project", 1, cores, True),
            RunSpec(f"a_plain_1x{cores}", "project", 1, cores, False),
        ):
            runs.setdefault(spec.name, spec)
        aliases["deepspeed"], aliases["plain"] = f"a_ds_1x{cores}", f"a_plain_1x{cores}"
    runs["b"] = RunSpec("b", "hf", 1, cores)
    aliases["b"] = "b"
    if bench.trl:
        runs["c"] = RunSpec("c", "trl", 1, cores)
        aliases["c"] = "c"
    order = [a.name, "b", *(["c"] if bench.trl else []), *(n for n in runs if n not in (a.name, "b", "c"))]
    specs = [runs[n] for n in order]
    if bench.profile_steps:
        specs.append(RunSpec("profile_a", "project", procs, threads, ds, profile_steps=bench.profile_steps))
    return specs, aliases


def _slim(example: dict) -> dict:
    return {k: example[k] for k in MODEL_KEYS}


def prepare_work(paths: BenchPaths, stage, bench, tokenizer) -> dict:
    """Write the budget's train examples and the held-out val examples once, for every run to read."""
    train = stage.section
    train_all, _ = build_examples(
        read_jsonl(paths.train), stage.tasks, tokenizer, train.max_length, train.truncation
    )
    budget = budget_examples(train_all, bench.budget_tokens, stage.seed)
    val, _ = build_examples(read_jsonl(paths.val), stage.tasks, tokenizer, train.max_length, train.truncation)
    if bench.heldout_max_examples is not None and bench.heldout_max_examples < len(val):
        val = random.Random(stage.seed).sample(val, bench.heldout_max_examples)
    write_jsonl(paths.work / "train_examples.jsonl", map(_slim, budget))
    write_jsonl(paths.work / "val_examples.jsonl", map(_slim, val))
    lengths = [len(e["input_ids"]) for e in budget]
    meta = {
        "global_batch": global_batch(train, bench),
        "budget_examples": len(budget),
        "budget_real_tokens": sum(lengths),
        "budget_target_tokens": sum(sum(1 for x in e["labels"] if x != -100) for e in budget),
        "train_examples_available": len(train_all),
        "val_examples": len(val),
        "val_real_tokens": sum(len(e["input_ids"]) for e in val),
        "mean_example_tokens": round(sum(lengths) / len(lengths), 3),
        "attention_context": attention_context(lengths),
    }
    write_json(paths.work / "meta.json", meta)
    return meta


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(spec: RunSpec, paths: BenchPaths) -> list[str]:
    """The command line of one run: `deepspeed --num_gpus P --module ...` for DeepSpeed, else `python -m`."""
    args = [
        "--spec",
        json.dumps(spec.to_dict()),
        "--work",
        str(paths.work),
        "--base",
        str(paths.base),
        "--out",
        str(paths.work / spec.name),
    ]
    module = "deepseek_sft.bench.worker"
    if spec.deepspeed:
        launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
        return [
            launcher,
            "--num_gpus",
            str(spec.processes),
            "--master_port",
            str(_free_port()),
            "--module",
            module,
            *args,
        ]
    return [sys.executable, "-m", module, *args]


def launch(spec: RunSpec, paths: BenchPaths, timeout: float) -> dict:
    """Run one spec in a fresh process group; return its rank results merged (or the error)."""
    out = paths.work / spec.name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    log.info("bench run %s: %s (%s)", spec.name, spec.contender, spec.layout)
    with open(out / "log.txt", "w", encoding="utf-8") as logfile:
        proc = subprocess.Popen(
            command(spec, paths), stdout=logfile, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole launcher + ranks group this run started
            proc.wait()
            code = "timeout"
    wall = round(time.perf_counter() - start, 2)
    ranks = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(out.glob("result_rank*.json"))]
    if code != 0 or len(ranks) != spec.processes:
        tail = (out / "log.txt").read_text(encoding="utf-8", errors="replace")[-3000:]
        log.error("bench run %s failed (%s); log tail:\n%s", spec.name, code, tail)
        return {"name": spec.name, "spec": spec.to_dict(), "error": f"exit {code}", "wall_seconds": wall}
    return merge_ranks(ranks) | {"wall_seconds": wall}


def merge_ranks(ranks: list[dict]) -> dict:
    """One result from the per-rank results: tokens summed, time and peaks over ranks."""
    first = min(ranks, key=lambda r: r["rank"])
    merged = dict(first)
    for key in ("real_tokens", "padded_tokens", "window_tokens", "window_cpu_seconds"):
        merged[key] = sum(r[key] for r in ranks)
    for key in ("window_seconds", "train_seconds", "collate_seconds"):
        merged[key] = max(r[key] for r in ranks)
    merged["max_rss_mb"] = round(sum(r["max_rss_mb"] for r in ranks), 1)
    merged["max_rss_mb_per_rank"] = [round(r["max_rss_mb"], 1) for r in ranks]
    merged.pop("rank", None)
    return merged


def run_all(
    specs: list[RunSpec], paths: BenchPaths, timeout: float, essential: set[str], deadline: float
) -> dict[str, dict]:
    """Launch the runs one after another (never two at once: they would share the cores).

    The runs in `essential` (a, b, c) always run; any other run is skipped when the longest run so far
    would carry the bench past `deadline` (a perf_counter time), so `make bench` stays within its budget.
    """
    results: dict[str, dict] = {}
    longest = 0.0
    for spec in specs:
        if spec.name not in essential and time.perf_counter() + longest > deadline:
            log.warning("bench run %s skipped: it would exceed bench.max_seconds", spec.name)
            results[spec.name] = {"name": spec.name, "spec": spec.to_dict(), "skipped": "bench.max_seconds"}
            continue
        results[spec.name] = launch(spec, paths, timeout)
        longest = max(longest, results[spec.name]["wall_seconds"])
    return results


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "transformers", "deepspeed", "trl", "accelerate"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def _training_dtype(train, base_params):
    import torch

    if train.bf16:
        return torch.bfloat16
    return getattr(torch, base_params.dtype) if base_params.dtype != "auto" else torch.float32


def run_bench(paths: BenchPaths, stage, bench, base_params) -> dict:
    """Run the whole bench; return the report (bench.json content)."""
    from transformers import AutoConfig, AutoTokenizer

    from .contenders import trl_defaults
    from .flops import flops_per_token, matmul_peak
    from .profile import shares
    from .report import deepspeed_overhead, derive, layout_choice, ratios

    started = time.perf_counter()
    trust = base_params.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(paths.base, trust_remote_code=trust)
    meta = prepare_work(paths, stage, bench, tokenizer)
    flops = flops_per_token(
        AutoConfig.from_pretrained(paths.base, trust_remote_code=trust), meta["attention_context"]
    )
    specs, aliases = plan_runs(stage.section, bench)
    dtype = _training_dtype(stage.section, base_params)
    peaks = {
        t: matmul_peak(t, bench.peak_matrix_size, bench.peak_seconds, dtype)
        for t in {s.threads for s in specs}
    }
    log.info("budget %s; matmul peak per thread count %s", meta, peaks)
    essential = {aliases[role] for role in ("a", "b", "c") if role in aliases}
    raw = run_all(specs, paths, bench.run_timeout_s, essential, started + bench.max_seconds)
    runs = {
        name: derive(r, flops["train"], peaks) for name, r in raw.items() if not name.startswith("profile")
    }
    profile = raw.get("profile_a", {})
    report = {
        "data": meta,
        "aliases": aliases,
        "runs": runs,
        "ratios": ratios(runs, aliases),
        "deepspeed_overhead": deepspeed_overhead(runs, aliases),
        "layouts": layout_choice(runs, aliases),
        "flops_per_token": flops,
        "matmul_peak_flops_per_thread_count": {str(k): v for k, v in peaks.items()},
        "peak_dtype": str(dtype).removeprefix("torch."),
        "profile": {
            "run": profile.get("spec"),
            "milliseconds": profile.get("profile_ms"),
            "shares": shares(profile.get("profile_ms") or {}),
            "error": profile.get("error"),
        },
        "trl_defaults": trl_defaults() if bench.trl else None,
        "machine": {"usable_cores": usable_cores(), "loadavg_1m_at_end": os.getloadavg()[0]},
        "versions": _versions(),
        "bench": bench.model_dump(),
    }
    report["bench_seconds"] = round(time.perf_counter() - started, 1)
    return report
