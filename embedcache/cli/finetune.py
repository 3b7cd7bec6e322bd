"""``embedcache finetune``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click

from embedcache.cli.common import (
    cache_dir_option,
    device_option,
    handle_errors,
    progress_bar,
    table,
    threads_option,
    warn_if_pickle,
    workers_option,
)
from embedcache.experiments.finetune.config import HEAD_INITS, OPTIMIZERS, SCHEDULES, FinetuneConfig
from embedcache.runtime import PRECISIONS

_SETTINGS = {f.name for f in dataclasses.fields(FinetuneConfig)}


@click.command("finetune")
@click.argument("probe_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("data")
@click.option("--unfreeze", default="all", show_default=True,
              help="What trains besides the head: all, last:N (the final N blocks; the summary lists "
                   "them) or none (the head alone).")
@click.option("--epochs", type=int, default=5, show_default=True, help="Training epochs at most.")
@click.option("--lr", type=float, default=None, help="Head learning rate [default: 1e-3 adamw, 1e-2 sgd].")
@click.option("--backbone-lr-mult", type=float, default=0.1, show_default=True,
              help="Backbone learning rate = lr x this.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True,
              help="adamw, or sgd (Nesterov momentum 0.9).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="cosine", show_default=True,
              help="cosine to zero, or x0.1 every third of the epochs; both after a 5% linear warm-up.")
@click.option("--weight-decay", type=float, default=None,
              help="On weights, not biases/norms [default: 0.01 adamw, 1e-4 sgd].")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images per step.")
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="Random resized crop + horizontal flip on training images.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto",
              show_default=True, help="auto: fp32 on CPU, bf16 on GPUs that have it, else fp16 with loss scaling.")
@device_option
@click.option("--patience", type=int, default=3, show_default=True,
              help="Stop after this many epochs without a better val accuracy.")
@click.option("--head-init", type=click.Choice(HEAD_INITS), default="probe", show_default=True,
              help="Start the head from the probe (LP->FT) or from random weights (for comparison).")
@click.option("--head-penalty", type=float, default=None,
              help="L2 penalty on the head, as the probe defines it [default: the probe's chosen penalty].")
@click.option("--bn-train", is_flag=True,
              help="Let BatchNorm of trainable blocks use batch statistics (default: keep the pretrained ones).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of head init, order, augmentation.")
@workers_option
@threads_option
@click.option("--weights", "weights_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The local weights file, when the probe's backbone used one.")
@click.option("--val-fraction", type=float, default=0.0, show_default=True,
              help="Hold-out to val when DATA has no splits (use the values given to extract).")
@click.option("--test-fraction", type=float, default=0.2, show_default=True,
              help="Hold-out to test when DATA has no splits (use the values given to extract).")
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of that hold-out.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory [default: PROBE_DIR-finetuned].")
@click.option("--restart", is_flag=True, help="Discard the run in --out and start over.")
@click.option("--allow-unchecked-split", is_flag=True,
              help="Fine-tune even when the probe's cache entry cannot be found to check that no test image "
                   "was one of its training rows (the report then says the split is unchecked).")
@cache_dir_option
@handle_errors
def finetune_command(probe_dir: Path, data: str, **options: Any) -> None:
    """Fine-tune the network behind a probe on DATA, starting the head from the probe (LP->FT).

    \b
    The backbone, its weights and preprocessing come from the probe. DATA is the image source
    the probe's features came from (same split options as extract): train trains, val picks
    the best epoch (early stopping), test is scored once at the start (the probe through the
    full network) and once at the end (the best epoch).
    A checkpoint is written after every epoch: after an interruption, run the same command
    again to resume. Writes backbone.safetensors (use with `extract --weights`), the head as a
    probe artifact (so `embedcache predict OUT ...` works), finetune.json and curve.png.
    """
    from embedcache.experiments.finetune.run import finetune

    warn_if_pickle(probe_dir)
    config = FinetuneConfig(**{k: v for k, v in options.items() if k in _SETTINGS})
    rest = {k: v for k, v in options.items() if k not in _SETTINGS}
    update, close = progress_bar(postfix=lambda p: f"loss {p.loss:.4f}, {p.images_per_s:.0f} img/s",
                                  phase=lambda p: f"epoch {p.epoch}/{p.epochs}")

    def say(line: str) -> None:
        close()
        click.echo(line, err=True)

    try:
        result = finetune(probe_dir, data, config, log=say, progress=update, **rest)
    finally:
        close()
    report = result.report
    if result.reused:
        click.echo(f"already done: {result.out} holds this run (pass --restart to train again)", err=True)
    start, test = report["start"], report["test"]
    best = report["best_epoch"]
    best_val = report["best_val_top1"]
    rows = [[f"start ({report['config']['head_init']} head)", f"{start['val_top1']:.4f}", f"{start['test_top1']:.4f}"],
            [f"fine-tuned (best epoch {best} of {len(report['epochs'])})", f"{best_val:.4f}", f"{test['top1']:.4f}"]]
    click.echo(table(rows, ["model", "val top-1", "test top-1"]))
    sizes = report["data"]["split_sizes"]
    params = report["params"]
    click.echo(f"\nrows       train {sizes['train']}, val {sizes['val']}, test {sizes['test']} "
               f"({report['data']['split_check']})")
    click.echo(f"params     {params['trainable']:,} trainable, {params['frozen']:,} frozen "
               f"(unfreeze {report['config']['unfreeze']})")
    click.echo(f"time       {report['seconds_per_epoch']:.1f} s per epoch (median), {report['device']}/"
               f"{report['precision']}" + (f"; resumed after epochs {report['resumes']}" if report["resumes"] else ""))
    click.echo(f"saved      {result.out} (backbone.safetensors, probe.json, finetune.json)")
    if report["config"]["head_init"] == "probe":
        click.echo("note       the start's val top-1 is optimistic (the probe was refit on train+val), so "
                   "the best epoch is chosen among trained epochs; compare on test.")
