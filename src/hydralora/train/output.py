"""A run's output folder: what may be written into it, checkpoints, files of other methods."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import TrainingError
from ..methods import METHODS
from ..model import CONFIG_NAME
from ..methods.lora_split import SPLIT_FILE
from .config import TrainConfig

CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = ".complete"
RUN_CONFIG = "train_config.yaml"
SUMMARY = "summary.json"


def last_checkpoint(output: Path) -> Path | None:
    """The newest checkpoint that was completely written (partial ones are ignored)."""
    folder = output / CHECKPOINTS
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if (p / COMPLETE_MARKER).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def prepare_output(cfg: TrainConfig) -> Path:
    """Check that the run may write into OUTPUT (nothing is written yet)."""
    output = Path(cfg.output)
    if output.exists() and not output.is_dir():
        raise TrainingError(f"--output {output} exists and is not a directory")
    has_adapter = (output / CONFIG_NAME).exists() or (output / SPLIT_FILE).exists()
    if cfg.resume:
        if last_checkpoint(output) is None:
            raise TrainingError(
                f"--resume: no complete checkpoint in {output / CHECKPOINTS}; start without --resume"
            )
    elif has_adapter and not cfg.overwrite:
        raise TrainingError(
            f"{output} already holds an adapter; choose another --output, or pass --overwrite "
            "to replace it (it is kept until the new one is saved)"
        )
    elif (output / CHECKPOINTS).exists() and last_checkpoint(output) and not cfg.overwrite:
        raise TrainingError(
            f"{output / CHECKPOINTS} holds checkpoints of an unfinished run: pass --resume to "
            "continue it or --overwrite to start again"
        )
    return output


def discard_old_checkpoints(output: Path) -> None:
    """With --overwrite (and no --resume) the previous run's checkpoints must not be mistaken
    for this run's: move them aside, then delete them."""
    folder = output / CHECKPOINTS
    if folder.exists():
        aside = output / f".{CHECKPOINTS}.old-{os.getpid()}"
        os.replace(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)


def leftovers(method: str) -> list[str]:
    """Files that the other methods write and `method` does not (a folder retrained with
    another method must not keep the old method's adapter files)."""
    own = set(METHODS[method].files)
    return sorted({f for m in METHODS.values() for f in m.files} - own)


def remove_leftovers(output: Path, method: str) -> None:
    for pattern in leftovers(method):
        for path in output.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
