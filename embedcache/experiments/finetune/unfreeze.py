"""Which parts of a backbone train during fine-tuning, and a torchinfo-style summary of them.

A backbone is cut into *blocks*: its module tree is walked in registration order (forward order
for the common architectures) and plain containers are opened: ``nn.Sequential``,
``nn.ModuleList`` and ``nn.ModuleDict`` (exactly those types, not subclasses such as torchvision's
``Conv2dNormActivation``), torch.fx graph modules (``--layer`` truncation) and the generic ``nn.Module`` parents they
hold, and every module on the way to the longest container in the tree (so ViT's
``encoder`` opens into ``encoder.layers``). Every other module with parameters is one block: a
ResNet ``BasicBlock``, an EfficientNet ``MBConv``, the stem. Parameters held directly by an opened
module (a ViT class token) form a block of their own, placed first.

``--unfreeze`` picks from that list: ``all`` (every block), ``last:N`` (the final N) or ``none``
(the head alone). Frozen blocks run in eval mode, so their BatchNorm statistics never move.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from embedcache.errors import ConfigError

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class Block:
    """One unit of ``--unfreeze last:N``: a module, or the direct parameters of one."""

    name: str
    module: nn.Module
    direct_only: bool = False  # only the parameters held directly by ``module``

    def parameters(self) -> list[nn.Parameter]:
        return list(self.module.parameters(recurse=not self.direct_only))

    @property
    def kind(self) -> str:
        return "parameters" if self.direct_only else type(self.module).__name__


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _param_children(module: nn.Module) -> list[nn.Module]:
    return [child for child in module.children() if _has_params(child)]


def _trunk_path(module: nn.Module) -> set[str]:
    """Qualified names of the longest plain container and of all its ancestors."""
    best, best_len = None, 1
    for name, mod in module.named_modules():
        if type(mod) in _CONTAINERS and len(_param_children(mod)) > best_len:
            best, best_len = name, len(_param_children(mod))
    if best is None:
        return set()
    parts = best.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def backbone_blocks(module: nn.Module) -> list[Block]:
    """The backbone's blocks in order (see the module docstring)."""
    blocks: list[Block] = []
    trunk = _trunk_path(module)

    def opens(mod: nn.Module, name: str) -> bool:
        return type(mod) in _CONTAINERS or type(mod) is nn.Module or name in trunk or isinstance(
            mod, torch.fx.GraphModule)

    def walk(mod: nn.Module, prefix: str) -> None:
        if prefix == "" or opens(mod, prefix):
            if any(True for _ in mod.parameters(recurse=False)):
                blocks.append(Block(prefix or "(root)", mod, direct_only=True))
            for name, child in mod.named_children():
                if _has_params(child):
                    walk(child, f"{prefix}.{name}" if prefix else name)
        else:
            blocks.append(Block(prefix, mod))

    walk(module, "")
    return blocks


def parse_unfreeze(text: str | int | None, n_blocks: int) -> int:
    """``all`` → n_blocks, ``none`` → 0, ``last:N`` → N (how many final blocks train)."""
    value = "all" if text is None else str(text).strip().lower()
    if value == "all":
        return n_blocks
    if value == "none":
        return 0
    if value.startswith("last:"):
        count = value[5:]
        if count.isdigit() and int(count) >= 1:
            if int(count) > n_blocks:
                raise ConfigError(
                    f"The 'unfreeze' parameter asks for the last {count} blocks but this backbone "
                    f"has {n_blocks}. Use last:1 ... last:{n_blocks}, or all."
                )
            return int(count)
    raise ConfigError(
        f"The 'unfreeze' parameter must be 'all', 'none' or 'last:N' with N >= 1 "
        f"(e.g. last:3). Got {text!r}."
    )


