"""``embedcache backbones``."""

from __future__ import annotations

import dataclasses
import json

import click

from embedcache.cli.common import handle_errors, json_option, table


@click.command("backbones")
@click.argument("name", required=False)
@click.option("--nodes", is_flag=True,
              help="With NAME: list the graph nodes usable as `extract --layer` / `--layers`, and what the "
                   "presets 'stages' and 'last4' stand for on this model.")
@json_option
@handle_errors
def backbones_command(name: str | None, nodes: bool, as_json: bool) -> None:
    """List backbones with feature dim, input size, preprocessing and whether they work offline,
    or describe NAME (built with random init: dim and full preprocessing spec).

    \b
    offline = the default weights are on this machine (no download needed).
    dim "?" = not computable without building the model; `embedcache backbones NAME` shows it.
    """
    from embedcache.models.build import get_backbone, graph_nodes, preset_nodes
    from embedcache.models.catalog import list_backbones

    if name and nodes:
        for node in graph_nodes(name):
            click.echo(node)
        for preset, meaning in preset_nodes(name).items():
            click.echo(f"\npreset {preset}: {meaning}", err=True)
        return
    if name:
        bb = get_backbone(name, weights="none")
        click.echo(json.dumps({"name": name, "dim": bb.dim, "preprocess": bb.preprocess.to_dict()}, indent=2))
        return
    rows_info = list_backbones()
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(r) for r in rows_info], indent=2, default=list))
        return
    rows = [[r.name, r.source, str(r.dim or "?"), r.preprocess or "?", "yes" if r.offline_ready else "no",
             ",".join(r.weights) or r.description] for r in rows_info]
    click.echo(table(rows, ["name", "source", "dim", "preprocessing", "offline", "weights"]))
    click.echo("\noffline = usable with no download. torchvision weights download on first use; "
               "offline, pass --weights FILE or --weights-tag none.")
