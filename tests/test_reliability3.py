"""Third round of hostile inputs (issue 22): what is not ours stays untouched, secrets stay
home, every failure is one line (docs/reliability.md, "Third round")."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_llama, tiny_records, write_jsonl
from hydralora.cli import main

TARGETS = ["--target-modules", "q_proj", "v_proj"]


def train_cmd(model_dir, data, out, steps=2, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data), "--output", str(out),
            "--max-steps", str(steps), "--batch-size", "4", "--lr", "5e-3", "--save-steps", "0",
            "--r", "4", "--num-heads", "2", "--seed", "3", *TARGETS, *extra]


def one_error_line(err: str) -> str:
    """The one `error:` line of a failed command (a progress bar may share its line)."""
    lines = [line[line.index("error:"):] for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root`: kind, content hash or link target, permissions."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            found[rel] = ("dir", path.stat().st_mode)
        else:
            found[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
    return found


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", tiny_records(16))


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "run"
    assert main(train_cmd(tiny_model_dir, data, out, 2, "--save-steps", "2")) == 0
    return out


# ---------------------------------------------------------------------------- BAD 1: train's names
@pytest.mark.parametrize("names", [("train_config.yaml", "summary.json"), ("router_stats.json",),
                                   ("adapter_model.safetensors",), ("checkpoints/notes.txt",)])
def test_train_never_replaces_user_files_of_its_names(tiny_model_dir, data, tmp_path, capsys, names):
    out = tmp_path / "mine"
    for name in names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("the user's own\n")
    before = snapshot(out)
    for extra in ([], ["--overwrite"]):
        assert main(train_cmd(tiny_model_dir, data, out, 2, *extra)) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "not written by hydralora" in line and names[0].split("/")[0] in line
        assert snapshot(out) == before


def test_a_link_of_the_users_named_like_our_file_is_never_replaced(tiny_model_dir, data, tmp_path, capsys):
    out, target = tmp_path / "run", tmp_path / "elsewhere.json"
    out.mkdir()
    target.write_text("{}")
    (out / "summary.json").symlink_to(target)
    assert main(train_cmd(tiny_model_dir, data, out, 2, "--overwrite")) == 2
    assert "summary.json" in one_error_line(capsys.readouterr().err)
    assert os.readlink(out / "summary.json") == str(target) and target.read_text() == "{}"


def test_a_run_never_claims_a_file_it_found(tmp_path):
    from hydralora.files import read_manifest
    from hydralora.train.output import run_folder

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("before")
    with run_folder(out, ["summary.json"]):
        (out / "notes.txt").write_text("changed by the user during the run")
        (out / "summary.json").write_text("{}")
    assert read_manifest(out) == {"summary.json"}


# ---------------------------------------------------------------------------- BAD 2: checkpoints
def test_checkpoints_of_others_survive_rotation_and_overwrite(tiny_model_dir, data, tmp_path, capsys):
    args = ["--save-steps", "1", "--save-total-limit", "1"]
    theirs = tmp_path / "theirs"  # a checkpoints folder the tool did not write
    (theirs / "checkpoints" / "checkpoint-0").mkdir(parents=True)
    (theirs / "checkpoints" / "checkpoint-0" / "weights.bin").write_text("theirs")
    before = snapshot(theirs)
    for extra in ([], ["--overwrite"]):
        assert main(train_cmd(tiny_model_dir, data, theirs, 3, *args, *extra)) == 2
        assert "checkpoints is not written by hydralora" in one_error_line(capsys.readouterr().err)
    assert snapshot(theirs) == before

    ours = tmp_path / "ours"
    assert main(train_cmd(tiny_model_dir, data, ours, 3, *args)) == 0
    assert sorted(p.name for p in (ours / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3"]
    for name in ("checkpoint-0", "checkpoint-2"):  # dropped into our folder; 2 is a step we save
        (ours / "checkpoints" / name).mkdir()
        (ours / "checkpoints" / name / "weights.bin").write_text(name)
    (ours / "checkpoints" / "notes.txt").write_text("mine")
    assert main(train_cmd(tiny_model_dir, data, ours, 3, *args, "--overwrite")) == 2
    assert "checkpoint-2 was not written by hydralora" in one_error_line(capsys.readouterr().err)
    shutil.rmtree(ours / "checkpoints" / "checkpoint-2")
    users = {k: v for k, v in snapshot(ours / "checkpoints").items() if k.startswith(("checkpoint-0", "notes"))}
    assert main(train_cmd(tiny_model_dir, data, ours, 3, *args, "--overwrite", "--seed", "4")) == 0
    after = snapshot(ours / "checkpoints")
    assert all(after[k] == v for k, v in users.items())  # rotation and --overwrite left them alone
    assert sorted(p.name for p in (ours / "checkpoints").glob("checkpoint-*")) == ["checkpoint-0", "checkpoint-3"]


def test_overwrite_over_a_peft_folder_of_someone_else(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "peft"
    (out / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (out / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (out / "checkpoints" / "checkpoint-5" / "adapter_model.safetensors").write_bytes(b"x")
    before = snapshot(out)
    assert main(train_cmd(tiny_model_dir, data, out, 2, "--overwrite")) == 2
    assert "not written by hydralora" in one_error_line(capsys.readouterr().err)
    assert snapshot(out) == before


# ---------------------------------------------------------------------------- BAD 3: model folders
def test_train_never_writes_into_a_model_folder(tiny_model_dir, data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    before = snapshot(base)
    assert main(train_cmd(base, data, base, 2, "--overwrite")) == 2
    assert "base model's own folder" in one_error_line(capsys.readouterr().err)
    assert main(train_cmd(tiny_model_dir, data, base, 2)) == 2  # another model's folder
    assert "holds a model (config.json)" in one_error_line(capsys.readouterr().err)
    assert snapshot(base) == before
    AutoModelForCausalLM.from_pretrained(base)  # still loads


# ---------------------------------------------------------------------------- BAD 4: other writers
def test_cluster_and_data_builtin_never_replace_user_files(data, tmp_path, capsys):
    for argv, name in ((["cluster", "--data", str(data), "--k-max", "3"], "labels.jsonl"),
                       (["cluster", "--data", str(data), "--k-max", "3"], "sse.png"),
                       (["data", "builtin", "--train-per-domain", "2", "--test-per-domain", "1"], "train.jsonl")):
        out = tmp_path / name
        out.mkdir()
        (out / name).write_text("the user's own")
        for extra in ([], ["--overwrite"]):
            assert main([*argv, "--output", str(out), *extra]) == 2
            assert f"{name} is not written by hydralora" in one_error_line(capsys.readouterr().err)
            assert [p.name for p in out.iterdir()] == [name] and (out / name).read_text() == "the user's own"
    out = tmp_path / "ours"  # the command's own earlier output: replaced only with --overwrite
    argv = ["cluster", "--data", str(data), "--k-max", "3", "--output", str(out)]
    assert main(argv) == 0
    assert main(argv) == 2
    assert "earlier output" in one_error_line(capsys.readouterr().err)
    assert main([*argv, "--overwrite"]) == 0
    listed = set(json.loads((out / ".hydralora-manifest.json").read_text())["files"])
    assert {"clusters.json", "labels.jsonl", "sse.png", "cluster_model.json"} <= listed


def test_analyze_never_replaces_user_files_or_adapters(tiny_model_dir, adapter, data, tmp_path, capsys):
    base = ["analyze", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--data", str(data)]
    out = tmp_path / "a"
    out.mkdir()
    (out / "analysis.json").write_text("{}")
    for extra in ([], ["--overwrite"]):
        assert main([*base, "--output", str(out), *extra]) == 2
        assert "analysis.json is not written by hydralora" in one_error_line(capsys.readouterr().err)
        assert (out / "analysis.json").read_text() == "{}"
    out = tmp_path / "b"  # a user's own per-domain LoRA where --per-domain-steps would train one
    (out / "per_domain" / "math").mkdir(parents=True)
    (out / "per_domain" / "math" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (out / "per_domain" / "math.jsonl").write_text("{}\n")
    before = snapshot(out)
    for extra in ([], ["--overwrite"]):
        assert main([*base, "--output", str(out), "--per-domain-steps", "1", *extra]) == 2
        assert "per_domain is not written by hydralora" in one_error_line(capsys.readouterr().err)
    assert snapshot(out) == before


def test_per_domain_loras_never_replace_a_users_adapter_folder(tiny_model_dir, data, tmp_path):
    from hydralora.errors import ConfigError
    from hydralora.train.per_domain import train_domain_loras

    out = tmp_path / "analysis"
    (out / "per_domain" / "math").mkdir(parents=True)
    (out / "per_domain" / "math" / "adapter_config.json").write_text("{}")
    (out / "per_domain" / ".hydralora-manifest.json").write_text(json.dumps({"files": ["headline"]}))
    before = snapshot(out)
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="math is not written by hydralora"):
            train_domain_loras(str(tiny_model_dir), [str(data)], out, 1, 0, ["q_proj"], 2, {}, overwrite)
    assert snapshot(out) == before


# ---------------------------------------------------------------------------- BAD 5: secrets
def test_credentials_never_reach_a_file(tiny_model_dir, data, tmp_path, capsys):
    import yaml

    token = "hf_" + "a1B2" * 9
    out = tmp_path / "run"
    assert main(train_cmd(tiny_model_dir, data, out, 2, "--trainer-arg", f"hub_token={token}")) == 2
    assert "does not upload" in one_error_line(capsys.readouterr().err) and not out.exists()
    assert main(train_cmd(tiny_model_dir, data, out, 2, "--trainer-arg", f"run_name=x {token}")) == 0
    written = "".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())
    assert token not in written
    record = (out / "train_config.yaml").read_text()
    assert record.startswith("# credentials are never written") and "<redacted>" in record
    assert yaml.safe_load(record)["trainer_args"]["run_name"] == "x <redacted>"
    from hydralora.files import redact

    clean, found = redact({"trainer": {"wandb_api_key": "k", "pad_token": "<pad>"},
                           "model": "https://bob:s3cret@host/m", "steps": 3, "tokens": 10})
    assert clean == {"trainer": {"wandb_api_key": None, "pad_token": "<pad>"},
                     "model": "https://bob:<redacted>@host/m", "steps": 3, "tokens": 10}
    assert found == ["trainer.wandb_api_key", "model"]


def test_push_lists_what_it_sends_and_keeps_secrets_home(adapter, tmp_path, monkeypatch, capsys):
    import hydralora.hub as hub

    folder = tmp_path / "push"
    shutil.copytree(adapter, folder)
    (folder / ".env").write_text("HF_TOKEN=hf_" + "x" * 34)
    (folder / "hf_token").write_text("hf_" + "y" * 34)
    (folder / "notes.txt").write_text("not written by hydralora")
    sent = {}

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            pass

        def create_commit(self, repo_id, operations, **kw):
            sent["files"] = sorted(op.path_in_repo for op in operations)
            return "https://huggingface.co/x/y/commit/1"

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_for_the_test")
    assert main(["push", str(folder), "x/y"]) == 0
    assert not {".env", "hf_token", "notes.txt", ".hydralora-manifest.json"} & set(sent["files"])
    assert not any(f.startswith("checkpoints/") for f in sent["files"])
    sent.clear()
    assert main(["push", str(folder), "x/y", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert "adapter_model.safetensors" in listed and "kept home" in listed and not sent
    assert main(["push", str(folder), "x/y", "--include", "notes.txt"]) == 0  # asked by name
    assert "notes.txt" in sent["files"]
    # a run record written before credentials were redacted: nothing is sent
    record = folder / "train_config.yaml"
    record.write_text(record.read_text() + "hub_token: hf_" + "z" * 34 + "\n")
    sent.clear()
    assert main(["push", str(folder), "x/y"]) == 2
    assert "holds a credential (hub_token)" in one_error_line(capsys.readouterr().err) and not sent
    theirs = tmp_path / "theirs"  # a folder hydralora did not write: only files named
    shutil.copytree(adapter, theirs)
    (theirs / ".hydralora-manifest.json").unlink()
    assert main(["push", str(theirs), "x/y"]) == 2
    assert "--include" in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------- BAD 6: disable_adapter
def test_disable_adapter_of_a_merged_model_is_the_base_model(tiny_batch):
    from hydralora import HydraLoraConfig, add_hydralora, disable_adapter
    from hydralora.model import hydralora_layers

    model = make_tiny_llama()
    with torch.no_grad():
        base = model(tiny_batch).logits
    add_hydralora(model, HydraLoraConfig(r=4, num_heads=2, init_heads="random", target_modules=["q_proj", "v_proj"]))
    for layer in hydralora_layers(model).values():
        torch.nn.init.normal_(layer.lora_A)
        torch.nn.init.normal_(layer.lora_B)
        layer.merge([0.5, 0.5])
    with torch.no_grad():
        merged = model(tiny_batch).logits
        assert not torch.allclose(merged, base)
        with disable_adapter(model):
            torch.testing.assert_close(model(tiny_batch).logits, base, rtol=0, atol=0)
        torch.testing.assert_close(model(tiny_batch).logits, merged, rtol=0, atol=0)


# ---------------------------------------------------------------------------- tracebacks -> one line
@pytest.mark.parametrize("extra,expected", [
    (["--trainer-arg", "dataloader_num_workers=-1"], "dataloader_num_workers=-1: must be >= 0"),
    (["--trainer-arg", "adam_beta1="], "adam_beta1='': expected float"),
    (["--trainer-arg", "adam_beta1=[0.9, 0.99]"], "adam_beta1=[0.9, 0.99]: expected float"),
    (["--trainer-arg", "push_to_hub=true"], "push_to_hub: hydralora train does not upload"),
    (["--trainer-arg", "max_grad_norm=nan"], "max_grad_norm=nan: must be a finite number"),
    (["--trainer-arg", "max_grad_norm=-1"], "max_grad_norm=-1.0: must be >= 0"),
    (["--trainer-arg", "eval_strategy=yes"], "quote the value"),
    (["--seed", str(2**32)], "--seed must be at most 4294967295"),
    (["--max-steps", "9" * 4000], "--max-steps must be at most"),
    (["--num-heads", "1000000000"], "lower --num-heads or --r"),
    (["--target-modules", "all-linear", "q_proj"], "all-linear"),
])
def test_values_that_failed_deep_inside_are_one_line(tiny_model_dir, data, tmp_path, capsys, extra, expected):
    out = tmp_path / "run"
    assert main(train_cmd(tiny_model_dir, data, out, 2, *extra)) == 2
    assert expected in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_missing_backends_and_config_files_are_one_line(tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    import transformers.integrations as integrations

    import hydralora.train.arguments as arguments

    monkeypatch.setattr(integrations, "get_available_reporting_integrations", lambda: [])
    assert main(train_cmd(tiny_model_dir, data, tmp_path / "r", 2, "--trainer-arg", "report_to=tensorboard")) == 2
    assert "tensorboard is not installed" in one_error_line(capsys.readouterr().err)
    monkeypatch.setattr(arguments, "_installed", lambda module: False)
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    assert main(train_cmd(tiny_model_dir, data, tmp_path / "r", 2, "--trainer-arg",
                          f"deepspeed={tmp_path / 'ds.json'}")) == 2
    assert "DeepSpeed is not installed" in one_error_line(capsys.readouterr().err)
    (tmp_path / "fsdp.txt").write_text("reshard_after_forward = true\n")
    assert main(train_cmd(tiny_model_dir, data, tmp_path / "r", 2, "--trainer-arg",
                          f"fsdp_config={tmp_path / 'fsdp.txt'}")) == 2
    assert f"{tmp_path / 'fsdp.txt'}, line 1: not valid JSON" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


def test_deep_nesting_and_huge_numbers_in_files_are_one_line(tiny_model_dir, data, adapter, tmp_path, capsys):
    deep = "[" * 100_000 + "]" * 100_000
    assert main(train_cmd(tiny_model_dir, data, tmp_path / "r", 2, "--trainer-arg", f"fsdp_config={deep}")) == 2
    assert "nested too deeply" in one_error_line(capsys.readouterr().err)
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: " + "1" * 5000 + "\n")
    assert main(["train", "--config", str(config), "--data", str(data), "--output", str(tmp_path / "r")]) == 2
    assert "run.yaml, line 1" in one_error_line(capsys.readouterr().err)
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    (copy / "adapter_config.json").write_text('{"r": ' + deep[:50_000] + "}")
    assert main(["info", str(copy)]) == 2
    assert "nested too deeply" in one_error_line(capsys.readouterr().err)
    (copy / "adapter_config.json").write_text('{"r": ' + "7" * 5000 + "}")
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(copy), "--prompt", "hi"]) == 2
    assert "5000 digits" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("damage", ["summary.json", "router_stats.json"])
def test_info_skips_a_broken_run_record(adapter, tmp_path, capsys, damage):
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    for text in ("{not json", "[" * 50_000, '{"steps": ' + "1" * 5000 + "}", '{"steps": "x", "final_loss": []}'):
        (copy / damage).write_text(text)
        assert main(["info", str(copy)]) == 0
        out = capsys.readouterr().out
        assert "HydraLoRA adapter" in out and "Traceback" not in out


# ---------------------------------------------------------------------------- disk full, read-only
@pytest.mark.parametrize("failure", ["torch", "oserror"])
def test_disk_full_inside_a_trainer_checkpoint(tiny_model_dir, data, tmp_path, monkeypatch, capsys, failure):
    out = tmp_path / "run"
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            Path(f).write_bytes(b"half a file")
            if failure == "torch":
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    assert main(train_cmd(tiny_model_dir, data, out, 2, "--save-steps", "1")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{out / 'checkpoints' / 'checkpoint-1'}: could not write it" in line
    assert ("No space left" in line) if failure == "oserror" else ("unexpected pos" in line)
    assert not (out / "checkpoints" / "checkpoint-1").exists()  # no partial checkpoint left


def test_read_only_storage_is_not_reported_as_a_full_disk(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    import hydralora.eval.run as eval_run
    import hydralora.files as files

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def never(*args, **kwargs):
        raise AssertionError("the model must not load before the output is checked")

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(eval_run, "load_model_with_adapter", never)
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--output",
                 str(tmp_path / "res.json")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "Read-only file system" in line and "read-only" in line and "free some space" not in line


# ---------------------------------------------------------------------------- silent readings
def test_duplicate_keys_and_yaml_booleans(tiny_model_dir, data, adapter, tmp_path, capsys):
    from hydralora.train.config import TrainConfig
    from hydralora.train.trainer import training_arguments

    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\nmax_steps: 2\nmax_steps: 20\n")
    assert main(["train", "--config", str(config), "--data", str(data), "--output", str(tmp_path / "r")]) == 2
    assert "run.yaml, line 3: not valid YAML (key 'max_steps' is given twice" in one_error_line(capsys.readouterr().err)
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    text = (copy / "adapter_config.json").read_text()
    (copy / "adapter_config.json").write_text(text.replace('"r": 4', '"r": 4,\n  "r": 8'))
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(copy), "--prompt", "hi"]) == 2
    assert "key 'r' is given twice" in one_error_line(capsys.readouterr().err)
    cfg = TrainConfig(data=["x"], output="o", trainer_args={"save_strategy": False})  # YAML 1.1's `no`
    args = training_arguments(cfg, tmp_path / "c", 2, False, torch.device("cpu"))
    assert args.save_strategy.value == "no"


def test_hydralora_flags_with_method_lora_are_named(tiny_model_dir, data, tmp_path, capsys):
    assert main(train_cmd(tiny_model_dir, data, tmp_path / "r", 0, "--method", "lora", "--router", "topk")) == 2
    err = capsys.readouterr().err
    assert "warning: --method lora does not use --router" in err


# ---------------------------------------------------------------------------- adapter files
@pytest.mark.parametrize("poison,expected", [
    (lambda t: t.to(torch.int64), "is not floating point"),
    (lambda t: torch.ones_like(t, dtype=torch.bool), "is not floating point"),
    (lambda t: t + 1e30, "values up to 1e+30"),
])
def test_adapter_weights_of_the_wrong_kind_are_refused(tiny_model_dir, adapter, tmp_path, capsys, poison, expected):
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    weights = copy / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    tensors[key] = poison(tensors[key])
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(copy), "--prompt", "hi",
                 "--max-new-tokens", "2"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert key in line and expected in line


def test_adapter_of_another_base_or_method(tiny_model_dir, adapter, tmp_path, capsys):
    from hydralora import load_adapter
    from transformers import AutoModelForCausalLM

    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    meta = json.loads((copy / "adapter_config.json").read_text())
    assert meta["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())  # absolute
    meta["base_model_name_or_path"] = "someone/another-model"
    (copy / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="trained on 'someone/another-model'"):
        load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), copy)
    meta["peft_type"] = "IA3"
    (copy / "adapter_config.json").write_text(json.dumps(meta))
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(copy), "--prompt", "hi"]) == 2
    assert "peft_type" in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------- Python API
def test_merge_gates_are_checked_and_a_merged_model_does_not_train(tiny_batch):
    from hydralora import HydraLoraConfig, add_hydralora
    from hydralora.errors import AdapterError, ConfigError
    from hydralora.model import hydralora_layers

    model = add_hydralora(make_tiny_llama(), HydraLoraConfig(r=2, num_heads=2, target_modules=["q_proj"]))
    layer = next(iter(hydralora_layers(model).values()))
    for gates, match in (([-0.5, 1.5], "non-negative"), ([0.9, 0.9], "sum to 1"), ([float("nan"), 1], "finite")):
        with pytest.raises(ConfigError, match=match):
            layer.merge(gates)
    for layer in hydralora_layers(model).values():
        layer.merge([0.25, 0.75])
    model.train()
    with pytest.raises(AdapterError, match="training a merged HydraLoRA layer"):
        model(tiny_batch)
    model.eval()
    model(tiny_batch)  # inference with merged layers is what merging is for


# ---------------------------------------------------------------------------- route
@pytest.fixture
def split_folder(tmp_path):
    from hydralora.clustering.kmeans import ClusterModel

    folder = tmp_path / "serve"
    texts = [f"What is {i} plus three?" for i in range(6)] + [f"Write a headline {i}." for i in range(6)]
    ClusterModel.fit(texts, 2, seed=0).save(folder)
    for name in ("math", "news"):
        (folder / name).mkdir()
        (folder / name / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 12}))
    (folder / "lora_split.json").write_text(json.dumps({"peft_type": "LORA_SPLIT", "adapters": ["math", "news"]}))
    return folder


def test_route_prints_paths_inside_the_folder_only(split_folder, tmp_path, capsys):
    assert main(["route", "--adapter", str(split_folder), "--prompt", "What is 7 plus three?", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert Path(row["path"]).parent == split_folder.resolve()
    assert row["lora_module"] == f"{row['adapter']}={row['path']}" and row["max_lora_rank"] == 16
    index = split_folder / "lora_split.json"
    for names in (["../../etc", "news"], ["/tmp", "news"], [".hidden", "news"]):
        index.write_text(json.dumps({"adapters": names}))
        assert main(["route", "--adapter", str(split_folder), "--prompt", "hi", "--json"]) == 2
        assert "is not the name of a folder inside" in one_error_line(capsys.readouterr().err)
    shutil.rmtree(split_folder / "math")
    (split_folder / "math").symlink_to(tmp_path)
    index.write_text(json.dumps({"adapters": ["math", "news"]}))
    assert main(["route", "--adapter", str(split_folder), "--prompt", "hi", "--json"]) == 2
    assert "'math'" in one_error_line(capsys.readouterr().err)


def test_route_refuses_a_nan_cluster_model(split_folder, capsys):
    tensors = load_file(str(split_folder / "cluster_model.safetensors"))
    tensors["centroids"][0, 0] = float("nan")
    save_file(tensors, str(split_folder / "cluster_model.safetensors"))
    assert main(["route", "--adapter", str(split_folder), "--prompt", "hi"]) == 2
    assert "NaN or infinite" in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------- pass@1
EQUAL_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(1, 1) == 2\n"
ABS_TEST = "def check(candidate):\n    assert abs(candidate(2, 3) - 5) < 1e-9\n"


@pytest.mark.parametrize("completion,test", [
    ("class Yes:\n    def __eq__(self, other):\n        return True\n\ndef add(a, b):\n    return Yes()\n", EQUAL_TEST),
    ("class Yes(int):\n    def __eq__(self, other):\n        return True\n\ndef add(a, b):\n    return Yes(0)\n",
     EQUAL_TEST),
    ("class Yes(list):\n    def __eq__(self, other):\n        return True\n\ndef add(a, b):\n    return Yes()\n",
     EQUAL_TEST),
    ("class Yes:\n    def __eq__(self, other):\n        return True\n\ndef add(a, b):\n    return {'sum': Yes()}\n",
     EQUAL_TEST.replace("candidate(2, 3)", "candidate(2, 3)['sum']").replace("candidate(1, 1)", "candidate(1, 1)['sum']")),
    ("import builtins\nbuiltins.abs = lambda x: 0\n\ndef add(a, b):\n    return 0\n", ABS_TEST),
])
def test_pass_at_1_compares_plain_values(completion, test):
    from hydralora.eval.sandbox import check_program

    assert check_program(completion, test, "add").status == "failed"
    good = "def add(a, b):\n    return {'sum': a + b}\n" if "'sum'" in test else "def add(a, b):\n    return a + b\n"
    assert check_program(good, test, "add").status == "passed"


def test_pass_at_1_still_takes_generators():
    from hydralora.eval.sandbox import check_program

    listed = "def check(candidate):\n    assert list(candidate(2, 3)) == [5]\n"
    assert check_program("def add(a, b):\n    yield a + b\n", listed, "add").status == "passed"


# ---------------------------------------------------------------------------- bounds, order
def test_generation_past_the_context_is_refused_at_once(tiny_model_dir, capsys):
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--max-new-tokens", "100000"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--max-new-tokens 100000: the model reads at most 256 tokens" in line


def test_eval_refuses_an_output_it_did_not_write_before_running(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    import hydralora.eval.run as eval_run

    monkeypatch.setattr(eval_run, "load_model_with_adapter", lambda *a, **k: pytest.fail("loaded the model"))
    (tmp_path / "results.json").write_text("the user's results")
    for extra in ([], ["--overwrite"]):
        assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--output",
                     str(tmp_path / "results.json"), *extra]) == 2
        assert "results.json is not written by hydralora" in one_error_line(capsys.readouterr().err)
    assert (tmp_path / "results.json").read_text() == "the user's results"


# ---------------------------------------------------------------------------- exports
def test_exports_are_readable_locked_and_carry_a_card(tiny_model_dir, adapter, tmp_path, capsys):
    out = tmp_path / "export"
    argv = ["export", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--output", str(out)]
    mask = os.umask(0o022)
    try:
        assert main(argv) == 0
    finally:
        os.umask(mask)
    assert oct((out / "adapter_model.safetensors").stat().st_mode & 0o777) == oct(0o644)
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "license:" in card and "--max-lora-rank 8" in card
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    from hydralora.folders import acquire_lock, release_lock

    lock, _ = acquire_lock(out)  # another export writing this folder
    try:
        assert main([*argv, "--overwrite"]) == 2
        assert "is in use" in one_error_line(capsys.readouterr().err)
    finally:
        release_lock(lock)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert main([*argv[:-1], str(link)]) == 2
    assert "is a symbolic link" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "elsewhere").exists()


def test_peft_outputs_and_checkpoints_are_readable_by_others(tiny_model_dir, data, tmp_path):
    out = tmp_path / "lora"
    mask = os.umask(0o022)
    try:
        assert main(train_cmd(tiny_model_dir, data, out, 1, "--method", "lora", "--num-heads", "1",
                              "--save-steps", "1")) == 0
    finally:
        os.umask(mask)
    files = [out / "adapter_model.safetensors", *(out / "checkpoints" / "checkpoint-1").iterdir()]
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {oct(0o644)}


def test_hub_ids_of_base_models():
    from hydralora.cards import base_hub_id, vllm_max_lora_rank

    assert base_hub_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_hub_id("/c/hub/models--org--name/snapshots/0123abc") == "org/name"
    assert [vllm_max_lora_rank(r) for r in (1, 4, 8, 12, 64, 500)] == [1, 8, 8, 16, 64, 512]


def test_push_offline_without_token_or_network_is_one_line(adapter, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as constants

    folder = tmp_path / "push"
    shutil.copytree(adapter, folder)
    monkeypatch.setenv("HF_TOKEN", "hf_for_the_test")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["push", str(folder), "x/y"]) == 2
    assert "HF_HUB_OFFLINE" in one_error_line(capsys.readouterr().err)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    assert main(["push", str(folder), "x/y"]) == 2
    assert "cannot reach the Hub" in one_error_line(capsys.readouterr().err)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert main(["push", str(folder), "x/y"]) == 2
    assert "no Hugging Face token" in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------- the look-alike walk
LOOK_ALIKES = [
    "adapter_config.json", "adapter_model.safetensors", "train_config.yaml", "summary.json",
    "router_stats.json", "README.md", "hydralora_export.json", "lora_split.json", "cluster_model.json",
    "cluster_model.safetensors", "clusters.json", "labels.jsonl", "sse.png", "router_heatmap.png",
    "ab_similarity.png", "analysis.json", "train.jsonl", "test.jsonl", "results.json",
    "checkpoints/checkpoint-2/optimizer.pt", "data/train.jsonl", "data/test.jsonl", "per_domain/math.jsonl",
    "per_domain/math/adapter_config.json", "cluster_0/adapter_config.json", "route_clusters/cluster_model.json",
    "results-data/test.jsonl", "runs/events.out", "math/adapter_config.json", "headline/adapter_config.json",
]
MODEL_FILES = ["config.json", "model.safetensors", "tokenizer.json"]


def walk_commands(model, adapter, data, out):
    """Every command that writes, pointed at `out` (argv without --overwrite)."""
    train = ["train", "--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", "2",
             "--batch-size", "4", "--r", "4", "--num-heads", "2", "--save-steps", "1", *TARGETS]
    export = ["export", "--model", str(model), "--adapter", str(adapter), "--output", str(out)]
    analyze = ["analyze", "--model", str(model), "--adapter", str(adapter), "--output", str(out)]
    return [
        train, [*train, "--method", "lora"], [*train, "--method", "lora-split"],
        [*train[:4], "builtin", *train[5:], "--builtin-train-per-domain", "2", "--builtin-test-per-domain", "1"],
        export, [*export, "--format", "merged"], [*export, "--gates", "per-domain", "--data", str(data)],
        ["cluster", "--data", str(data), "--k-max", "3", "--output", str(out)],
        ["cluster", "--data", "builtin", "--k-max", "3", "--output", str(out)],
        ["data", "builtin", "--train-per-domain", "2", "--test-per-domain", "1", "--output", str(out)],
        [*analyze, "--data", str(data)], [*analyze, "--data", str(data), "--per-domain-steps", "1"],
        [*analyze, "--data", "builtin"],
        ["eval", "--model", str(model), "--data", str(data), "--output", str(out / "results.json")],
        ["eval", "--model", str(model), "--data", "builtin", "--output", str(out / "results.json")],
    ]


@pytest.mark.parametrize("with_model", [False, True])
def test_no_command_touches_look_alike_user_files(tiny_model_dir, adapter, data, tmp_path, capsys, with_model):
    """Acceptance of issue 22: a folder of the user's holding files named like every file any
    command writes; every writing command, with and without --overwrite, is refused with one
    line and leaves every file, folder and link as it was (and writes nothing beside them)."""
    look = tmp_path / "look"
    for name in LOOK_ALIKES + (MODEL_FILES if with_model else []):
        (look / name).parent.mkdir(parents=True, exist_ok=True)
        (look / name).write_text(f"the user's {name}\n")
    (look / "notes-link.txt").symlink_to(look / "README.md")
    before = snapshot(look)
    outside = sorted(p.name for p in tmp_path.iterdir())
    for argv in walk_commands(tiny_model_dir, adapter, data, look):
        for extra in ([], ["--overwrite"]):
            assert main([*argv, *extra]) == 2, argv
            one_error_line(capsys.readouterr().err)
            assert snapshot(look) == before, argv + extra
            assert sorted(p.name for p in tmp_path.iterdir()) == outside, argv  # no stray folder beside it
    assert main(["push", str(look), "someone/repo"]) == 2  # not ours: nothing is sent or written
    assert "--include" in one_error_line(capsys.readouterr().err)
    assert snapshot(look) == before
