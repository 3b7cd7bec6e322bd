"""Tests for embedcache.data: sources, splits, manifest, dataset/collate, folder export."""

from __future__ import annotations

import os
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from embedcache import data
from embedcache.data import (
    TEST,
    TRAIN,
    UNSPLIT,
    VAL,
    ArraySource,
    ImageDataset,
    collate_images,
    open_source,
    write_image_folder,
)
from embedcache.errors import ConfigError, DataSourceError, DecodeError
from embedcache.preprocess import PreprocessSpec

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
SPEC = PreprocessSpec(resize_size=16, crop_size=16)


# ---------------------------------------------------------------------------------------------
# helpers


def save(image: Image.Image, path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def solid(color=(200, 30, 30), size=(12, 10)) -> Image.Image:
    return Image.new("RGB", size, color)


def truncated_jpeg(p):
    rng = np.random.default_rng(0)
    save(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), p, format="JPEG")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def make_class_folder(root, layout: dict[str, int], split: str | None = None):
    """root[/split]/<class>/<i>.png with `layout[class]` images each (distinct pixel values)."""
    for c, (name, count) in enumerate(layout.items()):
        for i in range(count):
            parts = [split] if split else []
            save(solid((c * 40, i * 10 % 256, 5)), root.joinpath(*parts, name, f"{i:03d}.png"))


# ---------------------------------------------------------------------------------------------
# folder sources and splits


def test_class_folder_gets_stratified_holdout(tmp_path):
    make_class_folder(tmp_path, {"cat": 10, "dog": 5, "emu": 1})
    (tmp_path / "notes.txt").write_text("ignored")
    save(solid(), tmp_path / ".hidden" / "x.png")
    save(solid(), tmp_path / "cat" / ".x.png")
    source = open_source(tmp_path, test_fraction=0.2, val_fraction=0.2)
    assert source.kind == "folder" and source.root == str(tmp_path)
    assert source.class_names == ["cat", "dog", "emu"]
    assert len(source) == 16
    assert [s.path for s in source.samples] == sorted(s.path for s in source.samples)
    per_class = {}
    for s in source.samples:
        per_class.setdefault(source.class_names[s.label], []).append(s.split)
    assert sorted(per_class["cat"]) == [TRAIN] * 6 + [VAL] * 2 + [TEST] * 2
    assert sorted(per_class["dog"]) == [TRAIN] * 3 + [VAL] + [TEST]
    assert per_class["emu"] == [TRAIN]
    assert source.description == f"folder {tmp_path} (3 classes, 16 images)"
    assert source.to_dict() == {
        "kind": "folder", "root": str(tmp_path), "description": source.description, "n": 16,
        "class_names": ["cat", "dog", "emu"], "splits": {"train": 10, "val": 3, "test": 3},
    }
    sample = source.samples[0]
    stat = (tmp_path / sample.path).stat()
    assert (sample.size, sample.mtime_ns) == (stat.st_size, stat.st_mtime_ns)


def test_holdout_is_deterministic_disjoint_and_seeded(tmp_path):
    make_class_folder(tmp_path, {"a": 20, "b": 7, "c": 2})
    first = open_source(tmp_path, test_fraction=0.3, val_fraction=0.2, split_seed=1)
    again = open_source(tmp_path, test_fraction=0.3, val_fraction=0.2, split_seed=1)
    other = open_source(tmp_path, test_fraction=0.3, val_fraction=0.2, split_seed=2)
    assert first.samples == again.samples
    assert [s.split for s in first.samples] != [s.split for s in other.samples]
    groups = [{s.path for s in first.samples if s.split == code} for code in (TRAIN, VAL, TEST)]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert set().union(*groups) == {s.path for s in first.samples}
    for label in range(3):  # every class with >= 2 images keeps a train image
        assert any(s.split == TRAIN and s.label == label for s in first.samples)


