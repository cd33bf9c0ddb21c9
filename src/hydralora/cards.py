"""Model cards (README.md) of the folders hydralora writes: `model_card` for a training
output (built from adapter_config.json, summary.json, train_config.yaml), `export_card` for an
export. Both carry the license, the pipeline tag and the base model as a hub id where known
(a built-in name, a hub id, a Hugging Face cache folder, a saved model naming its hub id), and
how to load the folder (and serve it with vLLM: `--max-lora-rank` fits the rank, k*r for a
`--no-shared-a` export)."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .commands.common import looks_like_hub_id
from .files import CONFIG_NAME, SPLIT_FILE, read_manifest, record_written, write_text

CARD_NAME = "README.md"
# the built-in names' hub ids and the licenses of known bases, for the card's metadata
BUILTIN_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0", "HuggingFaceTB/SmolLM2-135M": "apache-2.0"}
# the values vLLM's --max-lora-rank takes (vllm/config/lora.py): the smallest >= the rank fits
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_CACHE_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")


def vllm_max_lora_rank(rank: int) -> int:
    return next((v for v in VLLM_LORA_RANKS if v >= rank), rank)


def base_hub_id(base: str) -> str:
    """The hub id of a base model where one is known: a built-in name, a hub id, a folder of
    the Hugging Face cache, a saved model whose config names its hub id; else `base`."""
    if base in BUILTIN_HUB_IDS or looks_like_hub_id(base):
        return BUILTIN_HUB_IDS.get(base, base)
    cached = _CACHE_SNAPSHOT.search(Path(base).as_posix())
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        named = json.loads((Path(base) / "config.json").read_text()).get("_name_or_path") or ""
        if looks_like_hub_id(named):
            return named
    return base


def same_base_model(saved: str, current: str) -> bool:
    """Whether two base model names (local folders, hub ids, the built-in name) plausibly name
    one model: the same folder or hub id, or the same last name component."""
    names = [BUILTIN_HUB_IDS.get(n, n) for n in (saved, current)]
    names = [str(Path(n).resolve()) if Path(n).is_dir() else n for n in names]
    return names[0] == names[1] or Path(names[0]).name.lower() == Path(names[1]).name.lower()


def card_metadata(base: str, library: str, tags: list[str]) -> dict[str, Any]:
    """The card's YAML header: library, license (the base model's where known, else 'other'
    naming it), pipeline tag, base model (a hub id), tags."""
    hub_id = base_hub_id(base)
    meta: dict[str, Any] = {"library_name": library, "license": KNOWN_LICENSES.get(hub_id, "other")}
    if meta["license"] == "other":
        meta["license_name"] = "same-as-base-model"
        if looks_like_hub_id(hub_id):
            meta["license_link"] = f"https://huggingface.co/{hub_id}"
    meta["pipeline_tag"] = "text-generation"
    if looks_like_hub_id(hub_id):
        meta["base_model"] = hub_id
    meta["tags"] = tags
    return meta


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
    base_id = base_hub_id(str(base))
    peft_type = config.get("peft_type")
    method = summary.get("method") or ("lora-split" if split else {"LORA": "lora"}.get(peft_type, "hydralora"))
    meta = card_metadata(str(base), "peft" if method == "lora" else "hydralora",
                         ["hydralora", "lora", "peft" if method != "hydralora" else "mixture-of-lora-experts"])
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {folder.resolve().name}", "",
             f"{summary.get('variant') or method} adapter for `{base}`, trained with "
             "the `hydralora` package (HydraLoRA: one shared A, k B heads and a per-token router).", "",
             "## Settings", ""]
    settings = {k: config.get(k) for k in ("r", "alpha", "num_heads", "target_modules", "router",
                                            "routing", "shared_a", "init_heads", "balance_loss_weight")
                if k in config}
    # train_config.yaml's names (TrainingArguments'), the short ones in files written before them
    for names in (("learning_rate", "lr"), ("max_steps",), ("per_device_train_batch_size", "batch_size"),
                  ("max_length",), ("seed",), ("router_lr_multiplier",)):
        found = next((n for n in names if n in run), None)
        if found is not None:
            settings[names[0]] = run[found]
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


def export_card(folder: Path, base: str, fmt: str, gates: str, source: str, title: str = "") -> str:
    """The README.md of an export (`fmt`: peft-lora, merged, or per-request: a LoRA-Split
    layout) being written in `folder`, with how to load and serve it; `title`: its name."""
    hub_id = base_hub_id(base)
    split = (folder / SPLIT_FILE).exists()
    meta = card_metadata(base, "transformers" if fmt == "merged" else "peft",
                         ["hydralora", "lora"] + ([] if fmt == "merged" else ["peft"]))
    what = ("a full model with the adapter merged in" if fmt == "merged" else
            "one PEFT LoRA per group of requests and a request router" if split else "a PEFT LoRA")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {title or folder.name}", "",
             f"{what[0].upper() + what[1:]}, exported by `hydralora export` from the HydraLoRA adapter "
             f"`{source}` with fixed gates (`--gates {gates}`): the heads collapse into one static "
             f"update, so no per-token routing is needed to serve it. Base model: `{hub_id}`.", "",
             "## How to load it", "", "```python"]
    if fmt == "merged":
        lines += ["from transformers import AutoModelForCausalLM",
                  "model = AutoModelForCausalLM.from_pretrained('THIS_FOLDER_OR_REPO')", "```"]
        return "\n".join(lines) + "\n"
    names = (_read(folder, SPLIT_FILE) or {}).get("adapters") or [] if split else ["adapter"]
    config = _read(folder / names[0], CONFIG_NAME) if split and names else _read(folder, CONFIG_NAME)
    rank = vllm_max_lora_rank(int((config or {}).get("r") or 1))
    sub = "/NAME" if split else ""
    lines += ["from transformers import AutoModelForCausalLM", "from peft import PeftModel",
              f"model = AutoModelForCausalLM.from_pretrained({hub_id!r})",
              f"model = PeftModel.from_pretrained(model, 'THIS_FOLDER_OR_REPO{sub}')", "```", "",
              "Serving with vLLM:", "", "```bash",
              f"vllm serve {hub_id} --enable-lora --max-lora-rank {rank} --lora-modules "
              + " ".join(f"{n}=THIS_FOLDER/{n}" if split else f"{n}=THIS_FOLDER" for n in names), "```"]
    if split:
        lines += ["", "`hydralora route --adapter THIS_FOLDER --prompt ... --json` names each prompt's "
                  "adapter (and gives its `--lora-modules` entry)."]
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
