"""Batch-1 speed and peak memory of every model, side by side, each in a fresh process.

Why a fresh process per model: the peak resident memory of a process (`ru_maxrss`) is then that model's load
and inference alone (evaluation's worker processes run several models one after the other, so their peaks
mix). The models run one at a time with the same thread count, in `rounds` passes over all models (the best
pass per model counts, which damps other work on a shared machine).

Measured per model: prefill ms per prompt token (one forward over a `prompt_tokens` prompt), decode ms per token
(greedy single-token steps on the KV cache, median over steps and repeats), peak RSS after both.
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from ..base_model import load_model_and_tokenizer


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


@torch.inference_mode()
def time_decode(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, float]:
    """Prefill ms/token (median forward over `prompt`) and decode ms/token (median greedy cached step)."""
    prefill, steps = [], []
    for _ in range(repeats + 1):  # the first pass warms up (allocations, prepacked int8 weights)
        started = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        prefill.append((time.perf_counter() - started) * 1000 / prompt.shape[1])
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            started = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            steps.append((time.perf_counter() - started) * 1000)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    warm = new_tokens  # drop the warm-up pass
    return {
        "prefill_ms_per_token": statistics.median(prefill[1:]),
        "decode_ms_per_token": statistics.median(steps[warm:]),
    }


def measure_model(
    path: str, load_options: dict, prompt_tokens: int, new_tokens: int, repeats: int, threads: int, seed: int
) -> dict[str, float]:
    """Load `path` (compressed or not) and time it at batch 1; run in a fresh process (see module doc)."""
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(path, **load_options)  # packed variants via load_compressed
    load_s = time.perf_counter() - started
    rss_loaded = _peak_rss_mb()
    generator = torch.Generator().manual_seed(seed)
    vocab = min(len(tokenizer), model.config.vocab_size)
    prompt = torch.randint(3, vocab, (1, prompt_tokens), generator=generator)
    result = time_decode(model, prompt, new_tokens, repeats)
    return result | {"load_s": load_s, "peak_rss_mb": _peak_rss_mb(), "rss_after_load_mb": rss_loaded}


def measure_all(
    models: dict[str, str | Path],
    load_options: dict | None = None,
    *,
    prompt_tokens: int = 32,
    new_tokens: int = 32,
    repeats: int = 3,
    threads: int = 0,
    rounds: int = 1,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """{name: speed and memory} for every model, each measured in its own spawned process, one at a time."""
    context = multiprocessing.get_context("spawn")
    best: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        for name, path in models.items():
            with ProcessPoolExecutor(1, mp_context=context) as pool:
                result = pool.submit(
                    measure_model,
                    str(path),
                    load_options or {},
                    prompt_tokens,
                    new_tokens,
                    repeats,
                    threads,
                    seed,
                ).result()
            if name not in best or result["decode_ms_per_token"] < best[name]["decode_ms_per_token"]:
                best[name] = result
    return best


def speedups(reference: dict[str, float], variant: dict[str, float]) -> dict[str, float]:
    """Prefill and decode speed-up of a variant over the reference (> 1 = faster), and its peak memory."""
    return {
        "prefill_speedup": reference["prefill_ms_per_token"] / variant["prefill_ms_per_token"],
        "decode_speedup": reference["decode_ms_per_token"] / variant["decode_ms_per_token"],
        "decode_ms_per_token": variant["decode_ms_per_token"],
        "prefill_ms_per_token": variant["prefill_ms_per_token"],
        "peak_rss_mb": variant["peak_rss_mb"],
        "memory_ratio": reference["peak_rss_mb"] / variant["peak_rss_mb"],
    }


def main(argv: list[str] | None = None) -> None:
    """`python -m deepseek_sft.compress.speed sft=models/sft quantize=models/compressed/quantize ...`: the
    stage's side-by-side batch-1 measurement on any model directories (the first is the reference)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("models", nargs="+", help="name=directory, the reference first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    models = dict(item.split("=", 1) for item in args.models)
    results = measure_all(models, threads=args.threads, rounds=args.rounds, new_tokens=args.new_tokens)
    reference = results[next(iter(models))]
    for name, result in results.items():
        print(json.dumps({"model": name, **result, **speedups(reference, result)}))


if __name__ == "__main__":
    main()
