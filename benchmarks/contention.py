"""Every command idle and with one core held by another process, side by side in one run.

    python benchmarks/contention.py --repeats 3 [--code before=DIR --code after=DIR] [--only extract,probe]

Runs each command as a fresh ``python -m embedcache ...`` process, first on an idle machine,
then while a busy loop (``python -c "while True: pass"``) holds one core, and prints the
medians and the ratio contended/idle of the throughput (1.0 = unaffected). ``--code LABEL=DIR``
(repeatable) times other checkouts of embedcache (e.g. ``git archive main | tar -x -C
/tmp/before``), their runs alternating so that each sees the same machine; ``--env K=V`` adds
environment variables (e.g. OMP_NUM_THREADS=1). Before each run it waits (up to 30 s)
until nothing else keeps the cores busy, and says so when something still does.

Data (made once under ``--work``, by default /tmp/embedcache-contention): 750 and 200 PNGs
copied from ``--images`` (a ``train/`` + ``test/`` class-folder tree such as the README's
Fashion-MNIST folder), their cache entries and probes. The commands timed:

* extract: 750 images, efficientnet_lite0 at 224 px, a fresh cache directory each run (img/s of
  the model loop, as ``--json`` reports it);
* probe: the penalty sweep on ``--entry`` (default: the 750-image entry), seconds of the call;
* fewshot: the default k x seeds grid on the same entry, seconds of the call;
* finetune: one epoch on 160 training images at 64 px, seconds per epoch from finetune.json;
* predict: the 150 test images of the 750 through the saved probe, process seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = ("extract", "probe", "fewshot", "finetune", "predict")
#: Waiting for a quiet machine: at most this long, for a load below the expected one + this margin.
QUIET_TIMEOUT_S, QUIET_MARGIN = 30.0, 0.15


def busy_cores(seconds: float = 1.0) -> float:
    """Cores busy over ``seconds`` (from /proc/stat), whoever keeps them busy."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    cores = os.cpu_count() or 1
    return cores * (1 - (idle1 - idle0) / max(1, total1 - total0))


def wait_for_quiet(expected: float) -> float:
    """Wait until no more than ``expected`` cores (+ a margin) are busy: other people's work
    (a test suite, another benchmark) would make the idle column meaningless. Returns the load seen."""
    deadline = time.monotonic() + QUIET_TIMEOUT_S
    while True:
        load = busy_cores()
        if load <= expected + QUIET_MARGIN or time.monotonic() > deadline:
            if load > expected + QUIET_MARGIN:
                print(f"warning: {load:.2f} cores busy before a run (expected {expected:.0f})", flush=True)
            return load


def copy_subset(images: Path, dst: Path, per_class: dict[str, int]) -> None:
    if dst.exists():
        return
    for split, n in per_class.items():
        for cls in sorted(os.listdir(images / split)):
            (dst / split / cls).mkdir(parents=True)
            for name in sorted(os.listdir(images / split / cls))[:n]:
                shutil.copy2(images / split / cls / name, dst / split / cls / name)


class Runner:
    def __init__(self, code: Path, env: dict[str, str], work: Path) -> None:
        self.env = {**os.environ, "PYTHONPATH": str(code), **env}
        self.work = work

    def run(self, *args: str) -> tuple[float, str]:
        """(wall seconds, stdout) of ``python -m embedcache ARGS``."""
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "embedcache", *args], env=self.env, cwd=self.work,
                              capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"failed: embedcache {' '.join(args)}\n{done.stderr[-2000:]}")
        return seconds, done.stdout


def prepare(runner: Runner, images: Path, work: Path) -> dict[str, Path]:
    """Subsets, their entries (extracted with this checkout) and probes."""
    copy_subset(images, work / "img750", {"train": 60, "test": 15})
    copy_subset(images, work / "img200", {"train": 16, "test": 4})
    paths = {}
    for name, size in (("img750", "224"), ("img200", "64")):
        _, out = runner.run("extract", str(work / name), "--image-size", size, "--cache-dir", str(work / "cache"),
                            "--json")
        paths[name] = Path(json.loads(out)["path"])
        probe_dir = work / f"probe-{name}"
        if not (probe_dir / "probe.json").exists():
            runner.run("probe", str(paths[name]), "--out", str(probe_dir), "--json")
    return paths


