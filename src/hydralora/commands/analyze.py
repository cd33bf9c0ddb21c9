"""Options of `hydralora analyze` (run by analysis.py) and `hydralora cluster` (clustering/choose_k.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..options import check_ranges
from .common import (DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_MAX_LENGTH, DEFAULT_MODEL, K_MAX, MAX_SEED,
                     check_int_bounds, check_placement)


@dataclass
class AnalyzeOptions:
    """Router usage per domain and the A-vs-B comparison (plots + JSON)."""

    adapter: str = field(default="", metadata={"required": True})
    """HydraLoRA adapter directory."""
    data: list[str] = field(default_factory=list, metadata={"required": True})
    """Examples with a 'domain' field, or 'builtin' / 'builtin-conflict' (a built-in mixture's test split)."""
    output: str = field(default="", metadata={"required": True})
    """Directory for router_heatmap.png, ab_similarity.png and analysis.json."""
    model: str = DEFAULT_MODEL
    """Base model: hub id, local directory, .gguf file, or built-in name."""
    domain_lora: list[str] | None = field(default=None, metadata={"metavar": "DOMAIN=DIR"})
    """PEFT LoRAs trained separately per domain (DOMAIN=DIR ...), for the A-vs-B comparison."""
    per_domain_steps: int = 0
    """Train one LoRA per domain for this many steps (same seed) when no --domain-lora is given."""
    batch_size: int = 4
    """Batch size of the per-domain LoRAs."""
    lr: float = 1e-3
    """Learning rate of the per-domain LoRAs."""
    seed: int = 0
    """Seed of the per-domain LoRAs (one seed: they start from the same A)."""
    max_length: int = DEFAULT_MAX_LENGTH
    """Tokens per example."""
    device: str = DEFAULT_DEVICE
    """Where the model runs: auto (the GPU when there is one), cpu, cuda or cuda:N."""
    dtype: str = DEFAULT_DTYPE
    """Dtype of the base weights: auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16 or float16."""
    overwrite: bool = False
    """Allow replacing the files of an earlier analyze in --output (never files it did not write)."""

    def __post_init__(self) -> None:
        check_ranges(self, {"per_domain_steps": ">=0", "batch_size": ">=1", "lr": ">0", "seed": ">=0",
                            "max_length": ">=1"})
        check_int_bounds(self, {"seed": MAX_SEED})
        check_placement(self.device, self.dtype)

    def domain_loras(self) -> dict[str, str] | None:
        if not self.domain_lora:
            return None
        bad = [x for x in self.domain_lora if "=" not in x]
        if bad:
            raise ConfigError(f"--domain-lora expects DOMAIN=DIR, got {bad}")
        return dict(x.split("=", 1) for x in self.domain_lora)


@dataclass
class ClusterOptions:
    """Choose k: TF-IDF (or embeddings) + k-means + elbow."""

    data: list[str] = field(default_factory=list, metadata={"required": True})
    """Data files, or 'builtin' / 'builtin-conflict' (a built-in mixture's train split)."""
    output: str = field(default="", metadata={"required": True})
    """Directory for clusters.json, labels.jsonl, sse.png and the cluster model."""
    k_max: int = K_MAX
    """Largest k tried."""
    features: str = field(default="tfidf", metadata={"choices": ("tfidf", "embeddings")})
    """tfidf, or embeddings (mean-pooled hidden states of --model)."""
    model: str = DEFAULT_MODEL
    """Model for --features embeddings."""
    seed: int = 0
    """Seed of k-means."""
    device: str = DEFAULT_DEVICE
    """Where --features embeddings runs the model: auto (the GPU when there is one), cpu, cuda or cuda:N."""
    dtype: str = DEFAULT_DTYPE
    """Dtype of the model for --features embeddings: auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16 or float16."""
    overwrite: bool = False
    """Allow replacing the files of an earlier cluster in --output (never files it did not write)."""

    def __post_init__(self) -> None:
        check_ranges(self, {"k_max": ">=1", "seed": ">=0"})
        check_int_bounds(self, {"seed": MAX_SEED})
        if self.features == "embeddings":
            check_placement(self.device, self.dtype)
