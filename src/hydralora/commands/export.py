"""Options of `hydralora export` (run by export.py) and `hydralora route` (routing/requests.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..options import check_ranges
from .common import (
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MODEL,
    EXPORT_FORMATS,
    QUANTIZE_MODES,
    check_int_bounds,
    check_placement,
)


@dataclass
class ExportOptions:
    """Export a HydraLoRA adapter as a PEFT LoRA or a merged model."""

    adapter: str = field(default="", metadata={"required": True})
    """HydraLoRA adapter directory."""
    output: str = field(default="", metadata={"required": True})
    """Directory to write (refused if it exists and is not empty, unless --overwrite)."""
    model: str = DEFAULT_MODEL
    """Base model: hub id, local directory, .gguf file, or built-in name."""
    format: str = field(default="peft-lora", metadata={"choices": EXPORT_FORMATS})
    """peft-lora (a PEFT LoRA directory) or merged (a full transformers model)."""
    gates: str = "uniform"
    """uniform | mean | domain=NAME | a JSON file {layer: [g...]}; or per-domain | per-cluster:
    one PEFT LoRA per group of --data plus a request router (for vLLM's multi-LoRA)."""
    data: list[str] | None = None
    """Calibration / held-out file(s)."""
    overwrite: bool = False
    """Allow replacing an earlier export in --output (never files it did not write)."""
    max_length: int = DEFAULT_MAX_LENGTH
    """Tokens per calibration example."""
    device: str = DEFAULT_DEVICE
    """Where the calibration runs: auto (the GPU when there is one), cpu, cuda or cuda:N."""
    dtype: str = DEFAULT_DTYPE
    """Dtype of the base weights (and of a merged export): auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16 or float16."""
    quantize: str = field(default="none", metadata={"choices": QUANTIZE_MODES})
    """Calibrate on a bitsandbytes-quantized base: none, 4bit or 8bit (peft-lora format only)."""

    def __post_init__(self) -> None:
        check_ranges(self, {"max_length": ">=1"})
        check_int_bounds(self)
        check_placement(self.device, self.dtype, self.quantize)


@dataclass
class RouteOptions:
    """Name the adapter of a per-request export (or LoRA-Split folder) that serves each prompt."""

    adapter: str = field(default="", metadata={"required": True})
    """Folder written by `export --gates per-domain|per-cluster` (or `train --method lora-split`)."""
    prompt: list[str] = field(default_factory=list, metadata={"required": True})
    """One or more prompts."""
    json: bool = False
    """Print JSON: [{"prompt", "adapter", "path", "lora_module", "max_lora_rank"}] (vLLM's
    --lora-modules NAME=PATH and --max-lora-rank for that adapter)."""
