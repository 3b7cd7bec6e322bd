"""``--engine ray`` on a local Ray (2 CPUs): the same entry as one process, a cache hit for it,
resume after a killed driver, a killed actor retried, damaged shards found and recomputed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

import tests.tiny_backbone  # noqa: F401 - registers the tiny backbone
from embedcache.cli import main
from embedcache.extraction.extract import extract
from embedcache.extraction.ray_tasks import FAULT_ENV, FAULT_MARKER
from embedcache.store.reader import FeatureStore
from embedcache.store.shards import shard_name, shards_dir
from tests.hostile_helpers import REPO, chunk_offset, flipped_copy
from tests.tiny_backbone import TINY, make_image_folder

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'embedcache[ray]'")
pytestmark = pytest.mark.ray

SLOW = "tests.tiny_backbone:slow_factory"


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module; its workers import this checkout (and ``tests``)."""
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("ray") / "data", per_class=13)
    (root / "a" / "broken.png").write_bytes(b"not a png")
    return root


def _run(folder, cache, **kw):
    return extract(folder, backbone=kw.pop("backbone", TINY), workers=0, cache_dir=cache, precision="fp32",
                   batch_size=kw.pop("batch_size", 4), **kw)


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    return _run(folder, tmp_path_factory.mktemp("local"))


@pytest.fixture(scope="module")
def sharded(cluster, folder, tmp_path_factory):
    cache = tmp_path_factory.mktemp("sharded")
    return cache, _run(folder, cache, engine="ray", shard_size=8)


def test_ray_gives_the_single_process_entry_and_is_its_cache_hit(reference, sharded, folder, tmp_path):
    cache, store = sharded
    assert not store.cache_hit and store.stats.computed_rows == 27
    assert store.cache_key == reference.cache_key
    assert np.array_equal(store.features, reference.features) and store.features.dtype == reference.features.dtype
    assert np.array_equal(store.rows, reference.rows) and list(store.paths) == list(reference.paths)
    assert store.errors == reference.errors == [(0, "a/broken.png", "not an image (cannot identify format)")]
    assert sorted(p.name for p in shards_dir(cache, store.cache_key).iterdir()) == [shard_name(i) for i in range(4)]
    moved = tmp_path / "moved"
    shutil.copytree(cache, moved)  # relative virtual paths: a copied cache is a hit, locally too
    hit = _run(folder, moved)
    assert hit.cache_hit and np.array_equal(hit.features, reference.features)
    assert CliRunner().invoke(main, ["verify", str(store.path)]).exit_code == 0
    info = CliRunner().invoke(main, ["info", str(store.path)])
    assert info.exit_code == 0, info.output
    cli = CliRunner().invoke(main, ["extract", str(folder), "-b", TINY, "--workers", "0", "--precision", "fp32",
                                    "--batch-size", "4", "--engine", "ray", "--shard-size", "8",
                                    "--cache-dir", str(cache)])
    assert cli.exit_code == 0 and cli.output.startswith("cache hit:"), cli.output
    for command in (["ls"], ["probe", str(store.path), "--penalty", "0.001", "--out", str(tmp_path / "p")]):
        result = CliRunner().invoke(main, [*command, "--cache-dir", str(cache)])
        assert result.exit_code == 0, result.output
    ours = CliRunner().invoke(main, ["probe", str(store.path), "--penalty", "0.001", "--json"])
    theirs = CliRunner().invoke(main, ["probe", str(reference.path), "--penalty", "0.001", "--json"])
    ours, theirs = json.loads(ours.stdout)["test"], json.loads(theirs.stdout)["test"]
    assert {k: v for k, v in ours.items() if "seconds" not in k} == {k: v for k, v in theirs.items() if "seconds" not in k}


def test_damaged_shards_are_named_by_verify_and_only_they_are_recomputed(sharded, folder, reference, tmp_path):
    cache = tmp_path / "copy"
    shutil.copytree(sharded[0], cache)
    folder_of_shards = shards_dir(cache, reference.cache_key)
    (folder_of_shards / shard_name(1)).unlink()
    flipped = folder_of_shards / shard_name(2)
    offset, _ = chunk_offset(flipped)
    os.replace(flipped_copy(flipped, tmp_path / "f.h5", offset + 1), flipped)
    entry = cache / f"{reference.cache_key[:16]}.h5"
    result = CliRunner().invoke(main, ["verify", str(entry)])
    assert result.exit_code == 1 and "shard-00001.h5" in result.output
    assert "rows done" not in result.output  # the check stopped at the shard: nothing was counted
    os.replace(entry, tmp_path / "aside.h5")  # with shard 1 back, verify names the flipped shard 2
    shutil.copy(shards_dir(sharded[0], reference.cache_key) / shard_name(1), folder_of_shards / shard_name(1))
    os.replace(tmp_path / "aside.h5", entry)
    result = CliRunner().invoke(main, ["verify", str(entry)])
    assert result.exit_code == 1 and "shard-00002.h5" in result.output and "shard-00001.h5" not in result.output
    (folder_of_shards / shard_name(1)).unlink()
    again = _run(folder, cache, engine="ray", shard_size=8)
    assert not again.cache_hit and again.stats.computed_rows == 16 and again.stats.resumed_rows == 11
    assert any("shard-00002.h5" in w for w in again.stats.warnings)
    assert np.array_equal(again.features, reference.features)


