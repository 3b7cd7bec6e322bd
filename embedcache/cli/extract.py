"""``embedcache extract``."""

from __future__ import annotations

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
    precision_option,
    progress_bar,
    runtime_option,
    threads_option,
    workers_option,
)
from embedcache.models.pooling import POOLS
from embedcache.sources.augments import AUGMENTS
from embedcache.store.schema import DEFAULT_SHARD_SIZE, STORE_DTYPES

if TYPE_CHECKING:
    from embedcache.extraction.extract import ExtractStats


@click.command("extract")
@click.argument("data")
@click.option("-b", "--backbone", default="efficientnet_lite0", show_default=True,
              help="Backbone name (see `embedcache backbones`), module.path:factory, or timm:NAME.")
@click.option("--weights-tag", "weights", default=None,
              help="Weights tag: DEFAULT, IMAGENET1K_V2, ..., or 'none' for random init.")
@click.option("--weights", "weights_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Local state dict (.safetensors, or .pt/.pth loaded with weights_only=True).")
@click.option("--layer", default=None, help="Intermediate graph node to read instead of the penultimate features.")
@click.option("--layers", default=None,
              help="Also store these nodes, pooled, in the same entry, from the same forward pass: node names "
                   "(`embedcache backbones NAME --nodes`) or a preset, comma-separated: 'stages' (CNNs: each "
                   "stage's output), 'last4' (ViTs: the last 4 blocks). Each node x pool is one feature set "
                   "NODE:POOL, read with `probe ENTRY --features NODE:POOL`; the penultimate features stay the "
                   "default set.")
@click.option("--pool", default=None,
              help=f"Pooling of --layer's output, one of {', '.join(POOLS)} [default: avg]; with --layers, "
                   f"one or more, comma-separated (e.g. avg,max) [default: avg; last4: cls,avg].")
@click.option("--image-size", type=int, default=None,
              help="Model input size in pixels, 8-2048 (default: the backbone's).")
@click.option("--views", type=int, default=1, show_default=True,
              help="Views of every TRAIN image to cache: its centre view plus K-1 augmented ones (val and test "
                   "keep the centre view only). Probes then train on every view of the train images.")
@click.option("--augment", type=click.Choice(sorted(AUGMENTS)), default=None,
              help="What an augmented view is (with --views K >= 2) [default: standard]: "
                   + "; ".join(f"{name}: {text}" for name, text in AUGMENTS.items()) + ".")
@batch_size_option
@workers_option
@threads_option
@device_option
@precision_option
@runtime_option
@click.option("--store-dtype", type=click.Choice(STORE_DTYPES), default="float16", show_default=True,
              help="On-disk dtype of the features.")
@click.option("--max-errors", default=None,
              help="Fail when more images than this fail to decode: a count (10) or a fraction (0.01).")
@click.option("--unlabelled", is_flag=True, default=None, help="Treat DATA as a folder of unlabelled images.")
@click.option("--val-fraction", type=float, default=0.0, show_default=True,
              help="Hold-out to val when DATA has no splits.")
@click.option("--test-fraction", type=float, default=0.2, show_default=True,
              help="Hold-out to test when DATA has no splits.")
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of that stratified hold-out.")
@click.option("--no-incremental", is_flag=True, help="Do not copy rows of unchanged files from an older entry, nor feature sets from an entry of other --layers.")
@click.option("--target", "target", default=None,
              help="CSV manifests: a numeric column to store as each image's target (e.g. age).")
@click.option("--targets", "targets", default=None,
              help="CSV manifests: several numeric target columns, comma-separated (e.g. x1,y1,x2,y2).")
@click.option("--engine", type=click.Choice(("local", "ray")), default="local", show_default=True,
              help="local: this process. ray: shards on a Ray cluster (pip install 'embedcache[ray]').")
@click.option("--ray-address", default=None,
              help="With --engine ray: 'auto' or HOST:PORT of a running cluster (default: a local Ray).")
