"""The settings of a fine-tuning run as one frozen dataclass; its hash is part of the run key.

No torch here: the CLI reads the choices below without loading it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from embedcache.errors import ConfigError
from embedcache.runtime import PRECISIONS

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step")
HEAD_INITS = ("probe", "random")
#: Default learning rate of the head per optimiser (the backbone gets ``lr * backbone_lr_mult``).
DEFAULT_LR = {"adamw": 1e-3, "sgd": 1e-2}
DEFAULT_WEIGHT_DECAY = {"adamw": 1e-2, "sgd": 1e-4}


def _number(name: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
            or (positive and value == 0):
        raise ConfigError(f"The '{name}' parameter must be a finite number {'> 0' if positive else '>= 0'}. "
                          f"Got {value!r}.")
    return float(value)


@dataclass(frozen=True)
class FinetuneConfig:
    """Every setting that shapes a run (the probe and the data are the rest of the run key)."""

    unfreeze: str = "all"  # all | last:N | none (see embedcache.experiments.finetune.unfreeze)
    epochs: int = 5  # training epochs at most
    lr: float | None = None  # head learning rate; None: DEFAULT_LR of the optimiser
    backbone_lr_mult: float = 0.1  # backbone learning rate = lr x this
    optimizer: str = "adamw"  # adamw | sgd (Nesterov momentum 0.9)
    schedule: str = "cosine"  # cosine to zero | step (x0.1 every third of the epochs), after warm-up
    weight_decay: float | None = None  # on weights, not biases/norms; None: DEFAULT_WEIGHT_DECAY
    batch_size: int = 64  # images per step
    augment: bool = True  # random resized crop + horizontal flip on training images
    precision: str = "auto"  # auto: fp32 on CPU, bf16 on GPUs that have it, else fp16 with scaling
    patience: int = 3  # stop after this many epochs without a better val accuracy
    head_init: str = "probe"  # probe (LP->FT) | random (for comparison)
    head_penalty: float | None = None  # L2 on the head as the probe defines it; None: the probe's
    bn_train: bool = False  # BatchNorm of trainable blocks uses batch statistics
    seed: int = 0  # head init, shuffling, augmentation, dropout

    def with_settings(self, **settings: Any) -> FinetuneConfig:
        """A copy with some fields replaced; an unknown name is an error that lists the fields."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ConfigError(f"Unknown fine-tuning setting(s) {unknown}. Settings are: {sorted(names)}.")
        return dataclasses.replace(self, **settings)

    def resolved(self) -> FinetuneConfig:
        """A copy with optimiser-dependent defaults filled in, after checking every value."""
        for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("head_init", HEAD_INITS),
                              ("precision", PRECISIONS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"The '{name}' parameter must be one of {list(choices)}. Got {getattr(self, name)!r}.")
        for name in ("epochs", "batch_size", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"The '{name}' parameter must be a positive int. Got {value!r}.")
        lr = _number("lr", DEFAULT_LR[self.optimizer] if self.lr is None else self.lr, positive=True)
        wd = _number("weight_decay", DEFAULT_WEIGHT_DECAY[self.optimizer] if self.weight_decay is None
                     else self.weight_decay)
        penalty = None if self.head_penalty is None else _number("head_penalty", self.head_penalty)
        return dataclasses.replace(self, lr=lr, weight_decay=wd, head_penalty=penalty, augment=bool(self.augment),
                                   bn_train=bool(self.bn_train),
                                   backbone_lr_mult=_number("backbone_lr_mult", self.backbone_lr_mult))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
