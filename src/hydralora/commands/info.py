"""Options of `hydralora info` (run by info.py) and `hydralora push` (hub.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from .common import looks_like_hub_id


@dataclass
class InfoOptions:
    """Summarize an adapter directory."""

    adapter: str = field(default="", metadata={"positional": True})
    """Adapter directory (HydraLoRA, PEFT LoRA or LoRA-Split)."""
    json: bool = False
    """Print JSON."""


@dataclass
class PushOptions:
    """Upload an adapter folder to the Hugging Face Hub."""

    folder: str = field(default="", metadata={"positional": True})
    """Adapter folder (written by hydralora train or export)."""
    repo: str = field(default="", metadata={"positional": True})
    """Hub repository id, owner/name (created if missing); owner/name@branch pushes to a branch."""
    private: bool = False
    """Create the repository as private."""
    revision: str | None = None
    """Branch to push to (default: main)."""
    commit_message: str = "Upload HydraLoRA adapter"
    """Commit message."""
    include: list[str] = field(default_factory=list, metadata={"metavar": "PATH"})
    """Also send these files (paths inside the folder), which push otherwise keeps home: files
    hydralora did not write, dot-files, files named like credentials."""
    dry_run: bool = False
    """List what would be uploaded, and upload nothing."""

    def __post_init__(self) -> None:
        if self.repo and not looks_like_hub_id(self.repo.split("@")[0]):
            raise ConfigError(f"REPO {self.repo!r}: give a hub repository id like owner/name")
        repo, at, branch = self.repo.partition("@")
        if at:  # owner/name@branch: the branch is --revision's
            if not branch:
                raise ConfigError(f"REPO {self.repo!r}: name the branch after '@' (owner/name@branch), "
                                  "or leave the '@' out for main")
            if self.revision and self.revision != branch:
                raise ConfigError(f"REPO {self.repo!r} and --revision {self.revision}: give the branch "
                                  "once, as owner/name@branch or with --revision")
            self.repo, self.revision = repo, branch
