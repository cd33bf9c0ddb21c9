"""Hub-ready adapter folders: the model card of `hydralora train`, adapters named by hub id
(resolved from a pre-filled Hugging Face cache, offline), and `hydralora push` up to the upload."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import make_tiny_llama, tiny_records, write_jsonl
from hydralora import HydraLoraConfig, add_hydralora, load_adapter, save_adapter
from hydralora.cli import main
from hydralora.errors import AdapterError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_cache(cache, repo_id, folder):
    """A snapshot in huggingface_hub's cache layout: models--OWNER--NAME/{refs/main, snapshots/SHA}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    train = write_jsonl(root / "train.jsonl", tiny_records(16))
    test = write_jsonl(root / "test.jsonl", tiny_records(6))
    out = root / "adapter"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(train), "--eval-data", str(test),
                 "--output", str(out), "--max-steps", "2", "--batch-size", "4", "--r", "4",
                 "--num-heads", "2", "--target-modules", "q_proj", "v_proj", "--save-steps", "2"]) == 0
    return out


def test_train_writes_a_model_card_listed_as_ours(trained, tiny_model_dir):
    card = (trained / "README.md").read_text()
    manifest = json.loads((trained / ".hydralora-manifest.json").read_text())["files"]
    assert "README.md" in manifest
    summary = json.loads((trained / "summary.json").read_text())
    assert str(tiny_model_dir) in card and "HydraLoRA r=4, k=2" in card
    assert "k = 2 heads, set by hand" in card
    assert "- per_device_train_batch_size: `4`" in card and "- max_steps: `2`" in card
    assert "- learning_rate: `" in card  # train_config.yaml's names, read back
    assert f"{summary['trainable_params']:,}" in card
    assert "headline: 8" in card and "math: 8" in card  # training data per domain
    assert "## Held-out results" in card and f"{summary['eval']['fine-tuned']['mean']['loss']:.4f}" in card
    assert "load_model_with_adapter" in card and "peft-lora" in card
    assert card.startswith("---\nlibrary_name: hydralora")


def test_a_second_run_replaces_our_card_but_never_a_users(trained, tiny_model_dir, tmp_path):
    from hydralora.cards import write_model_card

    folder = tmp_path / "copy"
    shutil.copytree(trained, folder)
    assert write_model_card(folder)  # ours: replaced
    (folder / "README.md").write_text("my notes")
    manifest = folder / ".hydralora-manifest.json"
    data = json.loads(manifest.read_text())
    data["files"].remove("README.md")
    manifest.write_text(json.dumps(data))
    assert not write_model_card(folder)
    assert (folder / "README.md").read_text() == "my notes"


def test_load_adapter_from_a_cached_hub_id(offline_cache, tmp_path):
    torch.manual_seed(0)
    model = add_hydralora(make_tiny_llama(), HydraLoraConfig(r=2, num_heads=2, init_heads="random",
                                                            target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    fill_cache(offline_cache, "someone/tiny-hydra", tmp_path / "a")
    loaded = load_adapter(make_tiny_llama(), "someone/tiny-hydra")
    ids = torch.tensor([[1, 2, 3]])
    model.eval()
    assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-6)
    assert load_adapter(make_tiny_llama(), f"someone/tiny-hydra@{COMMIT}") is not None
    with pytest.raises(AdapterError, match="local cache"):
        load_adapter(make_tiny_llama(), "someone/not-cached")


def test_cli_adapter_flag_takes_a_hub_id(offline_cache, trained, tiny_model_dir, capsys):
    fill_cache(offline_cache, "someone/trained", trained)
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", "someone/trained",
                 "--prompt", "What is 2 plus three?", "--max-new-tokens", "3"]) == 0
    assert main(["info", "someone/trained"]) == 0
    assert "HydraLoRA adapter" in capsys.readouterr().out
    assert main(["info", "someone/missing"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err


def test_push_uploads_the_folder_without_checkpoints(trained, tmp_path, monkeypatch, capsys):
    import hydralora.hub as hub

    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls["create"] = (repo_id, kw)

        def create_branch(self, repo_id, branch, **kw):
            calls["branch"] = branch

        def create_commit(self, repo_id, operations, **kw):
            calls["commit"] = (repo_id, [op.path_in_repo for op in operations], kw)
            return "https://huggingface.co/someone/repo/commit/abc"

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    folder = tmp_path / "push"
    shutil.copytree(trained, folder)
    (folder / "README.md").unlink()  # a folder without a card gets one before the upload
    assert main(["push", str(folder), "someone/repo", "--private"]) == 0
    assert calls["create"] == ("someone/repo", {"private": True, "exist_ok": True, "repo_type": "model"})
    repo, sent, kw = calls["commit"]
    assert repo == "someone/repo" and kw["repo_type"] == "model"
    assert (folder / "README.md").exists()
    assert "README.md" in json.loads((folder / ".hydralora-manifest.json").read_text())["files"]
    assert "adapter_model.safetensors" in sent and "README.md" in sent
    assert not any(s.startswith(("checkpoints/", ".")) for s in sent)
    printed = capsys.readouterr().out
    assert f"uploading {len(sent)} files" in printed and "checkpoints/" in printed  # listed first
    # owner/name@branch: the branch is the revision, the id what the Hub is given
    assert main(["push", str(folder), "someone/repo@dev"]) == 0
    assert calls["commit"][0] == "someone/repo" and calls["branch"] == "dev"
    assert calls["commit"][2]["revision"] == "dev"
    assert main(["push", str(folder), "someone/repo@dev", "--revision", "main"]) == 2
    assert "give the branch once" in capsys.readouterr().err
    assert main(["push", str(folder), "someone/repo@"]) == 2
    assert "name the branch after '@'" in capsys.readouterr().err


def test_push_refuses_bad_input(tmp_path, capsys):
    assert main(["push", str(tmp_path), "someone/repo"]) == 2
    assert "not an adapter folder" in capsys.readouterr().err
    assert main(["push", str(tmp_path), "not a repo id"]) == 2
