"""Turn the runs' raw results into bench.json: rates, padding, MFU, held-out loss, ratios, plots."""

from __future__ import annotations

import math
from pathlib import Path

from ..io import atomic_path, write_json, write_metrics
from .flops import mfu
from .runs import padding_fraction


def derive(result: dict, train_flops_per_token: float, peak_per_thread: dict[int, float]) -> dict:
    """Add tokens/s (steady state and overall), padding fraction, MFU and held-out loss to a run result."""
    if "error" in result or "skipped" in result:
        return result
    spec = result["spec"]
    tps = result["window_tokens"] / result["window_seconds"] if result["window_seconds"] > 0 else 0.0
    peak = spec["processes"] * peak_per_thread.get(spec["threads"], 0.0)
    out = dict(result)
    out["tokens_per_second"] = round(tps, 2)
    out["tokens_per_second_overall"] = (
        round(result["real_tokens"] / result["train_seconds"], 2) if result["train_seconds"] else 0.0
    )
    cpu = result.get("window_cpu_seconds", 0.0)
    out["tokens_per_cpu_second"] = round(result["window_tokens"] / cpu, 2) if cpu else 0.0
    out["padding_fraction"] = round(padding_fraction(result["real_tokens"], result["padded_tokens"]), 4)
    out["peak_flops"] = peak
    out["mfu"] = round(mfu(train_flops_per_token, tps, peak), 5)
    if result.get("heldout_tokens"):
        out["heldout_loss"] = round(result["heldout_nll_sum"] / result["heldout_tokens"], 5)
    return out


def _rate(runs: dict, aliases: dict, role: str) -> float | None:
    run = runs.get(aliases.get(role, ""), {})
    return run.get("tokens_per_second") or None


def _cpu_rate(runs: dict, aliases: dict, role: str) -> float | None:
    return runs.get(aliases.get(role, ""), {}).get("tokens_per_cpu_second") or None


def _loss(runs: dict, aliases: dict, role: str) -> float | None:
    return runs.get(aliases.get(role, ""), {}).get("heldout_loss")


def ratios(runs: dict[str, dict], aliases: dict[str, str]) -> dict[str, float | None]:
    """a/b and a/c of real tokens/s (and of tokens per CPU-second, the view less skewed by other processes
    sharing the cores), and the held-out loss differences a - b and a - c (<= 0: a is as good or better)."""
    out: dict[str, float | None] = {}
    a, a_cpu = _rate(runs, aliases, "a"), _cpu_rate(runs, aliases, "a")
    for other in ("b", "c"):
        rate, cpu = _rate(runs, aliases, other), _cpu_rate(runs, aliases, other)
        out[f"tokens_per_second_a_over_{other}"] = round(a / rate, 4) if a and rate else None
        out[f"tokens_per_cpu_second_a_over_{other}"] = round(a_cpu / cpu, 4) if a_cpu and cpu else None
        la, lo = _loss(runs, aliases, "a"), _loss(runs, aliases, other)
        out[f"heldout_loss_a_minus_{other}"] = (
            round(la - lo, 5) if la is not None and lo is not None else None
        )
    return out


def deepspeed_overhead(runs: dict[str, dict], aliases: dict[str, str]) -> dict[str, float | None]:
    """The same path and layout with and without DeepSpeed: overhead = 1 - rate(DeepSpeed) / rate(plain)."""
    ds, plain = _rate(runs, aliases, "deepspeed"), _rate(runs, aliases, "plain")
    return {
        "run_deepspeed": aliases.get("deepspeed"),
        "run_plain": aliases.get("plain"),
        "tokens_per_second_deepspeed": ds,
        "tokens_per_second_plain": plain,
        "overhead_fraction": round(1.0 - ds / plain, 4) if ds and plain else None,
    }


def layout_choice(runs: dict[str, dict], aliases: dict[str, str]) -> dict:
    """Tokens/s of each processes x threads layout (with DeepSpeed) and the fastest one."""
    rates = {
        role.removeprefix("layout_"): _rate(runs, aliases, role)
        for role in aliases
        if role.startswith("layout_")
    }
    measured = {k: v for k, v in rates.items() if v}
    return {"tokens_per_second": rates, "fastest": max(measured, key=measured.get) if measured else None}


def flat_metrics(report: dict) -> dict[str, float]:
    """metrics.json: the headline numbers, flat and numeric."""
    flat: dict[str, float] = {}
    for role in ("a", "b", "c"):
        run = report["runs"].get(report["aliases"].get(role, ""), {})
        for key in (
            "tokens_per_second",
            "tokens_per_cpu_second",
            "padding_fraction",
            "mfu",
            "heldout_loss",
            "max_rss_mb",
        ):
            if isinstance(run.get(key), int | float):
                flat[f"{role}_{key}"] = run[key]
    for key, value in {**report["ratios"], **report["deepspeed_overhead"]}.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            flat[key] = value
    flat["bench_seconds"] = report["bench_seconds"]
    return flat


def write_report(report: dict, out_dir: Path) -> None:
    """bench.json (everything), metrics.json (headline numbers) and bench.png."""
    write_json(out_dir / "bench.json", report)
    write_metrics(out_dir / "metrics.json", flat_metrics(report))
    plot(report, out_dir / "bench.png")


def plot(report: dict, path: Path) -> None:
    """Two bar charts: real tokens/s and held-out loss of every run (a, b, c marked), ratios in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    roles = {v: k for k, v in report["aliases"].items() if k in ("a", "b", "c")}
    rows = [
        (f"{roles[name]}: {name}" if name in roles else name, run)
        for name, run in report["runs"].items()
        if "tokens_per_second" in run
    ]
    labels = [label for label, _ in rows]
    palette = [
        "#1f77b4" if label.startswith("a:") else "#ff7f0e" if label[:2] in ("b:", "c:") else "#9aa5b1"
        for label in labels
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(rows) + 2.0))
    sns.barplot(
        x=[run["tokens_per_second"] for _, run in rows],
        y=labels,
        hue=labels,
        palette=palette,
        legend=False,
        ax=axes[0],
    )
    axes[0].set(xlabel="real (non-padding) tokens / s", ylabel="", title="training throughput")
    losses = [run.get("heldout_loss", math.nan) for _, run in rows]
    sns.barplot(x=losses, y=labels, hue=labels, palette=palette, legend=False, ax=axes[1])
    finite = [x for x in losses if not math.isnan(x)]
    if finite:
        axes[1].set_xlim(min(finite) * 0.98, max(finite) * 1.01)
    axes[1].set(
        xlabel="held-out loss (mean CE per val response token)", ylabel="", title="after the same tokens"
    )
    r = report["ratios"]
    fig.suptitle(
        f"budget {report['data']['budget_real_tokens']} real tokens; tokens/s a/b = "
        f"{r.get('tokens_per_second_a_over_b')}, a/c = {r.get('tokens_per_second_a_over_c')}"
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
