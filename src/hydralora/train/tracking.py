"""Where experiment trackers write during `hydralora train` (`--trainer-arg report_to=...`).

The Trainer puts TensorBoard's event files under its own output_dir, which for `hydralora
train` is OUTPUT/checkpoints/ (so they would sit among the checkpoints, and `--overwrite`
and `save_total_limit` housekeeping would be their neighbours); they belong beside the run's
other records, under OUTPUT/runs/. Whether the tracker is installed is checked with the
other trainer arguments, before any slow work (`train/arguments.py`, naming the extra:
`pip install 'hydralora[tensorboard]'`, `'hydralora[wandb]'`).
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import Trainer


def tracking_folders(trainer: Trainer, output: Path) -> None:
    """report_to=tensorboard writes under OUTPUT/runs/<date>_<host>/, W&B's local files under
    OUTPUT/wandb/; a folder set in the environment (TENSORBOARD_LOGGING_DIR, WANDB_DIR) wins."""
    from transformers.integrations.integration_utils import TensorBoardCallback, default_logdir

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(output / default_logdir())
    if "wandb" in (trainer.args.report_to or []):
        os.environ.setdefault("WANDB_DIR", str(output))
