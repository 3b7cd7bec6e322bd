"""``embedcache probe`` and ``embedcache predict``."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from embedcache.cli.common import (
    batch_size_option,
    cache_dir_option,
    device_option,
    handle_errors,
    json_option,
    parse_floats,
    progress_bar,
    table,
    warn_if_pickle,
    workers_option,
)
from embedcache.heads.registry import HEADS

if TYPE_CHECKING:
    from embedcache.experiments.predict import PredictResult
    from embedcache.experiments.protocol import ProbeResult

head_option = click.option("--head", type=click.Choice(HEADS), default="torch", show_default=True,
                           help="torch: full-batch L-BFGS; sklearn: LogisticRegression(lbfgs). Same objective.")


@click.command("probe")
@click.argument("entry")
@head_option
@click.option("--penalty", type=float, default=None,
              help="Use this L2 penalty and skip the sweep (C = 1/(penalty*n) in sklearn terms).")
@click.option("--sweep/--no-sweep", default=True, show_default=True,
              help="Sweep the penalty on a log grid, choosing on the val split only.")
@click.option("--penalties", default=None, help="Sweep grid, comma-separated (default: 11 values 1e-6..1e-1).")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Hold-out of train used for selection when the cache has no val split.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of that hold-out.")
@click.option("--no-standardize", is_flag=True, help="Do not standardise features.")
@click.option("--device", default="cpu", show_default=True, help="Device of the torch head (cpu, cuda, cuda:N).")
@click.option("--max-iter", type=int, default=None,
              help="Solver iterations at most, for every fit [default: budgets that scale with the data for a "
                   "sweep; 1000 for a fixed --penalty].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write probe.safetensors|probe.joblib, probe.json, report.json, confusion.png here.")
@json_option
@cache_dir_option
@handle_errors
def probe_command(entry: str, penalty: float | None, sweep: bool, penalties: str | None,
                  no_standardize: bool, as_json: bool, **options: object) -> None:
    """Train a linear probe on a cache entry and report test metrics.

    \b
    Protocol: sweep the penalty on the val split only (the cache's val split, else a
    stratified seeded hold-out of train), refit on train+val with the chosen value, score
    once on test. ENTRY is an .h5 path or a cache-key prefix (see `embedcache ls`).
    """
    from embedcache.experiments.protocol import probe

    if penalty is None and not sweep:
        raise click.UsageError("--no-sweep needs --penalty VALUE.")
    result = probe(entry, penalty=penalty, penalties=parse_floats(penalties, "--penalties"),
                   standardize=not no_standardize, progress=lambda msg: click.echo(msg, err=True), **options)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    click.echo(_probe_report(result))
    for note in result.notes:
        click.echo(f"note: {note}", err=True)


def _probe_report(result: ProbeResult) -> str:
    lines = []
    if result.sweep is not None:
        sweep = result.sweep
        rows = [[f"{p:.3g}", f"{a:.4f}", str(i), f"{t:.2f}", "<- chosen" if p == result.penalty else ""]
                for p, a, i, t in zip(sweep.penalties, sweep.val_accuracy, sweep.iterations, sweep.seconds, strict=True)]
        lines += [table(rows, ["penalty", "val top-1", "iters", "fit s", ""]), ""]
    m, sizes = result.metrics, result.split_sizes
    top_k = next((k for k in m if k.startswith("top") and k != "top1"), None)
    lines += [
        f"cache      {result.store_path}",
        f"head       {result.head}, penalty {result.penalty:.3g} "
        f"({'swept' if result.swept else 'fixed'}; val: {result.val_source})",
        f"rows       train {sizes['train']}, val {sizes['val']}, test {sizes['test']} (refit on train+val)",
        f"test       top-1 {m['top1']:.4f}" + (f"  {top_k} {m[top_k]:.4f}" if top_k else "")
        + f"  balanced {m['balanced_accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}",
        f"time       refit {result.fit_seconds:.2f} s, total {result.total_seconds:.2f} s",
    ]
    if result.artifact_dir:
        lines.append(f"saved      {result.artifact_dir}")
    return "\n".join(lines)


@click.command("predict")
@click.argument("probe_dir", type=click.Path(exists=True, path_type=Path))
@click.argument("paths", nargs=-1, required=True)
@click.option("--top-k", type=int, default=1, show_default=True, help="Classes listed per image.")
@click.option("--out", "out_csv", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write one CSV row per image here (path, true, predictions, probabilities).")
@click.option("--weights", "weights_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The local weights file, when the probe's backbone used one.")
@batch_size_option
@workers_option
@device_option
@handle_errors
def predict_command(probe_dir: Path, paths: tuple[str, ...], top_k: int, out_csv: Path | None,
                    **options: object) -> None:
    """Classify images with a saved probe (PATHS: image files, a folder, or any DATA form).

    The backbone is rebuilt from the probe's metadata. When the folder has class subfolders
    matching the probe's classes, the accuracy is printed too.
    """
    from embedcache.experiments.predict import predict

    warn_if_pickle(probe_dir)
    update, close = progress_bar()
    try:
        result = predict(probe_dir, list(paths), top_k=top_k, progress=update, **options)
    finally:
        close()
    if out_csv is not None:
        _write_predictions(result, out_csv, top_k)
    else:
        for r in result.rows[:50]:
            click.echo(f"{r.path}\t" + ", ".join(f"{label} {prob:.3f}" for label, prob in zip(r.pred, r.prob, strict=True)))
        if len(result.rows) > 50:
            click.echo(f"... {len(result.rows) - 50} more (use --out FILE.csv)")
    for path, message in result.failures:
        click.echo(f"failed: {path}: {message}", err=True)
    summary = f"{len(result.rows)} images classified, {len(result.failures)} failed"
    if result.accuracy is not None:
        summary += f"; top-1 accuracy {result.accuracy:.4f} on {result.n_scored} labelled images"
    click.echo(summary + (f"; wrote {out_csv}" if out_csv is not None else ""))


def _write_predictions(result: PredictResult, out_csv: Path, top_k: int) -> None:
    from embedcache.fileio import atomic_write

    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["path", "true"] + [f"{kind}{i + 1}" for i in range(top_k) for kind in ("pred", "prob")])
    for r in result.rows:
        cells = [r.path, r.true or ""]
        for label, prob in zip(r.pred, r.prob, strict=True):
            cells += [label, f"{prob:.6f}"]
        writer.writerow(cells)
    atomic_write(out_csv, text.getvalue().encode("utf-8"))
