import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import tests.tiny_backbone  # noqa: F401
from embedcache.errors import CacheLockedError, ConfigError, TooManyErrorsError
from embedcache.extraction import compute as compute_mod
from embedcache.extraction import extract as extract_mod
from embedcache.extraction import loop as loop_mod
from embedcache.extraction import plan as plan_mod
from embedcache.extraction.extract import extract
from embedcache.models import build
from embedcache.store.reader import FeatureStore
from embedcache.store.schema import entry_paths
from embedcache.store.writer import StoreWriter
from tests.tiny_backbone import TINY, make_image_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "data", per_class=10, split_dirs=True)


def run(data, cache, **kw):
    kw.setdefault("backbone", TINY)
    kw.setdefault("workers", 0)
    kw.setdefault("batch_size", 4)
    return extract(data, cache_dir=cache, **kw)


def test_cache_entry_follows_the_documented_schema(folder, tmp_path):
    store = run(folder, tmp_path / "c")
    assert not store.cache_hit
    with h5py.File(store.path, "r") as f:
        assert f["features"].shape == (40, 8) and f["features"].dtype == np.float16
        assert f["labels"].dtype == np.int64 and f["split"].dtype == np.uint8
        assert f["done"][...].all()
        assert set(f["paths"].asstr()[...]) >= {"train/a/img000.png", "test/b/img009.png"}
        for attr in ("format", "format_version", "cache_key", "complete", "n", "dim", "class_names",
                     "backbone", "preprocess", "precision", "store_dtype", "versions",
                     "manifest_sha256", "source", "created", "updated"):
            assert attr in f.attrs, attr
        assert f.attrs["format"].decode() == "embedcache" and bool(f.attrs["complete"])
    assert store.path.name == store.cache_key[:16] + ".h5"
    assert sorted(set(store.splits.tolist())) == [0, 2]
    assert store.class_names == ["a", "b"]


def test_second_run_is_a_cache_hit_without_running_the_model(folder, tmp_path, monkeypatch):
    first = run(folder, tmp_path / "c")

    def boom(*a, **k):
        raise AssertionError("model ran on a cache hit")

    # neither built nor run: the identity is remembered, the entry exists
    monkeypatch.setattr(extract_mod, "build_backbone", boom)
    monkeypatch.setattr(loop_mod, "run_batches", boom)
    monkeypatch.setattr(build, "get_backbone", boom)
    second = run(folder, tmp_path / "c", batch_size=7, workers=0)
    assert second.cache_hit and second.path == first.path
    np.testing.assert_array_equal(second.features, first.features)


@pytest.mark.parametrize(
    "change",
    [{"image_size": 12}, {"layer": "features.2", "pool": "max"}, {"weights": "other"},
     {"precision": "fp32"}, {"store_dtype": "float32"}],
)
def test_config_changes_make_a_new_entry(folder, tmp_path, change):
    base = run(folder, tmp_path / "c", precision="bf16")
    other = run(folder, tmp_path / "c", **{"precision": "bf16", **change})
    assert other.cache_key != base.cache_key and not other.cache_hit


def test_moved_dataset_is_the_same_entry(folder, tmp_path):
    first = run(folder, tmp_path / "c")
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved, copy_function=shutil.copy2)
    assert run(moved, tmp_path / "c").cache_hit
    assert run(moved, tmp_path / "c").cache_key == first.cache_key


def test_interrupted_run_resumes_to_identical_features(folder, tmp_path, monkeypatch):
    reference = run(folder, tmp_path / "ref")
    monkeypatch.setattr(compute_mod, "COMMIT_EVERY_SECONDS", 0.0)  # after every batch
    calls = []

    def interrupt(progress):
        calls.append(progress)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(folder, tmp_path / "c", progress=interrupt)
    final, partial, _ = entry_paths(tmp_path / "c", reference.cache_key)
    assert partial.exists() and not final.exists()
    resumed = run(folder, tmp_path / "c")
    assert resumed.stats.resumed_rows == 12
    assert resumed.stats.computed_rows == 28
    np.testing.assert_array_equal(resumed.features, reference.features)


