"""Tests for the thread policy of embedcache.runtime: cores available (affinity, cgroup quotas),
thread counts (argument, environment variable, default), passive OpenMP waiting."""

import json
import sys

import pytest
import torch
from click.testing import CliRunner

import tests.tiny_backbone  # noqa: F401 - registers the tiny backbone
from embedcache import runtime
from embedcache.cli import main
from embedcache.errors import ConfigError
from embedcache.experiments.fewshot import fewshot
from embedcache.experiments.predict import predict
from embedcache.experiments.protocol import probe
from embedcache.extraction.extract import extract
from tests.tiny_backbone import TINY, make_image_folder


@pytest.fixture
def cgroup(tmp_path, monkeypatch):
    """Point the cgroup paths at empty temporary folders; returns (v2 cpu.max path, v1 folder)."""
    v1 = tmp_path / "cpu"
    v1.mkdir()
    monkeypatch.setattr(runtime, "CGROUP_V2_CPU_MAX", str(tmp_path / "cpu.max"))
    monkeypatch.setattr(runtime, "CGROUP_V1_CPU_DIRS", (str(v1),))
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    return tmp_path / "cpu.max", v1


@pytest.mark.parametrize("text, cpus", [("150000 100000", 1.5), ("200000 100000", 2.0), ("max 100000", None),
                                        ("max", None), ("garbage here", None), ("50000", 0.5)])
def test_cgroup_v2_cpu_max(cgroup, text, cpus):
    cgroup[0].write_text(text + "\n")
    assert runtime.cgroup_cpu_limit() == cpus


@pytest.mark.parametrize("quota, period, cpus", [("-1", "100000", None), ("300000", "100000", 3.0),
                                                 ("50000", "100000", 0.5), ("100000", "0", None)])
def test_cgroup_v1_quota_and_period(cgroup, quota, period, cpus):
    (cgroup[1] / "cpu.cfs_quota_us").write_text(quota)
    (cgroup[1] / "cpu.cfs_period_us").write_text(period)
    assert runtime.cgroup_cpu_limit() == cpus


def test_no_cgroup_files_means_no_limit(cgroup):
    assert runtime.cgroup_cpu_limit() is None


@pytest.mark.parametrize("affinity, cpu_max, cores", [
    ({0, 1, 2, 3}, None, 4),  # affinity alone
    ({0, 1, 2, 3}, "150000 100000", 1),  # a 1.5-CPU quota: one whole core
    ({0, 1}, "400000 100000", 2),  # the affinity is the tighter limit
    ({5}, None, 1),
    ({0, 1, 2, 3}, "20000 100000", 1),  # a fraction of a core still runs one thread
])
def test_available_cores_is_affinity_capped_by_quota(cgroup, monkeypatch, affinity, cpu_max, cores):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda _pid: affinity, raising=False)
    if cpu_max is not None:
        cgroup[0].write_text(cpu_max)
    assert runtime.available_cores() == cores


def test_default_workers_follow_the_available_cores(cgroup, monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: 4)
    assert runtime.default_workers() == 3
    monkeypatch.setattr(runtime, "available_cores", lambda: 1)
    assert runtime.default_workers() == 1


def test_resolve_threads_argument_then_environment_then_cores(cgroup, monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: 4)
    assert runtime.resolve_threads() == 4
    monkeypatch.setenv(runtime.THREADS_ENV, "2")
    assert runtime.resolve_threads() == 2
    assert runtime.resolve_threads(3) == 3
    monkeypatch.setenv(runtime.THREADS_ENV, "")
    assert runtime.resolve_threads() == 4  # empty = not set


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "abc", "0", "", "2.0"])
def test_bad_thread_counts_are_named(cgroup, value):
    with pytest.raises(ConfigError, match=r"The 'threads' parameter must be a whole number of threads >= 1"):
        runtime.resolve_threads(value)


@pytest.mark.parametrize("value", ["abc", "0", "-3", "1.5"])
def test_bad_environment_variable_is_named(cgroup, monkeypatch, value):
    monkeypatch.setenv(runtime.THREADS_ENV, value)
    with pytest.raises(ConfigError, match=rf"The EMBEDCACHE_THREADS environment variable must be .*{value!r}"):
        runtime.resolve_threads()


def test_check_threads_accepts_digits_and_ints():
    assert runtime.check_threads(" 3 ") == 3 and runtime.check_threads(2) == 2 and runtime.check_threads(None) is None


