"""The run report: a self-contained HTML page (PNGs beside it) and pictures made from run outputs."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def loss_curve(metrics_jsonl: Path, path: Path, title: str) -> Path:
    """Training loss, held-out loss and the zero-prediction floor against the step."""
    lines = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    by_step = {line["step"]: line for line in lines}  # a restarted run logs some steps twice: keep the last
    steps = sorted(by_step)
    fig = Figure(figsize=(6, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(steps, [by_step[s]["loss"] for s in steps], label="train loss")
    ax.plot(steps, [by_step[s]["val_loss"] for s in steps], label="held-out loss")
    ax.axhline(by_step[steps[-1]]["val_loss_zero_prediction"], color="0.5", ls="--", label="predicting zeros")
    ax.set_xlabel("step")
    ax.set_ylabel("masked MSE")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return path


def metric_curves(metrics_jsonl: Path, keys: Sequence[str], path: Path, title: str, ylabel: str) -> Path:
    """The named metrics of a metrics.jsonl against the step (a key missing from a line is skipped there)."""
    lines = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    by_step = {line["step"]: line for line in lines}  # a restarted run logs some steps twice: keep the last
    steps = sorted(by_step)
    fig = Figure(figsize=(6, 3.2), layout="constrained")
    ax = fig.subplots()
    for key in keys:
        points = [(s, by_step[s][key]) for s in steps if by_step[s].get(key) is not None]
        ax.plot([s for s, _ in points], [v for _, v in points], label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return path


def image_grid(images: np.ndarray, labels: Sequence[str], path: Path, columns: int = 10) -> Path:
    """uint8 [N, H, W, 3] images in a captioned grid."""
    rows = int(np.ceil(len(images) / columns))
    fig = Figure(figsize=(1.2 * columns, 1.35 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax, image, label in zip(axes, images, labels, strict=False):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(label, fontsize=6)
    for ax in axes:
        ax.axis("off")
    fig.savefig(path, dpi=110)
    return path


def _table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row.values()) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(folder: Path, title: str, sections: Sequence[dict[str, Any]]) -> Path:
    """report.html in `folder`. A section has a heading and any of: text, table (rows), images, code.

    Image paths are written relative to the folder, so the report and its PNGs move together.
    """
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "font-size:13px;text-align:left}img{max-width:100%;margin:.3em 0;border:1px solid #eee}"
        "pre{background:#f6f6f6;padding:.6em;font-size:12px;overflow:auto}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section['heading'])}</h2>")
        if "text" in section:
            parts.append(f"<p>{html.escape(section['text'])}</p>")
        if "table" in section:
            parts.append(_table(section["table"]))
        for image in section.get("images", []):
            rel = Path(image).resolve().relative_to(folder.resolve())
            parts.append(f"<img src='{html.escape(rel.as_posix())}' alt='{html.escape(rel.name)}'>")
        if "code" in section:
            parts.append(f"<pre>{html.escape(section['code'])}</pre>")
    parts.append("</body></html>")
    path = folder / "report.html"
    path.write_text("\n".join(parts))
    return path