def test_kill_9_then_rerun_resumes(folder, tmp_path):
    cache = tmp_path / "c"
    cmd = [sys.executable, "-m", "embedcache", "extract", str(folder), "-b",
           "tests.tiny_backbone:slow_factory", "--batch-size", "2", "--workers", "0",
           "--cache-dir", str(cache)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    done_rows = 0
    while time.time() < deadline and done_rows < 10:
        time.sleep(0.1)
        for partial in cache.glob("*.partial") if cache.exists() else []:
            try:
                with h5py.File(partial, "r", locking=False) as f:
                    done_rows = int(f["done"][...].sum())
            except (OSError, KeyError):
                pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < done_rows < 40, done_rows
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "resumed" in result.stdout
    reference = run(folder, tmp_path / "ref", backbone="tests.tiny_backbone:slow_factory", batch_size=2)
    resumed = FeatureStore.open(next(cache.glob("*.h5")))
    np.testing.assert_array_equal(resumed.features, reference.features)


def _write_bad_files(folder):
    bad = folder / "train" / "a"
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "page.jpg").write_text("<html><body>not an image</body></html>")
    good = (bad / "img000.png").read_bytes()
    (bad / "cut.png").write_bytes(good[: len(good) // 2])


def test_bad_files_are_recorded_and_skipped(folder, tmp_path):
    _write_bad_files(folder)
    store = run(folder, tmp_path / "c")
    assert len(store) == 40 and len(store.errors) == 3
    failed = {path for _, path, _ in store.errors}
    assert failed == {"train/a/empty.jpg", "train/a/page.jpg", "train/a/cut.png"}
    assert not set(store.paths) & failed


def test_a_batch_of_only_bad_files_does_not_crash(tmp_path):
    root = tmp_path / "bad"
    (root / "x").mkdir(parents=True)
    for i in range(3):
        (root / "x" / f"b{i}.jpg").write_bytes(b"")
    make_image_folder(root, classes=("y",), per_class=3)
    store = run(root, tmp_path / "c", batch_size=3)
    assert len(store) == 3 and len(store.errors) == 3


@pytest.mark.parametrize("max_errors", [2, 0.05])
def test_max_errors_ends_the_run(folder, tmp_path, max_errors):
    _write_bad_files(folder)
    with pytest.raises(TooManyErrorsError, match="more than max_errors"):
        run(folder, tmp_path / "c", max_errors=max_errors)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"batch_size": 0}, "'batch_size' parameter"), ({"workers": -1}, "'workers' parameter"),
     ({"precision": "int8"}, "'precision' parameter"), ({"device": "tpu"}, "'device' parameter"),
     ({"max_errors": "lots"}, "'max_errors' parameter"), ({"store_dtype": "int8"}, "'store_dtype'")],
)
def test_bad_parameters_are_named(folder, tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        run(folder, tmp_path / "c", **kwargs)


def test_a_second_writer_fails_fast(folder, tmp_path):
    plan = plan_mod.plan_extraction(folder, backbone=TINY, cache_dir=tmp_path / "c")
    holder = StoreWriter(cache_dir=tmp_path / "c", cache_key=plan.cache_key, n=1, dim=8,
                         store_dtype="float16", attrs={}, paths=["x"], labels=[0], splits=[0],
                         file_sizes=[1], file_mtimes_ns=[1])
    with holder, pytest.raises(CacheLockedError, match="already writing this cache entry"):
        run(folder, tmp_path / "c")


def test_added_images_reuse_unchanged_rows(folder, tmp_path):
    first = run(folder, tmp_path / "c")
    make_image_folder(folder / "train", classes=("c",), per_class=4, seed=5)
    (folder / "test" / "c").mkdir()
    shutil.copy2(folder / "train" / "c" / "img000.png", folder / "test" / "c" / "img000.png")
    second = run(folder, tmp_path / "c")
    assert second.cache_key != first.cache_key
    assert second.stats.reused_rows == 40 and second.stats.computed_rows == 5
    fresh = run(folder, tmp_path / "fresh", incremental=False)
    np.testing.assert_array_equal(second.features, fresh.features)


def test_unreadable_partial_is_discarded_with_a_warning(folder, tmp_path):
    plan = plan_mod.plan_extraction(folder, backbone=TINY, cache_dir=tmp_path / "c")
    plan.partial_path.parent.mkdir(parents=True, exist_ok=True)  # planning may have made it (memo)
    plan.partial_path.write_bytes(b"garbage")
    store = run(folder, tmp_path / "c")
    assert any("Discarded partial entry" in w and "unreadable" in w for w in store.stats.warnings)
    assert len(store) == 40


def test_no_hold_out_source_gets_a_recorded_split(tmp_path):
    root = make_image_folder(tmp_path / "flat", per_class=10)
    store = run(root, tmp_path / "c", test_fraction=0.2, val_fraction=0.1)
    counts = np.bincount(store.splits, minlength=3)
    assert counts[2] == 4 and counts[1] == 2 and counts[0] == 14


def _messy_folder(root: Path) -> dict[str, np.ndarray]:
    """odd/<name>: awkward-but-valid files; ref/<name>.png: the RGB each must decode to.
    Plus bad files that must be recorded and skipped."""
    from PIL import Image

    odd, ref = root / "odd", root / "ref"
    odd.mkdir(parents=True)
    ref.mkdir()
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    expected = {}

    Image.fromarray(base).convert("CMYK").save(odd / "cmyk.tif")
    expected["cmyk"] = np.asarray(Image.fromarray(base).convert("CMYK").convert("RGB"))
    gray = base[..., 0]
    Image.fromarray(gray.astype(np.uint16) * 257).save(odd / "sixteen.png")
    expected["sixteen"] = np.repeat(gray[..., None], 3, axis=2)
    alpha = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    Image.fromarray(np.dstack([base, alpha]), "RGBA").save(odd / "rgba.png")
    a = alpha[..., None].astype(np.float64) / 255
    expected["rgba"] = np.asarray(
        Image.alpha_composite(Image.new("RGBA", (32, 24), (255,) * 4),
                              Image.fromarray(np.dstack([base, alpha]), "RGBA")).convert("RGB"))
    assert np.abs(expected["rgba"] - (base * a + 255 * (1 - a))).max() <= 1
    pal = Image.fromarray(base).quantize(colors=16)
    pal.info["transparency"] = 0
    pal.save(odd / "palette.png", transparency=0)
    expected["palette"] = np.asarray(
        Image.alpha_composite(Image.new("RGBA", (32, 24), (255,) * 4), pal.convert("RGBA")).convert("RGB"))
    rotated = Image.fromarray(base)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    rotated.save(odd / "exif.png", exif=exif)
    expected["exif"] = np.asarray(Image.fromarray(base).transpose(Image.Transpose.ROTATE_270))
    frames = [Image.fromarray(np.full((24, 32, 3), v, np.uint8)) for v in (40, 200)]
    frames[0].save(odd / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    expected["anim"] = np.full((24, 32, 3), 40, np.uint8)
    for name, array in expected.items():
        Image.fromarray(array).save(ref / f"{name}.png")

    jpeg = odd / "truncated.jpg"
    Image.fromarray(base).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    (odd / "zero.jpg").write_bytes(b"")
    (odd / "page.jpg").write_text("<!doctype html><html><body>404</body></html>")
    return expected


def test_messy_folder_completes_and_good_files_decode_correctly(tmp_path):
    expected = _messy_folder(tmp_path / "messy")
    store = run(tmp_path / "messy", tmp_path / "c", precision="fp32", store_dtype="float32",
                test_fraction=0.0)
    failed = {path for _, path, _ in store.errors}
    assert failed == {"odd/truncated.jpg", "odd/zero.jpg", "odd/page.jpg"}
    rows = {p: i for i, p in enumerate(store.paths)}
    for name in expected:
        odd_row = next(i for p, i in rows.items() if p.startswith(f"odd/{name}."))
        np.testing.assert_allclose(store.features[odd_row], store.features[rows[f"ref/{name}.png"]],
                                   rtol=0, atol=1e-6, err_msg=name)


def test_a_writer_in_another_process_blocks_us(folder, tmp_path):
    plan = plan_mod.plan_extraction(folder, backbone=TINY, cache_dir=tmp_path / "c")
    lock_path = entry_paths(tmp_path / "c", plan.cache_key)[2]
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.lockf(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); "
         "print('locked', flush=True); time.sleep(60)", str(lock_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CacheLockedError, match=f"pid {holder.pid}"):
            run(folder, tmp_path / "c")
    finally:
        holder.kill()
        holder.wait()
    assert not run(folder, tmp_path / "c").cache_hit  # the lock died with its holder


def test_the_entry_records_how_long_the_loop_waited_for_decoded_images(folder, tmp_path, monkeypatch):
    from embedcache.sources.base import FileSource

    original = FileSource.load_pixels

    def slow(self, index):
        time.sleep(0.01)  # 40 images: at least 0.4 s of decoding, all of it in the loop with workers=0
        return original(self, index)

    monkeypatch.setattr(FileSource, "load_pixels", slow)
    store = run(folder, tmp_path / "c")
    waited = store.attrs["extract_decode_wait_seconds"]
    assert 0.4 <= waited <= store.attrs["extract_seconds"]
