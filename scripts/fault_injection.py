"""Fault injection, end to end: kill -9 at random points, a full disk (a file-size limit, and a real
ENOSPC on a small tmpfs when run as root), flipped bytes, planted links.

    python scripts/fault_injection.py [--seed 0] [--kills 3] [--flips 200] [--only NAME] [--keep DIR]

Every case runs the real CLI (``python -m embedcache``) in subprocesses on small generated
images with the repository's tiny test backbones, and checks the promise of the README's
"Reliability" section. Prints one line per case, PASS or FAIL with the reason, and exits 1 if
any case failed. About 2-4 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from embedcache.store.reader import FeatureStore  # noqa: E402
from tests.tiny_backbone import make_image_folder  # noqa: E402

SLOW = "tests.tiny_backbone:slow_factory"  # 0.25 s per batch: room to kill it mid-run
TINY = "tests.tiny_backbone:tiny_factory"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


class CaseFailed(Exception):
    """A promise that did not hold."""


def cli(*args: str, timeout: float = 300, preexec: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embedcache", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "embedcache", *args], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def one_clean_line(result: subprocess.CompletedProcess) -> bool:
    """Failed with exit 1 and a one-line ``Error: ...`` as the last line of stderr (progress bars
    may come before it), no traceback."""
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    return result.returncode == 1 and "Traceback" not in result.stderr and last.startswith("Error:")


def wait_for(directory: Path, pattern: str, timeout: float = 60) -> None:
    """Until a file matching ``pattern`` exists in ``directory`` (a run got past its start-up)."""
    deadline = time.time() + timeout
    while time.time() < deadline and not list(directory.glob(pattern)):
        time.sleep(0.05)


def entry(cache: Path) -> Path:
    found = sorted(cache.glob("*.h5"))
    if len(found) != 1:
        raise AssertionError(f"expected one entry in {cache}, found {[p.name for p in found]}")
    return found[0]


# --------------------------------------------------------------------------- cases


def kill_during_extract(work: Path, rng: random.Random, kills: int) -> str:
    data = make_image_folder(work / "data", per_class=30, split_dirs=True)
    args = ["extract", str(data), "-b", SLOW, "--batch-size", "2", "--workers", "0"]
    reference = cli(*args, "--cache-dir", str(work / "ref"))
    if reference.returncode:
        raise CaseFailed(f"reference run failed: {reference.stderr.strip()}")
    for _ in range(kills):
        proc = start(*args, "--cache-dir", str(work / "c"))
        wait_for(work / "c", "*.partial")  # past start-up: the kill lands in the loop
        time.sleep(rng.uniform(0.2, 4.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if list((work / "c").glob("*.h5")):
            break  # it finished before the kill: nothing more to resume
    final = cli(*args, "--cache-dir", str(work / "c"))
    if final.returncode:
        raise CaseFailed(f"rerun after kill -9 failed: {final.stderr.strip()}")
    a, b = FeatureStore.open(entry(work / "ref")), FeatureStore.open(entry(work / "c"))
    if not np.array_equal(a.features, b.features):
        raise CaseFailed("features after kill -9 + rerun differ from an uninterrupted run")
    return f"{kills} kills at random moments, rerun resumed ({final.stdout.strip()[:60]}...), features bitwise equal"


def sigint_during_extract(work: Path, rng: random.Random) -> str:
    data = make_image_folder(work / "data", per_class=30, split_dirs=True)
    args = ["extract", str(data), "-b", SLOW, "--batch-size", "2", "--workers", "0", "--cache-dir", str(work / "c")]
    proc = start(*args)
    wait_for(work / "c", "*.partial")
    time.sleep(rng.uniform(0.5, 3.0))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode != 130 or "Traceback" in err:
        raise CaseFailed(f"SIGINT gave exit {proc.returncode} (expected 130): {err.strip()[-200:]}")
    if not list((work / "c").glob("*.partial")):
        raise CaseFailed("no partial kept after SIGINT")
    again = cli(*args)
    if "resumed" not in again.stdout:
        raise CaseFailed(f"no resume after SIGINT: {again.stdout.strip()}")
    return "exit 130, progress kept, rerun resumed"


def kill_during_probe(work: Path, rng: random.Random, kills: int) -> str:
    data = make_image_folder(work / "data", per_class=40, split_dirs=True)
    cache = work / "c"
    if cli("extract", str(data), "-b", TINY, "--workers", "0", "--cache-dir", str(cache)).returncode:
        raise CaseFailed("extraction failed")
    key = entry(cache).name[:8]
    out = work / "probe"
    first = cli("probe", key, "--cache-dir", str(cache), "--out", str(out), "--penalty", "0.01")
    if first.returncode:
        raise CaseFailed(f"probe failed: {first.stderr}")
    from embedcache.experiments.artifacts import load_probe

    for _ in range(kills):
        proc = subprocess.Popen([sys.executable, "-m", "embedcache", "probe", key, "--cache-dir", str(cache),
                                 "--out", str(out)], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 3.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        try:
            loaded = load_probe(out)
        except Exception as exc:  # noqa: BLE001 - any failure to load is what this case looks for
            raise CaseFailed(f"probe directory unusable after kill -9: {exc}") from exc
        if loaded.metadata.get("penalty") is None:
            raise CaseFailed("probe.json lost its penalty")
    return f"{kills} kills during `probe --out`: the directory always loaded as one consistent probe"


def kill_during_finetune(work: Path, rng: random.Random) -> str:
    data = make_image_folder(work / "data", per_class=40, split_dirs=True)
    cache = work / "c"
    cli("extract", str(data), "-b", TINY, "--workers", "0", "--cache-dir", str(cache), "--precision", "fp32")
    key = entry(cache).name[:8]
    cli("probe", key, "--cache-dir", str(cache), "--out", str(work / "p"), "--penalty", "0.01")
    args = ["finetune", str(work / "p"), str(data), "--epochs", "3", "--workers", "0", "--batch-size", "8",
            "--cache-dir", str(cache)]
    reference = cli(*args, "--out", str(work / "ref"))
    if reference.returncode:
        raise CaseFailed(f"reference fine-tune failed: {reference.stderr.strip()[-200:]}")
    proc = start(*args, "--out", str(work / "ft"))
    wait_for(work / "ft", "checkpoint.pt")
    time.sleep(rng.uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = cli(*args, "--out", str(work / "ft"))
    if again.returncode:
        raise CaseFailed(f"resume failed: {again.stderr.strip()[-200:]}")
    a = json.loads((work / "ref" / "finetune.json").read_text())
    b = json.loads((work / "ft" / "finetune.json").read_text())
    if [r["val_top1"] for r in a["epochs"]] != [r["val_top1"] for r in b["epochs"]] or a["test"]["top1"] != b["test"]["top1"]:
        raise CaseFailed("resumed fine-tune differs from the uninterrupted one")
    return "killed after a checkpoint, rerun resumed, same val curve and test score"


def disk_full(work: Path) -> str:
    data = make_image_folder(work / "data", per_class=30, split_dirs=True)
    cache = work / "c"
    small = make_image_folder(work / "small", per_class=2, split_dirs=True)
    older = cli("extract", str(small), "-b", TINY, "--workers", "0", "--cache-dir", str(cache))
    if older.returncode:
        raise CaseFailed(f"older entry failed: {older.stderr}")
    older_entry = entry(cache)
    before = older_entry.read_bytes()
    limit = os.path.getsize(older_entry) + 20_000  # room for the older entry's size, not for the new one

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    full = cli("extract", str(data), "-b", "pixels", "--image-size", "64", "--workers", "0",
               "--cache-dir", str(cache), preexec=cap)
    if not one_clean_line(full) or "no room" not in full.stderr.lower():
        raise CaseFailed(f"disk full: exit {full.returncode}, stderr {full.stderr.strip()[-300:]!r}")
    if [p for p in cache.glob("*.h5") if p != older_entry] or older_entry.read_bytes() != before:
        raise CaseFailed("a new entry was published or the older one changed")
    hit = cli("extract", str(small), "-b", TINY, "--workers", "0", "--cache-dir", str(cache))
    if "cache hit" not in hit.stdout:
        raise CaseFailed("the older entry is no longer a cache hit")
    return f"one clean error ({full.stderr.strip().splitlines()[-1][:100]}...), nothing published, the older entry intact"


class Skipped(Exception):
    """A case this machine cannot run (says why)."""


def _mount_tmpfs(where: Path, size: int) -> None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode:
        raise Skipped(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()[:120]}")


def disk_full_tmpfs(work: Path) -> str:
    """A real ENOSPC: the cache dir and a probe directory on a 1.5 MB tmpfs."""
    data = make_image_folder(work / "data", per_class=40, split_dirs=True)
    small = make_image_folder(work / "small", per_class=10, split_dirs=True)
    disk = work / "disk"
    _mount_tmpfs(disk, 1_500_000)
    try:
        cache, out = disk / "c", disk / "p"
        older = cli("extract", str(small), "-b", TINY, "--workers", "0", "--store-dtype", "float32",
                    "--cache-dir", str(cache))
        if older.returncode:
            raise CaseFailed(f"older entry failed: {older.stderr.strip()[-300:]}")
        older_entry = entry(cache)
        first = cli("probe", str(older_entry), "--penalty", "0.01", "--out", str(out))
        if first.returncode:
            raise CaseFailed(f"first probe failed: {first.stderr.strip()[-300:]}")
        probe_before = {p.name: p.read_bytes() for p in out.iterdir()}
        entry_before = older_entry.read_bytes()
        filler = disk / "filler"  # leave less room than the next extraction needs
        with open(filler, "wb") as handle:
            while True:
                try:
                    handle.write(b"\0" * 65536)
                    handle.flush()
                except OSError:
                    break
        filler.write_bytes(b"\0" * max(0, filler.stat().st_size - 200_000))
        full = cli("extract", str(data), "-b", "pixels", "--image-size", "64", "--workers", "0",
                   "--cache-dir", str(cache))
        if not one_clean_line(full) or "room" not in full.stderr.lower():
            raise CaseFailed(f"extract on a full tmpfs: exit {full.returncode}, {full.stderr.strip()[-300:]!r}")
        if [p for p in cache.glob("*.h5") if p != older_entry] or older_entry.read_bytes() != entry_before:
            raise CaseFailed("a new entry was published or the older one changed")
        filler.write_bytes(b"\0" * max(0, filler.stat().st_size + 190_000))  # nearly nothing left
        again = cli("probe", str(older_entry), "--penalty", "0.5", "--out", str(out))
        if again.returncode == 0:
            raise CaseFailed("probe --out succeeded on a full disk; the case did not fill it")
        if not one_clean_line(again):
            raise CaseFailed(f"probe --out on a full tmpfs: exit {again.returncode}, {again.stderr.strip()[-300:]!r}")
        if {p.name: p.read_bytes() for p in out.iterdir()} != probe_before:
            raise CaseFailed("the previous probe directory changed")
        hit = cli("extract", str(small), "-b", TINY, "--workers", "0", "--store-dtype", "float32",
                  "--cache-dir", str(cache))
        if "cache hit" not in hit.stdout:
            raise CaseFailed("the older entry is no longer a cache hit")
        return (f"extract: {full.stderr.strip().splitlines()[-1][:90]}...; probe --out refused with the old "
                f"probe intact; the older entry still a hit")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def flipped_bytes(work: Path, rng: random.Random, flips: int) -> str:
    data = make_image_folder(work / "data", per_class=12, split_dirs=True)
    cache = work / "c"
    cli("extract", str(data), "-b", TINY, "--workers", "0", "--cache-dir", str(cache))
    good = entry(cache)
    reference = FeatureStore.open(good)
    raw = good.read_bytes()
    silent = caught = harmless = 0
    for position in rng.sample(range(len(raw)), min(flips, len(raw))):
        damaged = bytearray(raw)
        damaged[position] ^= 1 << rng.randrange(8)
        copy = work / "x" / good.name
        copy.parent.mkdir(exist_ok=True)
        copy.write_bytes(bytes(damaged))
        try:
            store = FeatureStore.open(copy)
        except Exception as exc:  # noqa: BLE001 - only CacheError is an acceptable refusal
            if type(exc).__name__ not in ("CacheError", "CorruptEntryError"):
                raise CaseFailed(f"byte {position}: {type(exc).__name__} instead of a named error: {exc}") from exc
            caught += 1
            continue
        same = (np.array_equal(store.features, reference.features) and np.array_equal(store.labels, reference.labels)
                and list(store.paths) == list(reference.paths) and store.attrs == reference.attrs
                and np.array_equal(store.splits, reference.splits) and store.errors == reference.errors)
        harmless += same
        silent += not same
    if silent:
        raise CaseFailed(f"{silent} of {flips} flipped bytes were served as different data")
    shutil.copy(work / "x" / good.name, good)  # leave a damaged entry in place: extract must recompute it
    damaged = bytearray(raw)
    with h5py.File(good, "r") as f:
        offset = f["features"].id.get_chunk_info(0).byte_offset  # inside the first block of rows
    damaged[offset + 3] ^= 0xFF
    good.write_bytes(bytes(damaged))
    verify = cli("verify", good.name[:8], "--cache-dir", str(cache))
    again = cli("extract", str(data), "-b", TINY, "--workers", "0", "--cache-dir", str(cache))
    if verify.returncode != 1 or "computed again" not in again.stderr + again.stdout:
        raise CaseFailed(f"verify exit {verify.returncode}; extract after corruption: {again.stderr.strip()[-200:]}")
    if not np.array_equal(FeatureStore.open(entry(cache)).features, reference.features):
        raise CaseFailed("the recomputed entry differs")
    return f"{flips} random bit flips: {caught} refused by checksums, {harmless} harmless, 0 served; verify fails, extract recomputes"


def planted_links(work: Path) -> str:
    data = make_image_folder(work / "data", per_class=6, split_dirs=True)
    cache = work / "c"
    outside = work / "outside.bin"
    outside.write_bytes(b"precious" * 100)
    from embedcache.extraction.plan import plan_extraction

    plan = plan_extraction(str(data), backbone=TINY, cache_dir=cache)
    cache.mkdir(parents=True, exist_ok=True)
    plan.partial_path.symlink_to(outside)
    result = cli("extract", str(data), "-b", TINY, "--workers", "0", "--cache-dir", str(cache))
    if result.returncode or outside.read_bytes() != b"precious" * 100:
        raise CaseFailed("extract wrote through a planted .partial symlink (or failed)")
    lock = plan.final_path.with_name(plan.final_path.name + ".lock")
    plan.final_path.unlink()
    lock.unlink(missing_ok=True)
    lock.symlink_to(outside)
    locked = cli("extract", str(data), "-b", TINY, "--workers", "0", "--cache-dir", str(cache))
    if outside.read_bytes() != b"precious" * 100 or not one_clean_line(locked):
        raise CaseFailed("the lock file followed a planted symlink (or no clean error)")
    lock.unlink()
    cli("extract", str(data), "-b", TINY, "--workers", "0", "--cache-dir", str(cache))
    out = work / "probe"
    out.mkdir()
    for name in ("probe.json", "report.json", "probe.safetensors", "confusion.png"):
        (out / name).symlink_to(outside)
    probed = cli("probe", plan.cache_key[:8], "--cache-dir", str(cache), "--out", str(out), "--penalty", "0.01")
    if probed.returncode or outside.read_bytes() != b"precious" * 100:
        raise CaseFailed(f"probe --out wrote through planted symlinks: {probed.stderr.strip()[-200:]}")
    return "planted .partial, .lock and --out links never written through"


def concurrent_writers(work: Path) -> str:
    data = make_image_folder(work / "data", per_class=30, split_dirs=True)
    args = ["extract", str(data), "-b", SLOW, "--batch-size", "2", "--workers", "0", "--cache-dir", str(work / "c")]
    first = start(*args)
    wait_for(work / "c", "*.partial")
    second = cli(*args)
    first.send_signal(signal.SIGKILL)
    first.wait()
    if not one_clean_line(second) or "pid" not in second.stderr:
        raise CaseFailed(f"second writer: exit {second.returncode}, {second.stderr.strip()[-200:]}")
    return "the second writer failed at once naming the first's pid"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--flips", type=int, default=200)
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this")
    parser.add_argument("--keep", type=Path, default=None, help="keep the work directories here")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    cases = {
        "kill -9 during extract": lambda w: kill_during_extract(w, rng, args.kills),
        "SIGINT during extract": lambda w: sigint_during_extract(w, rng),
        "kill -9 during probe --out": lambda w: kill_during_probe(w, rng, args.kills),
        "kill -9 during finetune": lambda w: kill_during_finetune(w, rng),
        "disk full (RLIMIT_FSIZE)": disk_full,
        "disk full (1.5 MB tmpfs)": disk_full_tmpfs,
        "flipped bytes": lambda w: flipped_bytes(w, rng, args.flips),
        "planted symlinks": planted_links,
        "two writers": concurrent_writers,
    }
    if args.only:
        cases = {name: case for name, case in cases.items() if args.only in name}
    root = Path(args.keep or tempfile.mkdtemp(prefix="embedcache-faults-"))
    failures, skipped, started = 0, 0, time.perf_counter()
    for name, case in cases.items():
        work = root / "".join(c if c.isalnum() else "_" for c in name)
        work.mkdir(parents=True, exist_ok=True)
        case_started = time.perf_counter()
        try:
            message, ok = case(work), True
        except CaseFailed as exc:
            message, ok = str(exc), False
        except Skipped as exc:
            print(f"SKIP  {name:<28} {exc}", flush=True)
            skipped += 1
            continue
        except Exception as exc:  # noqa: BLE001 - a crashing case is a failing case
            message, ok = f"{type(exc).__name__}: {exc}", False
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name:<28} {time.perf_counter() - case_started:5.1f} s  {message}", flush=True)
    print(f"\n{len(cases) - failures - skipped} passed, {failures} failed, {skipped} skipped "
          f"in {time.perf_counter() - started:.0f} s")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
