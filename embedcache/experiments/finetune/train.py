"""The fine-tuning model, optimiser, schedule, evaluation and epoch loop.

The loop knows nothing of the backbone beyond its module and preprocessing. Evaluation runs
through the same inference loop as extraction (:func:`embedcache.extraction.loop.run_batches`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from embedcache.errors import ConfigError
from embedcache.experiments.artifacts import LoadedProbe
from embedcache.experiments.finetune.augment import TrainImages
from embedcache.experiments.finetune.config import FinetuneConfig
from embedcache.experiments.finetune.setup import FinetuneData
from embedcache.experiments.finetune.unfreeze import Block, set_train_mode
from embedcache.extraction.loop import ImageDataset, collate_images, model_input, run_batches
from embedcache.fileio import atomic_write
from embedcache.models.backbone import Backbone
from embedcache.models.preprocess import PreprocessSpec
from embedcache.runtime import autocast, resolve_precision

#: Share of all steps spent warming the learning rate up linearly from zero.
WARMUP_FRACTION = 0.05
#: Evaluation batches hold at least this many images.
MIN_EVAL_BATCH = 64
BEST = "best.pt"


@dataclass
class EpochProgress:
    """Passed to ``progress`` after every training batch."""

    epoch: int
    epochs: int
    done: int
    total: int
    loss: float
    images_per_s: float


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


def training_precision(precision: str, device: torch.device) -> str:
    """Explicit values as for extraction; ``auto`` differs: training on a CPU stays fp32 (bf16
    autocast trained 2.5x slower than fp32 channels_last here, docs/benchmarks.md), and CUDA
    prefers bf16, which needs no loss scaling."""
    if precision != "auto":
        return resolve_precision(precision, device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def build_model(loaded: LoadedProbe, bb: Backbone, config: FinetuneConfig) -> FinetuneModel:
    """Backbone + a head initialised from the probe (``head_init="probe"``) or at random."""
    est = loaded.estimator
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = nn.Linear(bb.dim, len(est.classes_))
    if config.head_init == "probe":
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(np.asarray(est.coef_), dtype=torch.float32))
            head.bias.copy_(torch.as_tensor(np.asarray(est.intercept_), dtype=torch.float32))
    scale = getattr(est, "scale_", None)
    return FinetuneModel(bb.module, head, None if scale is None else torch.as_tensor(np.asarray(scale)))


def make_optimiser(model: FinetuneModel, trainable: list[nn.Parameter], config: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW or SGD; the backbone at ``lr * backbone_lr_mult``; decay on weights only (the head
    keeps the probe's penalty instead, when it has one)."""
    groups = []
    head_decay = 0.0 if config.head_penalty else config.weight_decay
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


