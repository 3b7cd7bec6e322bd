"""Tests for embedcache.sources.files: class folders, unlabelled folders, CSV manifests, and the
manifest hash of file sources (embedcache.sources.base)."""

from __future__ import annotations

import os
import shutil

import pytest

from embedcache.errors import DataSourceError, DecodeError
from embedcache.sources.open import open_source
from embedcache.splits import Split
from tests.sources.helpers import make_class_folder, save, solid


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
    assert {(s.label, s.split) for s in source.samples} == {(-1, Split.UNSPLIT)}
    assert source.class_names == [] and source.description.startswith("unlabelled folder ")
    with pytest.raises(DecodeError, match="not an image"):
        source.load_image(2)


def test_unlabelled_flag_drops_labels(tmp_path):
    make_class_folder(tmp_path, {"cat": 2, "dog": 2})
    source = open_source(tmp_path, unlabelled=True)
    assert len(source) == 4 and source.class_names == []
    assert {(s.label, s.split) for s in source.samples} == {(-1, Split.UNSPLIT)}


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
        ("a.png", 1, Split.TEST), ("b.png", 0, Split.VAL), ("d.png", -1, Split.TRAIN), ("sub/c.png", 0, Split.TRAIN)]


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


@pytest.mark.parametrize("path,root", [
    ("/data/a/b.png", "/data"), ("/data/b.png", "/data/"), ("/x.png", "/"),
    ("/data/./b.png", "/data"), ("/data/a/../b.png", "/data"), ("/data//b.png", "/data"),
    ("/data/.hidden/b.png", "/data"), ("/database/b.png", "/data"), ("/other/b.png", "/data"),
])
def test_relative_names_match_relpath(path, root):
    """The scan's fast relative name is exactly what os.path.relpath gives, for plain paths
    under the root and for the odd ones it leaves to relpath."""
    from embedcache.sources.files import _relative

    assert _relative(path, root) == os.path.relpath(path, root)


def test_scan_records_size_and_mtime_of_symlink_targets(tmp_path):
    root = tmp_path / "root"
    save(solid(), root / "cat" / "a.png")
    os.symlink(root / "cat" / "a.png", root / "cat" / "link.png")
    source = open_source(root)
    real, link = sorted(source.samples, key=lambda s: s.path)
    target = os.stat(root / "cat" / "a.png")
    assert (link.path, link.size, link.mtime_ns) == ("cat/link.png", target.st_size, target.st_mtime_ns)
    assert (real.size, real.mtime_ns) == (link.size, link.mtime_ns)
