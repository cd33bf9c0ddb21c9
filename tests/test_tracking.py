"""`--trainer-arg report_to=tensorboard`: without TensorBoard one error line naming the extra,
before the model loads; with it, event files under OUTPUT/runs/ (not OUTPUT/checkpoints/runs/)."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import tiny_records, write_jsonl
from hydralora.cli import main


def train(model_dir, tmp_path, *extra):
    data = write_jsonl(tmp_path / "d.jsonl", tiny_records(8))
    return main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "run"),
                 "--max-steps", "2", "--batch-size", "4", "--logging-steps", "1", "--save-steps", "0",
                 "--r", "2", "--num-heads", "2", "--target-modules", "q_proj", *extra])


@pytest.mark.parametrize("backend,extra", [("tensorboard", "hydralora[tensorboard]"), ("wandb", "hydralora[wandb]")])
def test_a_missing_tracker_is_one_error_line_naming_the_extra(tiny_model_dir, tmp_path, capsys, monkeypatch,
                                                              backend, extra):
    real = importlib.util.find_spec
    hidden = {"tensorboard", "tensorboardX", "wandb"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name.split(".")[0] in hidden else real(name, *a, **k))
    assert train(tiny_model_dir, tmp_path, "--trainer-arg", f"report_to={backend}") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert f"pip install '{extra}'" in err
    assert not (tmp_path / "run").exists()  # refused before any work


def test_tensorboard_event_files_land_under_output_runs(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    assert train(tiny_model_dir, tmp_path, "--trainer-arg", "report_to=tensorboard") == 0
    events = list((tmp_path / "run" / "runs").glob("*/events.out.tfevents.*"))
    assert events and not (tmp_path / "run" / "checkpoints" / "runs").exists()
