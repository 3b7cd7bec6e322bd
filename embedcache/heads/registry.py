"""Head names to estimators: the one list of heads the CLI and the protocol offer.

Plain data at import (no torch, no scikit-learn): the CLI lists these choices without them.
"""

from __future__ import annotations

from typing import Any

from embedcache.errors import ConfigError

#: ``torch``: :class:`~embedcache.heads.torch_probe.TorchLinearProbe` (softmax by L-BFGS in torch;
#: for label sets :class:`~embedcache.heads.multilabel.SigmoidProbe`, one sigmoid per class);
#: ``sklearn``: :class:`~embedcache.heads.sklearn_probe.SklearnProbe` (LogisticRegression);
#: ``knn``: :class:`~embedcache.heads.knn.KNNProbe` (cosine k-NN, temperature-weighted votes);
#: ``ridge``: :class:`~embedcache.heads.ridge_probe.RidgeClassifierProbe` (one-hot ridge), for numeric
#: targets :class:`~embedcache.heads.ridge_probe.RidgeRegressor` (closed-form ridge path).
HEADS = ("torch", "sklearn", "knn", "ridge")
#: The heads with a linear softmax model (penalty sweep in heads/sweep.py, few-shot).
LINEAR_HEADS = ("torch", "sklearn")
#: What a cache entry's rows are labelled with: one class each, float targets, or label sets.
TASKS = ("classes", "regression", "multilabel")
#: The heads each kind of target can be fitted with; the first is the default.
TASK_HEADS = {"classes": ("torch", "sklearn", "knn", "ridge"), "regression": ("ridge",), "multilabel": ("torch",)}
#: Why a head does not fit a kind of target (named in the error).
_WHY_NOT = {
    "regression": "numeric targets are fitted by the closed-form ridge path, which solves the squared "
                  "loss exactly for every penalty (an iterative torch regression would only approach "
                  "the same solution)",
    "multilabel": "label sets are fitted by the torch head (one sigmoid per class, L-BFGS)",
}


def check_head(head: str, *, task: str = "classes", allowed: tuple[str, ...] | None = None) -> str:
    """``head`` if it is one of :data:`HEADS` and fits ``task`` (or is in ``allowed``)."""
    if head not in HEADS:
        raise ConfigError(f"The 'head' parameter must be one of {list(HEADS)}. Got {head!r} instead.")
    choices = allowed if allowed is not None else TASK_HEADS[check_task(task)]
    if head not in choices:
        reason = f" ({_WHY_NOT[task]})" if allowed is None and task in _WHY_NOT else ""
        target = "here" if allowed is not None else f"for {task} targets"
        raise ConfigError(f"The 'head' parameter must be one of {list(choices)} {target}{reason}. "
                          f"Got {head!r} instead.")
    return head


def check_task(task: str) -> str:
    """``task`` if it is one of :data:`TASKS`."""
    if task not in TASKS:
        raise ConfigError(f"The 'task' parameter must be one of {list(TASKS)}. Got {task!r} instead.")
    return task


def resolve_head(head: str | None, task: str) -> str:
    """The head to fit: ``head`` when given (checked against ``task``), else the task's default."""
    return TASK_HEADS[check_task(task)][0] if head is None else check_head(head, task=task)


def make_head(head: str, **params: Any) -> Any:
    """An unfitted class estimator for ``head`` (parameters it does not take are dropped:
    ``device`` and ``data_dtype`` only apply to the torch head, ``warm_start`` and ``max_iter``
    not to ``ridge``; ``knn`` takes ``k`` and ``temperature``, not a penalty)."""
    check_head(head)
    # imported here so that HEADS costs nothing to import (the CLI lists it without torch)
    if head == "torch":
        from embedcache.heads.torch_probe import TorchLinearProbe

        return TorchLinearProbe(**params)
    if head == "knn":
        from embedcache.heads.knn import KNNProbe

        return KNNProbe(**{k: v for k, v in params.items() if k in ("k", "temperature", "device")})
    if head == "ridge":
        from embedcache.heads.ridge_probe import RidgeClassifierProbe

        return RidgeClassifierProbe(**{k: v for k, v in params.items() if k in ("penalty", "standardize")})
    from embedcache.heads.sklearn_probe import SklearnProbe

    params.pop("device", None)
    params.pop("data_dtype", None)
    return SklearnProbe(**params)