def measure(runner: Runner, command: str, work: Path, entry: Path, extra: list[str]) -> tuple[float, str]:
    """One run of ``command``: (its throughput figure, unit); higher is better for img/s."""
    if command == "extract":
        cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))
        try:
            _, out = runner.run("extract", str(work / "img750"), "--cache-dir", str(cache), "--json", *extra)
        finally:
            shutil.rmtree(cache)
        return json.loads(out)["images_per_s"], "img/s"
    if command == "probe":
        _, out = runner.run("probe", str(entry), "--json", *extra)
        return json.loads(out)["total_seconds"], "s"
    if command == "fewshot":
        out_dir = work / "fewshot-out"
        runner.run("fewshot", str(entry), "--out", str(out_dir), *extra)
        return json.loads((out_dir / "fewshot.json").read_text())["seconds"], "s"
    if command == "finetune":
        out_dir = work / "finetune-out"
        runner.run("finetune", str(work / "probe-img200"), str(work / "img200"), "--epochs", "1", "--restart",
                   "--out", str(out_dir), "--cache-dir", str(work / "cache"), *extra)
        return json.loads((out_dir / "finetune.json").read_text())["seconds_per_epoch"], "s/epoch"
    if command == "predict":
        seconds, _ = runner.run("predict", str(work / "probe-img750"), str(work / "img750" / "test"), *extra)
        return seconds, "s"
    raise ValueError(command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=Path("/tmp/fm10k"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/embedcache-contention"))
    parser.add_argument("--code", action="append", default=[],
                        help="LABEL=DIR of a checkout to time (repeatable; runs alternate). Default: this one.")
    parser.add_argument("--entry", type=Path, default=None, help="Entry for probe and fewshot.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=",".join(COMMANDS))
    parser.add_argument("--env", action="append", default=[], help="K=V for every run.")
    parser.add_argument("--extra", default="", help="Arguments added to every command (e.g. '--threads 1').")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    env = dict(kv.split("=", 1) for kv in args.env)
    codes = dict(c.split("=", 1) for c in args.code) or {"this": str(Path(__file__).resolve().parents[1])}
    runners = {label: Runner(Path(code).resolve(), env, args.work) for label, code in codes.items()}
    entries = prepare(next(iter(runners.values())), args.images, args.work)
    entry = args.entry or entries["img750"]
    rows = []
    for command in [c for c in args.only.split(",") if c]:
        figures: dict[tuple[str, str], list[float]] = {}
        unit = ""
        for load in ("idle", "busy"):
            spinner = (subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None)
            try:
                for _ in range(args.repeats):
                    for label, runner in runners.items():  # alternating: both see the same machine
                        wait_for_quiet(1.0 if spinner else 0.0)
                        value, unit = measure(runner, command, args.work, entry, args.extra.split())
                        figures.setdefault((label, load), []).append(value)
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
        for label in runners:
            idle_runs, busy_runs = figures[(label, "idle")], figures[(label, "busy")]
            idle, busy = statistics.median(idle_runs), statistics.median(busy_runs)
            ratio = busy / idle if unit == "img/s" else idle / busy  # throughput kept under load
            rows.append((command, label, unit, idle, idle_runs, busy, busy_runs, ratio))
            print(f"{command:9s} {label:8s} idle {idle:8.2f} {unit} {fmt(idle_runs)}  busy {busy:8.2f} {unit} "
                  f"{fmt(busy_runs)}  kept {ratio:.2f}x", flush=True)
    print("\n| command | code | idle | one core busy | throughput kept |\n|---|---|---|---|---|")
    for command, label, unit, idle, idle_runs, busy, busy_runs, ratio in rows:
        print(f"| {command} | {label} | {idle:.2f} {unit} {fmt(idle_runs)} | {busy:.2f} {unit} {fmt(busy_runs)} "
              f"| {ratio:.2f}x |")


def fmt(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in values) + ")"


if __name__ == "__main__":
    main()
