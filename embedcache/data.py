"""Image sources, splits and the manifest that identifies a data set.

An :class:`ImageSource` is an ordered list of :class:`Sample` rows (relative path, label, split,
size, mtime) plus a way to decode row ``i`` into an RGB PIL image. :func:`open_source` picks the
kind from one string: an image folder, a ``.csv`` manifest, ``.npz`` arrays, ``demo``, or
``torchvision:NAME:ROOT``. Nothing is ever downloaded. This module holds the source base classes,
folder and CSV scanning, the seeded hold-out splits, ``open_source`` and the torch dataset/collate.
Array, demo and torchvision sources live in :mod:`embedcache.datasets`, writing a source out as an
image folder in :mod:`embedcache.materialize`, decoding one file safely in
:mod:`embedcache.decode`; their public names are re-exported here for existing callers.

The manifest hash (:meth:`ImageSource.manifest_sha256`) uses only root-relative paths, so a data set
moved to another directory is still the same cache entry; any change of a file's size, mtime, label
or split gives a new hash.
"""

from __future__ import annotations

import abc
import csv
import dataclasses
import hashlib
import importlib.resources  # noqa: F401 - still bound here: tests reach data.importlib
import json
import math
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# DECODER_VERSION, MAX_IMAGE_PIXELS: re-exported; callers import them from embedcache.data.
from embedcache.decode import (  # noqa: F401
    DECODER_VERSION,
    MAX_IMAGE_PIXELS,
    decode_image,
    to_rgb,
)
from embedcache.errors import ConfigError, DataSourceError, DecodeError
from embedcache.preprocess import PreprocessSpec, to_uint8_tensor

TRAIN, VAL, TEST, UNSPLIT = 0, 1, 2, 3
SPLIT_NAMES = {TRAIN: "train", VAL: "val", TEST: "test", UNSPLIT: "unsplit"}
# Folder names and CSV values accepted for each split (compared lower-cased).
SPLIT_ALIASES = {"train": TRAIN, "val": VAL, "valid": VAL, "validation": VAL, "test": TEST}

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
_IGNORED_NAMES = frozenset({"__MACOSX"})



@dataclass(frozen=True)
class Sample:
    """One image of a source.

    Attributes:
        path: POSIX path relative to the source root; a synthetic id ``"train/000123"`` for arrays.
        label: class index into ``class_names``; -1 = unlabelled.
        split: TRAIN, VAL, TEST or UNSPLIT.
        size: file size in bytes (0 when there is no file).
        mtime_ns: file modification time in ns (0 when there is no file).
    """

    path: str
    label: int
    split: int
    size: int = 0
    mtime_ns: int = 0


# --------------------------------------------------------------------------------------------
# Sources


class ImageSource(abc.ABC):
    """An ordered list of samples and a way to decode each one.

    Attributes:
        kind: ``folder``, ``csv``, ``arrays`` or ``torchvision``.
        root: absolute path of the source root (``""`` when there is none).
        description: human readable, e.g. ``folder /data/flowers (3 classes, 1200 images)``.
        samples: the rows, in a deterministic order (sorted by path for files).
        class_names: label ``i`` is ``class_names[i]``.
    """

    kind = ""

    def __init__(self, *, root: str, samples: list[Sample], class_names: list[str],
                 description: str = "") -> None:
        self.root = root
        self.samples = samples
        self.class_names = list(class_names)
        self.description = description

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"

    @abc.abstractmethod
    def load_image(self, index: int) -> Image.Image:
        """Decode sample ``index`` as an RGB image; raises DecodeError with a short reason."""

    def split_counts(self) -> dict[str, int]:
        """Number of samples per split name (only splits that occur)."""
        counts = np.bincount([s.split for s in self.samples], minlength=len(SPLIT_NAMES))
        return {SPLIT_NAMES[code]: int(n) for code, n in enumerate(counts) if n}

    def manifest_sha256(self) -> str:
        """sha256 of canonical JSON: sorted (path, size, mtime_ns, label, split), class names and
        kind-specific content (array bytes); never the root location."""
        rows = sorted([s.path, s.size, s.mtime_ns, s.label, s.split] for s in self.samples)
        payload = {"samples": rows, "class_names": self.class_names, **self._manifest_extra()}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def _manifest_extra(self) -> dict:
        return {}

    def to_dict(self) -> dict:
        """JSON-able summary: kind, root, description, n, class_names, split counts."""
        return {"kind": self.kind, "root": self.root, "description": self.description,
                "n": len(self), "class_names": list(self.class_names),
                "splits": self.split_counts()}

    def _set_splits(self, splits: np.ndarray) -> None:
        """Replace every sample's split (used by the seeded hold-out); paths stay stable."""
        self.samples = [dataclasses.replace(s, split=int(c)) for s, c in zip(self.samples, splits, strict=True)]