@pytest.mark.parametrize("split_dir", ["val", "valid", "validation", "Val"])
def test_split_folders_set_splits_and_ignore_fractions(tmp_path, split_dir):
    make_class_folder(tmp_path, {"cat": 3, "dog": 2}, split="train")
    make_class_folder(tmp_path, {"cat": 1, "dog": 1}, split=split_dir)
    make_class_folder(tmp_path, {"cat": 1, "eel": 1}, split="test")
    source = open_source(tmp_path, test_fraction=0.5)
    assert source.class_names == ["cat", "dog", "eel"]
    assert source.split_counts() == {"train": 5, "val": 2, "test": 2}
    eel = [s for s in source.samples if s.label == 2]
    assert [(s.path, s.split) for s in eel] == [("test/eel/000.png", TEST)]


def test_unlabelled_folder_is_detected(tmp_path):
    save(solid(), tmp_path / "a.png")
    save(solid(), tmp_path / "b.bmp")
    source = open_source(tmp_path)
    assert [s.path for s in source.samples] == ["a.png", "b.bmp"] and source.class_names == []


def test_unlabelled_folder_takes_every_image_recursively(tmp_path):
    save(solid(), tmp_path / "a.JPG", format="JPEG")
    save(solid(), tmp_path / "deep" / "b.webp")
    (tmp_path / "fake.jpg").write_text("<html></html>")  # included; fails at decode time
    (tmp_path / "readme.md").write_text("not an image")
    with pytest.raises(DataSourceError, match=r"top level .* and class folders \['deep'\]. Pass unlabelled=True"):
        open_source(tmp_path)  # ambiguous: loose images next to a folder
    source = open_source(tmp_path, unlabelled=True)
    assert [s.path for s in source.samples] == ["a.JPG", "deep/b.webp", "fake.jpg"]
    assert {(s.label, s.split) for s in source.samples} == {(-1, UNSPLIT)}
    assert source.class_names == [] and source.description.startswith("unlabelled folder ")
    with pytest.raises(DecodeError, match="not an image"):
        source.load_image(2)


def test_unlabelled_flag_drops_labels(tmp_path):
    make_class_folder(tmp_path, {"cat": 2, "dog": 2})
    source = open_source(tmp_path, unlabelled=True)
    assert len(source) == 4 and source.class_names == []
    assert {(s.label, s.split) for s in source.samples} == {(-1, UNSPLIT)}


@pytest.mark.parametrize(
    ("setup", "kwargs", "message"),
    [
        (lambda p: None, {}, r"No image files found under"),
        (lambda p: (p / "cat").mkdir(), {}, r"No image files found under"),
        (lambda p: (make_class_folder(p, {"cat": 1}), save(solid(), p / "x.png")), {},
         r"image files at the top level .* and class folders"),
        (lambda p: save(solid(), p / "x.png"), {"unlabelled": False},
         r"image files at the top level .* but no class folders. Pass unlabelled=True"),
        (lambda p: (make_class_folder(p, {"a": 1}, "train"), make_class_folder(p, {"b": 1})), {},
         r"mixes split folders \['train'\] with other folders \['b'\]"),
    ],
)
def test_folder_errors(tmp_path, setup, kwargs, message):
    setup(tmp_path)
    with pytest.raises(DataSourceError, match=message):
        open_source(tmp_path, **kwargs)


