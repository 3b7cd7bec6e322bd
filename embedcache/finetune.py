"""Fine-tuning: reload the full backbone, start the head from a trained probe (LP→FT), train end to end.

The probe fixes everything about the network: backbone name, weights (checked by hash),
truncation, preprocessing. The head is an ``nn.Linear`` initialised from the probe's
``coef_``/``intercept_`` (standardisation is already folded into them), so training starts from the
probe's accuracy instead of distorting the pretrained features with a random head's gradients.

A run lives in one ``out`` directory:

* ``checkpoint.pt``: model, optimiser, scheduler, grad scaler, epoch, best score, history and RNG
  state, written atomically after every epoch; the same command after an interruption resumes
  from it (a run with other settings is refused, ``restart=True`` starts over),
* ``best.pt``: the weights with the best validation accuracy so far (epoch 0 is the starting
  point itself, so fine-tuning never hands back a model worse on val than the probe it began from),
* when done: ``backbone.safetensors`` (fine-tuned backbone, loadable with ``extract --weights``),
  ``probe.safetensors`` + ``probe.json`` (the head as a probe artifact: ``predict OUT`` works),
  ``finetune.json`` (the report) and ``curve.png`` when matplotlib is installed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from embedcache.errors import CacheLockedError, ConfigError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step")
HEAD_INITS = ("probe", "random")
#: Default learning rate of the head per optimiser (the backbone gets ``lr * backbone_lr_mult``).
DEFAULT_LR = {"adamw": 1e-3, "sgd": 1e-2}
DEFAULT_WEIGHT_DECAY = {"adamw": 1e-2, "sgd": 1e-4}
#: Share of all steps spent warming the learning rate up linearly from zero.
WARMUP_FRACTION = 0.05
FORMAT = "embedcache-finetune"
FORMAT_VERSION = 1
CHECKPOINT, BEST, REPORT, WEIGHTS_FILE = "checkpoint.pt", "best.pt", "finetune.json", "backbone.safetensors"


@dataclass
class FinetuneConfig:
    """Every setting that shapes a run; its hash (with the probe and the data) is the run key."""

    unfreeze: str = "all"
    epochs: int = 5
    lr: float | None = None
    backbone_lr_mult: float = 0.1
    optimizer: str = "adamw"
    schedule: str = "cosine"
    weight_decay: float | None = None
    batch_size: int = 64
    augment: bool = True
    precision: str = "auto"
    patience: int = 3
    head_init: str = "probe"
    head_penalty: float | None = None
    bn_train: bool = False
    seed: int = 0

    def resolved(self) -> FinetuneConfig:
        """A copy with optimiser-dependent defaults filled in, after checking every value."""
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"The 'optimizer' parameter must be one of {list(OPTIMIZERS)}. Got {self.optimizer!r}.")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"The 'schedule' parameter must be one of {list(SCHEDULES)}. Got {self.schedule!r}.")
        if self.head_init not in HEAD_INITS:
            raise ConfigError(f"The 'head_init' parameter must be one of {list(HEAD_INITS)}. Got {self.head_init!r}.")
        for name in ("epochs", "batch_size", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"The '{name}' parameter must be a positive int. Got {value!r}.")
        lr = DEFAULT_LR[self.optimizer] if self.lr is None else self.lr
        wd = DEFAULT_WEIGHT_DECAY[self.optimizer] if self.weight_decay is None else self.weight_decay
        for name, value in (("lr", lr), ("backbone_lr_mult", self.backbone_lr_mult), ("weight_decay", wd)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"The '{name}' parameter must be a finite number >= 0. Got {value!r}.")
        if lr == 0:
            raise ConfigError("The 'lr' parameter must be > 0.")
        penalty = self.head_penalty
        if penalty is not None and (isinstance(penalty, bool) or not isinstance(penalty, (int, float))
                                    or not math.isfinite(penalty) or penalty < 0):
            raise ConfigError(f"The 'head_penalty' parameter must be a finite number >= 0. Got {penalty!r}.")
        return FinetuneConfig(**{**asdict(self), "lr": float(lr), "weight_decay": float(wd),
                                 "backbone_lr_mult": float(self.backbone_lr_mult)})


@dataclass
class EpochProgress:
    """Passed to ``progress`` after every training batch."""

    epoch: int
    epochs: int
    done: int
    total: int
    loss: float
    images_per_s: float


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


class FinetuneModel(nn.Module):
    """The truncated backbone followed by a linear head on its pooled features."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, feature_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        # The probe's per-feature standard deviations: its L2 penalty is on weight * scale.
        self.register_buffer("feature_scale", torch.ones(head.in_features) if feature_scale is None
                             else feature_scale.float())

    def head_penalty(self, penalty: float) -> torch.Tensor:
        """The probe's regulariser, ``penalty / 2 * ||W_standardised||^2``, on the current head."""
        return 0.5 * penalty * (self.head.weight * self.feature_scale).pow(2).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def finetune(probe: str | os.PathLike, data: str | os.PathLike, *, out: str | os.PathLike | None = None,
             unfreeze: str = "all", epochs: int = 5, lr: float | None = None, backbone_lr_mult: float = 0.1,
             optimizer: str = "adamw", schedule: str = "cosine", weight_decay: float | None = None,
             batch_size: int = 64, augment: bool = True, precision: str = "auto", device: str = "auto",
             patience: int = 3, head_init: str = "probe", head_penalty: float | None = None,
             bn_train: bool = False, seed: int = 0,
             workers: int | None = None,
             weights_path: str | os.PathLike | None = None, val_fraction: float = 0.0,
             test_fraction: float = 0.2, split_seed: int = 0, restart: bool = False,
             log: Callable[[str], None] | None = None,
             progress: Callable[[EpochProgress], None] | None = None) -> FinetuneResult:
    """Fine-tune the network behind a probe on ``data``; resume ``out`` if it holds the same run.

    Args:
        probe: a probe directory (``embedcache probe ENTRY --out DIR``).
        data: the images, in any DATA form ``extract`` takes; labelled with the probe's classes.
            Train/val/test come from the source's splits (or the same seeded hold-out as
            ``extract``: ``val_fraction``/``test_fraction``/``split_seed``); without a val split,
            val is held out of train exactly as the probe did.
        out: run directory (default: ``<probe>-finetuned`` next to the probe).
        unfreeze: ``all``, ``last:N`` (the final N blocks, see :mod:`embedcache.unfreeze`) or
            ``none`` (the head alone).
        epochs: training epochs at most.
        lr: the head's learning rate (default 1e-3 AdamW, 1e-2 SGD).
        backbone_lr_mult: backbone learning rate = ``lr * backbone_lr_mult``.
        optimizer: ``adamw`` or ``sgd`` (momentum 0.9, Nesterov).
        schedule: ``cosine`` (to zero) or ``step`` (x0.1 every third of the epochs), both after
            a linear warm-up over the first 5% of steps.
        weight_decay: on weights, not on biases/norms (default 0.01 AdamW, 1e-4 SGD).
        batch_size: images per step.
        augment: random resized crop + flip on training images.
        precision: ``auto`` (fp32 on CPU, where bf16 autocast measured slower for training;
            bf16 on CUDA GPUs that support it, else fp16 with loss scaling), ``fp32``, ``bf16``, ``fp16``.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        patience: stop after this many epochs without a better val accuracy.
        head_init: ``probe`` (LP→FT) or ``random`` (a fresh head, for comparison).
        head_penalty: L2 penalty on the head, as the probe defines it (on standardised
            weights); default: the probe's chosen penalty, so the head keeps the regularisation
            that was selected on val. The head gets no weight decay when this is > 0.
        bn_train: let BatchNorm layers of trainable blocks use and update batch statistics
            (default: they keep the pretrained running statistics; see
            :func:`embedcache.unfreeze.set_train_mode`).
        seed: seed of head init, shuffling, augmentation and dropout.
        workers: decoding processes (default: cores - 1).
        weights_path: the local weights file, when the probe's backbone was built from one.
        restart: discard a previous run in ``out`` and start over.
        log: called with lines to show (the model summary, one line per epoch).
        progress: called after every training batch.
    """
    from embedcache.artifacts import load_probe
    from embedcache.extract import default_workers, resolve_device
    from embedcache.finetune_setup import open_data, rebuild_backbone, run_key

    config = FinetuneConfig(unfreeze=unfreeze, epochs=epochs, lr=lr, backbone_lr_mult=backbone_lr_mult,
                            optimizer=optimizer, schedule=schedule, weight_decay=weight_decay,
                            batch_size=batch_size, augment=bool(augment), precision=precision,
                            patience=patience, head_init=head_init, head_penalty=head_penalty,
                            bn_train=bool(bn_train), seed=seed).resolved()
    say = log or (lambda _line: None)
    workers = default_workers() if workers is None else workers
    if not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"The 'workers' parameter must be an int >= 0. Got {workers!r}.")
    loaded = load_probe(probe)
    if config.head_penalty is None:  # keep the probe's own L2 penalty on the head
        config = replace(config, head_penalty=float(loaded.metadata.get("penalty") or 0.0))
    out = Path(out) if out is not None else loaded.path.with_name(loaded.path.name + "-finetuned")
    if out.resolve() == loaded.path.resolve():
        raise ConfigError("The 'out' directory must differ from the probe's directory.")
    dev = resolve_device(device)
    prec = _training_precision(config.precision, dev)
    bb = rebuild_backbone(loaded, weights_path)
    source, parts = open_data(data, loaded, val_fraction=val_fraction, test_fraction=test_fraction,
                              split_seed=split_seed)
    key = run_key(config, loaded, source, fmt=FORMAT, version=FORMAT_VERSION)

    from embedcache.store_writer import _Lock

    out.mkdir(parents=True, exist_ok=True)
    lock = _Lock(out / ".finetune.lock")
    try:
        lock.acquire()
    except CacheLockedError:
        raise ConfigError(f"Another process is fine-tuning into {str(out)!r}; wait for it, or use "
                          f"another --out.") from None
    try:
        return _run(config, loaded, bb, source, parts, out=out, run_key=key, device=dev,
                    precision=prec, workers=workers, restart=restart, say=say, progress=progress)
    finally:
        lock.release(unlink=True)