def _describe(kind: str, where: str, class_names: list[str], n: int) -> str:
    classes = f"{len(class_names)} classes, " if class_names else ""
    return f"{kind} {where} ({classes}{n} images)".replace("  ", " ")


class FileSource(ImageSource):
    """Images stored as files under ``root`` (folder and CSV sources)."""

    def __init__(self, *, kind: str, root: str, samples: list[Sample], class_names: list[str],
                 description: str) -> None:
        super().__init__(root=root, samples=samples, class_names=class_names,
                         description=description)
        self.kind = kind

    def load_image(self, index: int) -> Image.Image:
        return decode_image(os.path.join(self.root, *self.samples[index].path.split("/")))


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


def _file_sample(root: str, path: str, label: int, split: int) -> Sample:
    stat = os.stat(path)
    rel = Path(os.path.relpath(path, root)).as_posix()
    return Sample(rel, label, split, stat.st_size, stat.st_mtime_ns)


def scan_folder(root: str | os.PathLike, *, unlabelled: bool | None = None) -> FileSource:
    """Read an image folder: ``ROOT/<class>/...``, ``ROOT/<split>/<class>/...`` or unlabelled.

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
    top_images = [e.name for e in entries if e.is_file() and _is_image_name(e.name)]
    split_dirs = [d for d in dirs if d.lower() in SPLIT_ALIASES]
    if unlabelled is None:
        unlabelled = bool(top_images) and not dirs
    if unlabelled:
        files = sorted(_walk_images(root))
        samples = sorted((_file_sample(root, f, -1, UNSPLIT) for f in files),
                         key=lambda s: s.path)
        _require_images(samples, root)
        return FileSource(kind="folder", root=root, samples=samples, class_names=[],
                          description=_describe("unlabelled folder", root, [], len(samples)))
    if top_images:
        raise DataSourceError(
            f"Image folder {root!r} has image files at the top level ({top_images[0]!r}, ...) "
            f"{'and class folders ' + repr(dirs[:3]) if dirs else 'but no class folders'}. "
            f"Pass unlabelled=True (--unlabelled) to read every image without labels, or move "
            f"the images into ROOT/<class>/."
        )
    if split_dirs and len(split_dirs) != len(dirs):
        others = [d for d in dirs if d not in split_dirs]
        raise DataSourceError(
            f"Image folder {root!r} mixes split folders {split_dirs} with other folders "
            f"{others[:5]}. Use either ROOT/<class>/... or ROOT/{{train,val,test}}/<class>/...."
        )
    groups = [(os.path.join(root, d), SPLIT_ALIASES[d.lower()]) for d in split_dirs] or [
        (root, UNSPLIT)
    ]
    found: list[tuple[str, str, int]] = []  # (file, class, split)
    for parent, split in groups:
        with os.scandir(parent) as entries:
            class_dirs = [e.name for e in entries if e.is_dir() and not _is_hidden(e.name)]
        for name in class_dirs:
            found.extend((f, name, split) for f in _walk_images(os.path.join(parent, name)))
    class_names = sorted({name for _, name, _ in found})
    index = {name: i for i, name in enumerate(class_names)}
    samples = sorted((_file_sample(root, f, index[c], s) for f, c, s in found),
                     key=lambda s: s.path)
    _require_images(samples, root)
    return FileSource(kind="folder", root=root, samples=samples, class_names=class_names,
                      description=_describe("folder", root, class_names, len(samples)))


def _require_images(samples: list[Sample], where: str) -> None:
    if not samples:
        raise DataSourceError(
            f"No image files found under {where!r} (extensions: "
            f"{', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}; hidden files are skipped)."
        )


def read_csv_manifest(csv_path: str | os.PathLike) -> FileSource:
    """Read a CSV manifest with header ``path,label[,split]``; paths relative to the CSV's folder.

    Rows are numbered like a spreadsheet (the header is row 1). Absolute paths, ``..`` components
    and symlinks resolving outside the CSV's folder are refused. An empty label means unlabelled;
    when some rows have a split and others not, the others go to train.
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
    col = {name: header.index(name) for name in ("path", "label", "split") if name in header}
    entries: list[tuple[int, str, str, str]] = []  # (row number, path, label, split)
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        cells = {k: (row[i].strip() if i < len(row) else "") for k, i in col.items()}
        entries.append((number, cells["path"], cells.get("label", ""), cells.get("split", "")))
    has_split = any(split for _, _, _, split in entries)
    class_names = sorted({label for _, _, label, _ in entries if label})
    index = {name: i for i, name in enumerate(class_names)}
    samples, seen = [], {}
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
            TRAIN if has_split else UNSPLIT)
        full = os.path.join(root, *rel.split("/"))
        if not os.path.isfile(full):
            raise DataSourceError(f"{where}: file {rel!r} does not exist (looked at {full!r}).")
        samples.append(_file_sample(root, full, index[label] if label else -1, split))
    samples.sort(key=lambda s: s.path)
    _require_images(samples, csv_path)
    return FileSource(kind="csv", root=root, samples=samples, class_names=class_names,
                      description=_describe("csv", csv_path, class_names, len(samples)))


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


