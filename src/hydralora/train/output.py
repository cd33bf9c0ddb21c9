"""A run's output folder: what may be written into it, checkpoints, files of other methods,
the manifest of what the run wrote (only those files are ever replaced or removed) and the
run's lock.

Ownership, level by level: OUTPUT's manifest lists what the run wrote there; the checkpoints
folder's own manifest lists the `checkpoint-N` folders the Trainer wrote (each listed before
it is written, so a checkpoint cut short is still ours); each checkpoint lists its files once
complete. Folders written before checkpoints were listed: those holding our `.complete`
marker are ours.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

from ..config import HydraLoraConfig
from ..data.words import names_a_mixture
from ..dist import is_main_process, log
from ..errors import StorageError, TrainingError
from ..files import (
    CONFIG_NAME,
    LOCK_NAME,
    MANIFEST,
    RUN_CONFIG,
    SPLIT_FILE,
    STORAGE_ERRNOS,
    SUMMARY,
    foreign_inside,
    not_ours,
    read_manifest,
    record_written,
    remove_owned,
)
from ..folders import acquire_lock, check_output_path, make_dir, release_lock
from ..methods import METHODS
from .config import TrainConfig

CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = ".complete"
BUILTIN_DATA = "data"  # the built-in mixture's files, when --data builtin
CARD = "README.md"  # written only where it is missing or ours (cards.card_is_ours)


def _step(path: Path) -> int | None:
    step = path.name.removeprefix("checkpoint-")
    return int(step) if path.name.startswith("checkpoint-") and step.isdigit() else None


def our_checkpoints(folder: Path) -> list[Path]:
    """The `checkpoint-N` folders in `folder` that this tool wrote (complete or not), oldest
    first: those its manifest lists; in a folder from before checkpoints were listed, those
    holding our completion marker."""
    if not folder.is_dir():
        return []
    listed = read_manifest(folder)
    found = [p for p in folder.iterdir() if _step(p) is not None and p.is_dir() and not p.is_symlink()
             and (p.name in listed if listed is not None else (p / COMPLETE_MARKER).exists())]
    return sorted(found, key=_step)


def adopt_listed_checkpoints(folder: Path) -> None:
    """Give a checkpoints folder from before checkpoints were listed its manifest (the ones
    holding our marker), before this run adds its own."""
    if folder.is_dir() and read_manifest(folder) is None:
        record_written(folder, add=[p.name for p in our_checkpoints(folder)])


def last_checkpoint(output: Path) -> Path | None:
    """The newest checkpoint this tool wrote completely (partial ones, and folders it did not
    write, are ignored)."""
    done = [p for p in our_checkpoints(output / CHECKPOINTS) if (p / COMPLETE_MARKER).exists()]
    return done[-1] if done else None


def run_names(cfg: TrainConfig) -> list[str]:
    """The names a run may write into OUTPUT (the model card aside: it is written only where
    no README.md of the user's is)."""
    names = {RUN_CONFIG, SUMMARY, CHECKPOINTS, *(f for f in METHODS[cfg.method].files if "*" not in f)}
    if cfg.method == "lora-split":  # one folder per cluster: cluster_0 ... cluster_<k-1>
        k = cfg.k_max if cfg.adapter.get("num_heads") == "auto" else int(cfg.adapter.get("num_heads", 1))
        names |= {f"cluster_{i}" for i in range(max(k, 1))}
    if names_a_mixture([*cfg.data, *cfg.eval_data]):  # builtin, builtin-conflict
        names.add(BUILTIN_DATA)
    report_to = cfg.trainer_args.get("report_to") or []
    report_to = [report_to] if isinstance(report_to, str) else list(report_to)
    names |= {folder for tracker, folder in (("tensorboard", "runs"), ("wandb", "wandb"))
              if tracker in report_to or "all" in report_to}  # the trackers' files (tracking.py)
    return sorted(names - {CARD})


def refuse_model_folder(output: Path, model: str) -> None:
    """An adapter written next to a full model makes transformers load that folder as an
    adapter (`from_pretrained` then fails): never write one into a model's folder."""
    base = Path(model)
    if base.is_dir() and output.exists() and output.resolve() == base.resolve():
        raise TrainingError(f"--output {output} is the base model's own folder; an adapter written "
                            "there breaks loading the model: write it elsewhere")
    if (output / "config.json").exists() and "config.json" not in (read_manifest(output) or set()):
        raise TrainingError(f"--output {output} holds a model (config.json); an adapter written "
                            "there breaks loading that model: choose another --output")


def prepare_output(cfg: TrainConfig) -> Path:
    """Check that the run may write into OUTPUT (nothing is written yet): no entry of the names
    it writes that this tool did not write, no model folder, and an earlier adapter only with
    --overwrite (unfinished checkpoints: --resume or --overwrite)."""
    output = Path(cfg.output)
    check_output_path(output)
    refuse_model_folder(output, cfg.model)
    foreign = not_ours(output, run_names(cfg))
    if foreign:
        raise TrainingError(
            f"{output}: {', '.join(foreign[:5])} {'is' if len(foreign) == 1 else 'are'} not written by "
            f"hydralora (not listed in its {MANIFEST}) and this run would replace "
            f"{'it' if len(foreign) == 1 else 'them'}; it never replaces what it did not write, "
            f"--overwrite or not: move {'it' if len(foreign) == 1 else 'them'} away or choose another --output")
    inside = [str(p) for name in run_names(cfg) if name not in (CHECKPOINTS, BUILTIN_DATA)
              for p in foreign_inside(output / name)]
    if inside:  # a folder of ours the run replaces whole (a LoRA-Split cluster's) holds theirs
        raise TrainingError(f"{inside[0]} was not written by hydralora and this run would replace the "
                            "folder holding it: move it away (it is never removed)")
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
    check_checkpoint_names(output / CHECKPOINTS, cfg)
    return output


def check_checkpoint_names(folder: Path, cfg: TrainConfig) -> None:
    """The checkpoints this run will write, where they can be known before it starts (a step
    count and a save interval): none may have the name of a folder the tool did not write (the
    Trainer checks every save again)."""
    if not folder.is_dir() or cfg.save_steps <= 0 or cfg.max_steps <= 0 or cfg.method == "lora-split":
        return
    done = last_checkpoint(folder.parent) if cfg.resume else None
    start = _step(done) if done is not None else 0
    ours = {p.name for p in our_checkpoints(folder)}
    planned = [f"checkpoint-{s}" for s in range(cfg.save_steps, cfg.max_steps + 1, cfg.save_steps) if s > start]
    clash = [n for n in planned if os.path.lexists(folder / n) and n not in ours]
    if clash:
        raise TrainingError(f"{folder / clash[0]} was not written by hydralora, and this run would "
                            "write its checkpoint there: move it away (it is never replaced)")


def claim_checkpoint(folder: Path, name: str) -> None:
    """Before the Trainer writes checkpoint `name` into `folder`: refuse a folder of that name
    the tool did not write, and list it as ours before it is written."""
    if os.path.lexists(folder / name) and name not in {p.name for p in our_checkpoints(folder)}:
        raise TrainingError(f"{folder / name} was not written by hydralora and the Trainer would write "
                            "this step's checkpoint there: move it away (it is never replaced), then --resume")
    adopt_listed_checkpoints(folder)
    record_written(folder, add=[name])


def rotate_checkpoints(folder: Path, limit: int | None, keep: str | None = None) -> None:
    """Keep the newest `limit` of our checkpoints (and `keep`, the best one): the Trainer's
    own rotation would delete every `checkpoint-*` folder, ours or not."""
    if not limit or limit <= 0:
        return
    ours = our_checkpoints(folder)
    protected = {ours[-1]} if ours else set()
    if keep:
        protected.add(Path(keep))
    for path in ours[: max(len(ours) - max(limit, len(protected)), 0)]:
        if path not in protected:
            forget_checkpoint(folder, path)


def forget_checkpoint(folder: Path, path: Path) -> None:
    """Remove one of our checkpoints: its marker first (never resumed from half-deleted)."""
    (path / COMPLETE_MARKER).unlink(missing_ok=True)
    remove_owned(path)
    if not path.exists():
        record_written(folder, forget=[path.name])


def discard_old_checkpoints(output: Path) -> None:
    """With --overwrite (and no --resume) the previous run's checkpoints must not be mistaken
    for this run's: remove the ones this tool wrote (including the LoRA-Split parts' folders),
    nothing else."""
    folder = output / CHECKPOINTS
    if not folder.is_dir() or CHECKPOINTS not in (read_manifest(output) or set()):
        return
    adopt_listed_checkpoints(folder)
    for path in our_checkpoints(folder):
        forget_checkpoint(folder, path)
    for name in sorted(read_manifest(folder) or set()):  # the parts' folders (LoRA-Split)
        part = folder / name
        if part.is_dir() and not part.is_symlink():
            for path in our_checkpoints(part):
                forget_checkpoint(part, path)


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
                remove_owned(path)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.is_dir():
        return {}
    return {p.name: (p.lstat().st_ino, p.lstat().st_mtime_ns) for p in folder.iterdir()
            if not p.name.startswith(".")}


# what torch.save and safetensors say when the file system refuses a write
_WRITE_FAILED = re.compile(r"PytorchStreamWriter failed|file write failed|unexpected pos|"
                           r"No space left|Disk quota|Read-only file system|os error (28|122|30)")


def write_failure(err: BaseException, folder: Path) -> OSError | None:
    """An OSError with the errno of a write the file system refused (disk full, quota,
    read-only, permission), or None when `err` is something else. torch.save raises a
    RuntimeError without an errno: the file system's state tells which."""
    if isinstance(err, OSError):
        return err if isinstance(err, StorageError) or err.errno in STORAGE_ERRNOS else None
    tb, writer = err.__traceback__, False
    while tb is not None:  # raised while torch.save or safetensors wrote a file
        writer = writer or tb.tb_frame.f_code.co_filename.endswith(("torch/serialization.py", "safetensors/torch.py"))
        tb = tb.tb_next
    if not (writer or _WRITE_FAILED.search(str(err))):
        return None
    try:
        stat = os.statvfs(folder)
        code = (errno.EROFS if stat.f_flag & os.ST_RDONLY else
                errno.ENOSPC if stat.f_bavail * stat.f_frsize < 64 << 20 else errno.EIO)
    except OSError:
        code = errno.EIO
    return OSError(code, os.strerror(code) if code != errno.EIO else str(err).strip().splitlines()[0][:200])


@contextlib.contextmanager
def run_folder(output: Path, names: list[str] = (), check: Callable[[], Any] | None = None) -> Iterator[None]:
    """Hold OUTPUT's lock during the run (main process). `check` runs once the lock is held
    (what another process wrote before it took the lock is then seen). `names` (what the run
    may write, none of them another's: `prepare_output`) are listed in the manifest before the run writes, so
    a run killed halfway leaves them marked as ours; afterwards the manifest lists what is
    there. What was there before and was not ours is never claimed. A run that wrote nothing
    leaves the folder as it found it (a folder it created and left empty is removed)."""
    if not is_main_process():
        yield
        return
    try:
        created = make_dir(output)
    except OSError as err:
        if isinstance(err, StorageError):
            raise
        raise TrainingError(f"--output {output}: cannot create it ({err.strerror})") from None
    before = _snapshot(output)
    had_manifest = read_manifest(output)
    lock, note = acquire_lock(output)
    if note:
        log(note)
    try:
        if check is not None:
            check()
        if names:
            record_written(output, add=names)
        yield
    finally:
        release_lock(lock)
        after = _snapshot(output)
        theirs = {n for n in before if n not in (had_manifest or set())}
        changed = {n for n, v in after.items() if before.get(n) != v} - theirs
        gone = (read_manifest(output) or set()) - set(after)
        if changed or gone:
            record_written(output, add=changed, forget=gone)
        if had_manifest is None and not read_manifest(output):
            (output / MANIFEST).unlink(missing_ok=True)
        if created and not any(output.iterdir()):
            output.rmdir()


def check_resume_fits(output: Path, adapter: HydraLoraConfig) -> None:
    """--resume of a HydraLoRA run: the adapter settings must be the checkpoint's (checked
    before anything is written)."""
    checkpoint = last_checkpoint(output)
    config_file = checkpoint / "adapter_config.json" if checkpoint else None
    if config_file is None or not config_file.exists():
        return
    saved = HydraLoraConfig.from_json_file(config_file).to_dict()
    wanted = adapter.to_dict()
    # the preset is a label (runs before presets have none), k_selection a record of the choice
    differ = [f"{k}: checkpoint {saved[k]!r}, this run {wanted[k]!r}" for k in sorted(saved)
              if k not in ("k_selection", "preset") and saved[k] != wanted[k]]
    if differ:
        raise TrainingError(f"--resume: the adapter settings differ from {checkpoint}'s ("
                            + "; ".join(differ[:6]) + "); resume with the run's own settings")


__all__ = ["CHECKPOINTS", "COMPLETE_MARKER", "LOCK_NAME", "MANIFEST", "RUN_CONFIG", "SUMMARY",
           "adopt_listed_checkpoints", "check_resume_fits", "claim_checkpoint", "discard_old_checkpoints",
           "last_checkpoint", "leftovers", "our_checkpoints", "prepare_output", "remove_leftovers",
           "rotate_checkpoints", "run_folder", "run_names", "write_failure"]
