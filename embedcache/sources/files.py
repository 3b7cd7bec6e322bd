"""Images stored as files: class folders (optionally under split folders) and CSV manifests.

Folders are read as ``ROOT/<class>/...``, ``ROOT/{train,val,test}/<class>/...`` or, unlabelled,
any images under ROOT. CSV manifests list ``path,label[,split]`` relative to the CSV's folder;
absolute paths, ``..`` and symlinks out of that folder are refused.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import os
import posixpath
import stat as stat_module
from pathlib import Path

from embedcache.errors import DataSourceError
from embedcache.sources.base import FileSource, Sample, describe_source
from embedcache.sources.targets import (
    LABELS_COLUMN,
    label_set_indices,
    parse_label_set,
    parse_targets,
    target_columns,
)
from embedcache.splits import SPLIT_ALIASES, Split

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
_IGNORED_NAMES = frozenset({"__MACOSX"})

def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in _IGNORED_NAMES


def _is_image_name(name: str) -> bool:
    return not _is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_images(top: str) -> list[str]:
    """Absolute paths of image files under ``top``, recursively, hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        found.extend(os.path.join(dirpath, f) for f in filenames if _is_image_name(f))
    return found


def printable(text: str) -> str:
    """A name as valid UTF-8 text: bytes that are not UTF-8 (kept by Python as surrogates) are
    shown as ``\\xNN`` escapes."""
    if text.isascii():  # the common case; a name kept with surrogates is never ASCII
        return text
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def _file_sample(root: str, path: str, label: int, split: int, problems: dict[str, str]) -> Sample:
    """The sample of one file; a file that cannot be used as it is named (a dangling symlink,
    a symlink loop, a symlink out of the root, a name that is not UTF-8) becomes a sample whose
    decoding fails with that reason, so it is recorded and skipped like an undecodable image."""
    rel = _relative(path, root)
    shown = printable(rel)
    problem = None
    if shown != rel:
        problem = "the file name is not valid UTF-8 (shown escaped); rename the file to include it"
    else:
        try:
            # One lstat per file (a folder of 70k images is scanned on every run); a symlink
            # is checked and then followed.
            info = os.lstat(path)
            if stat_module.S_ISLNK(info.st_mode):
                problem = _symlink_problem(path, root)
                if problem is None:
                    info = os.stat(path)
        except OSError as exc:
            problem = f"cannot read file ({exc.strerror or exc})"
        if problem is None:
            return Sample(rel, label, int(split), info.st_size, info.st_mtime_ns)
    problems[shown] = problem
    return Sample(shown, label, int(split), 0, 0)


def _relative(path: str, root: str) -> str:
    """``path`` relative to ``root`` with ``/`` separators: a string cut when ``path`` is a plain
    path under ``root`` (the files a walk of ``root`` finds), ``relpath`` otherwise (``.``,
    ``..`` or empty parts, which it normalises)."""
    sep = os.sep
    prefix = root.rstrip(sep) + sep
    cut = sep + path[len(prefix):]
    if (path.startswith(prefix) and len(cut) > 1 and sep * 2 not in cut and sep + "." not in cut
            and not cut.endswith(sep)):
        rel = cut[1:]
    else:
        rel = os.path.relpath(path, root)
    return rel if sep == "/" else Path(rel).as_posix()


def _symlink_problem(path: str, root: str) -> str | None:
    """Why a symlinked image cannot be read (None when it points to a file inside the root)."""
    try:
        target = os.path.realpath(path, strict=True)
    except OSError as exc:
        return "symlink loop" if exc.errno == errno.ELOOP else "dangling symlink (its target does not exist)"
    real_root = os.path.realpath(root)
    if os.path.commonpath([target, real_root]) != real_root:
        return f"symlink points outside the data root (to {printable(target)!r}); refused"
    return None