def make_schedule(optimiser: torch.optim.Optimizer, config: FinetuneConfig,
                  steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A linear warm-up over :data:`WARMUP_FRACTION` of the steps, then cosine to zero or x0.1
    every third of the epochs."""
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


def evaluate(model: FinetuneModel, source: Any, rows: np.ndarray, *, preprocess: PreprocessSpec,
             batch_size: int, workers: int, device: torch.device, precision: str) -> np.ndarray:
    """Class probabilities ``(len(rows), K)`` with the extraction preprocessing (NaN rows = undecodable)."""
    proba = np.full((len(rows), model.head.out_features), np.nan, np.float32)
    position = {int(r): i for i, r in enumerate(rows)}
    batches = [rows[i:i + batch_size].tolist() for i in range(0, len(rows), batch_size)]
    was_training = model.training
    model.eval()
    try:
        for batch in run_batches(model, ImageDataset(source, preprocess), batches, device=device,
                                 precision=precision, workers=workers):
            if batch.outputs is not None:
                where = [position[int(r)] for r in batch.rows]
                proba[where] = torch.softmax(torch.from_numpy(batch.outputs), dim=1).numpy()
    finally:
        model.train(was_training)
    return proba


def accuracy(proba: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy over the decodable rows (NaN when there are none)."""
    ok = ~np.isnan(proba).any(axis=1)
    return float(np.mean(np.argmax(proba[ok], axis=1) == labels[ok])) if ok.any() else float("nan")


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`~embedcache.fileio.atomic_write` (a fresh temporary file,
    fsync, rename): a crash or a full disk leaves the previous checkpoint intact."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


@dataclass
class Trainer:
    """Everything one run's epochs need; ``state`` is what a checkpoint holds."""

    model: FinetuneModel
    optimiser: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    state: dict[str, Any]
    config: FinetuneConfig
    data: FinetuneData
    dataset: TrainImages
    blocks: list[Block]
    n_trainable: int
    bb: Backbone
    out: Path
    device: torch.device
    precision: str
    workers: int

    @property
    def eval_args(self) -> dict[str, Any]:
        return {"preprocess": self.bb.preprocess, "batch_size": max(self.config.batch_size, MIN_EVAL_BATCH),
                "workers": self.workers, "device": self.device, "precision": self.precision}

    def evaluate(self, rows: np.ndarray) -> float:
        return accuracy(evaluate(self.model, self.data.source, rows, **self.eval_args), self.data.labels[rows])

    def _loader(self, epoch: int) -> torch.utils.data.DataLoader:
        """This epoch's shuffled batches (full batches only), seeded by (seed, epoch)."""
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(
            self.config.seed * 1_000_003 + epoch)).tolist()
        size = self.config.batch_size
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        if len(batches) > 1 and len(batches[-1]) < size:
            batches.pop()
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers,
                                           collate_fn=collate_images, pin_memory=self.device.type == "cuda",
                                           prefetch_factor=4 if self.workers > 0 else None)

    def train_epoch(self, epoch: int, progress: Callable[[EpochProgress], None] | None) -> dict[str, Any]:
        """One epoch of training; returns its row of the history (without val)."""
        config, model = self.config, self.model
        self.dataset.epoch = epoch
        train_labels = self.data.labels[self.data.split.train]
        set_train_mode(self.bb.module, self.blocks, self.n_trainable, bn_train=config.bn_train)
        model.head.train()
        started, seen, loss_sum, correct, failures = time.perf_counter(), 0, 0.0, 0, 0
        for positions, images, failed in self._loader(epoch):
            failures += len(failed)
            if len(positions) == 0:
                continue
            y = torch.as_tensor(train_labels[positions.numpy()], device=self.device)
            with autocast(self.device, self.precision):
                logits = model(model_input(images, self.device, self.bb.preprocess))
                cross_entropy = nn.functional.cross_entropy(logits.float(), y)
            loss = cross_entropy + model.head_penalty(config.head_penalty) if config.head_penalty else cross_entropy
            if not torch.isfinite(loss):
                raise ConfigError(
                    f"The training loss became {loss.item()} in epoch {epoch}; lower --lr (now "
                    f"{config.lr:g}) or use --precision fp32. The last good epoch is kept in {self.out}."
                )
            self.optimiser.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimiser)
            self.scaler.update()
            self.scheduler.step()
            seen += len(y)
            loss_sum += float(cross_entropy.detach()) * len(y)
            correct += int((logits.argmax(dim=1) == y).sum())
            if progress is not None:
                elapsed = time.perf_counter() - started
                progress(EpochProgress(epoch, config.epochs, seen, len(self.dataset), loss_sum / seen,
                                       seen / elapsed if elapsed else 0.0))
        return {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "train_top1": correct / max(seen, 1),
                "lr": self.optimiser.param_groups[0]["lr"], "train_seconds": time.perf_counter() - started,
                "started": started, "images": seen, "failures": failures}

    def train(self, checkpoint: Path, say: Callable[[str], None],
              progress: Callable[[EpochProgress], None] | None) -> None:
        """Train from the epoch after ``state["epoch"]``; validate, keep the best, checkpoint each epoch."""
        state, config = self.state, self.config
        epoch = int(state["epoch"])
        while epoch < config.epochs and not state["stopped_early"]:
            epoch += 1
            row = self.train_epoch(epoch, progress)
            row["val_top1"] = val_acc = self.evaluate(self.data.split.val)
            row["seconds"] = time.perf_counter() - row.pop("started")
            state["history"] = [*state["history"], row]
            if val_acc > state["best_val"]:
                state["best_val"], state["best_epoch"] = val_acc, epoch
                save_atomic({"epoch": epoch, "model": self.model.state_dict()}, self.out / BEST)
            if epoch - state["best_epoch"] >= config.patience and epoch < config.epochs:
                state["stopped_early"] = True
            state.update(epoch=epoch, model=self.model.state_dict(), optimizer=self.optimiser.state_dict(),
                         scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
                         torch_rng=torch.get_rng_state())
            save_atomic(state, checkpoint)
            say(f"epoch {epoch}/{config.epochs}: train loss {row['train_loss']:.4f}, train top-1 "
                f"{row['train_top1']:.4f}, val top-1 {val_acc:.4f}{' (best)' if state['best_epoch'] == epoch else ''}, "
                f"{row['seconds']:.1f} s ({row['images'] / max(row['train_seconds'], 1e-9):.0f} img/s)")
            if state["stopped_early"]:
                say(f"early stop: no better val accuracy for {config.patience} epochs")
