"""Kill -9 an extraction at a random moment, rerun it, and compare with an uninterrupted run.

    python scripts/check_kill_resume.py DATA [--backbone efficientnet_lite0] [--batch-size 64]
                                       [--seed 0] [--kills 1]

Runs `embedcache extract` in a subprocess, SIGKILLs it at a random moment after the first rows
were committed (``--kills`` times in a row), reruns it to completion and checks the features are
bitwise identical to a run that was never interrupted (same batch size). Prints what it saw.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from embedcache.store.reader import FeatureStore


def committed_rows(cache: Path) -> int:
    for partial in cache.glob("*.partial"):
        try:
            with h5py.File(partial, "r", locking=False) as handle:
                return int(handle["done"][...].sum())
        except (OSError, KeyError):
            return 0
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--batch-size", default="64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kills", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        ref_cache, cache = Path(tmp) / "reference", Path(tmp) / "killed"
        base = [sys.executable, "-m", "embedcache", "extract", args.data, "-b", args.backbone,
                "--batch-size", args.batch_size]
        started = time.perf_counter()
        subprocess.run([*base, "--cache-dir", str(ref_cache)], check=True, capture_output=True)
        full_seconds = time.perf_counter() - started
        print(f"uninterrupted run: {full_seconds:.1f} s")
        for kill in range(args.kills):
            before = committed_rows(cache)
            proc = subprocess.Popen([*base, "--cache-dir", str(cache)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            while committed_rows(cache) <= before and proc.poll() is None:
                time.sleep(0.05)
            delay = rng.uniform(0, 0.4 * full_seconds)
            time.sleep(delay)
            if proc.poll() is not None:
                print(f"kill {kill + 1}: the run finished before the kill; try another --seed")
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            print(f"kill {kill + 1}: SIGKILL {delay:.1f} s after this run's first commit; "
                  f"{committed_rows(cache)} rows committed in total")
        result = subprocess.run([*base, "--cache-dir", str(cache)], capture_output=True, text=True)
        print("rerun:", result.stdout.strip())
        if result.returncode != 0:
            sys.exit(f"rerun failed: {result.stderr.strip()}")
        reference = FeatureStore.open(next(ref_cache.glob("*.h5")))
        resumed = FeatureStore.open(next(cache.glob("*.h5")))
        identical = np.array_equal(reference.features, resumed.features) and np.array_equal(
            reference.paths, resumed.paths)
        print(f"features bitwise identical to the uninterrupted run: {identical} "
              f"({len(resumed)} rows x {resumed.features.shape[1]})")
        if not identical:
            sys.exit(1)


if __name__ == "__main__":
    main()
