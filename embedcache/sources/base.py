"""A source is an ordered list of :class:`Sample` rows plus a way to decode row ``i``.

The manifest hash (:meth:`ImageSource.manifest_sha256`) uses only root-relative paths, so a data set
moved to another directory is still the same cache entry; any change of a file's size, mtime, label,
split, numeric target or label set gives a new hash.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from embedcache.errors import DecodeError
from embedcache.sources.decode import decode_image
from embedcache.splits import SPLIT_NAMES, Split


@dataclass(frozen=True)
class Sample:
    """One image of a source.

    Attributes:
        path: POSIX path relative to the source root; a synthetic id ``"train/000123"`` for arrays.
        label: class index into ``class_names``; -1 = unlabelled.
        split: a :class:`~embedcache.splits.Split` code.
        size: file size in bytes (0 when there is no file).
        mtime_ns: file modification time in ns (0 when there is no file).
        target: numeric targets, one per name of the source's ``target_names`` (else empty).
        label_set: class positions of a multi-label source's row (else None).
    """

    path: str
    label: int
    split: int
    size: int = 0
    mtime_ns: int = 0
    target: tuple[float, ...] = ()
    label_set: tuple[int, ...] | None = None


def describe_source(kind: str, where: str, class_names: list[str], n: int) -> str:
    """A one-line description such as ``folder /data/flowers (3 classes, 1200 images)``."""
    classes = f"{len(class_names)} classes, " if class_names else ""
    return f"{kind} {where} ({classes}{n} images)".replace("  ", " ")


class ImageSource(abc.ABC):
    """An ordered list of samples and a way to decode each one.

    Attributes:
        kind: ``folder``, ``csv``, ``files``, ``arrays`` or ``torchvision``.
        root: absolute path of the source root (``""`` when there is none).
        description: human readable, e.g. ``folder /data/flowers (3 classes, 1200 images)``.
        samples: the rows, in a deterministic order (sorted by path for files).
        class_names: label ``i`` is ``class_names[i]`` (for label sets: class ``i`` of a set).
        target_names: names of the numeric targets each sample carries (else empty).
        multilabel: whether each sample carries a label set instead of one label.
    """

    kind = ""

    def __init__(self, *, root: str, samples: list[Sample], class_names: list[str],
                 description: str = "", target_names: list[str] | None = None, multilabel: bool = False) -> None:
        self.root = root
        self.samples = samples
        self.class_names = list(class_names)
        self.description = description
        self.target_names = list(target_names or [])
        self.multilabel = multilabel

    @property
    def task(self) -> str:
        """``regression`` (numeric targets), ``multilabel`` (label sets) or ``classes``."""
        return "regression" if self.target_names else "multilabel" if self.multilabel else "classes"

    def target_array(self) -> np.ndarray | None:
        """``(n, len(target_names))`` float32 targets, or None without numeric targets."""
        if not self.target_names:
            return None
        return np.asarray([s.target for s in self.samples], np.float32).reshape(len(self.samples), -1)

    def label_set_array(self) -> np.ndarray | None:
        """``(n, len(class_names))`` uint8 label sets (1 = the image carries the class), or None."""
        if not self.multilabel:
            return None
        out = np.zeros((len(self.samples), len(self.class_names)), np.uint8)
        for row, sample in enumerate(self.samples):
            out[row, list(sample.label_set or ())] = 1
        return out

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"

    @abc.abstractmethod
    def load_image(self, index: int) -> Image.Image:
        """Decode sample ``index`` as an RGB image; raises DecodeError with a short reason."""

    def load_pixels(self, index: int) -> Image.Image:
        """Sample ``index`` for the model's preprocessing: :meth:`load_image`, except that a
        source may return a gray image in mode ``L`` (``decode_image(keep_gray=True)``), whose
        resizing is a third of an RGB one's and gives the same pixels once expanded."""
        return self.load_image(index)

    def split_counts(self) -> dict[str, int]:
        """Number of samples per split name (only splits that occur)."""
        counts = np.bincount([s.split for s in self.samples], minlength=len(SPLIT_NAMES))
        return {SPLIT_NAMES[code]: int(n) for code, n in enumerate(counts) if n}

    def manifest_sha256(self) -> str:
        """sha256 of canonical JSON: sorted (path, size, mtime_ns, label, split), class names,
        kind-specific content (:meth:`manifest_extra`) and, when present, the numeric targets and
        label sets; never the root location."""
        rows = sorted([s.path, s.size, s.mtime_ns, s.label, s.split] for s in self.samples)
        payload = {"samples": rows, "class_names": self.class_names, **self.manifest_extra()}
        if self.target_names:  # only when present: the hash of every other source is unchanged
            payload["targets"] = {"names": self.target_names,
                                  "rows": sorted([s.path, *s.target] for s in self.samples)}
        if self.multilabel:
            payload["label_sets"] = sorted([s.path, list(s.label_set or ())] for s in self.samples)
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def manifest_extra(self) -> dict[str, Any]:
        """What identifies the content beyond the samples (array bytes, file listings); {} here."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: kind, root, description, n, class_names, split counts."""
        extra = {"target_names": self.target_names} if self.target_names else {}
        extra.update({"multilabel": True} if self.multilabel else {})
        return {"kind": self.kind, "root": self.root, "description": self.description,
                "n": len(self), "class_names": list(self.class_names),
                "splits": self.split_counts(), **extra}

    def assign_splits(self, splits: np.ndarray) -> None:
        """Replace every sample's split (used by the seeded hold-out); paths stay stable."""
        self.samples = [dataclasses.replace(s, split=int(c)) for s, c in zip(self.samples, splits, strict=True)]

    def drop_labels(self) -> None:
        """Make every sample unlabelled and unsplit, without targets (predict / extract-only)."""
        self.samples = [dataclasses.replace(s, label=-1, split=Split.UNSPLIT, target=(), label_set=None)
                        for s in self.samples]
        self.class_names, self.target_names, self.multilabel = [], [], False


class FileSource(ImageSource):
    """Images stored as files under ``root`` (folder, CSV and file-list sources).

    Attributes:
        problems: ``{path: reason}`` of samples that cannot be read as named (a dangling symlink,
            a symlink out of the root, a name that is not UTF-8): their decoding fails with it.
    """

    def __init__(self, *, kind: str, root: str, samples: list[Sample], class_names: list[str],
                 description: str, target_names: list[str] | None = None, multilabel: bool = False,
                 problems: dict[str, str] | None = None) -> None:
        super().__init__(root=root, samples=samples, class_names=class_names,
                         description=description, target_names=target_names, multilabel=multilabel)
        self.kind = kind
        self.problems = dict(problems or {})

    def load_image(self, index: int) -> Image.Image:
        return self._decode(index, keep_gray=False)

    def load_pixels(self, index: int) -> Image.Image:
        return self._decode(index, keep_gray=True)

    def _decode(self, index: int, *, keep_gray: bool) -> Image.Image:
        path = self.samples[index].path
        if path in self.problems:
            raise DecodeError(self.problems[path])
        return decode_image(os.path.join(self.root, *path.split("/")), keep_gray=keep_gray)
