"""The ray engine against one process, side by side in one run on the same images.

    python benchmarks/ray_vs_local.py [--data /tmp/fm10k] [--n 3000] [--small 500]
                                      [--image-size 112] [--batch-size 64] [--shard-size 512]
                                      [--concurrency 1] [--cpus 2]

Copies the first --n images (sorted paths) of a class-folder tree into a temporary folder and
extracts them with efficientnet_lite0 four ways, each into a fresh cache directory:
  local        `extract(...)` in this process (the default engine)
  ray          `extract(..., engine="ray")` on a local Ray (ray.init timed on its own)
  ray-small    the same on the first --small images, so that
               time(n) = fixed + n / rate  gives the ray engine's fixed start-up cost per run and
               its rate per backbone actor
  local-small  the single process on the --small images (its own fixed cost, for comparison)
and checks that the local and ray features are bitwise equal. Prints one JSON object.
Load from other jobs changes every number: `uptime` is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np


def copy_subset(source: Path, dest: Path, n: int) -> int:
    files = sorted(p for p in source.rglob("*.png") if p.is_file())[:n]
    for f in files:
        target = dest / f.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    return len(files)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def timed_extract(folder: Path, cache: Path, args: argparse.Namespace, **kw):
    from embedcache import extract

    started = time.perf_counter()
    store = extract(folder, backbone="efficientnet_lite0", image_size=args.image_size, batch_size=args.batch_size,
                    cache_dir=cache, workers=args.workers, **kw)
    return store, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/tmp/fm10k")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--small", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of the local engine")
    args = parser.parse_args()
    import ray

    before = uptime()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = copy_subset(Path(args.data), tmp / "data", args.n)
        small = copy_subset(Path(args.data), tmp / "small", args.small)
        # the backbone identity memo is per cache dir: warm it so no run pays the weights hash
        timed_extract(tmp / "small", tmp / "warm", args)
        local, t_local = timed_extract(tmp / "data", tmp / "c-local", args)
        local_small, t_local_small = timed_extract(tmp / "small", tmp / "c-local-small", args)
        started = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        t_init = time.perf_counter() - started
        kw = {"engine": "ray", "shard_size": args.shard_size, "concurrency": args.concurrency}
        sharded, t_ray = timed_extract(tmp / "data", tmp / "c-ray", args, **kw)
        _, t_ray_small = timed_extract(tmp / "small", tmp / "c-ray-small", args, **kw)
        ray.shutdown()
        equal = bool(np.array_equal(local.features, sharded.features)) and local.cache_key == sharded.cache_key
    rate = (n - small) / (t_ray - t_ray_small) if t_ray > t_ray_small else float("nan")
    fixed = t_ray - n / rate
    local_rate = (n - small) / (t_local - t_local_small) if t_local > t_local_small else float("nan")
    print(json.dumps({
        "uptime_before": before, "uptime_after": uptime(), "n": n, "small": small, "image_size": args.image_size,
        "batch_size": args.batch_size, "shard_size": args.shard_size, "concurrency": args.concurrency,
        "ray_cpus": args.cpus, "local_workers": args.workers, "precision": local.stats.precision,
        "local_s": round(t_local, 2), "local_small_s": round(t_local_small, 2),
        "ray_init_s": round(t_init, 2), "ray_s": round(t_ray, 2), "ray_small_s": round(t_ray_small, 2),
        "ray_over_local": round(t_ray / t_local, 3),
        "local_img_per_s_marginal": round(local_rate, 1), "ray_img_per_s_per_actor_marginal": round(rate, 1),
        "ray_fixed_s_per_run": round(fixed, 2), "features_bitwise_equal": equal,
        "cpu_count": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