# --------------------------------------------------------------------------- setup


def _training_precision(precision: str, device: torch.device) -> str:
    """Explicit values as for extraction; ``auto`` differs: training on a CPU stays fp32 (bf16
    autocast trained 2.5x slower than fp32 channels_last here, docs/benchmarks.md), and CUDA
    prefers bf16, which needs no loss scaling."""
    from embedcache.extract import resolve_precision

    if precision != "auto":
        return resolve_precision(precision, device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _build_model(loaded: Any, bb: Any, config: FinetuneConfig) -> FinetuneModel:
    est = loaded.estimator
    n_classes, dim = len(est.classes_), bb.dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = nn.Linear(dim, n_classes)
    if config.head_init == "probe":
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(np.asarray(est.coef_), dtype=torch.float32))
            head.bias.copy_(torch.as_tensor(np.asarray(est.intercept_), dtype=torch.float32))
    scale = getattr(est, "scale_", None)
    return FinetuneModel(bb.module, head, None if scale is None else torch.as_tensor(np.asarray(scale)))


def _optimiser(model: FinetuneModel, trainable: list[nn.Parameter], config: FinetuneConfig) -> torch.optim.Optimizer:
    groups = []
    head_decay = 0.0 if config.head_penalty else config.weight_decay  # the probe's penalty instead
    for params, lr, wd in ((list(model.head.parameters()), config.lr, head_decay),
                           (trainable, config.lr * config.backbone_lr_mult, config.weight_decay)):
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups += [{"params": decay, "lr": lr, "weight_decay": wd},
                   {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.lr)


def _schedule(optimiser: torch.optim.Optimizer, config: FinetuneConfig,
              steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, config.epochs * steps_per_epoch)
    warmup = max(1, round(WARMUP_FRACTION * total))
    step_every = max(1, config.epochs // 3) * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "step":
            return 0.1 ** (step // step_every)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


# --------------------------------------------------------------------------- loops


def _loader(dataset: torch.utils.data.Dataset, *, batch_size: int, workers: int, device: torch.device,
            order: list[int] | None = None, drop_last: bool = False) -> torch.utils.data.DataLoader:
    from embedcache.data import collate_images

    sampler = order if order is not None else list(range(len(dataset)))
    batches = [sampler[i:i + batch_size] for i in range(0, len(sampler), batch_size)]
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                       collate_fn=collate_images, pin_memory=device.type == "cuda",
                                       prefetch_factor=4 if workers > 0 else None)


def _to_model_input(images: torch.Tensor, device: torch.device, preprocess: Any) -> torch.Tensor:
    """uint8 batch → normalised float on ``device``, channels-last (the layout the model runs in)."""
    from embedcache.preprocess import normalize_batch

    x = normalize_batch(images.to(device, non_blocking=True), preprocess)
    return x.contiguous(memory_format=torch.channels_last)


def _autocast(device: torch.device, precision: str) -> Any:
    from embedcache.extract import _AUTOCAST_DTYPES

    if precision in _AUTOCAST_DTYPES:
        return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])
    return contextlib.nullcontext()


