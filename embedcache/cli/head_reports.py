"""What ``probe`` and ``predict`` print for the k-NN and ridge heads, numeric targets and label
sets (the linear softmax heads' output is in :mod:`embedcache.cli.probe`)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

from embedcache.cli.common import table
from embedcache.fileio import atomic_write

if TYPE_CHECKING:
    from embedcache.experiments.predict import PredictResult
    from embedcache.experiments.protocol import ProbeResult

#: How a validation metric is named in the tables.
METRIC_TITLES = {"top1": "val top-1", "r2": "val R² (mean)", "mAP": "val mAP"}


def _value(parameter: str, value: float) -> str:
    return str(int(value)) if parameter == "k" else f"{value:.3g}"


#: Lines of a validation table shown (the chosen value always is; the rest evenly spaced).
TABLE_LINES = 12


def selection_table(result: ProbeResult) -> str:
    """The validation table: one line per k or penalty (a long grid thinned to 1 value in n,
    the last and the chosen one), the chosen one marked."""
    sel = result.selection
    step = max(1, -(-len(sel.values) // TABLE_LINES))
    rows = [[_value(sel.parameter, v), f"{s:.4f}", "<- chosen" if v == sel.best_value else ""]
            for i, (v, s) in enumerate(zip(sel.values, sel.val_scores, strict=True))
            if i % step == 0 or v == sel.best_value or i == len(sel.values) - 1]
    shown = f"; 1 in {step} shown" if step > 1 else ""
    return table(rows, [sel.parameter, METRIC_TITLES.get(sel.metric, sel.metric), ""]) + \
        f"\n({len(sel.values)} values scored in {sel.seconds:.2f} s{shown})"


def _test_line(result: ProbeResult) -> list[str]:
    m = result.metrics
    if result.task == "regression":
        several = len(m["per_target"]) > 1
        lines = [f"test       R² {m['r2']:.4f}" + (f" (mean over {len(m['per_target'])} targets)" if several
                                                  else f"  MAE {m['mae']:.4g}  RMSE {m['rmse']:.4g}")]
        rows = [[name, "-" if v["r2"] is None else f"{v['r2']:.4f}", f"{v['mae']:.4g}", f"{v['rmse']:.4g}"]
                for name, v in m["per_target"].items()]
        return lines + ["", table(rows, ["target", "test R²", "MAE", "RMSE"])]
    if result.task == "multilabel":
        return [f"test       mAP {m['mAP']:.4f}  micro-F1 {m['micro_f1']:.4f}  macro-F1 {m['macro_f1']:.4f} "
                f"(threshold {m['threshold']:.2f}, chosen on val)"]
    top_k = next((k for k in m if k.startswith("top") and k != "top1"), None)
    return [f"test       top-1 {m['top1']:.4f}" + (f"  {top_k} {m[top_k]:.4f}" if top_k else "")
            + f"  balanced {m['balanced_accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}"]


def probe_report(result: ProbeResult) -> str:
    """The whole ``probe`` output for these heads."""
    lines = [selection_table(result), ""] if result.selection is not None else []
    chosen = ", ".join(f"{k} {_value(k, v)}" for k, v in result.chosen.items())
    sizes = result.split_sizes
    refit = "references: train+val" if result.head == "knn" else "refit on train+val"
    lines += [
        f"cache      {result.store_path}",
        f"head       {result.head} ({result.task}), {chosen} "
        f"({'chosen on val' if result.swept else 'fixed'}; val: {result.val_source})",
        f"rows       train {sizes['train']}"
        + (f" (+ {sizes['train_views']} augmented views)" if sizes.get("train_views") else "")
        + f", val {sizes['val']}, test {sizes['test']} ({refit})",
        *_test_line(result),
        f"time       fit {result.fit_seconds:.2f} s, total {result.total_seconds:.2f} s",
    ]
    if result.artifact_dir:
        lines.append(f"saved      {result.artifact_dir}")
    return "\n".join(lines)


def prediction_lines(result: PredictResult, limit: int = 50) -> list[str]:
    """One line per image (at most ``limit``): predicted values, or the predicted label set."""
    lines = []
    for r in result.rows[:limit]:
        if result.task == "regression":
            lines.append(f"{r.path}\t" + ", ".join(f"{n} {v:.4g}" for n, v in zip(result.names, r.values, strict=True)))
        else:
            lines.append(f"{r.path}\t" + (", ".join(f"{n} {p:.3f}" for n, p in zip(r.pred, r.prob, strict=True))
                                           or "(no class above the threshold)"))
    if len(result.rows) > limit:
        lines.append(f"... {len(result.rows) - limit} more (use --out FILE.csv)")
    return lines


def write_predictions(result: PredictResult, out_csv: Path) -> None:
    """Regression: ``path, true_<t>, pred_<t>`` per target; label sets: ``path, true, pred`` and
    ``prob_<class>`` per class. Written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if result.task == "regression":
        writer.writerow(["path"] + [f"{kind}_{n}" for n in result.names for kind in ("true", "pred")])
        for r in result.rows:
            truth = r.true_values or [None] * len(result.names)
            writer.writerow([r.path] + [cell for t, v in zip(truth, r.values, strict=True)
                                        for cell in ("" if t is None else f"{t:.6g}", f"{v:.6g}")])
    else:
        writer.writerow(["path", "true", "pred"] + [f"prob_{n}" for n in result.names])
        for r in result.rows:
            writer.writerow([r.path, r.true or "", ";".join(r.pred)] + [f"{p:.6f}" for p in r.values])
    atomic_write(out_csv, buffer.getvalue().encode("utf-8"))


def summary(result: PredictResult) -> str:
    """The closing line: counts, and the metrics when the inputs carried the truth."""
    text = f"{len(result.rows)} images, {len(result.failures)} failed"
    m = result.metrics
    if m is not None and result.task == "regression":
        per = m["per_target"]
        scores = ", ".join(f"{n} R² {v['r2']:.4f} MAE {v['mae']:.4g}" for n, v in per.items() if v["r2"] is not None)
        text += (f"; {scores}" + (f" (mean R² {m['r2']:.4f})" if len(per) > 1 else "")
                 + f" on {result.n_scored} images with targets")
    elif m is not None:
        text += (f"; mAP {m['mAP']:.4f}, micro-F1 {m['micro_f1']:.4f}, macro-F1 {m['macro_f1']:.4f} on "
                 f"{result.n_scored} labelled images")
    return text
