"""What every command shares: error translation, progress bars, tables, and the shared options.

Options are defined once here, with their choices taken from the library's own definitions
(:data:`embedcache.runtime.DEVICES`, ...), which import neither torch nor scikit-learn.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from embedcache.errors import EmbedcacheError, StorageError
from embedcache.models.runtimes import INSTALL_ONNX, INSTALL_OPENVINO, RUNTIMES
from embedcache.runtime import DEVICES, PRECISIONS, THREADS_ENV, check_threads
from embedcache.store.schema import CACHE_DIR_ENV

cache_dir_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False, path_type=Path), envvar=CACHE_DIR_ENV, default="cache",
    show_default=True, help=f"Where cache entries live (env: {CACHE_DIR_ENV}).")
device_option = click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                             help="Where the backbone runs; auto = cuda, else mps, else cpu.")
precision_option = click.option(
    "--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
    help="Autocast precision; auto = bf16 on CPUs with native bf16, fp16 on GPUs, else fp32.")
#: ``--runtime``'s choices (extract, bench, predict).
runtime_choice = click.Choice(RUNTIMES)
runtime_option = click.option(
    "--runtime", type=runtime_choice, default=None,
    help=f"What runs the backbone: torch, or on the CPU openvino ({INSTALL_OPENVINO}) or onnxruntime "
         f"(fp32 only; {INSTALL_ONNX}). Default: $EMBEDCACHE_RUNTIME, else auto = on the CPU openvino when "
         f"installed, else onnxruntime when installed (and --precision is auto or fp32), else torch. "
         f"A runtime other than torch is part of the cache key.")
batch_size_option = click.option("--batch-size", type=int, default=64, show_default=True,
                                 help="Images per forward pass (not in the cache key).")
workers_option = click.option("--workers", type=int, default=None,
                              help="Decoding processes (default: cores - 1; 0 = in-process). With a cached "
                                   "OpenVINO/ONNX export, threads decode instead: one, and one more each time "
                                   "the model waits, up to --threads (0 = in-process).")


def _threads_value(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    """--threads as an int; a bad value is one line naming the option (not a usage dump)."""
    try:
        return check_threads(value, what="--threads")
    except EmbedcacheError as exc:
        raise click.ClickException(str(exc)) from None


threads_option = click.option(
    "--threads", default=None, metavar="N", callback=_threads_value,
    help=f"torch's intra-op threads (env: {THREADS_ENV}; default: every core this process may use, "
         f"shared with the decoding workers).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """EmbedcacheError -> a one-line message and exit 1; Ctrl-C -> a note and exit 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except StorageError as exc:
            if not exc.process_unsafe:
                raise click.ClickException(str(exc)) from exc
            # HDF5 cannot shut down cleanly after a failed write (it may crash at exit): say why
            # and leave at once; committed progress is on disk already.
            click.echo(f"Error: {exc}", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        except EmbedcacheError as exc:
            raise click.ClickException(str(exc)) from exc
        except MemoryError:
            raise click.ClickException("Out of memory. Use a smaller --batch-size or --image-size, or fewer "
                                       "--workers.") from None
        except OSError as exc:  # the last resort: what no library call named for us
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
        except KeyboardInterrupt:
            click.echo("\nInterrupted. Progress so far is kept; rerun the same command to resume.", err=True)
            sys.exit(130)

    return wrapper


def human_bytes(size: float) -> str:
    """``1.5 MB`` style sizes."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters with an ellipsis."""
    return text if len(text) <= width else text[: width - 1] + "…"


def table(rows: list[list[str]], headers: list[str]) -> str:
    """A fixed-width text table with a rule under the headers."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def progress_bar(postfix: Callable[[Any], str] = lambda p: f"{p.images_per_s:.0f} img/s, {p.failed} failed",
                 phase: Callable[[Any], str | None] = lambda p: None) -> tuple[Callable[[Any], None], Callable[[], None]]:
    """``(update, close)`` for a tqdm bar on stderr fed with progress objects (``done``,
    ``total``, ...). A new ``phase(p)`` (an epoch) starts a new, transient bar labelled with it."""
    from tqdm import tqdm

    if not hasattr(tqdm, "_lock"):
        # tqdm's default lock holds a multiprocessing one too (importing multiprocessing, ~8 ms, and
        # a semaphore) for bars written from several processes; ours are written by one process
        tqdm.set_lock(threading.RLock())
    state: dict[str, Any] = {}

    def close() -> None:
        if state.get("bar") is not None:
            state["bar"].close()
            state["bar"] = None

    def update(p: Any) -> None:
        bar = state.get("bar")
        if bar is None or state.get("phase") != phase(p):
            close()
            state["phase"] = label = phase(p)
            # Our own images/s (measured from the start of the model loop) instead of tqdm's,
            # which is meaningless on the first tick and counts resumed rows as fresh work.
            bar = state["bar"] = tqdm(
                total=p.total, unit="img", dynamic_ncols=True, file=sys.stderr, desc=label,
                leave=label is None, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
        bar.n = p.done
        bar.set_postfix_str(postfix(p), refresh=False)
        bar.refresh()

    return update, close


def parse_floats(text: str | None, option: str) -> list[float] | None:
    """Comma-separated numbers (None for an empty value); a usage error names ``option``."""
    if not text:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=option) from None


def parse_ints(text: str, option: str) -> list[int]:
    """Comma-separated ints; a usage error names ``option``."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated ints, got {text!r}", param_hint=option) from None


def warn_if_pickle(probe_dir: Path) -> None:
    """Say, before it is loaded, that a probe's ``probe.joblib`` is a pickle (every time)."""
    joblib_file = Path(probe_dir) / "probe.joblib"
    if joblib_file.exists():
        click.echo(f"warning: {joblib_file} is a joblib file, which is pickle: loading it runs code. Load only "
                   f"probes you trust (when probe.json lists its sha256, that is checked first).", err=True)


#: ``--features``: which stored feature set a head trains on (probe, fewshot).
features_option = click.option(
    "--features", default=None,
    help="Feature set to train on: 'penultimate' (the default), a set stored by `extract --layers` "
         "(NODE:POOL, e.g. features.3:avg; `embedcache info ENTRY` lists them), or several joined by '+' "
         "(concatenated at fit time, never stored).")