def evaluate(model: FinetuneModel, source: Any, rows: np.ndarray, *, preprocess: Any,
             batch_size: int, workers: int, device: torch.device, precision: str) -> np.ndarray:
    """Class probabilities ``(len(rows), K)`` with the extraction preprocessing (NaN rows = undecodable)."""
    from embedcache.augment import TrainImages

    dataset = TrainImages(source, preprocess, rows, augment=False, seed=0)
    loader = _loader(dataset, batch_size=batch_size, workers=workers, device=device)
    proba = np.full((len(rows), model.head.out_features), np.nan, np.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _autocast(device, precision):
            for positions, images, _failures in loader:
                if len(positions) == 0:
                    continue
                x = _to_model_input(images, device, preprocess)
                proba[positions.numpy()] = torch.softmax(model(x).float(), dim=1).cpu().numpy()
    finally:
        model.train(was_training)
    return proba


def _accuracy(proba: np.ndarray, labels: np.ndarray) -> float:
    ok = ~np.isnan(proba).any(axis=1)
    return float(np.mean(np.argmax(proba[ok], axis=1) == labels[ok])) if ok.any() else float("nan")


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the run


def _train_epochs(model: FinetuneModel, optimiser: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                  state: dict[str, Any], config: FinetuneConfig, source: Any, parts: dict[str, Any],
                  dataset: Any, unfreezing: tuple[list[Any], int], *, bb: Any, out: Path,
                  device: torch.device, precision: str, workers: int, eval_args: dict[str, Any],
                  say: Callable[[str], None], progress: Callable[[EpochProgress], None] | None) -> None:
    """Train from the epoch after ``state["epoch"]``; validate, keep the best, checkpoint each epoch."""
    from embedcache.unfreeze import set_train_mode

    blocks, n_trainable = unfreezing
    labels = parts["labels"]
    train_labels = labels[parts["train"]]
    epoch = int(state["epoch"])
    while epoch < config.epochs and not state["stopped_early"]:
        epoch += 1
        dataset.epoch = epoch
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(
            config.seed * 1_000_003 + epoch)).tolist()
        loader = _loader(dataset, batch_size=config.batch_size, workers=workers, device=device, order=order,
                         drop_last=True)
        set_train_mode(bb.module, blocks, n_trainable, bn_train=config.bn_train)
        model.head.train()
        started, seen, loss_sum, correct, failures = time.perf_counter(), 0, 0.0, 0, 0
        for positions, images, failed in loader:
            failures += len(failed)
            if len(positions) == 0:
                continue
            x = _to_model_input(images, device, bb.preprocess)
            y = torch.as_tensor(train_labels[positions.numpy()], device=device)
            with _autocast(device, precision):
                logits = model(x)
                cross_entropy = nn.functional.cross_entropy(logits.float(), y)
            loss = (cross_entropy + model.head_penalty(config.head_penalty)) if config.head_penalty else cross_entropy
            if not torch.isfinite(loss):
                raise ConfigError(
                    f"The training loss became {loss.item()} in epoch {epoch}; lower --lr (now "
                    f"{config.lr:g}) or use --precision fp32. The last good epoch is kept in {out}."
                )
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            scheduler.step()
            seen += len(y)
            loss_sum += float(cross_entropy.detach()) * len(y)
            correct += int((logits.argmax(dim=1) == y).sum())
            if progress is not None:
                elapsed = time.perf_counter() - started
                progress(EpochProgress(epoch, config.epochs, seen, len(order), loss_sum / seen,
                                       seen / elapsed if elapsed else 0.0))
        train_seconds = time.perf_counter() - started
        val_acc = _accuracy(evaluate(model, source, parts["val"], **eval_args),
                            labels[parts["val"]])
        row = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "train_top1": correct / max(seen, 1),
               "val_top1": val_acc, "lr": optimiser.param_groups[0]["lr"], "train_seconds": train_seconds,
               "seconds": time.perf_counter() - started, "images": seen, "failures": failures}
        state["history"] = [*state["history"], row]
        if val_acc > state["best_val"]:
            state["best_val"], state["best_epoch"] = val_acc, epoch
            _save_atomic({"epoch": epoch, "model": model.state_dict()}, out / BEST)
        if epoch - state["best_epoch"] >= config.patience and epoch < config.epochs:
            state["stopped_early"] = True
        state.update(epoch=epoch, model=model.state_dict(), optimizer=optimiser.state_dict(),
                     scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), torch_rng=torch.get_rng_state())
        _save_atomic(state, out / CHECKPOINT)
        say(f"epoch {epoch}/{config.epochs}: train loss {row['train_loss']:.4f}, train top-1 "
            f"{row['train_top1']:.4f}, val top-1 {val_acc:.4f}{' (best)' if state['best_epoch'] == epoch else ''}, "
            f"{row['seconds']:.1f} s ({seen / max(train_seconds, 1e-9):.0f} img/s)")
        if state["stopped_early"]:
            say(f"early stop: no better val accuracy for {config.patience} epochs")



