"""Fine-tuning step throughput on this machine: precision x memory format, side by side.

    python benchmarks/finetune_speed.py [--backbone efficientnet_lite0] [--size 64] [--batch 64]

Times full training steps (forward, cross-entropy, backward, AdamW step) of the backbone + a
linear head on random batches, every parameter trainable and BatchNorm in eval mode as
`embedcache finetune` runs it, for fp32 / bf16 autocast x NCHW / channels_last. Prints images/s
(median of the timed steps) and the ratio to the fastest. This is why `finetune --precision auto`
is fp32 on a CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from embedcache.models.build import get_backbone


def steps_per_second(backbone: str, size: int, batch: int, precision: str, channels_last: bool,
                     steps: int) -> float:
    bb = get_backbone(backbone, image_size=size)
    model = nn.Sequential(bb.module, nn.Linear(bb.dim, 10))
    for param in model.parameters():
        param.requires_grad_(True)
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,))
    times = []
    for step in range(steps + 2):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step >= 2:  # the first steps allocate and pick kernels
            times.append(time.perf_counter() - started)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"{args.backbone} @{args.size} px, batch {args.batch}, all parameters trainable")
    results = {}
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            name = f"{precision} {'channels_last' if channels_last else 'NCHW'}"
            results[name] = steps_per_second(args.backbone, args.size, args.batch, precision, channels_last,
                                             args.steps)
    best = max(results.values())
    for name, rate in results.items():
        print(f"  {name:<20} {rate:7.1f} img/s   {rate / best:.2f} of the fastest")


if __name__ == "__main__":
    main()
