"""What storing several feature sets costs: ``extract --layers`` vs a plain extract, side by side.

    python benchmarks/feature_sets_speed.py DATA [--n 2048] [--layers stages] [--repeats 3]

DATA is a class-folder tree of images (the first --n files, sorted, are copied to a temporary
folder). Prints images/s, as medians over --repeats, of
  (a) model only   the two inference modules on the same preloaded batches, interleaved batch by batch
  (b) end to end   `embedcache.extract` into a fresh cache entry, plain and with --layers, alternating
and the ratios plain / layers (1.0 = free). Interleaving keeps other load on the machine from
favouring either side.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import embedcache
from embedcache.extraction.loop import inference_module
from embedcache.models.build import get_backbone
from embedcache.models.preprocess import normalize_batch, to_uint8_tensor
from embedcache.runtime import autocast, default_workers, resolve_device, resolve_precision


def copy_subset(data: Path, dest: Path, n: int) -> list[Path]:
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:n]
    for f in files:
        target = dest / f.relative_to(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    return files


def model_only(modules: dict, files: list[Path], preprocess, batch_size: int, device, precision: str,
               repeats: int) -> dict[str, list[float]]:
    batch = torch.stack([to_uint8_tensor(Image.open(f).convert("RGB"), preprocess) for f in files])
    seconds = {name: [0.0] * repeats for name in modules}
    with torch.inference_mode(), autocast(device, precision):
        for module in modules.values():  # warm-up
            module(normalize_batch(batch[:batch_size], preprocess).contiguous(memory_format=torch.channels_last))
        for r in range(repeats):
            for start in range(0, len(files), batch_size):
                x = normalize_batch(batch[start:start + batch_size].to(device), preprocess)
                x = x.contiguous(memory_format=torch.channels_last)
                for name, module in modules.items():
                    began = time.perf_counter()
                    module(x).float().cpu()
                    seconds[name][r] += time.perf_counter() - began
    return {name: [len(files) / s for s in values] for name, values in seconds.items()}


def end_to_end(root: Path, args, workers: int, layers: str | None) -> float:
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        store = embedcache.extract(root, backbone=args.backbone, layers=layers, batch_size=args.batch_size,
                                   workers=workers, cache_dir=cache)
        rate = len(store) / (time.perf_counter() - started)
        if store.cache_hit:
            raise SystemExit("unexpected cache hit")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--layers", default="stages")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = resolve_device("auto")
    precision = resolve_precision("auto", device)
    workers = default_workers() if args.workers is None else args.workers
    plain, multi = get_backbone(args.backbone), get_backbone(args.backbone, layers=args.layers)
    sets = ", ".join(f"{name} ({dim})" for name, dim in multi.feature_sets)
    modules = {"plain": inference_module(plain, device), "layers": inference_module(multi, device)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        files = copy_subset(args.data, root, args.n)
        ceiling = model_only(modules, [root / f.relative_to(args.data) for f in files], plain.preprocess,
                             args.batch_size, device, precision, args.repeats)
        e2e: dict[str, list[float]] = {"plain": [], "layers": []}
        for _ in range(args.repeats):
            e2e["plain"].append(end_to_end(root, args, workers, None))
            e2e["layers"].append(end_to_end(root, args, workers, args.layers))
    print(f"{len(files)} images, {args.backbone}, device {device}, precision {precision}, batch {args.batch_size}, "
          f"workers {workers}, {args.repeats} repeats (medians)")
    print(f"--layers {args.layers}: {len(multi.feature_sets)} extra sets, {sum(d for _, d in multi.feature_sets)} "
          f"extra columns: {sets}")
    for label, results in (("(a) model only", ceiling), ("(b) end to end", e2e)):
        med = {k: statistics.median(v) for k, v in results.items()}
        runs = "; ".join(f"{k}: " + ", ".join(f"{r:.0f}" for r in v) for k, v in results.items())
        print(f"{label:<16} plain {med['plain']:7.1f} img/s   layers {med['layers']:7.1f} img/s   "
              f"plain/layers = {med['plain'] / med['layers']:.2f}   ({runs})")


if __name__ == "__main__":
    main()
