"""Image sources, splits and the manifest that identifies a data set.

An :class:`ImageSource` is an ordered list of :class:`Sample` rows (relative path, label, split,
size, mtime) plus a way to decode row ``i`` into an RGB PIL image. :func:`open_source` picks the
kind from one string: an image folder, a ``.csv`` manifest, ``.npz`` arrays, ``demo``, or
``torchvision:NAME:ROOT``. Nothing is ever downloaded. Decoding one file safely is
:mod:`embedcache.decode`'s job; its names are re-exported here for existing callers.

The manifest hash (:meth:`ImageSource.manifest_sha256`) uses only root-relative paths, so a data set
moved to another directory is still the same cache entry; any change of a file's size, mtime, label
or split gives a new hash.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import importlib.resources
import inspect
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

_IDX_DATASETS = {
    "MNIST": [f"{i} - {w}" for i, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])],
    "FashionMNIST": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    "KMNIST": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
}
_IDX_FILES = {TRAIN: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              TEST: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DEMO_FILE = "fashion_mnist_demo.npz"


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


class ImageSource:
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

    def load_image(self, index: int) -> Image.Image:
        """Decode sample ``index`` as an RGB image; raises DecodeError with a short reason."""
        raise NotImplementedError

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


class ArraySource(ImageSource):
    """Images held in memory as a uint8 array, ``(N, H, W)`` gray or ``(N, H, W, 3)`` RGB.

    Sample paths are ``"{split_name}/{i:06d}"`` where ``i`` counts within the split given here
    (``unsplit/...`` when ``splits`` is None); a later seeded hold-out does not rename them.
    """

    kind = "arrays"

    def __init__(self, images: np.ndarray, labels: np.ndarray, splits: np.ndarray | None,
                 class_names: list[str], description: str, *, kind: str = "arrays",
                 root: str = "") -> None:
        images = np.asarray(images)
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        n = len(images)
        if images.dtype != np.uint8 or not (
            images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)
        ):
            raise DataSourceError(
                f"Array images must be uint8 of shape (N, H, W) or (N, H, W, 3). "
                f"Got {images.dtype} {images.shape}."
            )
        splits = np.full(n, UNSPLIT, np.uint8) if splits is None else np.asarray(splits, np.uint8)
        if len(labels) != n or len(splits) != n:
            raise DataSourceError(
                f"Array source needs one label and one split per image: {n} images, "
                f"{len(labels)} labels, {len(splits)} splits."
            )
        if n and (labels.max() >= len(class_names) or labels.min() < -1):
            raise DataSourceError(
                f"Array labels must be in [-1, {len(class_names) - 1}] for {len(class_names)} "
                f"class names. Got range [{labels.min()}, {labels.max()}]."
            )
        counters = dict.fromkeys(SPLIT_NAMES, 0)
        samples = []
        for label, split in zip(labels.tolist(), splits.tolist(), strict=True):
            samples.append(Sample(f"{SPLIT_NAMES[split]}/{counters[split]:06d}", label, split))
            counters[split] += 1
        super().__init__(root=root, samples=samples, class_names=[str(c) for c in class_names],
                         description=description)
        self.kind = kind
        self.images = images
        self._content_sha256: str | None = None

    @classmethod
    def from_npz(cls, path: str | os.PathLike, *, description: str | None = None) -> ArraySource:
        """Load ``train_images``/``train_labels``/``test_images``/``test_labels``/``class_names``."""
        path = os.fspath(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                parts = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise DataSourceError(f"Cannot read arrays from {path!r}: {exc}") from None
        missing = {"train_images", "train_labels", "class_names"} - set(parts)
        if missing:
            raise DataSourceError(f"{path!r} lacks the arrays {sorted(missing)}.")
        images, labels, splits = [parts["train_images"]], [parts["train_labels"]], [
            np.full(len(parts["train_images"]), TRAIN, np.uint8)]
        if "test_images" in parts:
            images.append(parts["test_images"])
            labels.append(parts["test_labels"])
            splits.append(np.full(len(parts["test_images"]), TEST, np.uint8))
        names = [str(c) for c in parts["class_names"].tolist()]
        n = sum(len(i) for i in images)
        return cls(np.concatenate(images), np.concatenate(labels), np.concatenate(splits), names,
                   description or _describe("arrays", path, names, n))

    def load_image(self, index: int) -> Image.Image:
        array = self.images[index]
        return Image.fromarray(array, "L" if array.ndim == 2 else "RGB").convert("RGB")

    def _manifest_extra(self) -> dict:
        if self._content_sha256 is None:
            digest = hashlib.sha256(str(self.images.shape).encode())
            digest.update(np.ascontiguousarray(self.images).data)
            digest.update(np.asarray([s.label for s in self.samples], "<i8").tobytes())
            self._content_sha256 = digest.hexdigest()
        return {"arrays_sha256": self._content_sha256}


def demo_source() -> ArraySource:
    """The packaged Fashion-MNIST subset (``embedcache/demo_data/fashion_mnist_demo.npz``)."""
    resource = importlib.resources.files("embedcache").joinpath("demo_data", DEMO_FILE)
    if not resource.is_file():
        raise DataSourceError(
            f"The demo data embedcache/demo_data/{DEMO_FILE} is not installed with this package."
        )
    with importlib.resources.as_file(resource) as path:
        source = ArraySource.from_npz(path)
    source.description = _describe("demo Fashion-MNIST subset", "", source.class_names,
                                    len(source))
    return source


# --------------------------------------------------------------------------------------------
# torchvision data sets, read from local files only


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (plain or ``.gz``) of unsigned bytes into a numpy array."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise DataSourceError(f"Cannot read IDX file {path!r}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataSourceError(f"{path!r} is not an IDX file of unsigned bytes (bad magic).")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(data) - offset != math.prod(shape):
        raise DataSourceError(
            f"{path!r} is truncated or malformed: header says {shape}, "
            f"{len(data) - offset} bytes of data."
        )
    return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


def idx_source(name: str, root: str | os.PathLike) -> ArraySource:
    """MNIST / FashionMNIST / KMNIST from their IDX files in ROOT, ROOT/raw or ROOT/NAME/raw."""
    root = os.path.abspath(os.fspath(root))
    candidates = [root, os.path.join(root, "raw"), os.path.join(root, name, "raw")]
    for folder in candidates:
        found = {}
        for stem in (s for pair in _IDX_FILES.values() for s in pair):
            found[stem] = next((os.path.join(folder, stem + ext) for ext in (".gz", "")
                                if os.path.isfile(os.path.join(folder, stem + ext))), None)
        if all(found.values()):
            break
    else:
        expected = ", ".join(f"{s}[.gz]" for pair in _IDX_FILES.values() for s in pair)
        raise DataSourceError(
            f"torchvision:{name}: IDX files not found. Looked in {candidates}; expected {expected}. "
            f"Nothing is downloaded: copy the files there (e.g. from the Debian package "
            f"'fashion-mnist' at /usr/share/datasets/fashion-mnist)."
        )
    images, labels, splits = [], [], []
    for split, (image_stem, label_stem) in _IDX_FILES.items():
        part_images, part_labels = read_idx(found[image_stem]), read_idx(found[label_stem])
        if part_images.ndim != 3 or part_labels.shape != (len(part_images),):
            raise DataSourceError(
                f"torchvision:{name}: {found[image_stem]!r} {part_images.shape} and "
                f"{found[label_stem]!r} {part_labels.shape} do not match."
            )
        images.append(part_images)
        labels.append(part_labels)
        splits.append(np.full(len(part_images), split, np.uint8))
    names = _IDX_DATASETS[name]
    n = sum(len(i) for i in images)
    return ArraySource(np.concatenate(images), np.concatenate(labels), np.concatenate(splits),
                       names, _describe(f"torchvision {name}", folder, names, n),
                       kind="torchvision", root=folder)


class TorchvisionSource(ImageSource):
    """Any other torchvision data set class, built with ``download=False`` and read lazily.

    Labels come from the data set's ``targets``/``_labels``/``labels`` attribute when present
    (otherwise every item is read once). The manifest includes (relative path, size, mtime) of
    every file under ROOT, since the samples themselves carry no file identity.
    """

    kind = "torchvision"

    def __init__(self, name: str, root: str | os.PathLike) -> None:
        root = os.path.abspath(os.fspath(root))
        import torchvision.datasets

        cls = getattr(torchvision.datasets, name, None)
        if not (inspect.isclass(cls) and issubclass(cls, torch.utils.data.Dataset)):
            known = sorted(n for n in dir(torchvision.datasets) if n[0].isupper())
            raise DataSourceError(
                f"Unknown torchvision dataset {name!r}. Known: {', '.join(known)}."
            )
        params = inspect.signature(cls).parameters
        kwargs = {"download": False} if "download" in params else {}
        if "train" in params:
            attempts = [(TRAIN, {"train": True}), (TEST, {"train": False})]
        elif "split" in params:
            attempts = [(SPLIT_ALIASES[s], {"split": s}) for s in ("train", "val", "valid", "test")]
        else:
            attempts = [(UNSPLIT, {})]
        self.parts: list[tuple[int, torch.utils.data.Dataset]] = []
        errors = []
        for split, extra in attempts:
            try:
                self.parts.append((split, cls(root, **kwargs, **extra)))
            except Exception as exc:  # noqa: BLE001 - each class fails in its own way
                errors.append(f"{extra or 'default'}: {exc}")
        if not self.parts:
            raise DataSourceError(
                f"torchvision:{name}: cannot load from {root!r} with download=False "
                f"(nothing is downloaded). {' | '.join(errors)}"
            )
        samples, self._locations = [], []
        for part_number, (split, dataset) in enumerate(self.parts):
            for i, label in enumerate(_dataset_labels(dataset)):
                samples.append(Sample(f"{SPLIT_NAMES[split]}/{i:06d}", label, split))
                self._locations.append((part_number, i))
        classes = getattr(self.parts[0][1], "classes", None)
        if classes is None:
            classes = [str(i) for i in range(max((s.label for s in samples), default=-1) + 1)]
        class_names = [str(c) for c in classes]
        super().__init__(root=root, samples=samples, class_names=class_names,
                         description=_describe(f"torchvision {name}", root, class_names,
                                               len(samples)))

    def load_image(self, index: int) -> Image.Image:
        part, i = self._locations[index]
        try:
            image = self.parts[part][1][i][0]
            if isinstance(image, torch.Tensor):
                image = image.numpy()
                image = image.transpose(1, 2, 0) if image.ndim == 3 and image.shape[0] in (1, 3) \
                    else image
            if isinstance(image, np.ndarray):
                image = Image.fromarray(image.squeeze())
            return to_rgb(image)
        except DecodeError:
            raise
        except Exception as exc:  # noqa: BLE001 - data set classes raise anything
            raise DecodeError(f"cannot load item ({type(exc).__name__}: {exc})") from None

    def _manifest_extra(self) -> dict:
        files = []
        for dirpath, _, filenames in os.walk(self.root):
            for f in filenames:
                stat = os.stat(os.path.join(dirpath, f))
                rel = Path(os.path.relpath(os.path.join(dirpath, f), self.root)).as_posix()
                files.append([rel, stat.st_size, stat.st_mtime_ns])
        return {"files": sorted(files)}


def _dataset_labels(dataset) -> list[int]:
    for attr in ("targets", "_labels", "labels", "_targets"):
        values = getattr(dataset, attr, None)
        if values is not None and len(values) == len(dataset):
            return [int(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
    return [int(dataset[i][1]) for i in range(len(dataset))]


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
    text = os.fspath(data)
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
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label).tolist()
        members.sort(key=lambda i: hashlib.sha256(f"{seed}:{keys[i]}".encode()).digest())
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
            return index, to_uint8_tensor(self.source.load_image(index), self.spec), None
        except DecodeError as exc:
            return index, None, str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad image must never stop the loop
            return index, None, f"{type(exc).__name__}: {exc}"


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


# --------------------------------------------------------------------------------------------
# Materialising a source as an image folder


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
    split = {s.split != UNSPLIT for s in source.samples}
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
        parts = [] if sample.split == UNSPLIT else [SPLIT_NAMES[sample.split], folders[sample.label]]
        stem = posixpath.splitext(posixpath.basename(sample.path))[0]
        target = os.path.join(dest, *parts, stem + ".png")
        if target in used:
            target = os.path.join(dest, *parts, f"{stem}_{i:06d}.png")
        try:
            image = source.load_image(i)
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
