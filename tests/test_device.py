"""Device and dtype placement (--device, --dtype auto) on a CPU machine; the GPU branches are
checked with torch.cuda's answers patched (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_llama, make_tiny_tokenizer, tiny_records, write_jsonl
from hydralora.base_models import (
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    check_quantize,
    load_model,
    resolve_device,
    resolve_dtype,
)
from hydralora.cli import main
from hydralora.errors import ConfigError
from hydralora.commands.analyze import AnalyzeOptions, ClusterOptions
from hydralora.commands.evaluate import EvalOptions, GenerateOptions
from hydralora.commands.export import ExportOptions
from hydralora.train.config import TrainConfig

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.fixture
def fake_gpus(monkeypatch):
    """Two CUDA devices with bfloat16, as torch.cuda reports them (nothing runs on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_every_command_that_runs_a_model_defaults_to_auto():
    assert DEFAULT_DEVICE == "auto" and DEFAULT_DTYPE == "auto"
    for cls in (EvalOptions, GenerateOptions, ExportOptions, AnalyzeOptions, ClusterOptions, TrainConfig):
        fields = cls.__dataclass_fields__
        assert fields["device"].default == "auto" and fields["dtype"].default == "auto", cls
    for cls in (EvalOptions, GenerateOptions, ExportOptions, TrainConfig):
        assert cls.__dataclass_fields__["quantize"].default == "none", cls


@no_cuda
def test_auto_is_the_cpu_here_and_float32():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", "auto") is torch.float32
    assert resolve_dtype("auto") is torch.float32  # no device: the CPU
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16  # asked for: given


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_one_clear_error(name):
    with pytest.raises(ConfigError, match=rf"^--device {name}: no CUDA device on this machine; use --device cpu or auto$"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["cuda:x", "cuda:", "gpu", "CPU", "cuda:-1", "mps:0"])
def test_bad_device_names(name):
    with pytest.raises(ConfigError, match="choose auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_bad_dtype_and_quantize():
    with pytest.raises(ConfigError, match="--dtype 'float8': choose one of auto, float32"):
        resolve_dtype("float8")
    with pytest.raises(ConfigError, match="--quantize '3bit': choose one of none, 4bit, 8bit"):
        check_quantize("3bit")


def test_gpu_placement_logic(fake_gpus, monkeypatch):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="has 2 CUDA device"):
        resolve_device("cuda:2")
    assert resolve_dtype("auto", "auto") is torch.bfloat16  # a bf16 GPU: half the memory
    assert resolve_dtype("auto", "cpu") is torch.float32  # --device cpu on a GPU machine
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda") is torch.float32  # no bf16: never float16 unasked
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun each process takes its own GPU
    assert resolve_device("auto") == torch.device("cuda", 1)


@no_cuda
def test_options_fail_early():
    with pytest.raises(ConfigError, match="no CUDA device"):
        GenerateOptions(prompt=["hi"], device="cuda")
    with pytest.raises(ConfigError, match="choose auto, cpu, cuda or cuda:N"):
        EvalOptions(data=["x.jsonl"], device="cuda:x")
    ClusterOptions(data=["x"], output="o", device="cuda")  # tf-idf runs no model: not checked
    with pytest.raises(ConfigError, match="no CUDA device"):
        ClusterOptions(data=["x"], output="o", features="embeddings", device="cuda")
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):
        TrainConfig(data=["x"], output="o", device="cuda:1").validate()


def test_auto_dtype_on_cpu_is_float32_whatever_the_checkpoint(tmp_path):
    """`auto` no longer means the checkpoint's dtype: a bfloat16 checkpoint loads in float32 on
    a CPU (the old default), on the device asked for."""
    model = make_tiny_llama(vocab_size=300).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    make_tiny_tokenizer().save_pretrained(tmp_path)
    for device in (None, "cpu", "auto" if not torch.cuda.is_available() else "cpu"):
        loaded, _ = load_model(str(tmp_path), device=device)
        assert {p.dtype for p in loaded.parameters()} == {torch.float32}
        assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    half, _ = load_model(str(tmp_path), dtype="bfloat16", device="cpu")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


@no_cuda
def test_eval_cli_device_cuda_fails_with_one_line_and_auto_runs(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "test.jsonl", tiny_records(4))
    base = ["eval", "--model", str(tiny_model_dir), "--data", str(data), "--no-generate"]
    assert main([*base, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --device cuda: no CUDA device on this machine; use --device cpu or auto\n"
    assert main([*base, "--device", "cuda:x"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--device", "cuda:0"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert main([*base, "--device", "auto", "--output", str(tmp_path / "eval.json")]) == 0
    assert "math" in capsys.readouterr().out
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--max-new-tokens", "2",
                 "--device", "cpu", "--dtype", "auto"]) == 0