@click.option("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, show_default=True,
              help="With --engine ray: rows per shard, a multiple of --batch-size (not in the cache key).")
@click.option("--concurrency", type=int, default=None,
              help="With --engine ray: backbone actors (default: one per GPU group, else half the CPUs).")
@click.option("--gpus-per-worker", type=float, default=0.0, show_default=True,
              help="With --engine ray: GPUs each backbone actor reserves (0 = run on CPUs).")
@json_option
@cache_dir_option
@handle_errors
def extract_command(data: str, no_incremental: bool, as_json: bool, target: str | None, targets: str | None,
                    **options: object) -> None:
    """Extract pooled features of DATA once into the cache.

    \b
    DATA is one of:
      ROOT/                      class folders ROOT/<class>/<img>, or ROOT/{train,val,test}/<class>/<img>
      manifest.csv               columns path,label[,split]; paths relative to the CSV
                                 path,labels[,split]: label sets, labels like top;clothing
                                 path,age[,split] with --target age (or --targets x1,y1,...):
                                 numeric targets, fitted by `embedcache probe` with ridge
      images.npz                 arrays train_images, train_labels, class_names (+ val_/test_)
      torchvision:NAME:ROOT      a torchvision dataset from local files, e.g.
                                 torchvision:FashionMNIST:/usr/share/datasets/fashion-mnist
      demo                       the small Fashion-MNIST sample bundled with embedcache

    \b
    The same command again is a cache hit (no model runs). An interrupted run resumes where it
    stopped. Undecodable images are skipped and listed by `embedcache info ENTRY`.
    --engine ray computes the same entry shard by shard on a Ray cluster (README: "More than
    one machine"); a rerun recomputes only the shards that are missing or do not verify.
    """
    from embedcache.extraction.extract import extract

    pool = options.pop("pool")
    if options.get("layers"):
        options["pools"] = pool
    else:
        options["pool"] = pool or "avg"
    names = ([target] if target else []) + [t.strip() for t in (targets or "").split(",") if t.strip()]
    update, close = progress_bar()
    try:
        store = extract(data, incremental=not no_incremental, progress=update, targets=names or None, **options)
    finally:
        close()
    stats = store.stats
    for warning in stats.warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps({"path": str(store.path), "cache_key": store.cache_key, "cache_hit": store.cache_hit,
                               **stats.to_dict()}, default=str))
        return
    if store.cache_hit:
        click.echo(f"cache hit: {store.path} ({len(store)} rows x {store.attrs['dim']}, "
                   f"{stats.failed} failed) in {stats.seconds:.2f} s; no model ran.")
    else:
        click.echo(_summary(stats, Path(store.path), 0 if store.views is None else len(store.views)))
    if store.views is not None:
        click.echo(f"views: {store.attrs.get('views')} per train image ({store.attrs.get('augment')}): "
                   f"{len(store.views)} augmented rows besides the {len(store)} images")
    if store.feature_sets:
        click.echo(f"feature sets: {', '.join(f'{name} ({values.shape[1]})' for name, values in [('penultimate', store.features), *store.feature_sets.items()])}")
    if store.cache_hit:
        return
    if stats.failed:
        click.echo(f"failures are listed by: embedcache info {store.path}", err=True)


def _summary(stats: ExtractStats, path: Path, views: int = 0) -> str:
    rate = f", {stats.images_per_s:.0f} img/s" if stats.images_per_s else ""
    extra = []
    if stats.reused_rows:
        extra.append(f"{stats.reused_rows} reused from an older entry")
    if stats.resumed_rows:
        extra.append(f"{stats.resumed_rows} resumed")
    what = f"{stats.n - views} images + {views} views" if views else f"{stats.n} images"
    return (f"extracted {what} ({stats.computed_rows} computed"
            f"{', ' + ', '.join(extra) if extra else ''}), {stats.failed} failed, "
            f"{stats.seconds:.1f} s{rate}, {stats.device}/{stats.precision}"
            f"{'' if stats.runtime == 'torch' else '/' + stats.runtime} -> {path}")
