"""The Hugging Face Hub: adapters named by hub id, model cards, and `hydralora push`.

- `resolve_adapter(name)`: a local folder as it is; otherwise a hub id (`owner/name`,
  optionally `owner/name@revision`) downloaded with `huggingface_hub.snapshot_download` (the
  local cache first; with `HF_HUB_OFFLINE=1` only the cache).
- `model_card(folder)`: the README.md of an adapter folder, built from the files the run wrote
  (adapter_config.json, summary.json, train_config.yaml).
- `push(PushOptions)`: upload a folder with `HfApi.upload_folder` (checkpoints, locks and the
  manifest stay home); writes the model card first if the folder has no README.md.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

from .commands.common import looks_like_hub_id
from .commands.info import PushOptions
from .errors import AdapterError, ConfigError
from .files import read_manifest, record_written, write_text

CARD_NAME = "README.md"
PUSH_IGNORE = ["checkpoints/*", "checkpoints", ".hydralora*", "data/*", "*.tmp", "**/.*"]
# the built-in names' hub ids, for the card's metadata
BUILTIN_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


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


# ---------------------------------------------------------------------------- model card
def _read(folder: Path, name: str) -> Any:
    try:
        text = (folder / name).read_text()
        return yaml.safe_load(text) if name.endswith(".yaml") else json.loads(text)
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _loss_table(results: dict[str, Any]) -> list[str]:
    runs = {k: v for k, v in results.items() if isinstance(v, dict) and v}
    domains = sorted({d for r in runs.values() for d in r if d != "mean"}) + ["mean"]
    lines = ["| model | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
    for name, r in runs.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r[d]["loss"]) if d in r else "-" for d in domains) + " |")
    return lines


def model_card(folder: str | os.PathLike) -> str:
    """The model card (README.md text) of an adapter folder written by `hydralora train`."""
    folder = Path(folder)
    config = _read(folder, "adapter_config.json") or {}
    summary = _read(folder, "summary.json") or {}
    run = _read(folder, "train_config.yaml") or {}
    split = (folder / "lora_split.json").exists()
    base = config.get("base_model_name_or_path") or summary.get("model") or run.get("model") or "unknown"
    base_id = BUILTIN_HUB_IDS.get(base, base)
    peft_type = config.get("peft_type")
    method = summary.get("method") or ("lora-split" if split else {"LORA": "lora"}.get(peft_type, "hydralora"))
    meta: dict[str, Any] = {"library_name": "peft" if method == "lora" else "hydralora",
                            "tags": ["hydralora", "lora", "peft" if method != "hydralora" else "mixture-of-lora-experts"]}
    if looks_like_hub_id(base_id):
        meta["base_model"] = base_id
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {folder.resolve().name}", "",
             f"{summary.get('variant') or method} adapter for `{base}`, trained with "
             "the `hydralora` package (HydraLoRA: one shared A, k B heads and a per-token router).", "",
             "## Settings", ""]
    settings = {k: config.get(k) for k in ("r", "alpha", "num_heads", "target_modules", "router",
                                            "routing", "shared_a", "init_heads", "balance_loss_weight")
                if k in config}
    settings.update({k: run[k] for k in ("lr", "max_steps", "batch_size", "max_length", "seed",
                                         "router_lr_multiplier") if k in run})
    lines += [f"- {k}: `{v}`" for k, v in settings.items()] or ["- (no adapter_config.json found)"]
    ks = config.get("k_selection") or summary.get("k_selection")
    k = config.get("num_heads", summary.get("num_heads"))
    if ks:
        lines.append(f"- k = {ks.get('k', k)} heads, chosen automatically ({ks.get('method', 'elbow of k-means SSE')}, "
                     "`--num-heads auto`)")
    elif k is not None:
        lines.append(f"- k = {k} heads, set by hand (`--num-heads {k}`)")
    if "trainable_params" in summary:
        lines.append(f"- trainable parameters: {summary['trainable_params']:,} "
                     f"({100 * summary.get('trainable_share', 0):.3f}% of {summary.get('total_params', 0):,})")
    if "steps" in summary:
        lines.append(f"- training: {summary['steps']} steps, final loss {_fmt(summary.get('final_loss'))}")
    data = summary.get("data") or {}
    lines += ["", "## Data", ""]
    lines.append(f"Training files: {', '.join(map(str, run.get('data') or [])) or 'unknown'}.")
    for part in ("train", "held_out"):
        if data.get(part):
            sizes = ", ".join(f"{d}: {n}" for d, n in sorted(data[part].items()))
            lines.append(f"- {part.replace('_', '-')} examples per domain: {sizes}")
    results = summary.get("eval") or {}
    if results:
        lines += ["", "## Held-out results", "",
                  "Mean cross-entropy per response token (lower is better), per domain:", "",
                  *_loss_table(results)]
    lines += ["", "## How to load it", "", "```python"]
    if method == "lora":
        lines += ["from transformers import AutoModelForCausalLM", "from peft import PeftModel", f"model = AutoModelForCausalLM.from_pretrained({base_id!r})",
                  "model = PeftModel.from_pretrained(model, 'THIS_FOLDER_OR_REPO')"]
    else:
        lines += ["from hydralora.methods import load_model_with_adapter",
                  f"model, tokenizer = load_model_with_adapter({base!r}, 'THIS_FOLDER_OR_REPO')"]
    lines += ["```", "", "Command line: `hydralora generate --model "
              f"{base} --adapter THIS_FOLDER_OR_REPO --prompt ...`; scoring with lm-evaluation-harness: "
              "`python -m hydralora.integrations.lm_eval --model hydralora --model_args "
              f"pretrained={base},adapter=THIS_FOLDER_OR_REPO --tasks ...`."]
    if method == "hydralora":
        lines += ["", "Serving stacks that do not run per-token routing load a static export: "
                  "`hydralora export --format peft-lora` (a PEFT LoRA: `PeftModel.from_pretrained`, "
                  "vLLM `--enable-lora`, lm-eval `--model hf --model_args pretrained=BASE,peft=EXPORT`) "
                  "or `--format merged` (a full model)."]
    return "\n".join(lines) + "\n"


def card_is_ours(folder: Path) -> bool:
    """True when README.md is missing or listed in the folder's manifest (we wrote it)."""
    return not (folder / CARD_NAME).exists() or CARD_NAME in (read_manifest(folder) or set())