def scan_folder(root: str | os.PathLike, *, unlabelled: bool | None = None) -> FileSource:
    """Read an image folder: ``ROOT/<class>/...``, ``ROOT/<split>/<class>/...`` or unlabelled.

    Files that cannot be used as named (dangling or looping symlinks, symlinks out of ROOT,
    names that are not UTF-8) are kept as samples that fail to decode with the reason, so that
    extraction records and skips them like undecodable images.

    Args:
        root: the folder.
        unlabelled: True reads every image under ROOT with label -1; None detects it (image
            files directly in ROOT and no class folders); False requires class folders.
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise DataSourceError(f"Image folder {root!r} does not exist or is not a directory.")
    with os.scandir(root) as entries:
        entries = [e for e in entries if not _is_hidden(e.name)]
    dirs = sorted(e.name for e in entries if e.is_dir())
    top_images = [e.name for e in entries if _is_image_name(e.name) and not e.is_dir()]
    if unlabelled is None:
        unlabelled = bool(top_images) and not dirs
    problems: dict[str, str] = {}
    if unlabelled:
        samples = [_file_sample(root, f, -1, Split.UNSPLIT, problems) for f in _walk_images(root)]
        return _folder_source("unlabelled folder", root, samples, [], problems)
    _check_layout(root, top_images, dirs)
    split_dirs = [d for d in dirs if d.lower() in SPLIT_ALIASES]
    groups = [(os.path.join(root, d), SPLIT_ALIASES[d.lower()]) for d in split_dirs] or [(root, Split.UNSPLIT)]
    found: list[tuple[str, str, int]] = []  # (file, class, split)
    for parent, split in groups:
        with os.scandir(parent) as entries:
            class_dirs = [e.name for e in entries if e.is_dir() and not _is_hidden(e.name)]
        for name in class_dirs:
            found.extend((f, printable(name), split) for f in _walk_images(os.path.join(parent, name)))
    class_names = sorted({name for _, name, _ in found})
    index = {name: i for i, name in enumerate(class_names)}
    samples = [_file_sample(root, f, index[c], s, problems) for f, c, s in found]
    return _folder_source("folder", root, samples, class_names, problems)


def _check_layout(root: str, top_images: list[str], dirs: list[str]) -> None:
    """Refuse folders that are neither class folders nor split folders of class folders."""
    if top_images:
        raise DataSourceError(
            f"Image folder {root!r} has image files at the top level ({printable(top_images[0])!r}, ...) "
            f"{'and class folders ' + repr([printable(d) for d in dirs[:3]]) if dirs else 'but no class folders'}. "
            f"Pass unlabelled=True (--unlabelled) to read every image without labels, or move "
            f"the images into ROOT/<class>/."
        )
    split_dirs = [d for d in dirs if d.lower() in SPLIT_ALIASES]
    if split_dirs and len(split_dirs) != len(dirs):
        others = [printable(d) for d in dirs if d not in split_dirs]
        raise DataSourceError(
            f"Image folder {root!r} mixes split folders {split_dirs} with other folders "
            f"{others[:5]}. Use either ROOT/<class>/... or ROOT/{{train,val,test}}/<class>/...."
        )


def _folder_source(kind: str, root: str, samples: list[Sample], class_names: list[str],
                   problems: dict[str, str]) -> FileSource:
    samples = sorted(samples, key=lambda s: s.path)
    _require_images(samples, root)
    return FileSource(kind="folder", root=root, samples=samples, class_names=class_names,
                      description=describe_source(kind, root, class_names, len(samples)), problems=problems)


def _require_images(samples: list[Sample], where: str) -> None:
    if not samples:
        raise DataSourceError(
            f"No image files found under {where!r} (extensions: "
            f"{', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}; hidden files are skipped)."
        )


def read_csv_manifest(csv_path: str | os.PathLike, *, targets: list[str] | None = None,
                      label_vocabulary: list[str] | None = None) -> FileSource:
    """Read a CSV manifest with header ``path,label[,split]``; paths relative to the CSV's folder.

    Rows are numbered like a spreadsheet (the header is row 1). Absolute paths, ``..`` components
    and symlinks resolving outside the CSV's folder are refused. An empty label means unlabelled;
    when some rows have a split and others not, the others go to train.

    Args:
        csv_path: the manifest.
        targets: numeric target columns to read (``--target``/``--targets``), see
            :mod:`~embedcache.sources.targets`; a ``labels`` column (``;``-separated names) is
            read as label sets whenever present.
        label_vocabulary: the only class names label sets may use, in this order (a probe's).
    """
    csv_path = os.path.abspath(os.fspath(csv_path))
    root = os.path.dirname(csv_path)
    real_root = os.path.realpath(root)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataSourceError(f"Cannot read CSV manifest {csv_path!r}: {exc}") from None
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "path" not in header:
        raise DataSourceError(
            f"CSV manifest {csv_path!r} must start with a header row naming the columns "
            f"path,label[,split]. Got {rows[0] if rows else 'an empty file'!r}."
        )
    numeric = target_columns(header, targets, f"CSV manifest {csv_path!r}")  # issue 13: targets
    multilabel = LABELS_COLUMN in header
    if multilabel and "label" in header:
        raise DataSourceError(f"CSV manifest {csv_path!r} has both a 'label' and a '{LABELS_COLUMN}' column; "
                              f"use 'label' for one class per image or '{LABELS_COLUMN}' for label sets.")
    col = {name: header.index(name) for name in ("path", "label", "split", LABELS_COLUMN) if name in header}
    raw_rows: dict[int, list[str]] = {}
    entries: list[tuple[int, str, str, str]] = []  # (row number, path, label, split)
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        cells = {k: (row[i].strip() if i < len(row) else "") for k, i in col.items()}
        entries.append((number, cells["path"], cells.get("label", ""), cells.get("split", "")))
        raw_rows[number] = row
    has_split = any(split for _, _, _, split in entries)
    class_names = sorted({label for _, _, label, _ in entries if label})
    label_sets: dict[int, tuple[int, ...]] = {}
    if multilabel:
        position = col[LABELS_COLUMN]
        sets = [(number, parse_label_set(raw_rows[number][position] if position < len(raw_rows[number]) else "",
                                         f"CSV manifest {csv_path!r} row {number}")) for number, *_ in entries]
        class_names, label_sets = label_set_indices(sets, label_vocabulary, csv_path)
    index = {name: i for i, name in enumerate(class_names)}
    samples, seen, problems = [], {}, {}
    for number, raw, label, split_text in entries:
        where = f"CSV manifest {csv_path!r} row {number}"
        rel = _safe_relative(raw, root, real_root, where)
        if rel in seen:
            raise DataSourceError(f"{where}: {rel!r} is already listed in row {seen[rel]}.")
        seen[rel] = number
        if split_text and split_text.lower() not in SPLIT_ALIASES:
            raise DataSourceError(
                f"{where}: split must be one of {sorted(SPLIT_ALIASES)} or empty. "
                f"Got {split_text!r}."
            )
        split = SPLIT_ALIASES[split_text.lower()] if split_text else (
            Split.TRAIN if has_split else Split.UNSPLIT)
        full = os.path.join(root, *rel.split("/"))
        if not os.path.isfile(full):
            raise DataSourceError(f"{where}: file {rel!r} does not exist (looked at {full!r}).")
        sample = _file_sample(root, full, index[label] if label and not multilabel else -1, split,
                              problems)
        if numeric or multilabel:
            sample = dataclasses.replace(sample, target=parse_targets(raw_rows[number], numeric, where),
                                         label_set=label_sets.get(number) if multilabel else None)
        samples.append(sample)
    samples.sort(key=lambda s: s.path)
    _require_images(samples, csv_path)
    return FileSource(kind="csv", root=root, samples=samples, class_names=class_names,
                      description=describe_source("csv", csv_path, class_names, len(samples)),
                      target_names=[name for name, _ in numeric], multilabel=multilabel, problems=problems)


def _safe_relative(raw: str, root: str, real_root: str, where: str) -> str:
    if not raw:
        raise DataSourceError(f"{where}: the path is empty.")
    posix = raw.replace("\\", "/")
    if posix.startswith("/") or os.path.isabs(raw) or (len(raw) > 1 and raw[1] == ":"):
        raise DataSourceError(
            f"{where}: absolute path {raw!r} refused; paths must be relative to the CSV's folder."
        )
    if ".." in posix.split("/"):
        raise DataSourceError(f"{where}: path {raw!r} contains '..'; escapes are refused.")
    rel = posixpath.normpath(posix)
    real = os.path.realpath(os.path.join(root, *rel.split("/")))
    if os.path.commonpath([real, real_root]) != real_root:
        raise DataSourceError(
            f"{where}: path {raw!r} resolves outside the CSV's folder (symlink to {real!r}); "
            f"refused."
        )
    return rel


# --------------------------------------------------------------------------------------------
# Opening a source and assigning splits


