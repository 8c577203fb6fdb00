"""reports/report.md and a self-contained reports/report.html (figures inlined as base64) from one document.

The document is a list of blocks (heading, paragraph, table, figure) rendered twice, so the Markdown and the
HTML never disagree. It summarises data QA (reports/label_qa), training (reports/train, dvclive TSVs),
evaluation and errors (reports/evaluate).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..io import write_text


@dataclass
class Block:
    """One piece of the report: kind is h2/h3/p/table/img; `data` a DataFrame for tables, a Path for images."""

    kind: str
    text: str = ""
    data: object = None


def read_json_if_exists(path: str | Path | None) -> dict | None:
    """A JSON file's content, or None when the path is unset or missing."""
    if path is None or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text(encoding="utf-8"))


def flatten(obj: dict, prefix: str = "") -> dict[str, object]:
    """Dotted keys of a nested dict, as `dvc metrics show` prints them."""
    out: dict[str, object] = {}
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out |= flatten(value, name)
        else:
            out[name] = value
    return out


def metrics_table(metrics: dict, limit: int = 25) -> pd.DataFrame:
    """A two-column (metric, value) table of a stage's metrics.json, scalars only, first `limit` keys."""
    flat = [(k, v) for k, v in flatten(metrics).items() if isinstance(v, int | float | str | bool)]
    return pd.DataFrame(flat[:limit], columns=["metric", "value"])


def dvclive_curves(train_reports: str | Path | None) -> dict[str, pd.DataFrame]:
    """Training curves that dvclive logged under `train_reports` (any depth: <dir>/plots/metrics/**/*.tsv)."""
    if train_reports is None or not Path(train_reports).is_dir():
        return {}
    curves = {}
    for tsv in sorted(Path(train_reports).rglob("plots/metrics/**/*.tsv")):
        frame = pd.read_csv(tsv, sep="\t")
        if "step" in frame.columns and frame.shape[1] >= 2:
            metrics_root = next(p for p in tsv.parents if p.name == "metrics")
            name = tsv.relative_to(metrics_root).with_suffix("").as_posix()
            curves[name] = frame[["step", frame.columns[-1]]]
    return curves


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def _formatted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.map(_fmt) if len(frame) else frame


def to_markdown(blocks: list[Block], title: str, base_dir: Path) -> str:
    """Markdown of the document; images are linked relative to the report's directory."""
    parts = [f"# {title}\n"]
    for b in blocks:
        if b.kind in ("h2", "h3"):
            parts.append(f"{'#' * int(b.kind[1])} {b.text}\n")
        elif b.kind == "p":
            parts.append(f"{b.text}\n")
        elif b.kind == "table":
            parts.append(
                _formatted(b.data).to_markdown(index=False, disable_numparse=True) + "\n"
                if len(b.data)
                else "_(empty)_\n"
            )
        elif b.kind == "img":
            rel = Path(os.path.relpath(Path(b.data).resolve(), base_dir.resolve())).as_posix()
            parts.append(f"![{b.text}]({rel})\n")
    return "\n".join(parts)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.2em;font-size:0.9em}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f2f2f2}img{max-width:100%;border:1px solid #eee;margin:0.4em 0}figcaption{color:#666;font-size:0.85em}
code{background:#f5f5f5;padding:0 3px}"""


def _inline_image(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def to_html(blocks: list[Block], title: str) -> str:
    """A single HTML file with every figure embedded, so it can be mailed or archived as is."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for b in blocks:
        if b.kind in ("h2", "h3"):
            body.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{html.escape(b.text)}</p>")
        elif b.kind == "table":
            body.append(
                _formatted(b.data).to_html(index=False, escape=True, border=0)
                if len(b.data)
                else "<p>(empty)</p>"
            )
        elif b.kind == "img":
            body.append(_inline_image(Path(b.data), b.text))
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(
    blocks: list[Block], title: str, md_path: str | Path | None, html_path: str | Path | None
) -> None:
    """Write the Markdown and/or HTML rendering of the document (atomically)."""
    if md_path is not None:
        write_text(md_path, to_markdown(blocks, title, Path(md_path).parent))
    if html_path is not None:
        write_text(html_path, to_html(blocks, title))


def data_qa_blocks(label_qa_dir: str | Path | None) -> list[Block]:
    """Data-quality section from reports/label_qa (metrics and its figures), if that stage ran."""
    blocks = [Block("h2", "Data quality (label_qa)")]
    metrics = read_json_if_exists(Path(label_qa_dir) / "metrics.json" if label_qa_dir else None)
    if metrics is None:
        return [*blocks, Block("p", "No reports/label_qa/metrics.json found; run the label_qa stage.")]
    blocks.append(Block("table", data=metrics_table(metrics)))
    for png in sorted(Path(label_qa_dir).glob("*.png")):
        blocks.append(Block("img", png.stem.replace("_", " "), png))
    return blocks


def training_blocks(train_reports: str | Path | None, curves_png: Path | None) -> list[Block]:
    """Training section: reports/train metrics and the dvclive curves figure, if training ran."""
    blocks = [Block("h2", "Training")]
    metrics = read_json_if_exists(Path(train_reports) / "metrics.json" if train_reports else None)
    if metrics is None and curves_png is None:
        return [*blocks, Block("p", "No training reports found (reports/train); run the train stage.")]
    if metrics is not None:
        blocks.append(Block("table", data=metrics_table(metrics)))
    if curves_png is not None:
        blocks.append(Block("img", "training curves (dvclive)", curves_png))
    return blocks
