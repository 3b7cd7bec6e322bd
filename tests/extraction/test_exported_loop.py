"""The torch-free loop of a cached export (embedcache.extraction.exported_loop), with a fake
runtime model: the same uint8 batches as the DataLoader loop, failures, build order, clean-up.
The real runtimes' runs are in openvino_cases.py / onnxruntime_cases.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from embedcache.extraction.batches import row_batches
from embedcache.extraction.exported_loop import run_exported_batches
from embedcache.extraction.loop import ImageDataset, collate_images
from embedcache.models.export_cache import ExportedBackbone
from embedcache.models.preprocess import PreprocessSpec
from embedcache.sources.open import open_source
from tests.tiny_backbone import make_image_folder

SPEC = PreprocessSpec(resize_size=24, crop_size=20, interpolation="bicubic")


class FakeModel(ExportedBackbone):
    """Records the batches it is given; its features are the batch's pixels, flattened."""

    def __init__(self, events: list[str]) -> None:
        super().__init__(SPEC.crop_size**2 * 3, exported=False, directory=Path("."), threads=1)
        self.events, self.inputs = events, []
        events.append("built")

    def infer(self, images: np.ndarray) -> np.ndarray:
        assert images.dtype == np.uint8 and images.flags["C_CONTIGUOUS"]
        self.inputs.append(images.copy())
        return images.reshape(len(images), -1).astype(np.float32)

    def close(self) -> None:
        self.events.append("closed")


