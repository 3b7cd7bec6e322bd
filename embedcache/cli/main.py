"""The ``embedcache`` click group. Commands are added to it by :mod:`embedcache.cli`."""

from __future__ import annotations

import click

from embedcache.runtime import prefer_passive_waiting


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
      embedcache ls / info ENTRY / verify ENTRY / rm ENTRY
    """
    # Before any command imports torch: idle OpenMP threads sleep instead of spinning (unless
    # OMP_WAIT_POLICY / KMP_BLOCKTIME are set), so a busy core elsewhere does not stall us.
    prefer_passive_waiting()
