"""Reports and plots: leaderboard and few-shot tables (JSON, CSV, Markdown) and the PNGs, each
written as a unit (:func:`~embedcache.fileio.atomic_write`).

matplotlib is an optional extra: without it every PNG is skipped (:func:`pyplot` returns None).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from embedcache.fileio import atomic_write, named_write_errors


def pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend, or None when matplotlib (an
    optional extra) is not installed: every PNG this package writes is skipped then."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save_figure(fig: Any, path: str | Path, *, dpi: int) -> None:
    """A figure as PNG, written through :func:`~embedcache.fileio.atomic_write`."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write(Path(path), buffer.getvalue())


def confusion_png(report: dict[str, Any], *, title: str = "") -> bytes | None:
    """A confusion-matrix heatmap as PNG bytes, or None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    matrix = np.asarray(report["confusion_matrix"], dtype=float)
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    names = report["class_names"]
    size = max(4.0, 0.5 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(names) <= 20:
        for i in range(len(names)):
            for j in range(len(names)):
                if matrix[i, j]:
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if normalised[i, j] > 0.5 else "black")
    ax.set_title(title or f"top-1 {report['top1']:.3f}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def save_curve_png(report: dict[str, Any], path: str) -> bool:
    """Train loss and val accuracy per epoch (epoch 0 = the starting point) when matplotlib is installed."""
    plt = pyplot()
    if plt is None:
        return False
    epochs = report["epochs"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot([r["epoch"] for r in epochs], [r["train_loss"] for r in epochs], marker="o")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("train loss")
    ax_acc.plot([0] + [r["epoch"] for r in epochs], [report["start"]["val_top1"]] + [r["val_top1"] for r in epochs],
                marker="o", label="val top-1")
    ax_acc.axhline(report["test"]["top1"], color="grey", linestyle="--", label="test top-1 (best epoch)")
    ax_acc.set_xlabel("epoch")
    ax_acc.legend()
    fig.suptitle(f"fine-tune from {report['config']['head_init']} head, unfreeze {report['config']['unfreeze']}")
    fig.tight_layout()
    _save_figure(fig, path, dpi=110)
    plt.close(fig)
    return True


LEADERBOARD_COLUMNS = [
    ("backbone", "backbone", "{}"), ("head", "head", "{}"), ("features", "features", "{}"),
    ("test_top1", "test top-1", "{:.4f}"),
    ("penalty", "penalty", "{:.3g}"), ("k", "k", "{}"),
    ("dim", "dim", "{}"), ("image_size", "px", "{}"), ("extract_images_per_s", "extract img/s", "{:.0f}"),
    ("probe_seconds", "probe s", "{:.1f}"), ("cache_hit", "cache hit", "{}"),
]


def leaderboard_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells of the leaderboard (shared by the CLI and Markdown)."""
    headers = [title for _, title, _ in LEADERBOARD_COLUMNS]
    cells = [[("-" if row.get(key) is None else fmt.format(row[key])) for key, _, fmt in LEADERBOARD_COLUMNS]
             for row in report["rows"]]
    return headers, cells


def write_leaderboard(report: dict[str, Any], out: Path) -> list[Path]:
    """leaderboard.json, .csv, .md, and .png when matplotlib is installed."""
    with named_write_errors(out):
        out.mkdir(parents=True, exist_ok=True)
    written = [out / "leaderboard.json", out / "leaderboard.csv", out / "leaderboard.md"]
    atomic_write(written[0], json.dumps(report, indent=2).encode())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(report["rows"][0]))
    writer.writeheader()
    writer.writerows(report["rows"])
    atomic_write(written[1], text.getvalue().encode())
    headers, cells = leaderboard_table(report)
    heads = report.get("heads") or [report["head"]]
    lines = [f"Probe leaderboard on `{report['data']}` ({', '.join(heads)} head{'s' if len(heads) > 1 else ''})", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    atomic_write(written[2], ("\n".join(lines) + "\n").encode())
    labels = [f"{r['backbone']} + {r['head']}" if len(heads) > 1 else r["backbone"] for r in report["rows"]]
    if bar_chart(labels, [r["test_top1"] for r in report["rows"]],
                  out / "leaderboard.png", "test top-1"):
        written.append(out / "leaderboard.png")
    return written


def bar_chart(labels: list[str], values: list[float], path: Path, xlabel: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(labels) + 1.2))
    ax.barh(labels[::-1], values[::-1], color="#4c72b0")
    for i, v in enumerate(values[::-1]):
        ax.text(v, i, f" {v:.3f}", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_xlim(0, 1.08)
    fig.tight_layout()
    _save_figure(fig, path, dpi=120)
    plt.close(fig)
    return True


def write_fewshot(report: dict[str, Any], out: Path) -> None:
    """fewshot.json, fewshot.md, and fewshot.png when matplotlib is installed."""
    with named_write_errors(out):
        out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "fewshot.json", json.dumps(report, indent=2).encode())
    lines = [f"Few-shot linear probe on `{report['cache']}` ({report['backbone']}, {report['head']} head, "
             f"penalty {report['penalty']:g} fixed, {report['seeds']} seeds, {report['n_test']} test images)",
             "", "| k per class | test top-1 mean | std |", "|---|---|---|"]
    lines += [f"| {r['k']} | {r['mean']:.4f} | {r['std']:.4f} |" for r in report["results"]]
    atomic_write(out / "fewshot.md", ("\n".join(lines) + "\n").encode())
    plt = pyplot()
    if plt is None:
        return
    ks = [r["k"] for r in report["results"]]
    means = np.array([r["mean"] for r in report["results"]])
    stds = np.array([r["std"] for r in report["results"]])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3)
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("examples per class (k)")
    ax.set_ylabel("test top-1 (mean ± std over seeds)")
    ax.set_title(f"{report['backbone']} few-shot")
    fig.tight_layout()
    _save_figure(fig, out / "fewshot.png", dpi=120)
    plt.close(fig)