@pytest.fixture
def source(tmp_path):
    folder = make_image_folder(tmp_path / "data", per_class=5, size=30)
    (folder / "a" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return open_source(folder)


@pytest.mark.parametrize("decoders", [0, 1, 3])
def test_the_batches_are_the_dataloader_loops_and_a_bad_image_is_a_failure(source, decoders):
    batches = row_batches(np.zeros(len(source), bool), 4)
    events: list[str] = []
    models: list[FakeModel] = []

    def build():
        models.append(FakeModel(events))
        return models[0]

    out = list(run_exported_batches(build, source, SPEC, batches, decoders=decoders))
    assert [sorted(b.rows.tolist() + [i for i, _ in b.failures]) for b in out] == [sorted(rows) for rows in batches]
    failures = [f for b in out for f in b.failures]
    assert [source.samples[i].path for i, _ in failures] == ["a/zz_broken.png"]
    dataset = ImageDataset(source, SPEC)
    for batch, given in zip([b for b in out if b.outputs is not None], models[0].inputs, strict=True):
        indices, images, _ = collate_images([dataset[i] for i in batch.rows.tolist()])
        np.testing.assert_array_equal(given, images.permute(0, 2, 3, 1).numpy())  # bitwise the same input
        np.testing.assert_array_equal(indices.numpy(), batch.rows)
    assert events == ["built", "closed"]


def test_the_model_is_built_once_decoding_has_started_and_closed_when_the_consumer_stops(source):
    events: list[str] = []
    started = threading.Event()
    original = source.load_pixels

    def load(index):
        started.set()
        return original(index)

    source.load_pixels = load

    def build():
        events.append(f"decoding started: {started.wait(5)}")
        return FakeModel(events)

    stream = run_exported_batches(build, source, SPEC, row_batches(np.zeros(len(source), bool), 2), decoders=2)
    next(stream)
    stream.close()  # the consumer stops early (an interrupt, too many errors)
    assert events == ["decoding started: True", "built", "closed"]


def test_no_batches_build_nothing(source):
    assert list(run_exported_batches(lambda: pytest.fail("built"), source, SPEC, [], decoders=2)) == []


class PipelinedFakeModel(FakeModel):
    """A model that runs up to ``pipeline_depth`` batches at once: :meth:`start` only queues."""

    pipeline_depth = 3

    def __init__(self, events: list[str]) -> None:
        super().__init__(events)
        self.in_flight: list[int] = []
        self.most_in_flight = self.started = 0

    def start(self, images: np.ndarray) -> tuple[int, np.ndarray]:
        handle = self.started
        self.started += 1
        self.in_flight.append(handle)
        self.most_in_flight = max(self.most_in_flight, len(self.in_flight))
        return handle, self.infer(images)

    def wait(self, handle: tuple[int, np.ndarray]) -> np.ndarray:
        number, features = handle
        if self.in_flight[0] != number:
            raise AssertionError(f"waited for batch {number} before batch {self.in_flight[0]}")
        self.in_flight.pop(0)
        return features


def test_a_pipelined_model_gets_its_depth_of_batches_in_flight_and_they_come_back_in_order(source):
    broken = next(i for i, s in enumerate(source.samples) if s.path == "a/zz_broken.png")
    rows = [i for i in range(len(source)) if i != broken]
    batches = [rows[0:2], [broken], rows[2:5], rows[5:6], rows[6:9], rows[9:]]
    events: list[str] = []
    model = PipelinedFakeModel(events)
    out = list(run_exported_batches(lambda: model, source, SPEC, batches, decoders=2))
    assert model.most_in_flight == 3 and model.in_flight == []
    assert [b.rows.tolist() for b in out] == [b if b != [broken] else [] for b in batches]
    assert out[1].outputs is None and [i for i, _ in out[1].failures] == [broken]
    dataset = ImageDataset(source, SPEC)
    for batch in [b for b in out if b.outputs is not None]:
        _, images, _ = collate_images([dataset[i] for i in batch.rows.tolist()])
        np.testing.assert_array_equal(batch.outputs, images.permute(0, 2, 3, 1).reshape(len(images), -1).numpy())
    assert events == ["built", "closed"]


def test_decoding_runs_further_ahead_while_the_model_is_built_within_a_byte_budget(source, monkeypatch):
    from embedcache.extraction import exported_loop

    batches = row_batches(np.zeros(len(source), bool), 2)
    image_bytes = SPEC.crop_size**2 * 3
    monkeypatch.setattr(exported_loop, "STARTUP_DECODE_BYTES", 4 * 2 * image_bytes)
    assert exported_loop.startup_lead(batches, SPEC) == 4  # four batches of two fit the budget
    monkeypatch.setattr(exported_loop, "STARTUP_DECODE_BYTES", 1)
    assert exported_loop.startup_lead(batches, SPEC) == exported_loop.PREFETCH_BATCHES
    monkeypatch.setattr(exported_loop, "STARTUP_DECODE_BYTES", 1 << 30)
    assert exported_loop.startup_lead(batches, SPEC) == len(batches)

    loaded: list[int] = []
    original = source.load_pixels

    def load(index):
        loaded.append(index)
        return original(index)

    source.load_pixels = load
    seen_at_build: list[int] = []

    def build():
        deadline = time.monotonic() + 5
        while len(loaded) < len(source) and time.monotonic() < deadline:
            threading.Event().wait(0.01)
        seen_at_build.append(len(loaded))
        return FakeModel([])

    out = list(run_exported_batches(build, source, SPEC, batches, decoders=2))
    assert seen_at_build == [len(source)]  # every image decoded before the model existed
    assert [sorted(b.rows.tolist() + [i for i, _ in b.failures]) for b in out] == [sorted(r) for r in batches]


def test_each_batch_says_how_long_the_model_waited_for_its_images(source):
    original = source.load_pixels

    def slow(index):
        threading.Event().wait(0.02)
        return original(index)

    source.load_pixels = slow
    batches = row_batches(np.zeros(len(source), bool), 2)
    out = list(run_exported_batches(lambda: FakeModel([]), source, SPEC, batches, decoders=1))
    # one decoding thread, 11 images of at least 20 ms each, an instant model: the loop waits for
    # most of the decoding (all but what ran ahead while the model was built)
    assert all(b.decode_wait >= 0 for b in out) and sum(b.decode_wait for b in out) >= 0.1


def test_a_gray_folder_gives_both_loops_the_pixels_of_its_rgb_copy(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(11)
    for form in ("gray", "rgb"):
        for i in range(5):
            (tmp_path / form / "c").mkdir(parents=True, exist_ok=True)
            pixels = Image.fromarray(np.random.default_rng(i).integers(0, 256, (17 + i, 29), dtype=np.uint8), "L")
            (pixels if form == "gray" else pixels.convert("RGB")).save(tmp_path / form / "c" / f"{i}.png")
    gray, rgb = open_source(tmp_path / "gray"), open_source(tmp_path / "rgb")
    assert gray.load_pixels(0).mode == "L" and rgb.load_pixels(0).mode == "RGB"
    batches = row_batches(np.zeros(len(gray), bool), 2)
    inputs = []
    for folder in (gray, rgb):
        model = FakeModel([])
        list(run_exported_batches(lambda model=model: model, folder, SPEC, batches, decoders=int(rng.integers(0, 3))))
        inputs.append(np.concatenate(model.inputs))
        dataset_images = collate_images([ImageDataset(folder, SPEC)[i] for i in range(len(folder))])[1]
        np.testing.assert_array_equal(inputs[-1], dataset_images.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(inputs[0], inputs[1])


class SlowFakeModel(FakeModel):
    """A model that takes 30 ms a batch: decoding is never what the loop waits for."""

    def infer(self, images: np.ndarray) -> np.ndarray:
        threading.Event().wait(0.03)
        return super().infer(images)


def test_one_decoding_thread_runs_until_the_model_waits_for_images_then_more(source):
    from embedcache.extraction.exported_loop import GROW_AFTER_WAIT_SECONDS

    batches = row_batches(np.zeros(len(source), bool), 1)
    def slow_build():  # every image decodes (ahead, within the start-up budget) while it is built
        threading.Event().wait(0.5)
        return SlowFakeModel([])

    # decoding faster than the model: one thread all along, however many are allowed
    out = list(run_exported_batches(slow_build, source, SPEC, batches, decoders=3))
    assert {b.decoders for b in out} == {1}
    assert all(b.decode_wait <= GROW_AFTER_WAIT_SECONDS for b in out)

    original = source.load_pixels

    def slow(index):
        threading.Event().wait(0.02)
        return original(index)

    source.load_pixels = slow
    # an instant model waiting on 20 ms images: a thread more after each wait, up to the limit
    out = list(run_exported_batches(lambda: FakeModel([]), source, SPEC, batches, decoders=3))
    sizes = [b.decoders for b in out]
    assert sizes == sorted(sizes) and sizes[0] >= 1 and sizes[-1] == 3
    assert [sorted(b.rows.tolist() + [i for i, _ in b.failures]) for b in out] == [sorted(r) for r in batches]


def test_the_decode_pool_runs_jobs_in_order_and_cancels_the_rest_at_shutdown():
    from embedcache.extraction.exported_loop import DecodePool

    pool = DecodePool(limit=2)
    assert pool.size == 1
    gate, order = threading.Event(), []
    first = pool.submit(gate.wait, 5)  # holds the one thread
    rest = [pool.submit(order.append, i) for i in range(5)]
    assert not any(f.done() for f in rest)
    gate.set()
    assert [f.result(5) for f in rest] == [None] * 5 and order == list(range(5)) and first.result() is True
    failing = pool.submit(int, "not a number")
    with pytest.raises(ValueError):
        failing.result(5)
    assert pool.grow() and pool.size == 2 and not pool.grow()  # at the limit
    gate.clear()
    running = threading.Semaphore(0)

    def blocker():
        running.release()
        return gate.wait(5)

    blockers = [pool.submit(blocker) for _ in range(2)]
    queued = [pool.submit(order.append, "late") for _ in range(3)]
    assert running.acquire(timeout=5) and running.acquire(timeout=5)  # both threads hold a blocker
    threading.Timer(0.1, gate.set).start()
    pool.shutdown()
    assert all(f.result() is True for f in blockers) and all(f.cancelled() for f in queued)
    assert "late" not in order