def _run(config: FinetuneConfig, loaded: Any, bb: Any, source: Any, parts: dict[str, Any], *, out: Path,
         run_key: str, device: torch.device, precision: str, workers: int, restart: bool,
         say: Callable[[str], None], progress: Callable[[EpochProgress], None] | None) -> FinetuneResult:
    from embedcache.augment import TrainImages
    from embedcache.unfreeze import (
        apply_unfreeze,
        backbone_blocks,
        format_summary,
        model_summary,
        parse_unfreeze,
    )

    if restart:
        for name in (CHECKPOINT, BEST, REPORT):
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()
    report_path = out / REPORT
    if report_path.is_file():
        with contextlib.suppress(OSError, ValueError):
            previous = json.loads(report_path.read_text())
            if previous.get("run_key") == run_key and previous.get("status") == "complete":
                return FinetuneResult(out, previous, reused=True)
    state = None
    if (out / CHECKPOINT).is_file():
        try:
            state = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a foreign or corrupt file: say so, do not guess
            raise ConfigError(f"Cannot read the checkpoint {str(out / CHECKPOINT)!r} ({exc}); pass "
                              f"--restart to start over.") from exc
        if state.get("run_key") != run_key:
            raise ConfigError(
                f"{str(out)!r} holds a fine-tuning run with other settings, probe or data. Use "
                f"another --out, or pass --restart to discard it."
            )

    model = _build_model(loaded, bb, config)
    blocks = backbone_blocks(bb.module)
    n_trainable = parse_unfreeze(config.unfreeze, len(blocks))
    trainable = apply_unfreeze(bb.module, blocks, n_trainable)
    rows, totals = model_summary(bb.module, model.head, blocks, n_trainable, bb.preprocess.crop_size)
    summary = format_summary(rows, totals)
    say(summary)
    model = model.to(device).to(memory_format=torch.channels_last)
    optimiser = _optimiser(model, trainable, config)
    train_rows, labels = parts["train"], parts["labels"]
    steps = max(1, len(train_rows) // config.batch_size) if len(train_rows) > config.batch_size else 1
    scheduler = _schedule(optimiser, config, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    eval_args = {"preprocess": bb.preprocess, "batch_size": max(config.batch_size, 64), "workers": workers,
                 "device": device, "precision": precision}
    resumed_from = None
    if state is None:
        val_proba = evaluate(model, source, parts["val"], **eval_args)
        test_proba = evaluate(model, source, parts["test"], **eval_args)
        start = {"val_top1": _accuracy(val_proba, labels[parts["val"]]),
                 "test_top1": _accuracy(test_proba, labels[parts["test"]])}
        state = {"run_key": run_key, "format": FORMAT, "version": FORMAT_VERSION, "epoch": 0,
                 "best_val": -1.0, "best_epoch": 0, "history": [], "start": start,
                 "stopped_early": False, "resumes": []}
        say(f"start ({config.head_init} head): val top-1 {start['val_top1']:.4f}, test top-1 {start['test_top1']:.4f}")
    else:
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        resumed_from = int(state["epoch"])
        state["resumes"] = [*state["resumes"], resumed_from]
        say(f"resuming after epoch {resumed_from} (best val top-1 {state['best_val']:.4f} at epoch "
            f"{state['best_epoch']})")
    dataset = TrainImages(source, bb.preprocess, train_rows, augment=config.augment, seed=config.seed)
    with torch.random.fork_rng(devices=[]):  # dropout's RNG: seeded here, saved in checkpoints
        if resumed_from is None:
            torch.manual_seed(config.seed)
        else:
            torch.set_rng_state(state["torch_rng"])
        _train_epochs(model, optimiser, scheduler, scaler, state, config, source, parts, dataset,
                      (blocks, n_trainable), bb=bb, out=out, device=device, precision=precision,
                      workers=workers, eval_args=eval_args, say=say, progress=progress)

    best = torch.load(out / BEST, map_location="cpu", weights_only=True)
    model.load_state_dict(best["model"])
    from embedcache.metrics import classification_report

    test_rows = parts["test"]
    test_proba = evaluate(model, source, test_rows, **eval_args)
    ok = ~np.isnan(test_proba).any(axis=1)
    classes = np.arange(model.head.out_features)
    names = [loaded.class_names[int(c)] if int(c) < len(loaded.class_names) else str(c)
             for c in loaded.estimator.classes_]
    metrics = classification_report(labels[test_rows][ok], test_proba[ok], classes, class_names=names)
    report = {
        "status": "complete", "run_key": run_key, "config": asdict(config), "device": device.type,
        "precision": precision, "probe": {"path": str(loaded.path), "head": loaded.metadata.get("head"),
                                          "penalty": loaded.metadata.get("penalty"),
                                          "reported_test_top1": loaded.metadata.get("metrics", {}).get("top1")},
        "data": {"description": source.description, "split_sizes": {k: len(parts[k]) for k in ("train", "val", "test")},
                 "val_source": parts["val_source"], "split_check": parts["split_check"]},
        "params": totals, "blocks": len(blocks), "trainable_blocks": n_trainable,
        "start": state["start"], "epochs": state["history"], "best_epoch": state["best_epoch"],
        "best_val_top1": state["best_val"], "stopped_early": state["stopped_early"], "resumes": state["resumes"],
        "seconds_per_epoch": float(np.median([r["seconds"] for r in state["history"]])) if state["history"] else 0.0,
        "test": metrics,
    }
    from embedcache.artifacts import save_finetuned
    from embedcache.metrics import save_curve_png

    network = bb.network if bb.network is not None else bb.module
    save_finetuned(out, model.head, network, loaded, report, image_size=bb.preprocess.crop_size,
                   precision=precision, weights_file=WEIGHTS_FILE)
    tmp_report = out / f".{REPORT}.tmp"  # written last: its presence marks the run complete
    tmp_report.write_text(json.dumps(report, indent=2))
    os.replace(tmp_report, out / REPORT)
    save_curve_png(report, str(out / "curve.png"))
    return FinetuneResult(out, report, resumed_from_epoch=resumed_from, summary=summary, model=model)
