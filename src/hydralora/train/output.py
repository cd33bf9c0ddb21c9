"""A run's output folder: what may be written into it, checkpoints, files of other methods,
the manifest of what the run wrote (only those files are ever removed) and the run's lock."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..config import HydraLoraConfig
from ..dist import is_main_process, log
from ..errors import TrainingError
from ..files import (
    CONFIG_NAME,
    LOCK_NAME,
    MANIFEST,
    RUN_CONFIG,
    SPLIT_FILE,
    SUMMARY,
    acquire_lock,
    read_manifest,
    record_written,
    release_lock,
    remove_entry,
)
from ..methods import METHODS
from .config import TrainConfig

CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = ".complete"


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


def check_resume_fits(output: Path, adapter: HydraLoraConfig) -> None:
    """--resume of a HydraLoRA run: the adapter settings must be the checkpoint's (checked
    before anything is written)."""
    checkpoint = last_checkpoint(output)
    config_file = checkpoint / "adapter_config.json" if checkpoint else None
    if config_file is None or not config_file.exists():
        return
    saved = HydraLoraConfig.from_json_file(config_file).to_dict()
    wanted = adapter.to_dict()
    differ = [f"{k}: checkpoint {saved[k]!r}, this run {wanted[k]!r}" for k in sorted(saved)
              if k != "k_selection" and saved[k] != wanted[k]]
    if differ:
        raise TrainingError(f"--resume: the adapter settings differ from {checkpoint}'s ("
                            + "; ".join(differ[:6]) + "); resume with the run's own settings")


def discard_old_checkpoints(output: Path) -> None:
    """With --overwrite (and no --resume) the previous run's checkpoints must not be mistaken
    for this run's: move them aside, then delete them (only a folder this tool wrote)."""
    folder = output / CHECKPOINTS
    ours = CHECKPOINTS in (read_manifest(output) or set()) or (
        folder.is_dir() and all(p.name.startswith("checkpoint-") for p in folder.iterdir()))
    if folder.exists() and ours:
        aside = output / f".{CHECKPOINTS}.old-{os.getpid()}"
        os.replace(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)


def leftovers(method: str) -> list[str]:
    """Files that the other methods write and `method` does not (a folder retrained with
    another method must not keep the old method's adapter files)."""
    own = set(METHODS[method].files)
    return sorted({f for m in METHODS.values() for f in m.files} - own)


def remove_leftovers(output: Path, method: str) -> None:
    """Remove the other methods' files, only those the manifest says this tool wrote."""
    ours = read_manifest(output) or set()
    for pattern in leftovers(method):
        for path in output.glob(pattern):
            if path.name in ours:
                remove_entry(path)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.is_dir():
        return {}
    return {p.name: (p.lstat().st_ino, p.lstat().st_mtime_ns) for p in folder.iterdir()
            if not p.name.startswith(".")}


@contextlib.contextmanager
def run_folder(output: Path) -> Iterator[None]:
    """Hold OUTPUT's lock during the run (main process), and afterwards list in the manifest
    what the run wrote. A run that wrote nothing leaves the folder as it found it (a folder it
    created and left empty is removed)."""
    if not is_main_process():
        yield
        return
    created = not output.exists()
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrainingError(f"--output {output}: cannot create it ({err.strerror})") from None
    before = _snapshot(output)
    lock, note = acquire_lock(output)
    if note:
        log(note)
    try:
        yield
    finally:
        release_lock(lock)
        after = _snapshot(output)
        changed = {n for n, v in after.items() if before.get(n) != v}
        gone = (read_manifest(output) or set()) - set(after)
        if changed or gone:
            record_written(output, add=changed, forget=gone)
        elif created and not any(output.iterdir()):
            output.rmdir()


__all__ = ["CHECKPOINTS", "COMPLETE_MARKER", "LOCK_NAME", "MANIFEST", "RUN_CONFIG", "SUMMARY",
           "check_resume_fits", "discard_old_checkpoints", "last_checkpoint", "leftovers",
           "prepare_output", "remove_leftovers", "run_folder"]