def test_missing_source_path(tmp_path):
    with pytest.raises(DataSourceError, match=r"expected an image folder.*no such file"):
        open_source(tmp_path / "nope")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"test_fraction": -0.1}, r"'test_fraction' parameter must be a float in the range \[0, 1\). Got -0.1"),
        ({"test_fraction": 1.0}, r"'test_fraction' .* Got 1.0"),
        ({"val_fraction": "0.1"}, r"'val_fraction' .* Got '0.1'"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, r"val_fraction \+ test_fraction must be < 1"),
    ],
)
def test_fraction_validation(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        open_source(tmp_path, **kwargs)


# ---------------------------------------------------------------------------------------------
# CSV manifests


def write_csv(path, text: str):
    path.write_text(text)
    return path


def test_csv_manifest_labels_and_partial_splits(tmp_path):
    for name in ("a.png", "b.png", "sub/c.png", "d.png"):
        save(solid(), tmp_path / name)
    csv_path = write_csv(
        tmp_path / "list.csv",
        "path,label,split\na.png,zebra,test\n./sub/c.png,ant,\nb.png,ant,VALID\nd.png,,\n",
    )
    source = open_source(csv_path)
    assert source.kind == "csv" and source.root == str(tmp_path)
    assert source.class_names == ["ant", "zebra"]
    assert [(s.path, s.label, s.split) for s in source.samples] == [
        ("a.png", 1, TEST), ("b.png", 0, VAL), ("d.png", -1, TRAIN), ("sub/c.png", 0, TRAIN)]


def test_csv_without_splits_gets_holdout(tmp_path):
    for i in range(10):
        save(solid(), tmp_path / f"{i}.png")
    rows = "".join(f"{i}.png,{'ab'[i % 2]}\n" for i in range(10))
    source = open_source(write_csv(tmp_path / "m.csv", "path,label\n" + rows), test_fraction=0.2)
    assert source.split_counts() == {"train": 8, "test": 2}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("/etc/passwd,a", r"row 3: absolute path '/etc/passwd' refused"),
        ("../outside.png,a", r"row 3: path '../outside.png' contains '\.\.'"),
        ("sub/../../outside.png,a", r"row 3: path .* contains '\.\.'"),
        ("link.png,a", r"row 3: path 'link.png' resolves outside the CSV's folder"),
        ("linkdir/outside.png,a", r"row 3: path .* resolves outside the CSV's folder"),
        ("missing.png,a", r"row 3: file 'missing.png' does not exist"),
        ("ok.png,a", r"row 3: 'ok.png' is already listed in row 2"),
        (",a", r"row 3: the path is empty"),
        ("ok2.png,a,holdout", r"row 3: split must be one of .* Got 'holdout'"),
    ],
)
def test_csv_refuses_bad_rows(tmp_path, row, message):
    data_dir = tmp_path / "data"
    save(solid(), data_dir / "ok.png")
    save(solid(), data_dir / "ok2.png")
    save(solid(), tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", data_dir / "link.png")
    os.symlink(tmp_path, data_dir / "linkdir")
    header = "path,label,split\n" if row.count(",") == 2 else "path,label\n"
    csv_path = write_csv(data_dir / "m.csv", f"{header}ok.png,a{',train' * (row.count(',') == 2)}\n{row}\n")
    with pytest.raises(DataSourceError, match=message):
        open_source(csv_path)


def test_csv_needs_header(tmp_path):
    save(solid(), tmp_path / "a.png")
    with pytest.raises(DataSourceError, match=r"must start with a header row .* Got \['a.png', 'x'\]"):
        open_source(write_csv(tmp_path / "m.csv", "a.png,x\n"))


# ---------------------------------------------------------------------------------------------
# arrays, demo, torchvision


def tiny_arrays(n_per_class=6, classes=("T-shirt/top", "Trouser", "Bag")):
    rng = np.random.default_rng(0)
    n = n_per_class * len(classes)
    images = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
    labels = np.arange(n) % len(classes)
    return images, labels, list(classes)


def test_array_source_paths_images_and_hash(tmp_path):
    images, labels, names = tiny_arrays()
    splits = np.array([TRAIN] * 12 + [TEST] * 6, np.uint8)
    source = ArraySource(images, labels, splits, names, "tiny")
    assert [s.path for s in source.samples[:2]] == ["train/000000", "train/000001"]
    assert source.samples[12] == data.Sample("test/000000", 0, TEST, 0, 0)
    assert np.array_equal(np.asarray(source.load_image(3))[:, :, 1], images[3])
    changed = images.copy()
    changed[5, 0, 0] ^= 1
    assert ArraySource(images, labels, splits, names, "x").manifest_sha256() == source.manifest_sha256()
    assert ArraySource(changed, labels, splits, names, "x").manifest_sha256() != source.manifest_sha256()


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (np.zeros((2, 4, 4), np.float32), [0, 0], r"must be uint8 of shape .* Got float32"),
        (np.zeros((2, 4, 4), np.uint8), [0], r"2 images, 1 labels"),
        (np.zeros((2, 4, 4), np.uint8), [0, 5], r"labels must be in \[-1, 2\]"),
    ],
)
def test_array_source_validation(images, labels, message):
    with pytest.raises(DataSourceError, match=message):
        ArraySource(images, labels, None, ["a", "b", "c"], "bad")


