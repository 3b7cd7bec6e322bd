"""Weights: read a state dict file safely, load it into an architecture, hash its content.

Nothing here unpickles arbitrary objects: ``.safetensors`` files go through safetensors, anything
else through ``torch.load(weights_only=True)``. The classifier of a weights file may differ from
the architecture's (a fine-tuned head) or be absent, since the backbone cuts it anyway.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from embedcache.errors import WeightsError


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict without unpickling arbitrary objects.

    ``.safetensors`` via safetensors; anything else via ``torch.load(weights_only=True)``.
    A checkpoint dict holding ``state_dict`` / ``model`` is unwrapped; ``module.`` prefixes
    (DataParallel) are stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"The 'weights' file {str(path)!r} does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"Could not read weights file {str(path)!r} ({exc.__class__.__name__}: {exc}). "
            f"Use a .safetensors file or a .pt/.pth state dict that loads with weights_only=True."
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"Weights file {str(path)!r} does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights_file(model: nn.Module, path: str, head_name: str | None) -> None:
    """Load ``path`` into ``model``; the classifier may differ (or be absent) — it is cut anyway.

    Args:
        model: the full network, modified in place.
        path: a ``.safetensors`` / ``.pt`` state dict (see :func:`load_state_dict_file`).
        head_name: qualified name of the classifier module whose keys may mismatch or be
            missing; None when every key must fit.

    Raises:
        WeightsError: the file cannot be read, or its keys/shapes do not fit ``model``.
    """
    state = load_state_dict_file(path)
    own = model.state_dict()
    head_prefix = f"{head_name}." if head_name else None
    filtered = {}
    for key, value in state.items():
        if head_prefix and key.startswith(head_prefix):
            if key in own and own[key].shape == value.shape:
                filtered[key] = value
            continue
        filtered[key] = value
    missing = [k for k in own if k not in filtered and not (head_prefix and k.startswith(head_prefix))]
    unexpected = [k for k in filtered if k not in own]
    mismatched = [k for k in filtered if k in own and own[k].shape != filtered[k].shape]
    if missing or unexpected or mismatched:
        details = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                details.append(f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
        raise WeightsError(
            f"Weights file {path!r} does not fit this architecture ({'; '.join(details)}). "
            f"Pass the backbone name the weights were trained for."
        )
    model.load_state_dict(filtered, strict=False)


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Content hash of weights: names, dtypes, shapes and raw bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