def test_an_actor_killed_mid_shard_is_restarted_and_the_shard_retried(cluster, folder, reference, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "1")  # the first actor exits (os._exit) before its second batch
    result = CliRunner().invoke(main, ["extract", str(folder), "-b", TINY, "--workers", "0", "--precision", "fp32",
                                       "--batch-size", "4", "--engine", "ray", "--shard-size", "8", "--json",
                                       "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)  # nothing but the JSON on stdout
    assert out["computed_rows"] == 27 and not out["cache_hit"]
    assert (shards_dir(tmp_path / "c", out["cache_key"]) / FAULT_MARKER).exists()
    store = FeatureStore.open(out["path"])
    assert np.array_equal(store.features, reference.features) and store.errors == reference.errors


def test_a_killed_driver_resumes_with_only_the_unfinished_shards(cluster, folder, tmp_path):
    cache = tmp_path / "c"
    args = [sys.executable, "-m", "embedcache", "extract", str(folder), "-b", SLOW, "--batch-size", "2",
            "--workers", "0", "--precision", "fp32", "--engine", "ray", "--ray-address", cluster,
            "--shard-size", "4", "--cache-dir", str(cache)]
    driver = subprocess.Popen(args, cwd=REPO, env=os.environ.copy(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not list(cache.glob("*.shards/shard-*.h5")):
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    finished = {p.name for p in cache.glob("*.shards/shard-*.h5")}
    assert finished and not list(cache.glob("*.h5")), "the driver was killed before it published"
    resumed = _run(folder, cache, backbone=SLOW, batch_size=2, engine="ray", shard_size=4)
    assert resumed.stats.resumed_rows > 0 and resumed.stats.computed_rows == 27 - resumed.stats.resumed_rows
    assert resumed.stats.resumed_rows >= 4 * len(finished) - 4  # every finished shard kept (the last is 3 rows)
    reference = _run(folder, tmp_path / "local", backbone=SLOW, batch_size=2)
    assert np.array_equal(FeatureStore.open(resumed.path).features, reference.features)


def test_max_errors_counts_the_whole_run_kept_shards_included(cluster, folder, tmp_path):
    from embedcache.errors import TooManyErrorsError

    with pytest.raises(TooManyErrorsError, match="1 images failed to decode, more than max_errors=0"):
        _run(folder, tmp_path / "c", engine="ray", shard_size=8, max_errors=0)
    assert list((tmp_path / "c").glob("*.shards/shard-00000.h5"))  # finished shards are kept
    with pytest.raises(TooManyErrorsError, match="a/broken.png"):  # counted again from the kept shard
        _run(folder, tmp_path / "c", engine="ray", shard_size=8, max_errors=0)
    store = _run(folder, tmp_path / "c", engine="ray", shard_size=8, max_errors=1)
    assert store.stats.resumed_rows >= 8 and len(store.errors) == 1


def test_the_shard_size_must_be_a_multiple_of_the_batch_size(folder, tmp_path):
    from embedcache.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'shard_size' .* multiple of the batch size \(4\).*--shard-size 8"):
        _run(folder, tmp_path, engine="ray", shard_size=10)


def test_views_on_ray_equal_the_single_process_views(cluster, folder, tmp_path):
    """--views on the ray engine: the same rows, views and key as one process (the broken image's
    views fail with it and are dropped)."""
    local = _run(folder, tmp_path / "local", views=3, augment="crop")
    sharded = _run(folder, tmp_path / "ray", views=3, augment="crop", engine="ray", shard_size=16)
    assert sharded.cache_key == local.cache_key
    assert np.array_equal(sharded.features, local.features)
    assert np.array_equal(sharded.views.features, local.views.features)
    assert np.array_equal(sharded.views.origin, local.views.origin) and len(local.views) > 0
    assert CliRunner().invoke(main, ["verify", str(sharded.path)]).exit_code == 0