def test_npz_arrays_like_the_demo(tmp_path):
    images, labels, names = tiny_arrays()
    path = tmp_path / "demo.npz"
    np.savez(path, train_images=images[:12], train_labels=labels[:12], test_images=images[12:],
             test_labels=labels[12:], class_names=np.array(names))
    source = open_source(path)
    assert source.kind == "arrays" and source.class_names == names
    assert source.split_counts() == {"train": 12, "test": 6}
    assert source.load_image(0).size == (8, 8)


def test_demo_source():
    if not data.importlib.resources.files("embedcache").joinpath("demo_data", data.DEMO_FILE).is_file():
        with pytest.raises(DataSourceError, match="demo data .* is not installed"):
            open_source("demo")
        pytest.skip("demo npz not present yet; ArraySource.from_npz covered by a tmp npz")
    source = open_source("demo")
    assert source.class_names[0] == "T-shirt/top" and len(source) > 0
    assert set(source.split_counts()) == {"train", "test"}


def test_fashion_mnist_from_debian_idx_files():
    if not os.path.isdir(FASHION_MNIST):
        pytest.skip(f"{FASHION_MNIST} not installed")
    source = open_source(f"torchvision:FashionMNIST:{FASHION_MNIST}")
    assert source.kind == "torchvision" and source.root == FASHION_MNIST
    assert source.split_counts() == {"train": 60000, "test": 10000}
    assert source.class_names[0] == "T-shirt/top" and source.class_names[9] == "Ankle boot"
    assert source.samples[0] == data.Sample("train/000000", 9, TRAIN, 0, 0)
    assert source.samples[60000].path == "test/000000"
    image = source.load_image(0)
    assert image.size == (28, 28) and image.mode == "RGB"
    assert len(source.manifest_sha256()) == 64


def write_idx(path, array: np.ndarray, gz: bool):
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        import gzip

        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)


@pytest.mark.parametrize(("subdir", "gz", "name"), [("raw", False, "MNIST"), ("KMNIST/raw", True, "kmnist")])
def test_idx_files_in_torchvision_layouts(tmp_path, subdir, gz, name):
    images, labels, _ = tiny_arrays(classes=tuple("abc"))
    folder = tmp_path / subdir
    write_idx(folder / "train-images-idx3-ubyte", images[:10], gz)
    write_idx(folder / "train-labels-idx1-ubyte", labels[:10], gz)
    write_idx(folder / "t10k-images-idx3-ubyte", images[10:], gz)
    write_idx(folder / "t10k-labels-idx1-ubyte", labels[10:], gz)
    source = open_source(f"torchvision:{name}:{tmp_path}")
    assert source.split_counts() == {"train": 10, "test": 8}
    assert len(source.class_names) == 10
    assert np.array_equal(np.asarray(source.load_image(11))[:, :, 0], images[11])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("torchvision:FashionMNIST:{tmp}", r"IDX files not found. Looked in .*expected train-images-idx3-ubyte\[.gz\]"),
        ("torchvision:CIFAR10:{tmp}", r"torchvision:CIFAR10: cannot load from .* download=False"),
        ("torchvision:NoSuchSet:{tmp}", r"Unknown torchvision dataset 'NoSuchSet'. Known: .*CIFAR10"),
        ("torchvision:MNIST", r"Expected torchvision:NAME:ROOT"),
    ],
)
def test_torchvision_errors(tmp_path, spec, message):
    with pytest.raises(DataSourceError, match=message):
        open_source(spec.format(tmp=tmp_path))


