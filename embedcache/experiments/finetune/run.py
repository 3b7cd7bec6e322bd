"""Fine-tuning: reload the full backbone, start the head from a trained probe (LP->FT), train end to end.

The probe fixes everything about the network: backbone name, weights (checked by hash),
truncation, preprocessing. The head is an ``nn.Linear`` initialised from the probe's
``coef_``/``intercept_`` (standardisation is already folded into them), so training starts from the
probe's accuracy instead of distorting the pretrained features with a random head's gradients.

A run lives in one ``out`` directory:

* ``checkpoint.pt``: model, optimiser, scheduler, grad scaler, epoch, best score, history and RNG
  state, written atomically after every epoch; the same command after an interruption resumes
  from it (a run with other settings is refused, ``restart=True`` starts over),
* ``best.pt``: the weights with the best validation accuracy among trained epochs,
* when done: ``backbone.safetensors`` (fine-tuned backbone, loadable with ``extract --weights``),
  ``probe.safetensors`` + ``probe.json`` (the head as a probe artifact: ``predict OUT`` works),
  ``finetune.json`` (the report) and ``curve.png`` when matplotlib is installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from embedcache.errors import CacheLockedError, ConfigError
from embedcache.experiments.artifacts import LoadedProbe, load_probe, save_finetuned
from embedcache.experiments.finetune.augment import TrainImages
from embedcache.experiments.finetune.config import FinetuneConfig
from embedcache.experiments.finetune.setup import FinetuneData, open_data, rebuild_backbone, run_key
from embedcache.experiments.finetune.train import (
    BEST,
    EpochProgress,
    Trainer,
    build_model,
    evaluate,
    make_optimiser,
    make_schedule,
    training_precision,
)
from embedcache.experiments.finetune.unfreeze import (
    apply_unfreeze,
    backbone_blocks,
    format_summary,
    model_summary,
    parse_unfreeze,
)
from embedcache.experiments.reports import save_curve_png
from embedcache.fileio import atomic_write, named_write_errors
from embedcache.heads.metrics import classification_report
from embedcache.models.backbone import Backbone
from embedcache.runtime import check_workers, resolve_device, resolve_threads, torch_threads
from embedcache.store.locking import EntryLock

FORMAT = "embedcache-finetune"
FORMAT_VERSION = 1
CHECKPOINT, REPORT, WEIGHTS_FILE = "checkpoint.pt", "finetune.json", "backbone.safetensors"


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns; ``report`` is also written as finetune.json."""

    out: Path
    report: dict[str, Any]
    reused: bool = False
    resumed_from_epoch: int | None = None
    summary: str = ""
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def probe_test_top1(self) -> float:
        return self.report["start"]["test_top1"]

    @property
    def test_top1(self) -> float:
        return self.report["test"]["top1"]


@dataclass(frozen=True)
class RunSetup:
    """A run resolved before training: settings, probe, backbone, data, key, where and how."""

    config: FinetuneConfig
    loaded: LoadedProbe
    bb: Backbone
    data: FinetuneData
    out: Path
    run_key: str
    device: torch.device
    precision: str
    workers: int
    threads: int  # intra-op threads of training and evaluation (recorded in finetune.json)


def finetune(probe: str | os.PathLike, data: str | os.PathLike, config: FinetuneConfig | None = None, *,
             out: str | os.PathLike | None = None, device: str = "auto", workers: int | None = None,
             weights_path: str | os.PathLike | None = None, val_fraction: float = 0.0,
             test_fraction: float = 0.2, split_seed: int = 0, restart: bool = False,
             cache_dir: str | os.PathLike | None = None, allow_unchecked_split: bool = False,
             threads: int | None = None, log: Callable[[str], None] | None = None,
             progress: Callable[[EpochProgress], None] | None = None, **settings: Any) -> FinetuneResult:
    """Fine-tune the network behind a probe on ``data``; resume ``out`` if it holds the same run.

    Args:
        probe: a probe directory (``embedcache probe ENTRY --out DIR``).
        data: the images, in any DATA form ``extract`` takes; labelled with the probe's classes.
            Train/val/test come from the source's splits (or the same seeded hold-out as
            ``extract``: ``val_fraction``/``test_fraction``/``split_seed``); without a val split,
            val is held out of train exactly as the probe did (its recorded fraction and seed).
        config: the training settings (:class:`FinetuneConfig`; default: its defaults).
        out: run directory (default: ``<probe>-finetuned`` next to the probe).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        workers: decoding processes (default: cores - 1).
        weights_path: the local weights file, when the probe's backbone was built from one.
        restart: discard a previous run in ``out`` and start over.
        cache_dir: where to look for the probe's cache entry (by key) when it is not at the
            absolute path the probe recorded; its rows are compared with DATA's test rows.
        allow_unchecked_split: go on when the probe's cache entry cannot be found (the test
            rows are then not checked against the probe's training rows; the report says so).
        threads: torch's intra-op threads (default ``$EMBEDCACHE_THREADS``, else the cores
            available; see :func:`~embedcache.runtime.resolve_threads`).
        log: called with lines to show (the model summary, one line per epoch).
        progress: called after every training batch.
        settings: fields of :class:`FinetuneConfig` to override (``epochs=3, unfreeze="last:2"``).
    """
    setup = _resolve(probe, data, (config or FinetuneConfig()).with_settings(**settings), out=out, device=device,
                     workers=workers, threads=threads, weights_path=weights_path, val_fraction=val_fraction,
                     test_fraction=test_fraction, split_seed=split_seed,
                     split_check={"cache_dir": cache_dir, "allow_unchecked_split": bool(allow_unchecked_split)})
    with named_write_errors(setup.out):
        setup.out.mkdir(parents=True, exist_ok=True)
    lock = EntryLock(setup.out / ".finetune.lock")
    try:
        lock.acquire()
    except CacheLockedError:
        raise ConfigError(f"Another process is fine-tuning into {str(setup.out)!r}; wait for it, or use "
                          f"another --out.") from None
    try:
        with torch_threads(setup.threads):
            return _run(setup, restart=restart, say=log or (lambda _line: None), progress=progress)
    finally:
        lock.release(unlink=True)


