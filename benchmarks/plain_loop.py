"""A peer: the plain script a competent user writes instead of embedcache, one whole process.

    python benchmarks/plain_loop.py FOLDER OUT.npy --runtime openvino --model EXPORT/model.xml
    python benchmarks/plain_loop.py FOLDER OUT.npy --runtime onnxruntime --model EXPORT/model.onnx
    python benchmarks/plain_loop.py FOLDER OUT.npy --runtime torch --backbone efficientnet_lite0

It lists FOLDER's images (sorted), decodes each with PIL to uint8 (shorter side resized to
--resize with --interpolation, centre crop --crop: the same decoding as ``embedcache extract``) in a thread
pool of one thread per core that runs ahead of the model, stacks batches of --batch-size and runs:

* ``openvino``: the given model (embedcache's cached export: uint8 NHWC in, normalisation and
  folded BatchNorm inside) compiled for the CPU with OpenVINO's default settings;
* ``onnxruntime``: the same export as ONNX under a default ``InferenceSession``;
* ``torch``: the strong hand-written torch loop -- the truncated backbone, BatchNorm folded,
  channels-last, ``inference_mode``, bf16 autocast where the CPU runs bf16 natively -- the model
  taken from embedcache (the loop around it is not);
* ``tutorial``: the loop the torchvision tutorial teaches (ImageFolder + Compose, a DataLoader
  with one worker per core, fp32, NCHW, batch 32, ``no_grad``), with the same backbone.

``--preloaded``: FOLDER is instead a uint8 ``(N, crop, crop, 3)`` .npy decoded beforehand, so the
process times start-up plus the model alone: the model-only ceiling process.

The features go to OUT.npy (float16, like a cache entry). It prints one JSON line with the
image count and the seconds from its first line to its last (the caller times the process too).
This script is timed by benchmarks/whole_process.py; it is not part of the package.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STARTED = time.perf_counter()

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def decode(path: Path, resize: int, crop: int, interpolation: str = "bilinear") -> np.ndarray:
    """uint8 (crop, crop, 3): RGB, shorter side to ``resize`` (``interpolation``), centre crop."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        w, h = image.size
        short, long = min(w, h), max(w, h)
        size = (resize, int(resize * long / short)) if w <= h else (int(resize * long / short), resize)
        if size != image.size:
            image = image.resize(size, Image.Resampling[interpolation.upper()])
        w, h = image.size
        left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
        return np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


def batches(files: list[Path], batch_size: int, resize: int, crop: int, interpolation: str):
    """Stacked uint8 batches in order, decoded by a thread pool ahead of the consumer."""
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        decoded = pool.map(lambda p: decode(p, resize, crop, interpolation), files)
        batch = []
        for array in decoded:
            batch.append(array)
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)


def openvino_model(path: str):
    import openvino as ov

    compiled = ov.Core().compile_model(path, "CPU")
    request = compiled.create_infer_request()

    def run(images: np.ndarray) -> np.ndarray:
        request.infer([images])
        return request.get_output_tensor(0).data.copy()

    return run


def onnxruntime_model(path: str):
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})[0]


def torch_model(backbone: str, weights: str | None, crop: int):
    import torch

    from embedcache.models.build import get_backbone
    from embedcache.models.fuse import fold_batchnorms

    bb = get_backbone(backbone, weights=weights, image_size=crop)
    model = fold_batchnorms(bb.module, input_size=crop).eval().to(memory_format=torch.channels_last)
    mean = torch.tensor(bb.preprocess.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(bb.preprocess.std).view(1, 3, 1, 1) * 255
    flags = Path("/proc/cpuinfo").read_text() if os.path.exists("/proc/cpuinfo") else ""
    bf16 = "amx_bf16" in flags or "avx512_bf16" in flags

    def run(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().sub_(mean).div_(std)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(x.contiguous(memory_format=torch.channels_last)).float().numpy()

    return run


def tutorial(folder: Path, backbone: str, weights: str | None, resize: int, crop: int,
             interpolation: str) -> list[np.ndarray]:
    import torch
    from torchvision import datasets, transforms

    from embedcache.models.build import get_backbone

    bb = get_backbone(backbone, weights=weights, image_size=crop)
    transform = transforms.Compose([transforms.Resize(resize, transforms.InterpolationMode[interpolation.upper()]), transforms.CenterCrop(crop), transforms.ToTensor(),
                                    transforms.Normalize(bb.preprocess.mean, bb.preprocess.std)])
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=os.cpu_count() or 1)
    model = bb.module.eval()
    with torch.no_grad():
        return [model(x).numpy().astype(np.float16) for x, _ in loader]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--runtime", choices=["openvino", "onnxruntime", "torch", "tutorial"], required=True)
    parser.add_argument("--preloaded", action="store_true", help="FOLDER is a uint8 .npy of decoded images")
    parser.add_argument("--model", help="the export (openvino: model.xml, onnxruntime: model.onnx)")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="torch only")
    parser.add_argument("--weights", default=None, help="torch only")
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--interpolation", choices=["nearest", "bilinear", "bicubic"], default="bilinear")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    if args.runtime == "tutorial":
        features = tutorial(args.folder, args.backbone, args.weights, args.resize, args.crop, args.interpolation)
        np.save(args.out, np.concatenate(features))
        print(json.dumps({"images": sum(len(f) for f in features), "seconds": time.perf_counter() - STARTED}))
        return
    if args.runtime == "openvino":
        run = openvino_model(args.model)
    elif args.runtime == "onnxruntime":
        run = onnxruntime_model(args.model)
    else:
        run = torch_model(args.backbone, args.weights, args.crop)
    if args.preloaded:
        images = np.load(args.folder, mmap_mode="r")
        stream = (np.ascontiguousarray(images[i:i + args.batch_size]) for i in range(0, len(images), args.batch_size))
    else:
        files = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in EXTENSIONS)
        stream = batches(files, args.batch_size, args.resize, args.crop, args.interpolation)
    features = [run(batch).astype(np.float16) for batch in stream]
    np.save(args.out, np.concatenate(features))
    print(json.dumps({"images": sum(len(f) for f in features), "seconds": time.perf_counter() - STARTED}))


if __name__ == "__main__":
    main()
