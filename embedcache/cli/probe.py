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
    parse_ints,
    progress_bar,
    runtime_choice,
    table,
    threads_option,
    warn_if_pickle,
    workers_option,
)
from embedcache.heads.registry import HEADS, LINEAR_HEADS

if TYPE_CHECKING:
    from embedcache.experiments.predict import PredictResult
    from embedcache.experiments.protocol import ProbeResult

head_option = click.option("--head", type=click.Choice(LINEAR_HEADS), default="torch", show_default=True,
                           help="torch: full-batch L-BFGS; sklearn: LogisticRegression(lbfgs). Same objective.")
probe_head_option = click.option(
    "--head", type=click.Choice(HEADS), default=None,
    help="torch: softmax by full-batch L-BFGS (label sets: one sigmoid per class); sklearn: "
         "LogisticRegression(lbfgs), same objective; knn: cosine k-NN, temperature-weighted votes, k chosen "
         "on val; ridge: closed-form ridge path (50 penalties from one eigendecomposition). "
         "Default: torch, or ridge for numeric targets (the only head for them).")


@click.command("probe")
@click.argument("entry")
@probe_head_option
@click.option("--penalty", type=float, default=None,
              help="Use this L2 penalty and skip the sweep (C = 1/(penalty*n) in sklearn terms).")
@click.option("--sweep/--no-sweep", default=True, show_default=True,
              help="Sweep the penalty on a log grid, choosing on the val split only.")
@click.option("--penalties", default=None,
              help="Sweep grid, comma-separated (default: 11 values 1e-6..1e-1; ridge: 50 values 1e-5..1e3).")
@click.option("--k", "k", type=int, default=None, help="k-NN: use this k and skip choosing it on val.")
@click.option("--ks", default=None, help="k-NN: the k grid chosen from on val, comma-separated (default 10,20,100,200).")
@click.option("--temperature", type=float, default=None,
              help="k-NN: votes weigh softmax(cosine similarity / temperature) [default: 0.07].")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Hold-out of train used for selection when the cache has no val split.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of that hold-out.")
@click.option("--no-standardize", is_flag=True, help="Do not standardise features.")
@click.option("--device", default="cpu", show_default=True, help="Device of the torch head (cpu, cuda, cuda:N).")
@click.option("--max-iter", type=int, default=None,
              help="Solver iterations at most, for every fit [default: budgets that scale with the data for a "
                   "sweep; 1000 for a fixed --penalty].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write probe.safetensors, probe.json, report.json (and confusion.png) here.")
@threads_option
@click.option("--features", default=None,
              help="Feature set to train on: 'penultimate' (the default), a set stored by `extract --layers` "
                   "(NODE:POOL, e.g. features.3:avg; `embedcache info ENTRY` lists them), several joined by '+' "
                   "(concatenated at fit time, never stored), or 'all': sweep every (set, penalty) on val, "
                   "the concatenation of all sets included (not with --out), refit the winner on train+val, "
                   "score test once.")
@click.option("--views", type=int, default=None,
              help="An entry of `extract --views K`: train on the first N views of each train image (1: the "
                   "centre views only) [default: all K]. Val and test are always scored on centre views.")
@json_option
@cache_dir_option
@handle_errors
def probe_command(entry: str, penalty: float | None, sweep: bool, penalties: str | None, ks: str | None,
                  no_standardize: bool, as_json: bool, **options: object) -> None:
    """Train a probe on a cache entry and report test metrics.

    \b
    Protocol: choose on the val split only (the cache's val split, else a seeded hold-out
    of train, stratified by class), refit on train+val with the chosen value, score once on
    test. ENTRY is an .h5 path or a cache-key prefix (see `embedcache ls`).

    \b
    What the entry's rows carry decides the task:
      one class each     --head torch|sklearn|knn|ridge   test top-1, top-5, macro-F1
      numeric targets    --head ridge (default)           MAE, RMSE, R² per target
      label sets         --head torch (default)           mAP, micro/macro-F1
    (numeric targets and label sets come from a CSV manifest: `embedcache extract --help`).
    """
    from embedcache.experiments.protocol import probe

    if penalty is None and options.get("k") is None and not sweep:
        raise click.UsageError("--no-sweep needs --penalty VALUE (k-NN: --k VALUE).")
    if options["temperature"] is None:
        del options["temperature"]  # the head's default
    if options.get("features") == "all":  # choose the feature set on val too: one more API call
        from embedcache.experiments.feature_sweep import probe_all_sets as probe  # noqa: F811

        del options["features"]
    result = probe(entry, penalty=penalty, penalties=parse_floats(penalties, "--penalties"),
                   ks=parse_ints(ks, "--ks") if ks else None, standardize=not no_standardize,
                   progress=lambda msg: click.echo(msg, err=True), **options)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    if result.task != "classes" or result.head not in LINEAR_HEADS:
        from embedcache.cli.head_reports import probe_report

        click.echo(probe_report(result))  # k-NN, ridge, numeric targets, label sets
        return
    if result.feature_sweep is not None:
        click.echo(_feature_sweep_table(result) + "\n")
    click.echo(_probe_report(result))
    for note in result.notes:
        click.echo(f"note: {note}", err=True)