def _resolve(probe: str | os.PathLike, data: str | os.PathLike, config: FinetuneConfig, *,
             out: str | os.PathLike | None, device: str, workers: int | None, threads: int | None,
             weights_path: str | os.PathLike | None, val_fraction: float, test_fraction: float,
             split_seed: int, split_check: dict[str, Any]) -> RunSetup:
    config = config.resolved()
    workers = check_workers(workers)
    threads = resolve_threads(threads)
    loaded = load_probe(probe)
    if config.head_penalty is None:  # keep the probe's own L2 penalty on the head
        config = dataclasses.replace(config, head_penalty=float(loaded.metadata.get("penalty") or 0.0))
    out = Path(out) if out is not None else loaded.path.with_name(loaded.path.name + "-finetuned")
    if out.resolve() == loaded.path.resolve():
        raise ConfigError("The 'out' directory must differ from the probe's directory.")
    dev = resolve_device(device)
    precision = training_precision(config.precision, dev)
    bb = rebuild_backbone(loaded, weights_path)
    prepared = open_data(data, loaded, val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed,
                         **split_check)
    key = run_key(config, loaded, prepared.source, fmt=FORMAT, version=FORMAT_VERSION)
    return RunSetup(config, loaded, bb, prepared, out, key, dev, precision, workers, threads)


