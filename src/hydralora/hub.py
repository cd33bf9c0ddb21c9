"""The Hugging Face Hub: adapters named by hub id, model cards, and `hydralora push`.

- `resolve_adapter(name)`: a local folder as it is; otherwise a hub id (`owner/name`,
  optionally `owner/name@revision`) downloaded with `huggingface_hub.snapshot_download` (the
  local cache first; with `HF_HUB_OFFLINE=1` only the cache).
- `push(PushOptions)`: lists what it uploads (only files hydralora wrote, no training state,
  dot-files or credentials, plus what `--include` names) and sends them in one commit; writes
  the model card first if a folder of ours has none. Offline, no token, no network: one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import CommitOperationAdd, HfApi, get_token, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
)

from .commands.common import looks_like_hub_id
from .commands.info import PushOptions
from .errors import AdapterError, ConfigError, UserError
from .cards import CARD_NAME, write_model_card
from .files import CONFIG_NAME, MANIFEST, SPLIT_FILE, read_manifest, redact


def resolve_adapter(name: str | os.PathLike) -> Path:
    """A local adapter folder, or the local snapshot of a hub repository `owner/name[@rev]`."""
    path = Path(name)
    if path.is_dir() or not looks_like_hub_id(str(name)):
        return path  # a missing local folder is reported by the reader, naming the path
    repo_id, _, revision = str(name).partition("@")

    try:
        return Path(snapshot_download(repo_id, revision=revision or None))
    except LocalEntryNotFoundError:
        raise AdapterError(f"{name}: not a local folder, and the hub repository is neither in the "
                           "local cache nor reachable (offline?)") from None
    except (HfHubHTTPError, HFValidationError, OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise AdapterError(f"{name}: not a local folder, and not a readable hub repository "
                           f"({first})") from None


# ---------------------------------------------------------------------------- push
# kept home unless named with --include: training state, data, dot-files, temporary files, and
# files named like credentials (not tokenizer files: `tokenizer.json` is not a token)
HOME_DIRS = {"checkpoints": "training state", "data": "data files", "runs": "training logs",
             "wandb": "training logs"}
CREDENTIAL_FILE = re.compile(r"(^|[._-])(tokens?|secrets?|credentials?|passwords?)([._-]|$)|"
                             r"\.(pem|key|p12|pfx|netrc)$|^id_(rsa|dsa|ecdsa|ed25519)", re.I)
TEXT_SUFFIXES = {".json", ".yaml", ".yml", ".md", ".txt", ".cfg", ".ini", ".toml", ".py", ".sh", ".jinja"}


def _owned(folder: Path, parts: tuple[str, ...]) -> bool:
    """Whether the manifests from `folder` down list every part of this path (a folder
    without a manifest below a listed one: written before every folder got one)."""
    current = folder
    for part in parts:
        listed = read_manifest(current)
        if listed is None:
            return current != folder
        if part not in listed:
            return False
        current = current / part
    return True


def _why_home(folder: Path, rel: str, path: Path) -> str | None:
    parts = tuple(rel.split("/"))
    if path.is_symlink():
        return "a link"
    if any(p.startswith(".") for p in parts):
        return "a hidden file"
    if parts[0] in HOME_DIRS and len(parts) > 1:
        return HOME_DIRS[parts[0]]
    if rel.endswith(".tmp"):
        return "a temporary file"
    if CREDENTIAL_FILE.search(parts[-1]):
        return "named like a credential"
    if not _owned(folder, parts):
        return "not written by hydralora"
    return None


def secrets_in(path: Path) -> list[str]:
    """Where a text file holds a credential: a credential-like key with a value, a token, a
    URL password (empty for other files)."""
    if path.suffix.lower() not in TEXT_SUFFIXES and path.name != "README":
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    value: Any = text
    with contextlib.suppress(ValueError, yaml.YAMLError, RecursionError):
        if path.suffix in (".json",):
            value = json.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            value = yaml.safe_load(text)
    found = redact(value)[1]
    if value is not text and not found:  # a token in a comment of a YAML file, ...
        found = redact(text)[1]
    return found


def push_plan(opts: PushOptions) -> dict[str, Any]:
    """Choose what goes up: the files hydralora wrote into the folder (its manifests), without
    training state, data, dot-files, temporary files or files named like credentials, plus what
    `--include` names; a file holding a credential stops the push. Writes the model card first
    when a folder of ours has none. Returns {"files": [paths], "home": {path: why}, ...}."""
    folder = Path(opts.folder)
    if not (folder / CONFIG_NAME).exists() and not (folder / SPLIT_FILE).exists():
        raise AdapterError(f"{folder}: not an adapter folder (no adapter_config.json)")
    ours = read_manifest(folder)
    if ours is None and not opts.include:
        raise ConfigError(f"{folder}: no {MANIFEST}, so hydralora did not write it; push sends only "
                          "what it wrote or what you name: --include adapter_config.json "
                          "adapter_model.safetensors ...")
    card = folder / CARD_NAME
    if ours is not None and not card.exists() and not opts.dry_run:
        write_model_card(folder, record=True)
    chosen, home = [], {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files) + [d for d in dirs if Path(root, d).is_symlink()]:
            path = Path(root, name)
            rel = path.relative_to(folder).as_posix()
            why = _why_home(folder, rel, path)
            if why:
                home[rel] = why
            else:
                chosen.append(rel)
    for rel in opts.include:
        path = folder / rel
        inside = path.resolve().is_relative_to(folder.resolve()) and ".." not in Path(rel).parts
        if not inside or path.is_symlink() or not path.is_file():
            raise ConfigError(f"--include {rel}: not a file inside {folder}")
        home.pop(Path(rel).as_posix(), None)
        chosen.append(Path(rel).as_posix())
    chosen = sorted(set(chosen))
    for rel in chosen:
        found = secrets_in(folder / rel)
        if found:
            raise ConfigError(f"{folder / rel}: holds a credential ({', '.join(found[:3])}); push never "
                              "uploads credentials: remove it from the file (the Hub token comes from "
                              "`hf auth login` or HF_TOKEN)")
    if ours is not None and not card.exists():
        chosen.append(f"{CARD_NAME} (model card, written before the upload)")
    return {"folder": folder, "files": chosen, "home": home}


def _hub_error(err: Exception, repo: str) -> UserError | None:
    """A failed Hub call as one line saying what to do, or None for a bug."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    if isinstance(err, OfflineModeIsEnabled):
        return ConfigError("push: the Hub is off (HF_HUB_OFFLINE=1); unset it to push")
    if status == 401:
        return ConfigError("push: the Hub refused the token (401 Unauthorized): log in again "
                           "(`hf auth login`) or set HF_TOKEN")
    if status == 403:
        return ConfigError(f"push: the token may not write to {repo} (403 Forbidden): use a token "
                           "with write access, or a repository of yours")
    if isinstance(err, HfHubHTTPError):
        return ConfigError(f"push: the Hub answered {status or 'an error'} ({first})")
    network = type(err).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3")
    if network or isinstance(err, (ConnectionError, TimeoutError, OSError)):
        return ConfigError(f"push: cannot reach the Hub ({first}); check the network (and "
                           "HF_ENDPOINT), then push again")
    return None