def test_run_threads_sets_and_restores_the_count(cgroup):
    before = torch.get_num_threads()
    with runtime.run_threads(1) as count:
        assert count == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_passive_waiting_only_before_torch_and_never_over_the_users_choice(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("KMP_BLOCKTIME", "200")
    assert runtime.prefer_passive_waiting() is False  # torch is imported in this process: too late
    assert "OMP_WAIT_POLICY" not in runtime.os.environ
    monkeypatch.delitem(sys.modules, "torch")
    assert runtime.prefer_passive_waiting() is True
    assert runtime.os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert runtime.os.environ["KMP_BLOCKTIME"] == "200"


# ------------------------------------------------------------------------- the commands use it


@pytest.fixture
def entry(tmp_path, cgroup):
    folder = make_image_folder(tmp_path / "data", per_class=8, split_dirs=True)
    store = extract(folder, backbone=TINY, workers=0, threads=1, cache_dir=tmp_path / "c", precision="fp32",
                    store_dtype="float32")
    return folder, store


def test_extract_records_its_threads(entry):
    _folder, store = entry
    assert store.stats.threads == 1 and store.attrs["extract_threads"] == 1 and store.attrs["extract_workers"] == 0


def test_extract_and_predict_share_every_core_with_their_workers(tmp_path, cgroup, monkeypatch):
    """The decoding workers are not subtracted: on 2 cores, 2 model threads beside 1 worker ran
    1.5-1.7x faster idle than 1, and as fast with one core busy (docs/benchmarks.md)."""
    import embedcache.extraction.extract as extract_module

    monkeypatch.setattr(runtime, "available_cores", lambda: 3)
    folder = make_image_folder(tmp_path / "data", per_class=8, split_dirs=True)
    store = extract_module.extract(folder, backbone=TINY, workers=1, cache_dir=tmp_path / "c")
    assert store.stats.threads == 3 and store.attrs["extract_workers"] == 1
    probe(store, penalty=1e-3, out=tmp_path / "p")
    assert predict(tmp_path / "p", [str(folder / "test")], workers=1, device="cpu").threads == 3


def test_probe_fewshot_predict_record_their_threads(entry, tmp_path):
    folder, store = entry
    result = probe(store, penalty=1e-3, threads=1, out=tmp_path / "p")
    assert result.threads == 1
    assert json.loads((tmp_path / "p" / "report.json").read_text())["threads"] == 1
    curve = fewshot(store, shots=[1], seeds=2, threads=1, out=tmp_path / "f")
    assert curve.threads == 1 and json.loads((tmp_path / "f" / "fewshot.json").read_text())["threads"] == 1
    assert predict(tmp_path / "p", [str(folder / "test")], workers=0, threads=1, device="cpu").threads == 1


def test_results_do_not_depend_on_the_thread_count(entry):
    _folder, store = entry
    one = probe(store, penalty=1e-3, threads=1)
    two = probe(store, penalty=1e-3, threads=2)
    assert one.metrics["top1"] == two.metrics["top1"]
    assert (one.estimator.coef_ == two.estimator.coef_).all()


@pytest.mark.parametrize("args, env, message", [
    (["probe", "{entry}", "--threads", "0"], {}, "--threads must be a whole number of threads >= 1"),
    (["probe", "{entry}", "--threads", "many"], {}, "--threads must be a whole number of threads >= 1"),
    (["fewshot", "{entry}", "--shots", "1"], {"EMBEDCACHE_THREADS": "abc"}, "The EMBEDCACHE_THREADS environment"),
    (["extract", "{folder}", "-b", TINY, "--threads", "-2"], {}, "--threads must be"),
    (["predict", "{folder}", "{folder}", "--threads", "0"], {}, "--threads must be"),
])
def test_cli_thread_errors_are_one_line(entry, tmp_path, args, env, message):
    folder, store = entry
    args = [a.replace("{entry}", str(store.path)).replace("{folder}", str(folder)) for a in args]
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output


def test_cli_threads_reach_the_report(entry, tmp_path):
    _folder, store = entry
    result = CliRunner().invoke(main, ["probe", str(store.path), "--penalty", "1e-3", "--no-sweep", "--json",
                                       "--threads", "1"], catch_exceptions=False)
    assert json.loads(result.stdout)["threads"] == 1
    result = CliRunner().invoke(main, ["probe", str(store.path), "--penalty", "1e-3", "--no-sweep", "--json"],
                                env={"EMBEDCACHE_THREADS": "2"}, catch_exceptions=False)
    assert json.loads(result.stdout)["threads"] == 2


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_reuse_freed_memory_raises_then_restores_glibc_thresholds(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(runtime, "_glibc", lambda: fake)
    for key in [k for k in runtime.os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(key)
    with runtime.reuse_freed_memory() as changed:
        assert changed is True
        assert ("mallopt", runtime.M_MMAP_THRESHOLD, runtime.REUSED_BLOCK_BYTES) in fake.calls
    assert fake.calls[-3:] == [("mallopt", runtime.M_MMAP_THRESHOLD, runtime.GLIBC_MALLOC_DEFAULT),
                               ("mallopt", runtime.M_TRIM_THRESHOLD, runtime.GLIBC_MALLOC_DEFAULT),
                               ("malloc_trim", 0)]


@pytest.mark.parametrize("key, value", [("MALLOC_MMAP_THRESHOLD_", "65536"), ("GLIBC_TUNABLES", "glibc.malloc.x=1")])
def test_reuse_freed_memory_leaves_a_users_malloc_settings_alone(monkeypatch, key, value):
    fake = FakeLibc()
    monkeypatch.setattr(runtime, "_glibc", lambda: fake)
    monkeypatch.setenv(key, value)
    with runtime.reuse_freed_memory() as changed:
        assert changed is False
    assert fake.calls == []


def test_model_input_buffer_is_reused_and_gives_the_same_values():
    from embedcache.extraction.loop import input_buffer, model_input
    from embedcache.models.preprocess import PreprocessSpec

    spec = PreprocessSpec(resize_size=8, crop_size=8, interpolation="bilinear", antialias=True,
                          mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4), color_mode="RGB")
    images = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    cpu = torch.device("cpu")
    buffer = input_buffer(None, images, cpu)
    assert input_buffer(buffer, images[:3], cpu) is buffer  # a shorter last batch reuses it
    fresh = model_input(images, cpu, spec)
    reused = model_input(images, cpu, spec, buffer)
    assert torch.equal(fresh, reused) and reused.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(model_input(images[:3], cpu, spec, buffer), fresh[:3])


def test_a_module_returning_its_input_does_not_see_the_next_batch(tmp_path):
    from embedcache.extraction.loop import ImageDataset, collate_images, model_input, run_batches
    from embedcache.models.preprocess import PreprocessSpec
    from embedcache.sources.open import open_source

    class AsIs(torch.nn.Module):
        def forward(self, x):  # a view of the (reused) input buffer
            return x.permute(0, 2, 3, 1).reshape(len(x), -1)

    folder = make_image_folder(tmp_path / "d", per_class=3)
    spec = PreprocessSpec(resize_size=4, crop_size=4, interpolation="bilinear", antialias=True,
                          mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), color_mode="RGB")
    dataset = ImageDataset(open_source(str(folder)), spec)
    batches = [[0, 1], [2, 3], [4, 5]]
    cpu = torch.device("cpu")
    outs = [b.outputs for b in run_batches(AsIs(), dataset, batches, device=cpu, precision="fp32", workers=0)]
    fresh = [AsIs()(model_input(collate_images([dataset[i] for i in rows])[1], cpu, spec)).numpy() for rows in batches]
    assert all((a == b).all() for a, b in zip(outs, fresh, strict=True))


def test_package_versions_come_from_dist_info_names_as_importlib_metadata_reads_them(tmp_path, monkeypatch):
    from importlib import metadata

    from embedcache import runtime

    for name in ("numpy", "h5py", "Pillow", "scikit-learn", "torch", "embedcache"):
        assert runtime.package_version(name) == metadata.version(name), name
    runtime.package_version.cache_clear()
    runtime._dist_info_versions.cache_clear()
    (tmp_path / "first" / "Fancy.Name_here-3.1.4rc1.dist-info").mkdir(parents=True)
    (tmp_path / "later" / "fancy_name_here-9.9.dist-info").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(tmp_path / "later"))
    monkeypatch.syspath_prepend(str(tmp_path / "first"))  # before "later" on the path: it wins
    try:
        assert runtime.package_version("fancy-name.here") == "3.1.4rc1"
        assert runtime.package_version("no-such-distribution-anywhere") == "unknown"
    finally:
        runtime.package_version.cache_clear()
        runtime._dist_info_versions.cache_clear()