def _previous_state(setup: RunSetup, restart: bool) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(a finished run's report, a checkpoint to resume), after ``restart`` cleared the directory."""
    out = setup.out
    if restart:
        for name in (CHECKPOINT, BEST, REPORT):
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()
    if (out / REPORT).is_file():
        with contextlib.suppress(OSError, ValueError):
            previous = json.loads((out / REPORT).read_text())
            if previous.get("run_key") == setup.run_key and previous.get("status") == "complete":
                return previous, None
    if not (out / CHECKPOINT).is_file():
        return None, None
    try:
        state = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a foreign or corrupt file: say so, do not guess
        raise ConfigError(f"Cannot read the checkpoint {str(out / CHECKPOINT)!r} ({exc}); pass "
                          f"--restart to start over.") from exc
    if state.get("run_key") != setup.run_key:
        raise ConfigError(f"{str(out)!r} holds a fine-tuning run with other settings, probe or data. Use "
                          f"another --out, or pass --restart to discard it.")
    return None, state


def _trainer(setup: RunSetup, state: dict[str, Any] | None, say: Callable[[str], None]) -> tuple[Trainer, str]:
    """The model, optimiser and schedule, fresh or loaded from ``state``; and the summary printed."""
    config, bb = setup.config, setup.bb
    model = build_model(setup.loaded, bb, config)
    blocks = backbone_blocks(bb.module)
    n_trainable = parse_unfreeze(config.unfreeze, len(blocks))
    trainable = apply_unfreeze(bb.module, blocks, n_trainable)
    rows, totals = model_summary(bb.module, model.head, blocks, n_trainable, bb.preprocess.crop_size)
    summary = format_summary(rows, totals)
    say(summary)
    model = model.to(setup.device).to(memory_format=torch.channels_last)
    optimiser = make_optimiser(model, trainable, config)
    train_rows = setup.data.split.train
    steps = max(1, len(train_rows) // config.batch_size) if len(train_rows) > config.batch_size else 1
    dataset = TrainImages(setup.data.source, bb.preprocess, train_rows, augment=config.augment, seed=config.seed)
    trainer = Trainer(model, optimiser, make_schedule(optimiser, config, steps),
                      torch.amp.GradScaler(setup.device.type, enabled=setup.precision == "fp16"), {},
                      config, setup.data, dataset, blocks, n_trainable, bb, setup.out, setup.device,
                      setup.precision, setup.workers)
    trainer.state = state if state is not None else _fresh_state(trainer, setup, say, totals)
    if state is not None:
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.scaler.load_state_dict(state["scaler"])
        state["resumes"] = [*state["resumes"], int(state["epoch"])]
        say(f"resuming after epoch {int(state['epoch'])} (best val top-1 {state['best_val']:.4f} at epoch "
            f"{state['best_epoch']})")
    trainer.state["params"] = totals
    return trainer, summary


def _fresh_state(trainer: Trainer, setup: RunSetup, say: Callable[[str], None], totals: dict[str, int]) -> dict[str, Any]:
    """Epoch 0: the probe through the full network, scored on val and test once."""
    start = {"val_top1": trainer.evaluate(setup.data.split.val), "test_top1": trainer.evaluate(setup.data.split.test)}
    say(f"start ({setup.config.head_init} head): val top-1 {start['val_top1']:.4f}, test top-1 {start['test_top1']:.4f}")
    return {"run_key": setup.run_key, "format": FORMAT, "version": FORMAT_VERSION, "epoch": 0, "best_val": -1.0,
            "best_epoch": 0, "history": [], "start": start, "stopped_early": False, "resumes": []}


def _run(setup: RunSetup, *, restart: bool, say: Callable[[str], None],
         progress: Callable[[EpochProgress], None] | None) -> FinetuneResult:
    finished, state = _previous_state(setup, restart)
    if finished is not None:
        return FinetuneResult(setup.out, finished, reused=True)
    resumed_from = None if state is None else int(state["epoch"])
    trainer, summary = _trainer(setup, state, say)
    with torch.random.fork_rng(devices=[]):  # dropout's RNG: seeded here, saved in checkpoints
        if resumed_from is None:
            torch.manual_seed(setup.config.seed)
        else:
            torch.set_rng_state(trainer.state["torch_rng"])
        trainer.train(setup.out / CHECKPOINT, say, progress)
    report = _finish(setup, trainer)
    return FinetuneResult(setup.out, report, resumed_from_epoch=resumed_from, summary=summary, model=trainer.model)


def _finish(setup: RunSetup, trainer: Trainer) -> dict[str, Any]:
    """Best epoch scored once on test; exported; finetune.json written last (it marks completion)."""
    model, state, out, loaded = trainer.model, trainer.state, setup.out, setup.loaded
    best = torch.load(out / BEST, map_location="cpu", weights_only=True)
    model.load_state_dict(best["model"])
    test_rows = setup.data.split.test
    test_proba = evaluate(model, setup.data.source, test_rows, **trainer.eval_args)
    ok = ~np.isnan(test_proba).any(axis=1)
    names = [loaded.class_names[int(c)] if int(c) < len(loaded.class_names) else str(c)
             for c in loaded.estimator.classes_]
    metrics = classification_report(setup.data.labels[test_rows][ok], test_proba[ok],
                                    np.arange(model.head.out_features), class_names=names)
    split = setup.data.split
    report = {
        "status": "complete", "run_key": setup.run_key, "config": setup.config.to_dict(), "device": setup.device.type,
        "precision": setup.precision, "probe": {"path": str(loaded.path), "head": loaded.metadata.get("head"),
                                                "penalty": loaded.metadata.get("penalty"),
                                                "reported_test_top1": loaded.metadata.get("metrics", {}).get("top1")},
        "data": {"description": setup.data.source.description, "split_sizes": split.sizes(),
                 "val_source": split.val_source, "split_check": setup.data.split_check},
        "params": state["params"], "blocks": len(trainer.blocks), "trainable_blocks": trainer.n_trainable,
        "start": state["start"], "epochs": state["history"], "best_epoch": state["best_epoch"],
        "best_val_top1": state["best_val"], "stopped_early": state["stopped_early"], "resumes": state["resumes"],
        "seconds_per_epoch": float(np.median([r["seconds"] for r in state["history"]])) if state["history"] else 0.0,
        "threads": setup.threads, "workers": setup.workers,
        "test": metrics,
    }
    network = setup.bb.network if setup.bb.network is not None else setup.bb.module
    save_finetuned(out, model.head, network, loaded, report, image_size=setup.bb.preprocess.crop_size,
                   precision=setup.precision, weights_file=WEIGHTS_FILE)
    atomic_write(out / REPORT, json.dumps(report, indent=2).encode())  # written last: it marks completion
    save_curve_png(report, str(out / "curve.png"))
    return report