def push(opts: PushOptions) -> str:
    """List what goes up (`push_plan`), then create the repository if needed and upload those
    files in one commit; returns the commit URL ('' for --dry-run)."""
    plan = push_plan(opts)
    print(f"{'would upload' if opts.dry_run else 'uploading'} {len(plan['files'])} files from "
          f"{plan['folder']} to {opts.repo}:")
    for rel in plan["files"]:
        print(f"  {rel}")
    if plan["home"]:
        groups: dict[str, set[str]] = {}
        for rel, why in plan["home"].items():
            groups.setdefault(why, set()).add(rel.split("/")[0] + "/" if why in HOME_DIRS.values() else rel)
        print("kept home (--include PATH sends one): " + "; ".join(
            f"{why}: {', '.join(sorted(names)[:4])}{f' and {len(names) - 4} more' if len(names) > 4 else ''}"
            for why, names in sorted(groups.items())))
    if opts.dry_run:
        return ""
    if hf_constants.HF_HUB_OFFLINE:
        raise ConfigError("push: the Hub is off (HF_HUB_OFFLINE=1); unset it to push")
    if not get_token():
        raise ConfigError("push: no Hugging Face token: log in with `hf auth login` or set HF_TOKEN")
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(plan["folder"] / rel))
                  for rel in plan["files"]]
    api = HfApi()
    try:
        api.create_repo(opts.repo, private=opts.private, exist_ok=True, repo_type="model")
        if opts.revision:
            api.create_branch(opts.repo, branch=opts.revision, exist_ok=True)
        commit = api.create_commit(opts.repo, operations=operations, commit_message=opts.commit_message,
                                   revision=opts.revision, repo_type="model")
    except Exception as err:  # noqa: BLE001 (sorted out by _hub_error: the rest re-raised)
        error = _hub_error(err, opts.repo)
        if error is None:
            raise
        raise error from None
    url = str(getattr(commit, "commit_url", commit))
    print(f"pushed {opts.folder} to {opts.repo}: {url}")
    return url
