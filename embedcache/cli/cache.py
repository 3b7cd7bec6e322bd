"""``embedcache ls``, ``info`` and ``rm``: they need neither torch nor scikit-learn."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from embedcache.cli.common import (
    cache_dir_option,
    clip,
    handle_errors,
    human_bytes,
    json_option,
    table,
)


def _ls_row(e: dict[str, Any]) -> list[str]:
    if "unreadable" in e:
        return [Path(e["file"]).name, "?", "unreadable", "", "", "", human_bytes(e["bytes"])]
    bb = e.get("backbone", {})
    src = e.get("source", {})
    return [
        str(e.get("cache_key", ""))[:16],
        f"{bb.get('name')}" + (f"@{bb.get('layer')}" if bb.get("layer") else "")
        + f" [{bb.get('weights')}] {e.get('preprocess', {}).get('crop_size', '')}px {e.get('precision', '')}",
        clip(src.get("description", ""), 48),
        str(e.get("n", "")),
        str(e.get("dim", "")),
        "yes" if e.get("complete") else f"no ({e.get('rows_done', 0)} done)",
        human_bytes(e["bytes"]),
    ]


@click.command("ls")
@cache_dir_option
@json_option
@handle_errors
def ls_command(cache_dir: Path, as_json: bool) -> None:
    """List cache entries: key, backbone, dataset, rows, dim, complete, size."""
    from embedcache.store.entries import list_entries

    entries = list_entries(cache_dir)
    if as_json:
        click.echo(json.dumps(entries, default=str, indent=2))
    elif not entries:
        click.echo(f"no entries in {cache_dir}")
    else:
        click.echo(table([_ls_row(e) for e in entries], ["key", "backbone", "dataset", "n", "dim", "complete", "size"]))


@click.command("info")
@click.argument("entry")
@cache_dir_option
@json_option
@click.option("--errors", "max_errors_shown", type=click.IntRange(min=0), default=20, show_default=True,
              help="How many failed images to list.")
@handle_errors
def info_command(entry: str, cache_dir: Path, as_json: bool, max_errors_shown: int) -> None:
    """Show one entry's provenance, split counts and failed images.

    ENTRY is a path to an .h5 file or a cache-key prefix (see `embedcache ls`).
    """
    import numpy as np

    from embedcache.splits import Split
    from embedcache.store.entries import resolve_entry
    from embedcache.store.reader import FeatureStore

    path = resolve_entry(entry, cache_dir)
    store = FeatureStore.open(path, allow_partial=True)
    if as_json:
        click.echo(json.dumps({**store.attrs, "errors": store.errors, "path": str(path)}, default=str, indent=2))
        return
    a = store.attrs
    click.echo(f"entry      {path}")
    click.echo(f"cache key  {a['cache_key']}")
    done = len(store) + (len(store.views) if store.views is not None else 0)
    click.echo(f"complete   {a['complete']}   rows {done}/{a['n']}   dim {a['dim']}   dtype {a['store_dtype']}")
    if store.views is not None:
        click.echo(f"views      {a.get('views')} per train image ({a.get('augment')}): {len(store)} images + "
                   f"{len(store.views)} augmented views of train images (probes train on them; val/test never)")
    click.echo(f"backbone   {json.dumps(a['backbone'])}")
    sets = [f"penultimate ({a['dim']})"] + [f"{name} ({values.shape[1]})" for name, values in store.feature_sets.items()]
    click.echo(f"features   {len(sets)} set{'s' if len(sets) > 1 else ''}: {', '.join(sets)}")
    click.echo(f"preprocess {json.dumps(a['preprocess'])}")
    click.echo(f"precision  {a['precision']}   versions {json.dumps(a['versions'])}")
    click.echo(f"source     {a['source'].get('description', '')}")
    names = store.class_names
    click.echo(f"classes    {len(names)}: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}"
               if names else "classes    none (unlabelled)")
    counts = {s.label: int(np.sum(store.splits == s)) for s in Split}
    click.echo("splits     " + "  ".join(f"{k} {v}" for k, v in counts.items() if v))
    click.echo(f"created    {a.get('created')}   updated {a.get('updated')}")
    click.echo(f"failures   {len(store.errors)}")
    for row, rel, message in store.errors[:max_errors_shown]:
        click.echo(f"  [{row}] {rel}: {message}")
    if len(store.errors) > max_errors_shown:
        click.echo(f"  ... {len(store.errors) - max_errors_shown} more (--errors N or --json)")


@click.command("rm")
@click.argument("entries", nargs=-1, required=True)
@cache_dir_option
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@handle_errors
def rm_command(entries: tuple[str, ...], cache_dir: Path, yes: bool) -> None:
    """Delete cache entries (by path or key prefix), with their partial and lock files."""
    from embedcache.store.entries import remove_entry, resolve_entry

    paths = [resolve_entry(e, cache_dir) for e in entries]
    if not yes:
        click.confirm(f"Delete {', '.join(str(p) for p in paths)}?", abort=True)
    for path in paths:
        for removed in remove_entry(path):
            click.echo(f"removed {removed}")
