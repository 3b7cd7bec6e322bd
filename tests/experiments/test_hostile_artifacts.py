"""Hostile probe directories and nonsense numbers (issue 14): a probe directory is checked as a
unit on load (swapped, symlinked or edited files refused, a crash half-way never mixes two
fits), planted links in --out are never written through, a probe.joblib is type-checked and
warned about; fine-tuning refuses an unchecked split unless asked; nonsense penalties are
refused; fixed penalties are solved honestly and edge-of-grid choices flagged."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import tests.tiny_backbone  # noqa: F401 - registers the tiny backbone
from embedcache.cli import main
from embedcache.errors import CacheError, ConfigError, DataSourceError
from embedcache.experiments import protocol as protocol_mod
from embedcache.experiments.artifacts import load_probe
from embedcache.experiments.fewshot import fewshot
from embedcache.experiments.protocol import probe, probe_arrays
from embedcache.extraction.extract import extract
from embedcache.splits import Split
from embedcache.store.writer import StoreWriter
from tests.hostile_helpers import sha
from tests.tiny_backbone import TINY, make_image_folder


# ------------------------------------------------------------------ shared: one store, two probes
@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny-backbone entry and two torch probes of it (different penalties), plus a sklearn one."""
    root = tmp_path_factory.mktemp("hostile_artifacts")
    folder = make_image_folder(root / "data", per_class=10, split_dirs=True)
    store = extract(folder, backbone=TINY, workers=0, cache_dir=root / "c", precision="fp32",
                    store_dtype="float32")
    probe(store, penalty=1e-3, out=root / "p")
    probe(store, penalty=0.5, out=root / "other")
    probe(store, head="sklearn", penalty=1e-3, out=root / "sk")
    return {"root": root, "folder": folder, "store": store}


@pytest.fixture
def probe_dir(made, tmp_path):
    """A private copy of the first probe directory."""
    return Path(shutil.copytree(made["root"] / "p", tmp_path / "p"))


def _meta(directory: Path) -> dict:
    return json.loads((directory / "probe.json").read_text())


def _write_meta(directory: Path, meta: dict) -> None:
    (directory / "probe.json").write_text(json.dumps(meta, indent=2))


# ------------------------------------------------------------------ 11. probe directories
def test_weights_swapped_in_from_another_probe_are_refused(probe_dir, made):
    shutil.copyfile(made["root"] / "other" / "probe.safetensors", probe_dir / "probe.safetensors")
    with pytest.raises(ConfigError, match=r"probe\.safetensors.*(sha256|inconsistent)"):
        load_probe(probe_dir)


def test_weights_replaced_by_a_symlink_to_a_copy_of_themselves_are_refused(probe_dir, tmp_path):
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(probe_dir / "probe.safetensors", copy)
    (probe_dir / "probe.safetensors").unlink()
    (probe_dir / "probe.safetensors").symlink_to(copy)
    with pytest.raises(ConfigError, match="symlink"):
        load_probe(probe_dir)


@pytest.mark.parametrize("key, edit, match", [
    ("classes", lambda v: v[::-1], "classes in probe.json differ"),
    ("class_names", lambda v: v[::-1], "class names in probe.json differ"),
])
def test_edited_classes_in_probe_json_are_refused(probe_dir, key, edit, match):
    meta = _meta(probe_dir)
    meta[key] = edit(meta[key])
    _write_meta(probe_dir, meta)  # every file's recorded sha256 still matches
    with pytest.raises(ConfigError, match=match):
        load_probe(probe_dir)


def test_a_crash_before_probe_json_never_mixes_two_fits(made, probe_dir, monkeypatch):
    weights_before = sha(probe_dir / "probe.safetensors")
    meta_before = (probe_dir / "probe.json").read_bytes()
    real_replace = os.replace

    def crash_at_probe_json(src, dst, *args, **kwargs):
        if Path(dst).name == "probe.json":
            raise CacheError("simulated crash before probe.json was written")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", crash_at_probe_json)
    with pytest.raises(CacheError, match="simulated crash"):
        probe(made["store"], penalty=0.5, out=probe_dir)
    monkeypatch.undo()

    assert (probe_dir / "probe.json").read_bytes() == meta_before  # the old metadata...
    if sha(probe_dir / "probe.safetensors") != weights_before:  # ...with the new weights: refused
        with pytest.raises(ConfigError, match="inconsistent"):
            load_probe(probe_dir)
    else:  # nothing of the new fit was published: the old probe is whole
        np.testing.assert_array_equal(load_probe(probe_dir).estimator.coef_,
                                      load_probe(made["root"] / "p").estimator.coef_)


