"""Choosing the engine: the local one by default, one-line errors for the ray engine's options
and for a missing Ray (these run without Ray installed)."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

import tests.tiny_backbone  # noqa: F401 - registers the tiny backbone
from embedcache.cli import main
from embedcache.errors import ConfigError
from embedcache.extraction.extract import extract
from tests.tiny_backbone import TINY, make_image_folder


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "data", per_class=2)


@pytest.fixture
def no_ray(monkeypatch):
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError


def test_without_ray_the_ray_engine_says_how_to_install_it(folder, tmp_path, no_ray):
    with pytest.raises(ConfigError, match=r"^The 'engine' parameter 'ray' needs Ray.*pip install 'embedcache\[ray\]'$"):
        extract(folder, backbone=TINY, workers=0, cache_dir=tmp_path / "c", engine="ray")
    result = CliRunner().invoke(main, ["extract", str(folder), "-b", TINY, "--workers", "0", "--engine", "ray",
                                       "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        "Error: The 'engine' parameter 'ray' needs Ray, which is not installed. Run: pip install 'embedcache[ray]'"]
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("*.h5"))


def test_the_local_engine_needs_no_ray(folder, tmp_path, no_ray):
    store = extract(folder, backbone=TINY, workers=0, cache_dir=tmp_path / "c")
    assert len(store) == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"engine": "spark"}, r"The 'engine' parameter must be one of \['local', 'ray'\]. Got 'spark'."),
    ({"engine": "ray", "shard_size": 0}, r"The 'shard_size' parameter must be a positive int. Got 0."),
    ({"engine": "ray", "shard_size": 6}, r"'shard_size' parameter must be a multiple of the batch size \(4\)"),
    ({"engine": "ray", "concurrency": 0}, r"The 'concurrency' parameter must be a positive int. Got 0."),
    ({"engine": "ray", "gpus_per_worker": -1}, r"The 'gpus_per_worker' parameter must be a number >= 0"),
])
def test_engine_options_are_checked_before_any_work(folder, tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        extract(folder, backbone=TINY, workers=0, cache_dir=tmp_path / "c", batch_size=4, **kwargs)


class _Cluster:
    """Stands in for the ``ray`` module where only ``cluster_resources`` is asked."""

    def __init__(self, **resources):
        self.resources = resources

    def cluster_resources(self):
        return self.resources


@pytest.mark.parametrize("resources, options, actors", [
    ({"CPU": 16, "GPU": 4}, {"gpus_per_worker": 1}, 4),       # one actor per GPU
    ({"CPU": 16, "GPU": 4}, {"gpus_per_worker": 0.5}, 8),     # two actors share a GPU
    ({"CPU": 16, "GPU": 4}, {"gpus_per_worker": 1, "concurrency": 2}, 2),
    ({"CPU": 8}, {}, 4),                                      # CPU actors: half the CPUs, the rest decode
    ({"CPU": 8}, {"concurrency": 7}, 7),
])
def test_the_actor_pool_is_sized_from_the_clusters_gpus_or_cpus(resources, options, actors):
    from embedcache.extraction.ray_engine import RayOptions, _concurrency

    assert _concurrency(_Cluster(**resources), RayOptions(**options)) == actors


@pytest.mark.parametrize("resources, options, message", [
    ({"CPU": 8}, {"gpus_per_worker": 1},
     r"^The 'gpus_per_worker' parameter asks 1 GPUs per actor, but the Ray cluster has 0\. Pass --gpus-per-worker 0"),
    ({"CPU": 8, "GPU": 1}, {"gpus_per_worker": 2}, r"asks 2 GPUs per actor, but the Ray cluster has 1"),
    ({"CPU": 2}, {"concurrency": 2}, r"^The 'concurrency' parameter \(2\) leaves no CPU for decoding.*--concurrency 1"),
])
def test_an_actor_pool_the_cluster_cannot_hold_is_refused_naming_the_parameter(resources, options, message):
    from embedcache.extraction.ray_engine import RayOptions, _concurrency

    with pytest.raises(ConfigError, match=message):
        _concurrency(_Cluster(**resources), RayOptions(**options))