def test_generic_torchvision_dataset_is_wrapped_lazily(tmp_path):
    make_class_folder(tmp_path, {"cat": 5, "dog": 5})
    source = open_source(f"torchvision:ImageFolder:{tmp_path}", test_fraction=0.2)
    assert source.kind == "torchvision" and source.class_names == ["cat", "dog"]
    assert source.split_counts() == {"train": 8, "test": 2}
    assert source.samples[0].path == "unsplit/000000"
    assert source.load_image(0).size == (12, 10)
    before = source.manifest_sha256()
    os.utime(tmp_path / "cat" / "000.png", ns=(1, 1))
    assert open_source(f"torchvision:ImageFolder:{tmp_path}").manifest_sha256() != before


# ---------------------------------------------------------------------------------------------
# manifest hash


def test_manifest_hash_tracks_content_mtime_label_not_location(tmp_path):
    root = tmp_path / "one"
    make_class_folder(root, {"cat": 3, "dog": 3})
    (root / "m.csv").write_text("path,label,split\ncat/000.png,cat,train\ndog/000.png,dog,test\n")
    base = open_source(root).manifest_sha256()
    base_csv = open_source(root / "m.csv").manifest_sha256()
    assert open_source(root).manifest_sha256() == base

    moved = tmp_path / "elsewhere" / "two"
    shutil.copytree(root, moved, copy_function=shutil.copy2)
    assert open_source(moved).manifest_sha256() == base
    assert open_source(moved / "m.csv").manifest_sha256() == base_csv

    target = moved / "cat" / "001.png"
    stat = target.stat()
    save(solid(size=(20, 20)), target)  # new content (new size), mtime restored
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert open_source(moved).manifest_sha256() != base

    shutil.copy2(root / "cat" / "001.png", target)
    assert open_source(moved).manifest_sha256() == base
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert open_source(moved).manifest_sha256() != base

    (moved / "m.csv").write_text("path,label,split\ncat/000.png,dog,train\ndog/000.png,dog,test\n")
    assert open_source(moved / "m.csv").manifest_sha256() != base_csv


# ---------------------------------------------------------------------------------------------
# dataset and collate


def test_image_dataset_never_raises_on_bad_files(tmp_path):
    save(solid((10, 20, 30)), tmp_path / "good.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "html.jpg").write_text("<html></html>")
    truncated_jpeg(tmp_path / "cut.jpg")
    source = open_source(tmp_path)
    dataset = ImageDataset(source, SPEC)
    items = [dataset[i] for i in range(len(dataset))]
    by_path = {source.samples[i].path: (tensor, error) for i, tensor, error in items}
    assert by_path["good.png"][1] is None
    assert by_path["good.png"][0].shape == (3, 16, 16) and by_path["good.png"][0].dtype == torch.uint8
    assert by_path["good.png"][0][:, 0, 0].tolist() == [10, 20, 30]
    assert by_path["empty.jpg"] == (None, "empty file")
    assert by_path["html.jpg"] == (None, "not an image (cannot identify format)")
    assert by_path["cut.jpg"] == (None, "truncated image")

    (tmp_path / "good.png").unlink()  # vanished after scanning: still no exception
    assert dataset[source.samples.index(next(s for s in source.samples if s.path == "good.png"))][2] \
        == "cannot read file (No such file or directory)"


def test_collate_mixed_and_all_bad_batches(tmp_path):
    save(solid(), tmp_path / "a.png")
    save(solid(), tmp_path / "c.png")
    (tmp_path / "b.jpg").write_bytes(b"")
    dataset = ImageDataset(open_source(tmp_path), SPEC)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2,
                                         collate_fn=collate_images)
    [(indices, batch, failures)] = list(loader)
    assert indices.tolist() == [0, 2] and indices.dtype == torch.long
    assert batch.shape == (2, 3, 16, 16) and batch.dtype == torch.uint8
    assert failures == [(1, "empty file")]

    indices, batch, failures = collate_images([(4, None, "empty file"), (7, None, "truncated image")])
    assert indices.shape == (0,) and indices.dtype == torch.long
    assert batch.shape == (0, 3, 0, 0) and batch.dtype == torch.uint8
    assert failures == [(4, "empty file"), (7, "truncated image")]


