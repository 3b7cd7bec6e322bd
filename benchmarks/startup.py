"""Start-up and quick-command wall times: whole processes, as a user runs them.

    python benchmarks/startup.py FOLDER [--cache-dir DIR] [--repeats 7] [--load idle,busy]

Times, as medians of --repeats runs (each one a fresh process):
  help        embedcache --help
  version     embedcache --version
  ls          embedcache ls --cache-dir DIR
  cache hit   embedcache extract FOLDER --cache-dir DIR   (the entry exists: no model is built)
  import torch                                            (the floor of any command that needs torch)
With ``--load busy`` the same runs are repeated while another process holds one core
(``python -c "while True: pass"``). FOLDER is extracted once first when its entry is missing
(not timed). For the numbers in docs/benchmarks.md FOLDER held 10,000 Fashion-MNIST PNGs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

EMBEDCACHE = [sys.executable, "-m", "embedcache"]


def timed(command: list[str], repeats: int) -> list[float]:
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runs.append(time.perf_counter() - started)
    return runs


def commands(folder: str, cache_dir: str) -> dict[str, list[str]]:
    return {
        "help": [*EMBEDCACHE, "--help"],
        "version": [*EMBEDCACHE, "--version"],
        "ls": [*EMBEDCACHE, "ls", "--cache-dir", cache_dir],
        "cache hit": [*EMBEDCACHE, "extract", folder, "--cache-dir", cache_dir],
        "import torch": [sys.executable, "-c", "import torch"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--cache-dir", default="cache")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--load", default="idle,busy", help="comma-separated: idle, busy")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, load {os.getloadavg()[0]:.2f}")
    subprocess.run([*EMBEDCACHE, "extract", args.folder, "--cache-dir", args.cache_dir], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # make sure the entry exists
    for load in args.load.split(","):
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
        try:
            print(f"\n{load}: median (min-max) of {args.repeats} whole-process runs")
            for name, command in commands(args.folder, args.cache_dir).items():
                runs = timed(command, args.repeats)
                print(f"  {name:<14} {statistics.median(runs):6.2f} s   ({min(runs):.2f}-{max(runs):.2f})")
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()


if __name__ == "__main__":
    main()