def apply_unfreeze(backbone: nn.Module, blocks: list[Block], n_trainable: int) -> list[nn.Parameter]:
    """Set ``requires_grad`` for the chosen final blocks; return the trainable parameters."""
    for param in backbone.parameters():
        param.requires_grad_(False)
    trainable: list[nn.Parameter] = []
    for block in blocks[len(blocks) - n_trainable:] if n_trainable else []:
        for param in block.parameters():
            param.requires_grad_(True)
            trainable.append(param)
    return trainable


def set_train_mode(backbone: nn.Module, blocks: list[Block], n_trainable: int, *,
                   bn_train: bool = False) -> None:
    """Put the backbone in training mode the deliberate way.

    Trainable blocks (and parameter-free layers such as dropout) train; frozen blocks stay in
    eval mode. BatchNorm layers keep using their pretrained running statistics (eval mode; their
    scale and shift still learn when their block is trainable) unless ``bn_train``: batch
    statistics of a new domain differ from the pretrained ones, and switching to them changes
    the very features the probe's head was fitted on. With nothing unfrozen the whole backbone
    runs in eval mode, exactly as during extraction.
    """
    if n_trainable == 0:
        backbone.eval()
        return
    backbone.train()
    for block in blocks[: len(blocks) - n_trainable]:
        if not block.direct_only:
            block.module.eval()
    if not bn_train:
        for module in backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


@dataclass
class SummaryRow:
    index: int | None
    name: str
    kind: str
    output_shape: tuple[int, ...] | None
    params: int
    trainable: bool


def model_summary(backbone: nn.Module, head: nn.Module, blocks: list[Block], n_trainable: int,
                  input_size: int) -> tuple[list[SummaryRow], dict[str, int]]:
    """One row per block (output shape from a one-image forward pass) plus the head, and totals."""
    shapes: dict[int, tuple[int, ...]] = {}
    hooks = []
    for i, block in enumerate(blocks):
        if not block.direct_only:
            def record(_m: nn.Module, _inp: object, out: object, _i: int = i) -> None:
                if isinstance(out, torch.Tensor):
                    shapes[_i] = tuple(out.shape)
            hooks.append(block.module.register_forward_hook(record))
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            features = backbone(torch.zeros(1, 3, input_size, input_size,
                                            device=next(head.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
        backbone.train(was_training)
    first_trainable = len(blocks) - n_trainable
    rows = [SummaryRow(i, b.name, b.kind, shapes.get(i), sum(p.numel() for p in b.parameters()),
                       i >= first_trainable) for i, b in enumerate(blocks)]
    rows.append(SummaryRow(None, "head", type(head).__name__, (1, head.out_features)
                           if isinstance(head, nn.Linear) else tuple(features.shape),
                           sum(p.numel() for p in head.parameters()), True))
    counted = {id(p) for b in blocks for p in b.parameters()}
    uncounted = sum(p.numel() for p in backbone.parameters() if id(p) not in counted)
    trainable = sum(r.params for r in rows if r.trainable)
    total = sum(r.params for r in rows) + uncounted
    return rows, {"total": total, "trainable": trainable, "frozen": total - trainable}


def format_summary(rows: list[SummaryRow], totals: dict[str, int]) -> str:
    """The summary as a fixed-width table (what ``embedcache finetune`` prints first)."""
    lines = [f"{'#':>3}  {'block':<28} {'type':<20} {'output shape':<20} {'params':>11}  trainable"]
    lines.append("-" * len(lines[0]))
    for row in rows:
        shape = "-" if row.output_shape is None else str(list(row.output_shape))
        index = "" if row.index is None else str(row.index)
        lines.append(f"{index:>3}  {row.name[:28]:<28} {row.kind[:20]:<20} {shape:<20} "
                     f"{row.params:>11,}  {'yes' if row.trainable else 'no'}")
    lines.append("-" * len(lines[0]))
    lines.append(f"params: {totals['total']:,} total, {totals['trainable']:,} trainable, "
                 f"{totals['frozen']:,} frozen")
    return "\n".join(lines)
