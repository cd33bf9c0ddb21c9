"""Second round of hostile inputs (issue 15): never touch what is not ours, never run code the
user did not allow, one error line for every bad input (docs/reliability.md)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from conftest import make_tiny_llama, tiny_records, write_jsonl
from hydralora.cli import main

TARGETS = ["--target-modules", "q_proj", "v_proj"]


def train_cmd(model_dir, data, out, steps=2, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data), "--output", str(out),
            "--max-steps", str(steps), "--batch-size", "4", "--lr", "5e-3", "--save-steps", "2",
            "--r", "4", "--num-heads", "2", "--seed", "3", *TARGETS, *extra]


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", tiny_records(16))


@pytest.fixture
def adapter(tiny_model_dir, data, tmp_path):
    out = tmp_path / "adapter"
    assert main(train_cmd(tiny_model_dir, data, out)) == 0
    return out


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


# ---------------------------------------------------------------------------- 1. train cleanup
def test_train_never_removes_files_it_did_not_write(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "proj"
    (out / "cluster_analysis").mkdir(parents=True)
    (out / "cluster_analysis" / "notes.txt").write_text("mine")
    (out / "README.md").write_text("notes")
    assert main(train_cmd(tiny_model_dir, data, out)) == 0
    assert (out / "README.md").read_text() == "notes"
    assert (out / "cluster_analysis" / "notes.txt").read_text() == "mine"
    manifest = json.loads((out / ".hydralora-manifest.json").read_text())["files"]
    assert {"adapter_config.json", "adapter_model.safetensors", "train_config.yaml"} <= set(manifest)
    assert "README.md" not in manifest and "cluster_analysis" not in manifest
    # retrained with PEFT LoRA: PEFT's model card does not replace the user's README, and the
    # HydraLoRA files this tool wrote are the only ones removed
    assert main(train_cmd(tiny_model_dir, data, out, 2, "--overwrite", "--method", "lora",
                          "--num-heads", "1", "--save-steps", "0")) == 0
    assert (out / "README.md").read_text() == "notes"
    assert (out / "cluster_analysis" / "notes.txt").read_text() == "mine"
    assert not (out / "router_stats.json").exists()
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_a_tampered_manifest_cannot_point_outside(tmp_path):
    from hydralora.files import read_manifest

    (tmp_path / ".hydralora-manifest.json").write_text(
        json.dumps({"files": ["../victim", "/etc/passwd", "..", "ok.json", "a/b"]}))
    assert read_manifest(tmp_path) == {"ok.json"}


# ---------------------------------------------------------------------------- 2. export --overwrite
def test_export_overwrite_never_removes_unrelated_files(tiny_model_dir, adapter, tmp_path, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    export = ["export", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--format", "peft-lora"]
    assert main([*export, "--output", str(theirs), "--overwrite"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "did not write" in line
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]

    ours = tmp_path / "ours"
    assert main([*export, "--output", str(ours)]) == 0
    assert oct(ours.stat().st_mode & 0o777) == oct(0o777 & ~0o022)  # not owner-only
    (ours / "notes.txt").write_text("added later")
    assert main([*export, "--output", str(ours)]) == 2
    assert "--overwrite" in one_error_line(capsys.readouterr().err)
    assert main([*export, "--output", str(ours), "--overwrite", "--gates", "uniform"]) == 0
    assert (ours / "notes.txt").read_text() == "added later"
    assert (ours / "adapter_model.safetensors").exists()


def test_merged_export_refuses_the_base_model_folder(tiny_model_dir, adapter, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    before = sorted(p.name for p in base.iterdir())
    assert main(["export", "--model", str(base), "--adapter", str(adapter), "--format", "merged",
                 "--output", str(base), "--overwrite"]) == 2
    assert "base model's own folder" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in base.iterdir()) == before


# ---------------------------------------------------------------------------- 3. names from data
@pytest.mark.slow  # several trainings or a subprocess: kept out of make test-fast
def test_domain_names_from_data_stay_inside_the_output(tiny_model_dir, adapter, tmp_path):
    absolute = tmp_path / "absolute-victim"
    records = tiny_records(8)
    for i, r in enumerate(records):
        r["domain"] = "../../victim" if i % 2 else str(absolute)
    data = write_jsonl(tmp_path / "hostile.jsonl", records)
    out = tmp_path / "work" / "analysis"
    assert main(["analyze", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--data",
                 str(data), "--output", str(out), "--per-domain-steps", "1"]) == 0
    assert not list(tmp_path.glob("victim*")) and not list((tmp_path / "work").glob("victim*"))
    assert not list(tmp_path.glob("absolute-victim*"))
    folders = sorted(p.name for p in (out / "per_domain").iterdir() if p.is_dir())
    assert len(folders) == 2 and all("/" not in f and not f.startswith(".") for f in folders)


# ---------------------------------------------------------------------------- 4. trust on resume
def test_resume_does_not_turn_on_remote_code_from_the_run_file(tiny_model_dir, data, tmp_path,
                                                                monkeypatch, capsys):
    import hydralora.train.run as run_module
    from hydralora.errors import ConfigError

    out = tmp_path / "received-run"
    assert main(train_cmd(tiny_model_dir, data, out, 2)) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (out / name).unlink()
    config = out / "train_config.yaml"
    config.write_text(config.read_text().replace("trust_remote_code: false", "trust_remote_code: true"))
    assert main(["train", "--output", str(out), "--resume"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "trust_remote_code: true" in line and "--trust-remote-code" in line
    seen = {}

    def spy(name, **kwargs):
        seen.update(kwargs)
        raise ConfigError("stopped by the test")

    monkeypatch.setattr(run_module, "load_model", spy)
    assert main(["train", "--output", str(out), "--resume", "--trust-remote-code"]) == 2
    assert seen["trust_remote_code"] is True  # said on the command line: allowed


# ---------------------------------------------------------------------------- 6. YAML
def test_yaml_alias_bomb_is_refused_with_a_short_message(tiny_model_dir, tmp_path, capsys):
    levels = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcd", "bcde"):
        levels.append(f"&{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"model: {tiny_model_dir}\nr: [" + ", ".join(levels) + "]\n")
    assert main(["train", "--config", str(bomb), "--data", "x.jsonl", "--output", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "alias" in line and len(line) < 400


def test_yaml_numbers_and_single_strings(tiny_model_dir, data, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata: {data}\nlr: 2e-4\nmax_steps: 2\nr: 2\n"
                   "num_heads: 2\ntarget_modules: q_proj\nsave_steps: 0\nbatch_size: 4\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--output", str(out)]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["q_proj"]
    import yaml

    assert yaml.safe_load((out / "train_config.yaml").read_text())["learning_rate"] == 2e-4


def test_wrong_yaml_types_name_the_option_with_a_short_value(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: " + "x" * 5000 + "\n")
    assert main(["train", "--config", str(cfg), "--data", "d.jsonl", "--output", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--lr" in line and len(line) < 200


# ---------------------------------------------------------------------------- 7. adapter_config keys
def test_missing_adapter_config_keys_are_an_error_but_old_adapters_load(tmp_path):
    from hydralora import HydraLoraConfig, add_hydralora, load_adapter, save_adapter
    from hydralora.errors import ConfigError

    cfg = HydraLoraConfig(r=4, alpha=64, num_heads=2, router="topk", top_k=1, router_temperature=0.5,
                          target_modules=["q_proj"])
    save_adapter(add_hydralora(make_tiny_llama(), cfg), tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    meta = json.loads(config_file.read_text())
    assert meta["format_version"] == 3  # 3: dropout_masks joined the required keys
    for key in ("alpha", "router", "router_temperature"):
        del meta[key]
    config_file.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="missing key.*alpha, router, router_temperature"):
        load_adapter(make_tiny_llama(), tmp_path / "a")
    # written before format_version existed: today's defaults fill what it lacks
    del meta["format_version"]
    meta.update(router="topk")
    config_file.write_text(json.dumps(meta))
    model = load_adapter(make_tiny_llama(), tmp_path / "a")
    assert model.hydralora_config.alpha == HydraLoraConfig().alpha


# ---------------------------------------------------------------------------- 8. failed resume
def test_failed_resume_keeps_the_recorded_config(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_cmd(tiny_model_dir, data, out, 4)) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "summary.json"):
        (out / name).unlink()  # a crash after the step-2 checkpoint
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    recorded = (out / "train_config.yaml").read_bytes()
    assert main(["train", "--output", str(out), "--resume", "--r", "8"]) == 2
    assert (out / "train_config.yaml").read_bytes() == recorded
    assert "r: checkpoint 4, this run 8" in one_error_line(capsys.readouterr().err)
    assert main(["train", "--output", str(out), "--resume"]) == 0


# ---------------------------------------------------------------------------- 9. lock
def test_output_folder_is_locked_and_stale_locks_are_taken_over(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".hydralora.lock"
    lock.write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "since": "earlier"}))
    assert main(train_cmd(tiny_model_dir, data, out)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "in use" in line and "process 1 on" in line
    assert sorted(p.name for p in out.iterdir()) == [".hydralora.lock"]  # nothing written
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    assert main(train_cmd(tiny_model_dir, data, out)) == 0
    assert f"took over the stale lock {lock}: process {dead.pid}" in capsys.readouterr().out
    assert not lock.exists() and (out / "adapter_model.safetensors").exists()


def test_failed_start_changes_nothing_on_disk(tiny_model_dir, tmp_path, capsys):
    few = write_jsonl(tmp_path / "few.jsonl", tiny_records(3))
    out = tmp_path / "new-run"
    assert main(train_cmd(tiny_model_dir, few, out, 2, "--method", "lora-split", "--num-heads", "5",
                          "--r", "10")) == 2
    assert "needs at least 5 examples" in one_error_line(capsys.readouterr().err)
    assert not out.exists()


# ---------------------------------------------------------------------------- 10. input values
@pytest.mark.parametrize("value", [0, False, [], 5, {"a": 1}])
def test_non_string_input_is_an_error_naming_the_record(tmp_path, value):
    from hydralora.data import load_examples
    from hydralora.errors import DataError

    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Add", "input": "1 2", "output": "3"},
                                              {"instruction": "Add", "input": value, "output": "3"}])
    with pytest.raises(DataError, match=r"d.jsonl, line 2: field 'input' must be a string"):
        load_examples([path])


# ---------------------------------------------------------------------------- 11. router lr
def test_negative_router_lr_multiplier_is_refused(tiny_model_dir, data, tmp_path, capsys):
    assert main(train_cmd(tiny_model_dir, data, tmp_path / "run", 2, "--router-lr-multiplier", "-1")) == 2
    assert "--router-lr-multiplier must be > 0" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- 12. NaN weights
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_adapter_weights_are_refused(tiny_model_dir, adapter, capsys, poison):
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "model.layers.1.self_attn.v_proj.lora_A"
    tensors[key][0, 0] = poison
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--prompt", "hi",
                 "--max-new-tokens", "2"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert key in line and "NaN or infinite" in line


# ---------------------------------------------------------------------------- values and files
@pytest.mark.parametrize("flag,value", [
    ("--weight-decay", "-0.1"), ("--epochs", "nan"), ("--seed", "-1"), ("--lr-scheduler", "cosinus"),
    ("--k-max", "0"), ("--save-total-limit", "0"), ("--max-steps", "-5"), ("--lr", "inf"),
    ("--balance-loss-weight", "nan"), ("--alpha", "inf"), ("--batch-size", "0"),
])
def test_train_values_argparse_accepts_are_range_checked(tiny_model_dir, data, tmp_path, capsys, flag, value):
    assert main(train_cmd(tiny_model_dir, data, tmp_path / "run", 2, flag, value)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert flag in line or flag.lstrip("-").replace("-", "_") in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,flag", [
    (["eval", "--data", "d.jsonl", "--batch-size", "0"], "--batch-size"),
    (["eval", "--data", "d.jsonl", "--limit", "0"], "--limit"),
    (["eval", "--data", "d.jsonl", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["generate", "--prompt", "hi", "--sample", "--temperature", "0"], "--temperature"),
    (["cluster", "--data", "d.jsonl", "--output", "o", "--k-max", "0"], "--k-max"),
    (["analyze", "--adapter", "a", "--data", "d", "--output", "o", "--batch-size", "0"], "--batch-size"),
    (["export", "--adapter", "a", "--output", "o", "--max-length", "0"], "--max-length"),
    (["data", "builtin", "--output", "o", "--train-per-domain", "0"], "--train-per-domain"),
    (["demo", "--max-steps", "0"], "--max-steps"),
])
def test_other_commands_range_check_their_values(capsys, argv, flag):
    assert main(argv) == 2
    assert flag in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("encoding,suffix,expected", [
    ("utf-16", ".jsonl", "line 1: the file is UTF-16"),
    ("latin-1", ".jsonl", "line 2: not UTF-8 text"),
    ("latin-1", ".csv", "line 2: not UTF-8 text"),
])
def test_files_that_are_not_utf8(tiny_model_dir, tmp_path, capsys, encoding, suffix, expected):
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        path.write_bytes("prompt,completion\nCafé?,Oui\n".encode(encoding))
    else:
        text = json.dumps({"prompt": "a", "completion": "b"}) + "\n" + \
            json.dumps({"prompt": "Café", "completion": "b"}, ensure_ascii=False) + "\n"
        path.write_bytes(text.encode(encoding))
    assert main(train_cmd(tiny_model_dir, path, tmp_path / "run")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"data{suffix}, {expected}" in line


def test_lone_surrogates_and_folders_as_data(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "bad \\ud800 text", "completion": "b"}\n')
    assert main(train_cmd(tiny_model_dir, path, tmp_path / "run")) == 2
    assert "s.jsonl, line 1: field 'prompt' holds a lone surrogate" in one_error_line(capsys.readouterr().err)
    assert main(train_cmd(tiny_model_dir, tmp_path, tmp_path / "run")) == 2
    assert "is a folder" in one_error_line(capsys.readouterr().err)


def test_resume_without_output_and_eval_into_a_folder(tiny_model_dir, data, tmp_path, capsys):
    assert main(["train", "--resume"]) == 2
    assert "--resume needs --output" in one_error_line(capsys.readouterr().err)
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path)]) == 2
    assert "is a folder" in one_error_line(capsys.readouterr().err)


def test_disk_full_while_saving_is_one_error_line(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    import hydralora.model

    out = tmp_path / "run"

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hydralora.model, "save_file", full)
    assert main(train_cmd(tiny_model_dir, data, out, 2, "--save-steps", "0")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(out / "adapter_model.safetensors") in line and "No space left" in line
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
