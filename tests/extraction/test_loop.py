"""Tests for embedcache.extraction.loop: the dataset that never raises, and the collate."""

from __future__ import annotations

import torch

from embedcache.extraction.loop import ImageDataset, collate_images
from embedcache.models.preprocess import PreprocessSpec
from embedcache.sources.open import open_source
from tests.sources.helpers import save, solid, truncated_jpeg

SPEC = PreprocessSpec(resize_size=16, crop_size=16)


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
