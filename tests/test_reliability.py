"""Bad input, interrupted runs and broken files: clear errors, nothing lost (docs/reliability.md)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import tiny_records, write_jsonl
from hydralora.cli import main


def train_cmd(model_dir, data, out, steps=8, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data), "--output", str(out),
            "--max-steps", str(steps), "--batch-size", "4", "--lr", "5e-3", "--save-steps", "2",
            "--save-total-limit", "10", "--r", "4", "--num-heads", "3", "--seed", "3",
            "--target-modules", "q_proj", "v_proj", *extra]


def same_adapter(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    return x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout, f"{path} never appeared"
        time.sleep(0.05)


SLOW_CLI = Path(__file__).with_name("slow_cli.py")  # the CLI with a delay after every step


def spawn(args, step_delay: float):
    return subprocess.Popen([sys.executable, str(SLOW_CLI), str(step_delay), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture
def data8(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", tiny_records(32))


@pytest.mark.slow  # a training subprocess, killed
def test_sigkill_then_resume_equals_uninterrupted_run(tiny_model_dir, data8, tmp_path):
    straight = tmp_path / "straight"
    assert main(train_cmd(tiny_model_dir, data8, straight)) == 0
    killed = tmp_path / "killed"
    proc = spawn(train_cmd(tiny_model_dir, data8, killed), step_delay=0.5)
    wait_for(killed / "checkpoints" / "checkpoint-4" / ".complete", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter_model.safetensors").exists()
    resumed = subprocess.run([sys.executable, "-m", "hydralora", "train", "--output", str(killed),
                              "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    assert same_adapter(straight, killed)  # bitwise, float32 on CPU


@pytest.mark.slow  # a training subprocess, interrupted
def test_sigint_saves_a_checkpoint_and_resumes(tiny_model_dir, data8, tmp_path):
    straight = tmp_path / "straight"
    assert main(train_cmd(tiny_model_dir, data8, straight)) == 0
    out = tmp_path / "interrupted"
    log = tmp_path / "stderr.txt"
    with open(log, "w") as f:  # a file, not a pipe: the test reads the progress bar while it runs
        proc = subprocess.Popen([sys.executable, str(SLOW_CLI), "1.0",
                                 *train_cmd(tiny_model_dir, data8, out, 8, "--save-steps", "100")],
                                stdout=subprocess.DEVNULL, stderr=f, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            start = time.time()
            while not re.search(r"\| [1-6]/8 \[", log.read_text()):  # an optimizer step is done
                assert proc.poll() is None, log.read_text()[-2000:]
                assert time.time() - start < 300, "training never started"
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = log.read_text()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted at step" in err and "--resume" in err and "Traceback" not in err
    ckpts = [p for p in (out / "checkpoints").glob("checkpoint-*") if (p / ".complete").exists()]
    assert len(ckpts) == 1 and 0 < int(ckpts[0].name.split("-")[1]) < 8
    assert main(["train", "--output", str(out), "--resume"]) == 0
    assert same_adapter(straight, out)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_model_dir, data8, tmp_path,
                                                         monkeypatch, capsys):
    import torch

    import hydralora.train.trainer as train_module

    real = train_module.response_nll
    calls = {"n": 0}

    def poisoned(model, batch):
        nll, rows = real(model, batch)
        calls["n"] += 1
        return (nll * float("nan") if calls["n"] == 5 else nll), rows

    monkeypatch.setattr(train_module, "response_nll", poisoned)
    out = tmp_path / "nan"
    assert main(train_cmd(tiny_model_dir, data8, out)) == 2
    err = capsys.readouterr().err
    assert "the loss became nan at step 5" in err and "Traceback" not in err
    assert f"kept in {out / 'checkpoints'}:" in err  # the real folder, not a placeholder
    assert (out / "checkpoints" / "checkpoint-4" / ".complete").exists()
    assert not (out / "adapter_model.safetensors").exists()
    assert torch.isfinite(load_file(str(out / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"))[
        "model.layers.0.self_attn.q_proj.lora_B"]).all()


def test_failed_final_save_keeps_previous_adapter(tiny_model_dir, data8, tmp_path, monkeypatch, capsys):
    import hydralora.model

    out = tmp_path / "run"
    assert main(train_cmd(tiny_model_dir, data8, out, 2)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith("adapter_")}

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(hydralora.model, "save_file", broken)
    capsys.readouterr()
    assert main(train_cmd(tiny_model_dir, data8, out, 2, "--overwrite", "--seed", "9", "--save-steps", "0")) == 2
    err = capsys.readouterr().err
    assert f"error: {out / 'adapter_model.safetensors'}: could not write it" in err and "Traceback" not in err
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith("adapter_")}
    assert after == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_wrong_adapter_for_base_model_lists_mismatches(tiny_model_dir, data8, tmp_path, capsys):
    from conftest import save_tiny_model
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(train_cmd(tiny_model_dir, data8, out, 2)) == 0
    other = tmp_path / "other-model"
    save_tiny_model(other)
    model = AutoModelForCausalLM.from_pretrained(other)
    model.model.layers = model.model.layers[:1]  # a one-layer model
    model.config.num_hidden_layers = 1
    model.save_pretrained(other)
    assert main(["generate", "--model", str(other), "--adapter", str(out), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "model.layers.1.self_attn.q_proj.lora_A" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no-config", "bad-json"])
def test_broken_adapter_files_give_clear_errors(tiny_model_dir, data8, tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert main(train_cmd(tiny_model_dir, data8, out, 2)) == 0
    weights, config = out / "adapter_model.safetensors", out / "adapter_config.json"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif damage == "no-config":
        config.unlink()
    else:
        config.write_text("{oops")
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(out), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    expected = {"truncate": "truncated or corrupted", "garbage": "truncated or corrupted",
                "no-config": "missing adapter_config.json", "bad-json": "line 1: not valid JSON"}[damage]
    assert expected in err and "Traceback" not in err


def test_empty_data_file(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert main(train_cmd(tiny_model_dir, empty, tmp_path / "run")) == 2
    assert "empty.jsonl: the file holds no records" in capsys.readouterr().err


def test_all_responses_truncated_away(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 300, "completion": "x"}] * 4)
    assert main(train_cmd(tiny_model_dir, data, tmp_path / "run", 2, "--max-length", "32")) == 2
    err = capsys.readouterr().err
    assert "4 example(s) have prompts of 32 tokens or more" in err and "long.jsonl, line 1" in err


def test_lora_split_more_clusters_than_examples(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "few.jsonl", tiny_records(3))
    assert main(train_cmd(tiny_model_dir, data, tmp_path / "run", 2, "--method", "lora-split",
                          "--num-heads", "5", "--r", "10")) == 2
    assert "needs at least 5 examples" in capsys.readouterr().err


def test_no_trust_remote_code_by_default(monkeypatch, tiny_model_dir):
    import transformers

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    from hydralora.base_models import load_model

    load_model(str(tiny_model_dir))
    assert seen["trust_remote_code"] is False


def test_no_pickle_loading_in_our_code():
    """Weights are read only through safetensors; torch.load appears nowhere in our sources."""
    src = Path(__file__).resolve().parents[1] / "src" / "hydralora"
    patterns = ("torch.load(", "import pickle", "pickle.load", "import joblib", "weights_only=False")
    offenders = [p.name for p in src.rglob("*.py") if any(s in p.read_text() for s in patterns)]
    assert offenders == []
