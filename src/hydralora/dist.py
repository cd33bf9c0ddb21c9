"""Which process this is under torchrun/accelerate, and logging from the main one only."""

from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def log(message: str) -> None:
    """Print a progress line from the main process only."""
    if is_main_process():
        print(f"[hydralora] {message}", flush=True)
