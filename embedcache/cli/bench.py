"""``embedcache bench`` and ``embedcache fewshot``."""

from __future__ import annotations

from pathlib import Path

import click

from embedcache.cli.common import (
    batch_size_option,
    cache_dir_option,
    device_option,
    features_option,
    handle_errors,
    parse_ints,
    progress_bar,
    runtime_option,
    table,
    threads_option,
    workers_option,
)
from embedcache.cli.probe import head_option
from embedcache.heads.registry import HEADS


@click.command("bench")
@click.argument("data")
@click.option("--backbones", required=True,
              help="Comma-separated NAME[@SIZE][=WEIGHTS], e.g. efficientnet_lite0,resnet18=none,pixels@28.")
@click.option("--heads", "--head", "heads", default="torch", show_default=True,
              help=f"Comma-separated heads, each probed on every backbone: {', '.join(HEADS)} "
                   f"(e.g. torch,knn,ridge: one leaderboard row per backbone and head).")
@click.option("--image-size", type=int, default=None, help="Input size for backbones without @SIZE.")
@click.option("--layers", default=None,
              help="Also store these feature sets in every entry, as `extract --layers` (e.g. 'stages' for CNNs, "
                   "'last4' for ViTs; a preset resolves per backbone).")
@click.option("--pool", "pools", default=None, help="Pooling of the --layers nodes, as `extract --pool`.")
@click.option("--features", default=None,
              help="Feature set every probe trains on: a name, A+B, or 'all': per backbone, sweep every set "
                   "(and their concatenation) with the penalty on val and report the winner [default: penultimate].")
@batch_size_option
@workers_option
@threads_option
@device_option
@runtime_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the probes' val hold-out.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write leaderboard.json/.csv/.md (and .png with matplotlib) here.")
@cache_dir_option
@handle_errors
def bench_command(data: str, backbones: str, heads: str, out: Path | None, **options: object) -> None:
    """Leaderboard of probes across backbones (and heads) on DATA.

    \b
    Per backbone: extract (a cache hit when the entry exists), then the probe protocol with
    each of --heads (penalty or k chosen on val only, refit on train+val, one test score).
    A second run of the same command only trains probes. Add `pixels` to see whether a
    backbone beats raw pixels, and e.g. `resnet18=none` for a randomly initialised network;
    `--heads torch,knn,ridge` puts the L-BFGS, k-NN and ridge probes side by side;
    `--layers stages --features all` lets each backbone's row use its best layer (chosen on val).
    """
    from embedcache.experiments.bench import bench
    from embedcache.experiments.reports import leaderboard_table

    update, close = progress_bar()

    def line(message: str) -> None:
        close()
        click.echo(message, err=True)

    names = [h.strip() for h in heads.split(",") if h.strip()]
    unknown = [h for h in names if h not in HEADS]
    if unknown or not names:
        raise click.BadParameter(f"expected comma-separated heads from {list(HEADS)}, got {heads!r}",
                                 param_hint="--heads")
    try:
        result = bench(data, [b for b in backbones.split(",") if b.strip()], heads=names, out=out, progress=line,
                       extract_progress=update, **options)
    finally:
        close()
    headers, cells = leaderboard_table(result.to_dict())
    click.echo(table(cells, headers))
    if out is not None:
        click.echo(f"\nwrote {out}/leaderboard.json, .csv, .md" + (
            ", .png" if (Path(out) / "leaderboard.png").exists() else ""))


@click.command("fewshot")
@click.argument("entry")
@click.option("--shots", default="1,2,5,10,20", show_default=True, help="Values of k (examples per class).")
@click.option("--seeds", type=int, default=10, show_default=True, help="Seeds per k (0..N-1).")
@head_option
@click.option("--penalty", type=float, default=0.1, show_default=True,
              help="Fixed penalty for every k (never chosen by looking at test).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write fewshot.json, fewshot.md and fewshot.png here.")
@threads_option
@features_option
@cache_dir_option
@handle_errors
def fewshot_command(entry: str, shots: str, **options: object) -> None:
    """k-shot x seed learning curve from a cache entry, in seconds (no image is decoded).

    For each k and seed, k examples per class are drawn from the train split, a probe with a
    fixed penalty is fitted on them and scored on the full test split.
    """
    from embedcache.experiments.fewshot import fewshot

    result = fewshot(entry, shots=parse_ints(shots, "--shots"), **options)
    rows = [[str(r.k), f"{r.mean:.4f}", f"{r.std:.4f}"] for r in result.results]
    click.echo(table(rows, ["k per class", "test top-1 mean", "std"]))
    click.echo(f"\n{result.backbone}, {result.head} head, penalty {result.penalty:g} (fixed), {result.seeds} seeds, "
               f"{result.n_test} test images, {result.seconds:.1f} s")
