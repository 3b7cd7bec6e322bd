"""Any other torchvision data set class, built from local files with ``download=False``.

MNIST-family data sets are read from their IDX files by :mod:`embedcache.sources.arrays` instead;
this module serves the rest (CIFAR10, Flowers102, ...), whose files must already be on disk.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from embedcache.errors import DataSourceError, DecodeError
from embedcache.sources.base import ImageSource, Sample, describe_source
from embedcache.sources.decode import to_rgb
from embedcache.splits import SPLIT_ALIASES, SPLIT_NAMES, Split


class TorchvisionSource(ImageSource):
    """Any other torchvision data set class, built with ``download=False`` and read lazily.

    Labels come from the data set's ``targets``/``_labels``/``labels`` attribute when present
    (otherwise every item is read once). The manifest includes (relative path, size, mtime) of
    every file under ROOT, since the samples themselves carry no file identity.
    """

    kind = "torchvision"

    def __init__(self, name: str, root: str | os.PathLike) -> None:
        root = os.path.abspath(os.fspath(root))
        import torch  # imported here: only this source kind needs torchvision
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
            attempts = [(Split.TRAIN, {"train": True}), (Split.TEST, {"train": False})]
        elif "split" in params:
            attempts = [(SPLIT_ALIASES[s], {"split": s}) for s in ("train", "val", "valid", "test")]
        else:
            attempts = [(Split.UNSPLIT, {})]
        self.parts: list[tuple[int, Any]] = []
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
                samples.append(Sample(f"{SPLIT_NAMES[split]}/{i:06d}", label, int(split)))
                self._locations.append((part_number, i))
        classes = getattr(self.parts[0][1], "classes", None)
        if classes is None:
            classes = [str(i) for i in range(max((s.label for s in samples), default=-1) + 1)]
        class_names = [str(c) for c in classes]
        super().__init__(root=root, samples=samples, class_names=class_names,
                         description=describe_source(f"torchvision {name}", root, class_names,
                                               len(samples)))

    def load_image(self, index: int) -> Image.Image:
        return self._load(index, keep_gray=False)

    def load_pixels(self, index: int) -> Image.Image:
        return self._load(index, keep_gray=True)

    def _load(self, index: int, *, keep_gray: bool) -> Image.Image:
        part, i = self._locations[index]
        try:
            image = self.parts[part][1][i][0]
            if hasattr(image, "numpy") and not isinstance(image, np.ndarray):  # a torch tensor
                image = image.numpy()
                image = image.transpose(1, 2, 0) if image.ndim == 3 and image.shape[0] in (1, 3) \
                    else image
            if isinstance(image, np.ndarray):
                image = Image.fromarray(image.squeeze())
            return to_rgb(image, keep_gray=keep_gray)
        except DecodeError:
            raise
        except Exception as exc:  # noqa: BLE001 - data set classes raise anything
            raise DecodeError(f"cannot load item ({type(exc).__name__}: {exc})") from None

    def manifest_extra(self) -> dict[str, Any]:
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
