"""Materialising an image source as a plain image folder (``dest/<split>/<class>/<name>.png``)."""

from __future__ import annotations

import os
import posixpath

from embedcache.errors import ConfigError, DataSourceError, DecodeError
from embedcache.sources.base import ImageSource
from embedcache.splits import SPLIT_NAMES, Split


def write_image_folder(source: ImageSource, dest: str | os.PathLike, *,
                       limit_per_split: dict[int, int] | int | None = None,
                       stratified: bool = True) -> int:
    """Write ``dest/<split>/<class>/<name>.png`` for every (selected) sample; return the count.

    Args:
        source: any source; all samples labelled and split, or all unlabelled and unsplit
            (then ``dest/<name>.png``).
        dest: a new or empty folder.
        limit_per_split: at most this many images per split; a dict limits the splits it
            names and skips the others; None writes everything.
        stratified: when limiting, take classes round-robin (balanced) instead of in order.

    Images that fail to decode are skipped (not counted). Class names are made safe as folder
    names (``/`` becomes ``_``, so ``T-shirt/top`` is written as ``T-shirt_top``).
    """
    dest = os.path.abspath(os.fspath(dest))
    if os.path.isdir(dest) and os.listdir(dest):
        raise ConfigError(f"The 'dest' folder {dest!r} must be new or empty; it holds files.")
    labelled = {s.label >= 0 for s in source.samples}
    split = {s.split != Split.UNSPLIT for s in source.samples}
    if len(labelled) > 1 or len(split) > 1 or labelled != split:
        raise DataSourceError(
            "write_image_folder needs every sample labelled and split, or every sample "
            f"unlabelled and unsplit; {source.description} mixes them."
        )
    folders = [_safe_folder_name(c) for c in source.class_names]
    if len(set(folders)) != len(folders):
        raise DataSourceError(f"Class names {source.class_names} collide as folder names.")
    chosen: list[int] = []
    for code in sorted({s.split for s in source.samples}):
        members = [i for i, s in enumerate(source.samples) if s.split == code]
        limit = limit_per_split.get(code, 0) if isinstance(limit_per_split, dict) else (
            limit_per_split)
        if limit is not None and stratified:
            members = _round_robin(members, [source.samples[i].label for i in members])
        chosen.extend(members if limit is None else members[:limit])
    written, used = 0, set()
    for i in sorted(chosen):
        sample = source.samples[i]
        parts = [] if sample.split == Split.UNSPLIT else [SPLIT_NAMES[sample.split], folders[sample.label]]
        stem = posixpath.splitext(posixpath.basename(sample.path))[0]
        target = os.path.join(dest, *parts, stem + ".png")
        if target in used:
            target = os.path.join(dest, *parts, f"{stem}_{i:06d}.png")
        try:
            image = source.load_pixels(i)  # gray images stay one channel: smaller files, same pixels
        except DecodeError:
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        image.save(target, format="PNG")
        used.add(target)
        written += 1
    return written


def _safe_folder_name(name: str) -> str:
    safe = name.replace("/", "_").replace("\\", "_").replace("\0", "_").strip()
    return ("_" + safe) if not safe or safe.startswith(".") else safe


def _round_robin(members: list[int], labels: list[int]) -> list[int]:
    by_class: dict[int, list[int]] = {}
    for i, label in zip(members, labels, strict=True):
        by_class.setdefault(label, []).append(i)
    queues = [by_class[k] for k in sorted(by_class)]
    order = []
    for depth in range(max((len(q) for q in queues), default=0)):
        order.extend(q[depth] for q in queues if depth < len(q))
    return order
