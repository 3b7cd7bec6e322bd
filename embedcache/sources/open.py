"""One string to an image source, with splits assigned: :func:`open_source`."""

from __future__ import annotations

import os

import numpy as np

from embedcache.errors import ConfigError, DataSourceError
from embedcache.sources.arrays import IDX_DATASETS, ArraySource, demo_source, idx_source
from embedcache.sources.base import ImageSource
from embedcache.sources.files import read_csv_manifest, scan_folder
from embedcache.splits import Split, check_fraction, holdout_splits

#: The DATA forms, for messages and ``--help``.
DATA_FORMS = "an image folder, a .csv manifest, a .npz file, 'demo' or 'torchvision:NAME:ROOT'"


def open_source(data: str | os.PathLike, *, unlabelled: bool | None = None,
                val_fraction: float = 0.0, test_fraction: float = 0.2,
                split_seed: int = 0, targets: list[str] | None = None,
                label_vocabulary: list[str] | None = None) -> ImageSource:
    """Open an image source from one string.

    Args:
        data: a folder; a ``.csv`` manifest; a ``.npz`` of arrays; ``demo``; or
            ``torchvision:NAME:ROOT`` (MNIST/FashionMNIST/KMNIST from IDX files, any other
            torchvision data set class with ``download=False``).
        unlabelled: True drops all labels and splits (predict / extract-only); None detects an
            unlabelled folder; False requires labels.
        val_fraction: share of each class held out for validation when the source has no splits.
        test_fraction: share of each class held out for test when the source has no splits.
        split_seed: seed of that stratified hold-out (unstratified for numeric targets and
            label sets).
        targets: numeric target columns of a CSV manifest (``--target``/``--targets``).
        label_vocabulary: the class names a CSV's label sets may use (a probe's classes).
    """
    check_fraction("val_fraction", val_fraction)
    check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"val_fraction + test_fraction must be < 1 so that some images stay in train. "
            f"Got {val_fraction} + {test_fraction}."
        )
    text = os.path.expanduser(os.fspath(data))
    if targets and not (os.path.isfile(text) and text.lower().endswith(".csv")):
        raise ConfigError(f"Numeric targets (--target/--targets {','.join(targets)}) are read from a CSV "
                          f"manifest's columns; DATA must be a .csv file (path,<target columns>[,split]). "
                          f"Got {text!r}.")
    source = _open_kind(text, unlabelled, targets, label_vocabulary)
    labels = np.asarray([s.label for s in source.samples], np.int64)
    if source.task != "classes":  # numeric targets or label sets: every row is labelled, one stratum
        labels = np.zeros(len(labels), np.int64)
    if unlabelled:
        source.drop_labels()
    elif unlabelled is False and (labels < 0).all():
        raise DataSourceError(f"Source {source.description} has no labels (unlabelled=False).")
    elif (labels >= 0).any() and all(s.split == Split.UNSPLIT for s in source.samples):
        keys = [str(i) if source.kind in ("arrays", "torchvision") else s.path
                for i, s in enumerate(source.samples)]
        source.assign_splits(holdout_splits(keys, labels, val_fraction=val_fraction,
                                            test_fraction=test_fraction, seed=split_seed))
    return source


def _open_kind(text: str, unlabelled: bool | None, targets: list[str] | None = None,
               label_vocabulary: list[str] | None = None) -> ImageSource:
    if text == "demo":
        return demo_source()
    if text.startswith("torchvision:"):
        _, name, root = (text.split(":", 2) + ["", ""])[:3]
        if not name or not root:
            raise DataSourceError(f"Expected torchvision:NAME:ROOT. Got {text!r}.")
        canonical = {k.lower(): k for k in IDX_DATASETS}.get(name.lower())
        if canonical:
            return idx_source(canonical, root)
        from embedcache.sources.torchvision import TorchvisionSource  # imports torchvision

        return TorchvisionSource(name, root)
    if os.path.isdir(text):
        return scan_folder(text, unlabelled=unlabelled)
    if os.path.isfile(text) and text.lower().endswith(".csv"):
        return read_csv_manifest(text, targets=targets, label_vocabulary=label_vocabulary)
    if os.path.isfile(text) and text.lower().endswith(".npz"):
        return ArraySource.from_npz(os.path.abspath(text))
    raise DataSourceError(
        f"Cannot open data source {text!r}: expected {DATA_FORMS}"
        f"{'' if os.path.exists(text) else ' (no such file or directory)'}."
    )