def _probe_report(result: ProbeResult) -> str:
    lines = []
    if result.sweep is not None and result.feature_sweep is None:
        sweep = result.sweep
        rows = [[f"{p:.3g}", f"{a:.4f}", str(i), f"{t:.2f}", "<- chosen" if p == result.penalty else ""]
                for p, a, i, t in zip(sweep.penalties, sweep.val_accuracy, sweep.iterations, sweep.seconds, strict=True)]
        lines += [table(rows, ["penalty", "val top-1", "iters", "fit s", ""]), ""]
    m, sizes = result.metrics, result.split_sizes
    top_k = next((k for k in m if k.startswith("top") and k != "top1"), None)
    lines += [
        f"cache      {result.store_path}",
        f"features   {result.features}",
        f"head       {result.head}, penalty {result.penalty:.3g} "
        f"({'swept' if result.swept else 'fixed'}; val: {result.val_source})",
        f"rows       train {sizes['train']}"
        + (f" (+ {sizes['train_views']} augmented views)" if sizes.get("train_views") else "")
        + f", val {sizes['val']}, test {sizes['test']} (refit on train+val)",
        f"test       top-1 {m['top1']:.4f}" + (f"  {top_k} {m[top_k]:.4f}" if top_k else "")
        + f"  balanced {m['balanced_accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}",
        f"time       refit {result.fit_seconds:.2f} s, total {result.total_seconds:.2f} s",
    ]
    if result.artifact_dir:
        lines.append(f"saved      {result.artifact_dir}")
    return "\n".join(lines)


def _feature_sweep_table(result: ProbeResult) -> str:
    """The (feature set, penalty) val table of ``--features all``: each set's best penalty."""
    best: dict[str, dict] = {}
    for row in result.feature_sweep:
        if row["features"] not in best or row["val_top1"] > best[row["features"]]["val_top1"]:
            best[row["features"]] = row
    rows = [[name, str(row["dim"]), f"{row['penalty']:.3g}", f"{row['val_top1']:.4f}",
             "<- chosen" if name == result.features else ""] for name, row in best.items()]
    return table(rows, ["feature set", "dim", "best penalty", "val top-1", ""]) + (
        f"\n({len(result.feature_sweep)} fits on val; --json has every (set, penalty))")


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
@threads_option
@device_option
@click.option("--runtime", type=runtime_choice, default=None,
              help="What runs the backbone (as for extract). Default: $EMBEDCACHE_RUNTIME if set, else the "
                   "runtime the probe's features were extracted with (torch where that one is not installed).")
@handle_errors
def predict_command(probe_dir: Path, paths: tuple[str, ...], top_k: int, out_csv: Path | None,
                    **options: object) -> None:
    """Classify images with a saved probe (PATHS: image files, a folder, or any DATA form).

    The backbone is rebuilt from the probe's metadata. When the folder has class subfolders
    matching the probe's classes, the accuracy is printed too. A probe of numeric targets
    prints the predicted values, one of label sets the classes at or above its threshold;
    given a CSV manifest with the targets (or a labels column), their metrics are printed.
    """
    from embedcache.experiments.predict import predict

    warn_if_pickle(probe_dir)
    update, close = progress_bar()
    try:
        result = predict(probe_dir, list(paths), top_k=top_k, progress=update, **options)
    finally:
        close()
    if result.task != "classes":  # numeric targets, label sets
        _target_predictions(result, out_csv)
        return
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
    writer.writerow(["path", "true"] + [f"{kind}{i + 1}" for i in range(top_k) for kind in ("pred", result.score_name)])
    for r in result.rows:
        cells = [r.path, r.true or ""]
        for label, prob in zip(r.pred, r.prob, strict=True):
            cells += [label, f"{prob:.6f}"]
        writer.writerow(cells)
    atomic_write(out_csv, text.getvalue().encode("utf-8"))


def _target_predictions(result: PredictResult, out_csv: Path | None) -> None:
    from embedcache.cli.head_reports import prediction_lines, summary, write_predictions

    if out_csv is not None:
        write_predictions(result, out_csv)
    else:
        for line in prediction_lines(result):
            click.echo(line)
    for path, message in result.failures:
        click.echo(f"failed: {path}: {message}", err=True)
    click.echo(summary(result) + (f"; wrote {out_csv}" if out_csv is not None else ""))
