"""What the tests of the compiled runtimes (OpenVINO, ONNX Runtime) share: running a runtime's
real cases in their own pytest process, and the agreement checks against torch.

A runtime's cases (``case_*`` functions of a file beside this one) run in a new process: a
process that has run OpenVINO is not safe to fork, and the rest of the suite forks DataLoader
workers and subprocesses; ONNX Runtime's cases run apart the same way, so that neither runtime's
thread pool nor the ONNX exporter's state is left in the suite's process.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def run_cases(name: str, *, timeout: int = 900) -> None:
    """Run ``tests/extraction/<name>`` in a new pytest process; fail with its output unless every
    case passed and none was skipped."""
    cases = Path(__file__).with_name(name)
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o",
                             "python_functions=case_*", "-W", "ignore::FutureWarning", str(cases)],
                            cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of two feature matrices."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def check_demo_agreement(tmp_path: Path, runtime: str, *, precision: str = "auto") -> None:
    """The agreement bar on real data: per-row cosine >= 0.999 to torch's features and the
    probe's test accuracy within 0.3 points (1,500 of the demo's training images, all 1,000 test
    images, efficientnet_lite0 at 112 px to keep it under a minute), both runtimes at ``precision``."""
    from embedcache.experiments.protocol import probe
    from embedcache.extraction.extract import extract
    from embedcache.sources.arrays import DEMO_FILE

    with importlib.resources.as_file(importlib.resources.files("embedcache").joinpath("demo_data", DEMO_FILE)) as f:
        demo = dict(np.load(f))
    data = tmp_path / "demo1500.npz"
    np.savez(data, train_images=demo["train_images"][:1500], train_labels=demo["train_labels"][:1500],
             test_images=demo["test_images"], test_labels=demo["test_labels"], class_names=demo["class_names"])
    kw = dict(backbone="efficientnet_lite0", image_size=112, workers=0, cache_dir=tmp_path / "c", precision=precision)
    stores = {name: extract(data, runtime=name, **kw) for name in ("torch", runtime)}
    assert cosines(stores[runtime].features, stores["torch"].features).min() >= 0.999
    top1 = {name: probe(store, penalty=0.03).metrics["top1"] for name, store in stores.items()}
    assert abs(top1[runtime] - top1["torch"]) <= 0.003, top1


def check_export_cache(build: Callable[[Path], Any], exports: Path, *, files: list[str], weights: str,
                       backbone: str) -> None:
    """A runtime's cached export: ``build(exports_dir)`` exports once (the directory holds
    ``files`` and export.json, with the cache's permissions, not mkdtemp's 0o700), then reuses it;
    a flipped byte in ``weights`` (export.json's sha256 fails) and a directory replaced by a
    symlink are rebuilt, the symlink's target never written through."""
    first = build(exports)
    assert first.exported
    first.close()
    [directory] = exports.iterdir()
    assert directory == first.directory and sorted(p.name for p in directory.iterdir()) == sorted(
        ["export.json", *files])
    assert os.stat(directory).st_mode & 0o777 == 0o777 & ~_umask()
    assert not build(exports).exported

    damaged = directory / weights
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert build(exports).exported
    assert json.loads((directory / "export.json").read_text())["identity"]["backbone"]["name"] == backbone

    elsewhere = exports.parent / "elsewhere"
    os.rename(directory, elsewhere)
    directory.symlink_to(elsewhere, target_is_directory=True)
    before = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    assert build(exports).exported
    assert not directory.is_symlink() and directory.is_dir()
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir()} == before  # never written through


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_cli_round_trip(folder: Path, tmp_path: Path, monkeypatch: Any, runtime: str, extract_args: list[str], *,
                         shown: str) -> None:
    """``extract --runtime RUNTIME`` names it in its summary (``shown``: device/precision/runtime),
    ``probe`` records it, and ``predict`` runs the recorded runtime unless told otherwise."""
    from click.testing import CliRunner

    from embedcache.cli import main
    from embedcache.experiments import predict as predict_mod
    from tests.tiny_backbone import TINY

    monkeypatch.delenv("EMBEDCACHE_RUNTIME", raising=False)
    monkeypatch.setenv("EMBEDCACHE_DIR", str(tmp_path / "c"))
    runner = CliRunner()
    made = runner.invoke(main, ["extract", str(folder), "-b", TINY, "--workers", "0", "--runtime", runtime,
                                *extract_args, "--store-dtype", "float32"], catch_exceptions=False)
    assert made.exit_code == 0, made.output
    assert shown in made.output
    [entry] = (tmp_path / "c").glob("*.h5")
    probed = runner.invoke(main, ["probe", str(entry), "--penalty", "0.01", "--out", str(tmp_path / "p")],
                           catch_exceptions=False)
    assert probed.exit_code == 0, probed.output
    assert json.loads((tmp_path / "p" / "probe.json").read_text())["runtime"] == runtime

    used = []
    real = predict_mod.compute_features
    monkeypatch.setattr(predict_mod, "compute_features",
                        lambda *a, **kw: used.append((kw["runtime"], kw["precision"])) or real(*a, **kw))
    for extra in ([], ["--runtime", "torch"]):
        out = runner.invoke(main, ["predict", str(tmp_path / "p"), str(folder / "test"), *extra],
                            catch_exceptions=False)
        assert out.exit_code == 0, out.output
    assert [name for name, _ in used] == [runtime, "torch"]
    precision = json.loads((tmp_path / "p" / "probe.json").read_text())["precision"]
    assert [p for _, p in used] == [precision, precision]  # the recorded precision, both runs


def check_cached_export_runs_without_torch(tmp_path: Path, runtime: str) -> None:
    """A second extraction that finds the runtime's export cached (with the backbone's identity
    remembered) runs in a process where ``import torch`` fails, by the threads loop, and gives the
    first run's features bitwise (the first run exported and ran the DataLoader loop), with the
    same bad image recorded the same way."""
    import shutil

    from embedcache.extraction.extract import extract
    from embedcache.store.memo import MEMO_NAME
    from tests.tiny_backbone import make_image_folder

    folder = make_image_folder(tmp_path / "data", per_class=5, split_dirs=True)
    (folder / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    kw = dict(backbone="efficientnet_lite0", weights="none", image_size=64, runtime=runtime, batch_size=4,
              store_dtype="float32")
    first = extract(folder, cache_dir=tmp_path / "first", **kw)
    assert first.attrs["extract_loop"] == "dataloader" and first.stats.failed == 1
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    shutil.copytree(tmp_path / "first" / "exports", second_dir / "exports")
    shutil.copy(tmp_path / "first" / MEMO_NAME, second_dir / MEMO_NAME)
    hidden = tmp_path / "hidden"
    for name in ("torch", "torchvision", "sklearn"):
        (hidden / name).mkdir(parents=True)
        (hidden / name / "__init__.py").write_text(f"raise ImportError('{name} is not importable here')\n")
    code = (f"from embedcache.extraction.extract import extract\n"
            f"store = extract({str(folder)!r}, cache_dir={str(second_dir)!r}, **{kw!r})\n"
            f"print(store.attrs['extract_loop'], store.stats.failed, store.stats.runtime)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden), str(REPO)])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["threads", "1", runtime]
    from embedcache.store.reader import FeatureStore

    [entry] = second_dir.glob("*.h5")
    second = FeatureStore.open(entry)
    assert second.cache_key == first.cache_key
    np.testing.assert_array_equal(second.paths, first.paths)
    np.testing.assert_array_equal(second.features, first.features)
    assert second.errors == first.errors and "broken.png" in first.errors[0][1]