# ---------------------------------------------------------------------------------------------
# write_image_folder


def test_write_image_folder_round_trip(tmp_path):
    images, labels, names = tiny_arrays(n_per_class=6)
    splits = np.array([TRAIN, TRAIN, VAL, TEST] * 4 + [TRAIN, TEST], np.uint8)
    source = ArraySource(images, labels, splits, names, "tiny")
    dest = tmp_path / "out"
    assert write_image_folder(source, dest) == len(source)
    back = open_source(dest)
    assert back.class_names == ["Bag", "T-shirt_top", "Trouser"]  # sorted, '/' made safe

    def summary(src):
        return sorted((SPLIT, src.class_names[s.label].replace("/", "_"), s.path.rsplit("/", 1)[-1][:6])
                      for s in src.samples for SPLIT in [data.SPLIT_NAMES[s.split]])

    assert summary(back) == summary(source)
    assert back.split_counts() == source.split_counts()
    first = next(i for i, s in enumerate(back.samples) if s.path == "train/T-shirt_top/000000.png")
    assert np.array_equal(np.asarray(back.load_image(first)), np.asarray(source.load_image(0)))


@pytest.mark.parametrize(
    ("limit", "stratified", "expected"),
    [
        (2, True, {"train": 2, "val": 2, "test": 2}),
        ({TRAIN: 3, TEST: 1}, True, {"train": 3, "test": 1}),
        (3, False, {"train": 3, "val": 3, "test": 3}),
    ],
)
def test_write_image_folder_limits(tmp_path, limit, stratified, expected):
    images, labels, names = tiny_arrays(n_per_class=6)
    splits = (np.arange(18) // 3 % 3).astype(np.uint8)  # each split holds every class twice
    source = ArraySource(images, labels, splits, names, "tiny")
    count = write_image_folder(source, tmp_path / "out", limit_per_split=limit, stratified=stratified)
    back = open_source(tmp_path / "out")
    assert count == len(back) == sum(expected.values())
    assert back.split_counts() == expected
    if stratified:
        train_classes = [s.label for s in back.samples if s.split == TRAIN]
        assert len(set(train_classes)) == len(train_classes)  # one per class before repeating


def test_write_image_folder_refuses_non_empty_dest_and_skips_bad(tmp_path):
    save(solid(), tmp_path / "src" / "cat" / "a.png")
    (tmp_path / "src" / "cat" / "b.jpg").write_bytes(b"")
    save(solid(), tmp_path / "src" / "dog" / "c.png")
    source = open_source(tmp_path / "src", test_fraction=0.0)
    assert write_image_folder(source, tmp_path / "dest") == 2
    with pytest.raises(ConfigError, match=r"'dest' folder .* must be new or empty"):
        write_image_folder(source, tmp_path / "dest")


def test_open_source_expands_the_home_directory(tmp_path, monkeypatch):
    from tests.tiny_backbone import make_image_folder

    make_image_folder(tmp_path / "imgs", per_class=2)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert len(open_source("~/imgs")) == 4
