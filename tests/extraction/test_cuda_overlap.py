"""The GPU loop's schedule (embedcache/extraction/cuda_overlap.py): batch k+1 is fetched and its
upload queued after batch k's forward pass is queued and before batch k-1 is collected; results
come out in order, bad-only batches included. The schedule is checked on the CPU with recording
stages; the CUDA stages themselves run only where a GPU is present."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tests.tiny_backbone  # noqa: F401 - registers the tiny backbone
from embedcache.extraction.cuda_overlap import overlapped
from embedcache.extraction.loop import (
    ImageDataset,
    collate_images,
    inference_module,
    model_input,
    run_batches,
)
from embedcache.models.build import get_backbone
from embedcache.sources.open import open_source
from tests.tiny_backbone import TINY, make_image_folder


def batches_of(sizes):
    """DataLoader-like items: (indices, uint8 batch, failures); a size of 0 is a bad-only batch."""
    start, items = 0, []
    for n in sizes:
        indices = torch.arange(start, start + n, dtype=torch.long)
        images = torch.full((n, 3, 2, 2), len(items), dtype=torch.uint8) if n else torch.empty((0, 3, 0, 0), dtype=torch.uint8)
        items.append((indices, images, [] if n else [(start, "empty file")]))
        start += max(n, 1)
    return items


def test_each_batch_is_uploaded_before_the_previous_one_is_collected_and_results_stay_in_order():
    log = []
    items = batches_of([3, 2, 0, 4])

    def upload(images):
        log.append(("upload", int(images[0, 0, 0, 0])))
        return images

    def compute(staged):
        log.append(("compute", int(staged[0, 0, 0, 0])))
        return staged.float().sum(dim=(1, 2, 3))

    def collect(result):
        log.append(("collect", int(result[0]) // 12))
        return result.numpy()

    got = []
    for batch in overlapped(iter(items), upload, compute, collect):
        log.append(("yield", len(got)))
        got.append(batch)
    # batch k's forward is queued, batch k+1 fetched and its upload queued, and only then are
    # batch k-1's features waited for
    assert log == [("upload", 0), ("compute", 0), ("upload", 1),
                   ("compute", 1), ("collect", 0), ("yield", 0),  # batch 2 has no image: nothing to upload
                   ("upload", 3), ("collect", 1), ("yield", 1),
                   ("compute", 3), ("yield", 2),
                   ("collect", 3), ("yield", 3)]
    assert [b.rows.tolist() for b in got] == [[0, 1, 2], [3, 4], [], [6, 7, 8, 9]]
    assert got[2].outputs is None and got[2].failures == [(5, "empty file")]
    np.testing.assert_array_equal(got[3].outputs, np.full(4, 3 * 12, dtype=np.float32))
    assert all(b.decode_wait >= 0 for b in got)


def test_no_batches_and_only_bad_batches():
    assert list(overlapped(iter([]), None, None, None)) == []
    [batch] = overlapped(iter(batches_of([0])), None, None, None)
    assert batch.outputs is None and batch.failures == [(0, "empty file")]


def test_the_schedule_with_a_real_model_gives_the_plain_loops_features(tmp_path):
    folder = make_image_folder(tmp_path / "data", per_class=5)
    bb = get_backbone(TINY)
    dataset = ImageDataset(open_source(folder), bb.preprocess)
    batches = [list(range(0, 4)), list(range(4, 8)), list(range(8, 10))]
    device = torch.device("cpu")
    module = inference_module(bb, device)
    plain = list(run_batches(module, dataset, batches, device=device, precision="fp32", workers=0))
    loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_images))
    with torch.inference_mode():
        staged = list(overlapped(loader, lambda images: images,
                                 lambda x: module(model_input(x, device, bb.preprocess)).float(),
                                 lambda out: out.numpy()))
    assert [b.rows.tolist() for b in staged] == [b.rows.tolist() for b in plain]
    for a, b in zip(staged, plain, strict=True):
        np.testing.assert_array_equal(a.outputs, b.outputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_overlapped_loop_matches_the_cpu(tmp_path):
    folder = make_image_folder(tmp_path / "data", per_class=20)
    bb = get_backbone(TINY)
    dataset = ImageDataset(open_source(folder), bb.preprocess)
    batches = [list(range(i, min(i + 8, 40))) for i in range(0, 40, 8)]
    cpu = torch.device("cpu")
    want = list(run_batches(inference_module(bb, cpu), dataset, batches, device=cpu, precision="fp32", workers=0))
    gpu = torch.device("cuda")
    got = list(run_batches(inference_module(bb, gpu), dataset, batches, device=gpu, precision="fp32", workers=2))
    for a, b in zip(got, want, strict=True):
        assert a.rows.tolist() == b.rows.tolist()
        np.testing.assert_allclose(a.outputs, b.outputs, rtol=1e-3, atol=1e-4)
