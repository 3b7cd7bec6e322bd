"""Image sources held as arrays: ``.npz`` files, the bundled demo, MNIST-family IDX files.

MNIST / FashionMNIST / KMNIST are read straight from their IDX files (gzipped or not), so the
Debian package ``dataset-fashion-mnist`` works offline. Nothing is ever downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import math
import os
from typing import Any

import numpy as np
from PIL import Image

from embedcache.errors import DataSourceError
from embedcache.sources.base import ImageSource, Sample, describe_source
from embedcache.splits import SPLIT_NAMES, Split

IDX_DATASETS = {
    "MNIST": [f"{i} - {w}" for i, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])],
    "FashionMNIST": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    "KMNIST": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
}
_IDX_FILES = {Split.TRAIN: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              Split.TEST: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DEMO_FILE = "fashion_mnist_demo.npz"


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
        splits = np.full(n, Split.UNSPLIT, np.uint8) if splits is None else np.asarray(splits, np.uint8)
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
        """Load ``train_images``/``train_labels``/``class_names``, and optionally
        ``val_images``/``val_labels`` and ``test_images``/``test_labels``."""
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
            np.full(len(parts["train_images"]), Split.TRAIN, np.uint8)]
        for split, code in (("val", Split.VAL), ("test", Split.TEST)):
            if f"{split}_images" in parts:
                if f"{split}_labels" not in parts:
                    raise DataSourceError(f"{path!r} has {split}_images but no {split}_labels.")
                images.append(parts[f"{split}_images"])
                labels.append(parts[f"{split}_labels"])
                splits.append(np.full(len(parts[f"{split}_images"]), code, np.uint8))
        names = [str(c) for c in parts["class_names"].tolist()]
        n = sum(len(i) for i in images)
        return cls(np.concatenate(images), np.concatenate(labels), np.concatenate(splits), names,
                   description or describe_source("arrays", path, names, n))

    def load_image(self, index: int) -> Image.Image:
        return self.load_pixels(index).convert("RGB")

    def load_pixels(self, index: int) -> Image.Image:
        """The row as stored (``L`` or ``RGB``): a read-only view of the array, which PIL copies
        before any change, and preprocessing always makes a new image of."""
        array = self.images[index]
        return Image.fromarray(array, "L" if array.ndim == 2 else "RGB")

    def manifest_extra(self) -> dict[str, Any]:
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
    source.description = describe_source("demo Fashion-MNIST subset", "", source.class_names,
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
    names = IDX_DATASETS[name]
    n = sum(len(i) for i in images)
    return ArraySource(np.concatenate(images), np.concatenate(labels), np.concatenate(splits),
                       names, describe_source(f"torchvision {name}", folder, names, n),
                       kind="torchvision", root=folder)
