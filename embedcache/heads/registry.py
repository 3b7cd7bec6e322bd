"""Head names to estimators: the one list of heads the CLI and the protocol offer."""

from __future__ import annotations

from typing import Any

from embedcache.errors import ConfigError

#: ``torch``: :class:`~embedcache.heads.torch_probe.TorchLinearProbe` (L-BFGS in torch);
#: ``sklearn``: :class:`~embedcache.heads.sklearn_probe.SklearnProbe` (LogisticRegression).
HEADS = ("torch", "sklearn")


def check_head(head: str) -> str:
    """``head`` if it is one of :data:`HEADS`."""
    if head not in HEADS:
        raise ConfigError(f"The 'head' parameter must be one of {list(HEADS)}. Got {head!r} instead.")
    return head


def make_head(head: str, **params: Any) -> Any:
    """An unfitted estimator for ``head`` (parameters it does not take are dropped:
    ``device`` and ``data_dtype`` only apply to the torch head)."""
    check_head(head)
    # imported here so that HEADS costs nothing to import (the CLI lists it without torch)
    if head == "torch":
        from embedcache.heads.torch_probe import TorchLinearProbe

        return TorchLinearProbe(**params)
    from embedcache.heads.sklearn_probe import SklearnProbe

    params.pop("device", None)
    params.pop("data_dtype", None)
    return SklearnProbe(**params)