def open_source(data: str | os.PathLike, *, unlabelled: bool | None = None,
                val_fraction: float = 0.0, test_fraction: float = 0.2,
                split_seed: int = 0) -> ImageSource:
    """Open an image source from one string.

    Args:
        data: a folder; a ``.csv`` manifest; a ``.npz`` of arrays; ``demo``; or
            ``torchvision:NAME:ROOT`` (MNIST/FashionMNIST/KMNIST from IDX files, any other
            torchvision data set class with ``download=False``).
        unlabelled: True drops all labels and splits (predict / extract-only); None detects an
            unlabelled folder; False requires labels.
        val_fraction: share of each class held out for validation when the source has no splits.
        test_fraction: share of each class held out for test when the source has no splits.
        split_seed: seed of that stratified hold-out.
    """
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"val_fraction + test_fraction must be < 1 so that some images stay in train. "
            f"Got {val_fraction} + {test_fraction}."
        )
    text = os.path.expanduser(os.fspath(data))
    if text == "demo":
        source: ImageSource = demo_source()
    elif text.startswith("torchvision:"):
        _, name, root = (text.split(":", 2) + ["", ""])[:3]
        if not name or not root:
            raise DataSourceError(f"Expected torchvision:NAME:ROOT. Got {text!r}.")
        canonical = {k.lower(): k for k in _IDX_DATASETS}.get(name.lower())
        source = idx_source(canonical, root) if canonical else TorchvisionSource(name, root)
    elif os.path.isdir(text):
        source = scan_folder(text, unlabelled=unlabelled)
    elif os.path.isfile(text) and text.lower().endswith(".csv"):
        source = read_csv_manifest(text)
    elif os.path.isfile(text) and text.lower().endswith(".npz"):
        source = ArraySource.from_npz(os.path.abspath(text))
    else:
        raise DataSourceError(
            f"Cannot open data source {text!r}: expected an image folder, a .csv manifest, a .npz "
            f"file, 'demo' or 'torchvision:NAME:ROOT'"
            f"{'' if os.path.exists(text) else ' (no such file or directory)'}."
        )
    labels = np.asarray([s.label for s in source.samples], np.int64)
    if unlabelled:
        source.samples = [dataclasses.replace(s, label=-1, split=UNSPLIT) for s in source.samples]
        source.class_names = []
    elif unlabelled is False and (labels < 0).all():
        raise DataSourceError(f"Source {source.description} has no labels (unlabelled=False).")
    elif (labels >= 0).any() and all(s.split == UNSPLIT for s in source.samples):
        keys = [str(i) if source.kind in ("arrays", "torchvision") else s.path
                for i, s in enumerate(source.samples)]
        source._set_splits(holdout_splits(keys, labels, val_fraction=val_fraction,
                                          test_fraction=test_fraction, seed=split_seed))
    return source


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(
            f"The '{name}' parameter must be a float in the range [0, 1). Got {value!r} instead."
        )


