"""Extraction throughput, measured side by side in one run on the same images.

    python benchmarks/extract_throughput.py [--n 2048] [--backbone efficientnet_lite0] [--weights TAG]
                                            [--image-size 224] [--repeats 3]
                                            [--runtimes torch,openvino,onnxruntime]

Prints images/s for
  (a) ceiling   the model alone on preloaded, preprocessed tensors (same precision/layout as ours),
                for torch and, per runtime asked for, its export under plain OpenVINO / plain
                ONNX Runtime (ONNX Runtime at fp32, the only precision it runs)
  (b) ours      `embedcache.extract(...)` end to end from PNG files into a fresh cache entry, once
                per runtime (OpenVINO and ONNX Runtime with their exports already cached: each
                export's one-off seconds are printed separately)
  (c) tutorial  the torchvision-tutorial loop: ImageFolder + Compose, fp32, NCHW, batch 32
and the ratios b/a and b/c (medians over --repeats). Images are Fashion-MNIST test images written
as gray PNG class folders (apt-get install dataset-fashion-mnist; --rgb-images: as RGB PNGs, the
workload of runs before 2026-12-03), or random RGB images with --synthetic.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import embedcache
from embedcache.models.build import get_backbone
from embedcache.models.fuse import fold_batchnorms
from embedcache.models.preprocess import normalize_batch, to_uint8_tensor
from embedcache.models.runtimes import openvino_installed, resolve_runtime_precision
from embedcache.runtime import (
    default_workers,
    resolve_device,
    resolve_precision,
    reuse_freed_memory,
)

FASHION_ROOT = "/usr/share/datasets/fashion-mnist"


def write_images(dest: Path, n: int, synthetic: bool, rgb: bool = False) -> None:
    """Fashion-MNIST test images as gray PNG class folders (RGB PNGs of the same pixels with
    ``rgb``), or random RGB images with ``synthetic``."""
    if synthetic:
        rng = np.random.default_rng(0)
        for i in range(n):
            folder = dest / f"class{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
        return
    from embedcache.sources.materialize import write_image_folder
    from embedcache.sources.open import open_source

    source = open_source(f"torchvision:FashionMNIST:{FASHION_ROOT}")
    write_image_folder(source, dest, limit_per_split={2: n})  # test split only, stratified
    if rgb:
        for path in image_files(dest):
            with Image.open(path) as image:
                image.convert("RGB").save(path)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.png"))


def time_ceiling(bb, files: list[Path], batch_size: int, device, precision: str) -> float:
    """Model-only: every image decoded and preprocessed beforehand; only forward passes timed."""
    batch = torch.stack([to_uint8_tensor(Image.open(f).convert("RGB"), bb.preprocess) for f in files])
    # The same module embedcache runs (BatchNorm folded), so (a) is the ceiling for (b).
    model = fold_batchnorms(bb.module, input_size=bb.preprocess.crop_size)
    model = model.to(device).to(memory_format=torch.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    # freed activations kept in the heap, as embedcache's loop does (without it every large
    # activation is a fresh mmap the kernel zeroes: the "ceiling" ran slower than extract itself)
    reuse = reuse_freed_memory() if device.type == "cpu" else contextlib.nullcontext()
    with reuse, torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                       enabled=dtype is not None):
        model(normalize_batch(batch[:batch_size].to(device), bb.preprocess).contiguous(memory_format=torch.channels_last))  # warm-up
        started = time.perf_counter()
        for start in range(0, len(files), batch_size):
            x = normalize_batch(batch[start : start + batch_size].to(device), bb.preprocess)
            model(x.contiguous(memory_format=torch.channels_last)).float().cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return len(files) / (time.perf_counter() - started)


#: The runtimes that run an export, and their labels.
EXPORTED = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime"}


def exported_model(runtime: str, bb, exports: Path):
    """``runtime``'s model of the export cached in ``exports`` (made on the first call), at the
    precision ``extract`` gives it by default (OpenVINO: as torch; ONNX Runtime: fp32)."""
    if runtime == "openvino":
        from embedcache.models.openvino_backbone import openvino_backbone as build
    else:
        from embedcache.models.onnx_backbone import onnx_backbone as build
    return build(bb, precision=resolve_runtime_precision(runtime, "auto", "cpu"), exports_dir=exports)


def time_ceiling_exported(runtime: str, bb, files: list[Path], batch_size: int, exports: Path) -> float:
    """Model-only under the plain runtime: the cached export, preloaded uint8 batches, forward passes timed."""
    batch = torch.stack([to_uint8_tensor(Image.open(f).convert("RGB"), bb.preprocess) for f in files])
    model = exported_model(runtime, bb, exports)
    model(batch[:batch_size])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(files), batch_size):
        model(batch[start : start + batch_size])
    seconds = time.perf_counter() - started
    model.close()
    return len(files) / seconds


def time_ours(root: Path, args, workers: int, runtime: str, exports: Path | None) -> tuple[float, dict]:
    """``embedcache.extract`` end to end into a fresh cache (holding a copy of ``exports``)."""
    with tempfile.TemporaryDirectory() as cache:
        if exports is not None:  # the export is made once per backbone configuration: not timed here
            shutil.copytree(exports, Path(cache) / "exports")
        started = time.perf_counter()
        store = embedcache.extract(root, backbone=args.backbone, weights=args.weights, image_size=args.image_size,
                                   batch_size=args.batch_size, workers=workers, cache_dir=cache, runtime=runtime)
        seconds = time.perf_counter() - started
    if store.cache_hit:
        raise SystemExit("a fresh cache directory gave a cache hit: the benchmark is broken")
    return len(store) / seconds, store.stats


def time_tutorial(root: Path, bb, workers: int, device) -> float:
    """The loop most tutorials teach (and our seeds use): ImageFolder + Compose, fp32, NCHW, 32."""
    from torchvision import datasets, transforms

    spec = bb.preprocess
    transform = transforms.Compose([
        transforms.Resize(spec.resize_size),
        transforms.CenterCrop(spec.crop_size),
        transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])
    started = time.perf_counter()
    dataset = datasets.ImageFolder(str(root), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=False, num_workers=workers)
    model = bb.module.to(device)
    feats = []
    with torch.no_grad():
        for x, _ in loader:
            feats.append(model(x.to(device)).cpu())
    torch.cat(feats)
    return len(dataset) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default=None, help="weights tag (e.g. none: seeded random init, offline)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--rgb-images", action="store_true",
                        help="write the (gray) Fashion-MNIST images as RGB PNGs, as runs before 2026-12-03 did")
    parser.add_argument("--runtimes", default=None,
                        help="comma-separated: torch, openvino, onnxruntime (default: torch, and openvino "
                             "when installed)")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()

    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    workers = default_workers() if args.workers is None else args.workers
    bb = get_backbone(args.backbone, weights=args.weights, image_size=args.image_size)
    runtimes = ([r.strip() for r in args.runtimes.split(",") if r.strip()] if args.runtimes
                else ["torch"] + (["openvino"] if openvino_installed() and device.type == "cpu" else []))
    results: dict[str, list[float]] = {"ceiling": [], "tutorial": []}
    results.update({f"ours-{r}": [] for r in runtimes})
    exported = [r for r in runtimes if r in EXPORTED]
    export_seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        write_images(root, args.n, args.synthetic, rgb=args.rgb_images)
        files = image_files(root)
        exports = Path(tmp) / "exports"
        for runtime in exported:  # the one-off export, timed on its own
            started = time.perf_counter()
            exported_model(runtime, bb, exports).close()
            export_seconds[runtime] = time.perf_counter() - started
            results[f"ceiling-{runtime}"] = []
        for _ in range(args.repeats):
            results["ceiling"].append(time_ceiling(bb, files, args.batch_size, device, precision))
            for runtime in exported:
                results[f"ceiling-{runtime}"].append(
                    time_ceiling_exported(runtime, bb, files, args.batch_size, exports))
            for runtime in runtimes:
                rate, stats = time_ours(root, args, workers, runtime, exports if runtime in EXPORTED else None)
                results[f"ours-{runtime}"].append(rate)
            results["tutorial"].append(time_tutorial(root, bb, workers, device))
    med = {k: statistics.median(v) for k, v in results.items()}
    best = max(runtimes, key=lambda r: med[f"ours-{r}"])
    med["ours"] = med[f"ours-{best}"]
    machine = (f"{cpu_model()}, {os.cpu_count()} cores, "
               f"torch {torch.__version__}, device {device}, precision {precision}")
    print(f"machine: {machine}")
    print(f"images: {len(files)} PNG files, backbone {args.backbone} at {bb.preprocess.crop_size}px, "
          f"batch {args.batch_size}, workers {workers}, repeats {args.repeats} (median)")
    rows = [("ceiling", "(a) model only, preloaded, torch")]
    rows += [(f"ceiling-{r}", f"(a) model only, preloaded, {EXPORTED[r]}") for r in exported]
    rows += [(f"ours-{r}", f"(b) embedcache extract --runtime {r}") for r in runtimes]
    rows.append(("tutorial", "(c) tutorial loop, fp32 NCHW b32"))
    for name, label in rows:
        runs = ", ".join(f"{r:.0f}" for r in results[name])
        print(f"{label:<44} {med[name]:8.1f} img/s   runs: {runs}")
    for runtime, seconds in export_seconds.items():
        print(f"{EXPORTED[runtime]} export (once per backbone configuration, cached): {seconds:.1f} s")
    ceiling = max(med["ceiling"], *(med[f"ceiling-{r}"] for r in exported))
    print(f"best runtime: {best}; b/a = {med['ours'] / ceiling:.2f} (against the faster ceiling)   "
          f"b/c = {med['ours'] / med['tutorial']:.2f}")
    for runtime in exported:
        versus = (f"{runtime} / torch (end to end) = {med[f'ours-{runtime}'] / med['ours-torch']:.2f}   "
                  if "ours-torch" in med else "")
        print(f"{versus}ours-{runtime} / plain {EXPORTED[runtime]} model-only = "
              f"{med[f'ours-{runtime}'] / med[f'ceiling-{runtime}']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "runs": results, "median": med,
                                         "export_seconds": export_seconds, "b_over_a": med["ours"] / ceiling,
                                         "b_over_c": med["ours"] / med["tutorial"]}, indent=2))


if __name__ == "__main__":
    main()
