"""Which process this is under torchrun/accelerate, and logging from the main one only."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def end_process_group() -> None:
    """Destroy the process group the Trainer set up (torchrun, accelerate), if any: left to
    the interpreter's exit, gloo's worker threads can abort the process after its work is done
    ("terminate called without an active exception", exit -6: seen once in the 2-process test)."""
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def log(message: str) -> None:
    """Print a progress line from the main process only."""
    if is_main_process():
        print(f"[hydralora] {message}", flush=True)


def progress(iterable, desc: str, total: int | None = None, unit: str = "it"):
    """`iterable` with a tqdm progress bar on stderr, shown only in the main process and only
    when stderr is a terminal (never in logs, pipes or the stdout that scripts parse)."""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stderr
        tty = False
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, leave=False,
                disable=not (tty and is_main_process()), dynamic_ncols=True)