def holdout_splits(keys: list[str], labels: np.ndarray, *, val_fraction: float,
                   test_fraction: float, seed: int) -> np.ndarray:
    """Stratified, seeded hold-out: per class, ``round(n*test_fraction)`` to TEST and
    ``round(n*val_fraction)`` to VAL, the rest TRAIN; a class with >= 2 images keeps one in train.

    Members of a class are ordered by ``sha256(seed:key)`` so that the choice depends only on the
    seed and each sample's stable key (adding one file moves few others).
    """
    labels = np.asarray(labels)
    splits = np.full(len(keys), TRAIN, np.uint8)
    # fixed-width bytes compare like Python bytes (unsigned, lexicographic): the same order as
    # sorting the members by their digests, vectorised
    digests = np.array([hashlib.sha256(f"{seed}:{key}".encode()).digest() for key in keys], dtype="S32")
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[np.argsort(digests[members], kind="stable")].tolist()
        n = len(members)
        n_test, n_val = math.floor(n * test_fraction + 0.5), math.floor(n * val_fraction + 0.5)
        if n >= 2:
            excess = n_test + n_val - (n - 1)
            if excess > 0:
                cut = min(excess, n_val)
                n_val, n_test = n_val - cut, n_test - (excess - cut)
        elif n_test + n_val >= n:
            n_test = n_val = 0
        for position, i in enumerate(members):
            splits[i] = TEST if position < n_test else VAL if position < n_test + n_val else TRAIN
    return splits


# --------------------------------------------------------------------------------------------
# Torch dataset and collation


class ImageDataset(torch.utils.data.Dataset):
    """Decode + preprocess in DataLoader workers; ``item i -> (i, uint8 (3,H,W) | None, error)``.

    Never raises for a bad image: the error message comes back instead of the tensor.
    """

    def __init__(self, source: ImageSource, spec: PreprocessSpec) -> None:
        self.source = source
        self.spec = spec

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, self.tensor(index), None
        except DecodeError as exc:
            return index, None, str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad image must never stop the loop
            return index, None, f"{type(exc).__name__}: {exc}"

    def tensor(self, index: int) -> torch.Tensor:
        """Item ``index`` as a uint8 ``(3, H, W)`` tensor; subclasses change what is loaded and how."""
        return to_uint8_tensor(self.source.load_image(index), self.spec)


def collate_images(items) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """Stack the good rows; return ``(indices, uint8 batch (M,3,H,W), [(index, message)])``.

    A batch of only bad images gives indices of length 0 and a ``(0, 3, 0, 0)`` batch.
    """
    good = [(i, t) for i, t, _ in items if t is not None]
    failures = [(int(i), msg) for i, t, msg in items if t is None]
    indices = torch.tensor([i for i, _ in good], dtype=torch.long)
    if not good:
        return indices, torch.empty((0, 3, 0, 0), dtype=torch.uint8), failures
    # Stack as (M, H, W, 3) and view as (M, 3, H, W): the batch is channels_last in memory, the
    # layout the model runs in, so no reordering copy is needed later.
    batch = torch.stack([t.permute(1, 2, 0) for _, t in good]).permute(0, 3, 1, 2)
    return indices, batch, failures


# Re-exported for existing callers (``from embedcache.data import ArraySource`` ...) and used by
# open_source. Imported last: both modules build on the classes defined above.
from embedcache.datasets import (  # noqa: E402, F401
    _IDX_DATASETS,
    DEMO_FILE,
    ArraySource,
    TorchvisionSource,
    demo_source,
    idx_source,
    read_idx,
)
from embedcache.materialize import write_image_folder  # noqa: E402, F401