def write_model_card(folder: str | os.PathLike, record: bool = False) -> bool:
    """Write README.md unless a README.md we did not write is there; `record` lists it in the
    manifest at once (callers inside `run_folder` leave that to the run). True if written."""
    folder = Path(folder)
    if not card_is_ours(folder):
        return False
    write_text(folder / CARD_NAME, model_card(folder))
    if record:
        record_written(folder, add=[CARD_NAME])
    return True


# ---------------------------------------------------------------------------- push


def push_plan(opts: PushOptions) -> dict[str, Any]:
    """Check the folder and prepare it (model card); the arguments of `upload_folder`."""
    folder = Path(opts.folder)
    if not (folder / "adapter_config.json").exists() and not (folder / "lora_split.json").exists():
        raise AdapterError(f"{folder}: not an adapter folder (no adapter_config.json)")
    if not (folder / CARD_NAME).exists():
        write_model_card(folder, record=read_manifest(folder) is not None)
    return dict(repo_id=opts.repo, folder_path=str(folder), repo_type="model",
                revision=opts.revision, commit_message=opts.commit_message,
                ignore_patterns=PUSH_IGNORE)


def push(opts: PushOptions) -> str:
    """Create the repository if needed and upload the folder; returns the commit URL."""
    plan = push_plan(opts)
    api = HfApi()
    api.create_repo(opts.repo, private=opts.private, exist_ok=True, repo_type="model")
    if opts.revision:
        api.create_branch(opts.repo, branch=opts.revision, exist_ok=True)
    commit = api.upload_folder(**plan)
    url = str(getattr(commit, "commit_url", commit))
    print(f"pushed {opts.folder} to {opts.repo}: {url}")
    return url