def test_planted_links_in_out_are_never_written_through(made, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    names = ["probe.json", "report.json", "probe.safetensors", "confusion.png",
             ".probe.json.tmp", ".report.json.tmp", ".probe.safetensors.tmp", ".confusion.png.tmp"]
    targets = {}
    for i, name in enumerate(names):
        target = tmp_path / f"victim{i}.txt"
        target.write_text(f"victim {i}\n")
        (out / name).symlink_to(target)
        targets[target] = target.read_text()

    probe(made["store"], penalty=1e-3, out=out)

    assert {t: t.read_text() for t in targets} == targets
    for name in ("probe.json", "report.json", "probe.safetensors"):
        assert not (out / name).is_symlink() and (out / name).is_file()
    np.testing.assert_array_equal(load_probe(out).estimator.coef_, load_probe(made["root"] / "p").estimator.coef_)


def test_a_joblib_that_is_not_a_probe_is_refused_and_the_cli_warns_first(made, tmp_path):
    import joblib

    sk = Path(shutil.copytree(made["root"] / "sk", tmp_path / "sk"))
    assert type(load_probe(sk).estimator).__name__ == "SklearnProbe"
    meta = _meta(sk)
    if not (sk / "probe.joblib").exists():  # a version that saves sklearn heads without pickle: the older layout
        (sk / "probe.safetensors").unlink()
        del meta["files"]["probe.safetensors"]
    joblib.dump({"not": "a probe"}, sk / "probe.joblib")
    data = (sk / "probe.joblib").read_bytes()
    meta["files"]["probe.joblib"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _write_meta(sk, meta)  # only the type check can catch it now

    with pytest.raises(ConfigError, match="holds a dict, not an embedcache SklearnProbe"):
        load_probe(sk)

    result = CliRunner().invoke(main, ["predict", str(sk), str(made["folder"] / "test")], catch_exceptions=False)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "pickle" in result.stderr and "not an embedcache SklearnProbe" in result.stderr
    assert result.stderr.index("pickle") < result.stderr.index("not an embedcache SklearnProbe")


# ------------------------------------------------------------------ 12. fine-tuning's leak check
def test_finetune_refuses_an_unchecked_split_unless_asked_wherever_it_runs(probed, tmp_path, monkeypatch):
    from embedcache.experiments.finetune.run import finetune

    folder, probe_dir, _result = probed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not where the cache was made: the probe's absolute path finds it
    kw = {"epochs": 1, "batch_size": 8, "workers": 0, "device": "cpu"}
    checked = finetune(probe_dir, folder, out=tmp_path / "ft0", **kw)
    assert checked.report["data"]["split_check"] == "test split identical to the probe's"

    moved = tmp_path / "moved"
    os.replace(tmp_path / "c", moved)
    with pytest.raises(DataSourceError, match="--allow-unchecked-split"):
        finetune(probe_dir, folder, out=tmp_path / "ft1", **kw)
    assert not (tmp_path / "ft1" / "finetune.json").exists()

    unchecked = finetune(probe_dir, folder, out=tmp_path / "ft2", allow_unchecked_split=True, **kw)
    written = json.loads((tmp_path / "ft2" / "finetune.json").read_text())
    assert written["data"]["split_check"].startswith("UNCHECKED")
    assert unchecked.report["data"]["split_check"] == written["data"]["split_check"]

    found = finetune(probe_dir, folder, out=tmp_path / "ft3", cache_dir=moved, **kw)
    assert found.report["data"]["split_check"] == "test split identical to the probe's"


# ------------------------------------------------------------------ 13. nonsense numbers
def _arrays(n_per_class=20, classes=3, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    features = rng.normal(size=(len(labels), dim)).astype(np.float32) + labels[:, None]
    splits = np.where(np.arange(len(labels)) % 4 == 0, Split.TEST, Split.TRAIN).astype(np.uint8)
    keys = np.array([f"r{i:04d}" for i in range(len(labels))])
    return features, labels, splits, keys


NONSENSE = [math.inf, -1.0, math.nan]


@pytest.mark.parametrize("head", ["torch", "sklearn"])
@pytest.mark.parametrize("penalty", NONSENSE, ids=["inf", "negative", "nan"])
def test_probe_refuses_nonsense_penalties_before_fitting(head, penalty, monkeypatch):
    def no_fit(*args, **kwargs):
        raise AssertionError("a head was fitted with a nonsense penalty")

    monkeypatch.setattr(protocol_mod, "fit_fixed", no_fit)
    with pytest.raises(ConfigError, match=r"The 'penalty' parameter of probe must be a finite"):
        probe_arrays(*_arrays(), head=head, penalty=penalty)


def _entry(cache: Path, labels, splits, *, class_names) -> Path:
    features, _, _, _ = _arrays(n_per_class=len(labels))
    features = features[: len(labels)]
    n = len(labels)
    with StoreWriter(cache_dir=cache, cache_key="c0ffee" + "0" * 58, n=n, dim=features.shape[1],
                     store_dtype="float32",
                     attrs={"backbone": {"name": "test"}, "preprocess": {}, "precision": "fp32", "versions": {},
                            "source": {}, "class_names": class_names, "config_key": "cfg"},
                     paths=[f"x/{i:04d}.png" for i in range(n)], labels=labels, splits=splits,
                     file_sizes=[1] * n, file_mtimes_ns=[1] * n) as writer:
        writer.write_rows(np.arange(n), features)
        return writer.finalize()


@pytest.mark.parametrize("penalty", NONSENSE, ids=["inf", "negative", "nan"])
def test_fewshot_refuses_nonsense_penalties(tmp_path, penalty):
    labels = [i % 2 for i in range(24)]
    splits = [int(Split.TEST if i % 3 == 0 else Split.TRAIN) for i in range(24)]
    entry = _entry(tmp_path / "c", labels, splits, class_names=["x", "y"])
    with pytest.raises(ConfigError, match="'penalty'"):
        fewshot(entry, shots=[1], seeds=1, penalty=penalty)


def test_fewshot_refuses_a_one_class_entry(tmp_path):
    splits = [int(Split.TEST if i % 3 == 0 else Split.TRAIN) for i in range(12)]
    entry = _entry(tmp_path / "c", [0] * 12, splits, class_names=["only"])
    with pytest.raises(ConfigError, match="at least 2 classes"):
        fewshot(entry, shots=[1], seeds=1)


@pytest.mark.parametrize("grid", [[1e-3, -1e-2], [1e-3, math.inf], [math.nan]])
def test_a_penalty_grid_with_nonsense_values_is_refused(grid):
    with pytest.raises(ConfigError, match="'penalties' grid must hold finite values >= 0"):
        probe_arrays(*_arrays(), penalties=grid)


# ------------------------------------------------------------------ 14. honest probes
def test_a_fixed_weak_penalty_is_solved_like_scikit_learn_run_to_convergence():
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from embedcache.experiments.protocol import split_for_probe
    from embedcache.sources.arrays import demo_source

    source = demo_source()  # Fashion-MNIST pixels: nearly separable at a weak penalty
    splits = np.array([s.split for s in source.samples])
    keep = np.concatenate([np.flatnonzero(splits == Split.TRAIN)[:1500], np.flatnonzero(splits == Split.TEST)])
    features = np.asarray(source.images).reshape(len(source), -1).astype(np.float32)[keep]
    labels = np.array([s.label for s in source.samples])[keep]
    keys = np.array([s.path for s in source.samples])[keep]
    splits = splits[keep]
    penalty = 1e-6

    ours = probe_arrays(features, labels, splits, keys, penalty=penalty)

    parts = split_for_probe(labels, splits, keys)  # the rows the probe refits on: train + val
    fit = np.concatenate([parts.train, parts.val])
    mean, scale = ours.estimator.mean_, ours.estimator.scale_
    with threadpool_limits(1):
        reference = LogisticRegression(C=1 / (penalty * len(fit)), max_iter=5000, tol=1e-8).fit(
            (features[fit] - mean) / scale, labels[fit])
    theirs = reference.score((features[parts.test] - mean) / scale, labels[parts.test])
    assert abs(ours.metrics["top1"] - theirs) <= 0.02, (ours.metrics["top1"], theirs)
    assert ours.to_dict()["converged"] and not ours.notes


def test_a_sweep_that_chooses_the_edge_of_its_grid_says_so():
    result = probe_arrays(*_arrays(), penalties=[1e-3, 1e-2])  # two values: the best is an edge
    assert result.sweep.at_edge in ("strongest", "weakest")
    assert result.to_dict()["sweep"]["at_edge"] == result.sweep.at_edge
    assert any("--penalties" in note and result.sweep.at_edge in note for note in result.notes), result.notes


def test_a_sweep_that_chooses_inside_its_grid_adds_no_note():
    from embedcache.heads.sweep import SweepResult

    inside = SweepResult([1e-1, 1e-2, 1e-3], [0.5, 0.9, 0.7], [1, 1, 1], [0.0] * 3, 1e-2, 0.9)
    assert inside.at_edge is None
    assert SweepResult([1e-1, 1e-2, 1e-3], [0.5, 0.7, 0.9], [1, 1, 1], [0.0] * 3, 1e-3, 0.9).at_edge == "weakest"
    assert protocol_mod.fit_notes(inside, None) == []
