"""``embedcache verify``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from embedcache.cli.common import cache_dir_option, handle_errors, json_option


@click.command("verify")
@click.argument("entries", nargs=-1, required=True)
@cache_dir_option
@json_option
@handle_errors
def verify_command(entries: tuple[str, ...], cache_dir: Path, as_json: bool) -> None:
    """Check cache entries completely: every checksum (per block of feature rows, per column,
    HDF5's own per chunk), the layout, done rows finite, the file name against the key.

    ENTRIES are .h5 paths or cache-key prefixes (see `embedcache ls`). Exits with 1 when any
    entry has a problem; `embedcache rm` removes a damaged entry and extracting again recomputes it.
    """
    from embedcache.store.entries import resolve_entry
    from embedcache.store.verify import verify_entry

    reports = [verify_entry(resolve_entry(e, cache_dir)) for e in entries]
    if as_json:
        click.echo(json.dumps([{"path": str(r.path), "ok": r.ok, "problems": r.problems, "notes": r.notes,
                                "rows": r.rows, "rows_done": r.rows_done, "blocks": r.blocks} for r in reports],
                              indent=2))
    for r in reports if not as_json else []:
        status = "ok" if r.ok else "FAILED"
        # a check that stopped early (an unreadable file, a damaged shard) has counted nothing
        counted = f"  ({r.rows_done}/{r.rows} rows done, {r.blocks} feature blocks checked)" if r.rows else ""
        click.echo(f"{status:<7}{r.path}{counted}")
        for problem in r.problems:
            click.echo(f"  problem: {problem}")
        for note in r.notes:
            click.echo(f"  note:    {note}")
    if not all(r.ok for r in reports):
        raise click.exceptions.Exit(1)
