"""Whole processes, side by side on the same images: embedcache extract against its peers.

    python benchmarks/whole_process.py [--n 2048] [--backbone efficientnet_lite0] [--weights TAG]
                                       [--image-size 224] [--repeats 3] [--load idle,busy]
                                       [--skip tutorial,...]

Every number is the wall time of a fresh process, as a user runs it (imports, model build,
scanning, decoding, the model, writing), turned into images/s; medians over --repeats rounds, each
round running every contender once in turn (paired, so drift hits all alike). Contenders:

  ours-auto / ours-torch / ours-onnxruntime
                   ``embedcache extract FOLDER --runtime R`` into a cache directory that holds the
                   runtime's export and the backbone's remembered identity already (what the first
                   run of a configuration leaves; exporting is once per configuration), its entry
                   removed before every run (the export, checked once by the features comparison
                   run, stays: what every later run of a user finds)
  plain-openvino / plain-onnxruntime
                   benchmarks/plain_loop.py: PIL decoding in a thread pool, the same export under
                   the runtime's default settings
  plain-torch      the strong hand-written torch loop (folded BatchNorm, channels-last, bf16)
  tutorial         the torchvision tutorial loop (ImageFolder + Compose, fp32, NCHW, batch 32)
  ceiling-openvino the model-only ceiling process: plain_loop.py --preloaded on images decoded
                   beforehand (start-up + the model, no decoding)

With ``--load busy`` every round is repeated while ``python -c "while True: pass"`` holds one
core. Images are Fashion-MNIST test images written as gray PNG class folders
(apt-get install dataset-fashion-mnist; --rgb-images: the same pixels as RGB PNGs). The features of ours-auto and plain-openvino are
compared (per-row cosine) so that the race is over the same work.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from extract_throughput import cpu_model, image_files, write_images  # noqa: E402

#: The cache directory's memo of backbone identities (embedcache.store.memo.MEMO_NAME).
MEMO = "backbone-specs.json"
CONTENDERS = ("ours-auto", "ours-torch", "ours-onnxruntime", "plain-openvino", "plain-onnxruntime",
              "plain-torch", "tutorial", "ceiling-openvino")


def exports_for(args, exports: Path) -> dict[str, Path]:
    """Make (or reuse) the OpenVINO and ONNX exports in ``exports``; their model files."""
    from embedcache.models.build import get_backbone
    from embedcache.models.onnx_backbone import onnx_backbone
    from embedcache.models.openvino_backbone import openvino_backbone

    bb = get_backbone(args.backbone, weights=args.weights, image_size=args.image_size)
    ov = openvino_backbone(bb, precision="bf16", exports_dir=exports)
    ort = onnx_backbone(bb, precision="fp32", exports_dir=exports)
    files = {"openvino": ov.directory / "model.xml", "onnxruntime": ort.directory / "model.onnx"}
    ov.close()
    ort.close()
    return files, bb.preprocess


def decode_all(files: list[Path], preprocess, dest: Path) -> None:
    from PIL import Image

    from embedcache.models.preprocess import to_uint8_tensor

    arrays = [to_uint8_tensor(Image.open(f).convert("RGB"), preprocess).permute(1, 2, 0).numpy() for f in files]
    np.save(dest, np.stack(arrays))


def ours_command(args, root: Path, cache_dir: Path, runtime: str) -> list[str]:
    cmd = [sys.executable, "-m", "embedcache", "extract", str(root), "--backbone", args.backbone,
           "--cache-dir", str(cache_dir), "--runtime", runtime]
    if args.weights:
        cmd += ["--weights-tag", args.weights]
    if args.image_size:
        cmd += ["--image-size", str(args.image_size)]
    return cmd


def command(name: str, args, root: Path, work: Path, models: dict[str, Path], preprocess) -> list[str]:
    py = sys.executable
    if name.startswith("ours-"):
        return ours_command(args, root, work / "cache", name.split("-", 1)[1])
    plain = [py, str(HERE / "plain_loop.py")]
    size = ["--resize", str(preprocess.resize_size), "--crop", str(preprocess.crop_size),
            "--interpolation", preprocess.interpolation]
    model = ["--backbone", args.backbone] + (["--weights", args.weights] if args.weights else [])
    out = str(work / f"{name}.npy")
    if name == "ceiling-openvino":
        return [*plain, str(work / "decoded.npy"), out, "--runtime", "openvino", "--preloaded",
                "--model", str(models["openvino"]), *size]
    runtime = "tutorial" if name == "tutorial" else name.split("-", 1)[1]
    extra = ["--model", str(models[runtime])] if runtime in models else model
    return [*plain, str(root), out, "--runtime", runtime, *extra, *size]


def run_once(name: str, args, root: Path, work: Path, exports: Path, models, preprocess) -> float:
    cache = work / "cache"
    if name.startswith("ours-") and cache.is_dir():  # a user's cache directory: entries go, exports stay
        for entry in [*cache.glob("*.h5"), *cache.glob("*.h5.partial")]:
            entry.unlink()
    elif name.startswith("ours-"):  # what one earlier run of the configuration leaves: its export, its memo
        cache.mkdir(parents=True)
        shutil.copytree(exports, cache / "exports")
        if (exports.parent / MEMO).exists():
            shutil.copy(exports.parent / MEMO, cache / MEMO)
    cmd = command(name, args, root, work, models, preprocess)
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{' '.join(cmd)}\n{done.stderr[-3000:]}")
    return seconds


def ours_features(work: Path) -> np.ndarray:
    import h5py

    (entry,) = list((work / "cache").glob("*.h5"))
    with h5py.File(entry, "r") as fh:
        return fh["features"][...].astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="Fashion-MNIST test images written as PNGs (default 2048)")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="backbone name (default efficientnet_lite0)")
    parser.add_argument("--weights", default=None, help="weights tag; 'none' for torchvision models offline")
    parser.add_argument("--image-size", type=int, default=None, help="model input size (default: the backbone's)")
    parser.add_argument("--repeats", type=int, default=3, help="paired rounds per load; medians are printed")
    parser.add_argument("--load", default="idle,busy",
                        help="comma-separated: idle, busy (one core held by a spinning process)")
    parser.add_argument("--skip", default="", help=f"comma-separated contenders to leave out, of {', '.join(CONTENDERS)}")
    parser.add_argument("--rgb-images", action="store_true",
                        help="write the (gray) images as RGB PNGs, as benchmarks before 2026-12-03 did")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's seconds here")
    args = parser.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    contenders = [c for c in CONTENDERS if c not in skip]
    results: dict[str, dict[str, list[float]]] = {}
    # An installed package has its bytecode compiled (pip does it); an editable checkout run with
    # PYTHONDONTWRITEBYTECODE=1 would compile every module of embedcache in every process (0.1 s
    # measured), which the peers, importing installed packages only, never pay.
    import embedcache

    compileall.compile_dir(str(Path(embedcache.__file__).parent), quiet=1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root, work, exports = tmp / "images", tmp / "work", tmp / "state" / "exports"
        work.mkdir()
        write_images(root, args.n, synthetic=False, rgb=args.rgb_images)
        files = image_files(root)
        models, preprocess = exports_for(args, exports)
        # one earlier run of the configuration in the state directory: it remembers the backbone's identity
        run = subprocess.run(ours_command(args, root, exports.parent, "torch"), capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(run.stderr[-3000:])
        decode_all(files, preprocess, work / "decoded.npy")
        if {"ours-auto", "plain-openvino"} <= set(contenders):  # the same work: compare the features
            run_once("ours-auto", args, root, work, exports, models, preprocess)
            a = ours_features(work)
            run_once("plain-openvino", args, root, work, exports, models, preprocess)
            b = np.load(work / "plain-openvino.npy").astype(np.float32)
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
            print(f"ours-auto vs plain-openvino features: per-row cosine min {cos.min():.5f}, "
                  f"median {np.median(cos):.5f}")
        for load in args.load.split(","):
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
            try:
                runs = results.setdefault(load, {c: [] for c in contenders})
                for _ in range(args.repeats):
                    for name in contenders:
                        runs[name].append(len(files) / run_once(name, args, root, work, exports, models, preprocess))
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; images: {len(files)} Fashion-MNIST PNGs, "
          f"{args.backbone} at {preprocess.crop_size} px, whole processes, medians of {args.repeats}")
    medians = {load: {c: statistics.median(v) for c, v in runs.items()} for load, runs in results.items()}
    for load, med in medians.items():
        print(f"\n{load}:")
        for name in contenders:
            spread = ", ".join(f"{r:.0f}" for r in results[load][name])
            print(f"  {name:<18} {med[name]:7.1f} img/s   runs: {spread}")
        ours = med.get("ours-auto")
        if ours:
            for peer in ("plain-openvino", "plain-onnxruntime", "plain-torch", "tutorial", "ceiling-openvino"):
                if peer in med:
                    pairs = zip(results[load]["ours-auto"], results[load][peer], strict=True)
                    paired = statistics.median(a / b for a, b in pairs)
                    print(f"  ours-auto / {peer:<18} {ours / med[peer]:.2f}   (median of the rounds' ratios {paired:.2f})")
    if "idle" in medians and "busy" in medians:
        print("\nbusy / idle:")
        for name in contenders:
            print(f"  {name:<18} {medians['busy'][name] / medians['idle'][name]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "medians": medians}, indent=2))


if __name__ == "__main__":
    main()
