"""`hydralora compare`: equal-size rows, the learning rate chosen on validation data, paired
seeds, a verdict, and a resumable set of runs keyed by their flags."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_records, write_jsonl
from hydralora.cli import main, training_flags
from hydralora.commands.compare import CompareOptions
from hydralora.compare.report import diagnosis, parameter_counts, prepare_data, row_flags, table, verdict_line
from hydralora.data.conflict import TASKS, conflict_mixture
from hydralora.errors import ConfigError


def test_lora_gets_hydraloras_parameter_count_and_update_scale():
    shapes = [(64, 128), (128, 64)]
    counts = parameter_counts(shapes, r=8, k=4, domains=2)
    hydra = sum(8 * i + 4 * o * 8 + 4 * i for i, o in shapes)
    assert counts["hydralora"] == hydra
    assert counts["lora"] == counts["lora_rank"] * sum(i + o for i, o in shapes)
    assert abs(counts["lora"] - hydra) <= sum(i + o for i, o in shapes) / 2  # the nearest rank
    assert counts["control"] == sum(8 * i + o * 8 for i, o in shapes)
    assert counts["oracle"] == sum(8 * i + 2 * o * 8 for i, o in shapes)
    opts = CompareOptions(data=["d"], output="o", r=8, alpha=32.0)
    lora = row_flags("lora", opts, counts, None)
    rank = counts["lora_rank"]
    assert lora[lora.index("--alpha") + 1] == f"{4.0 * rank:g}"  # alpha_L / r_L = alpha / r = 4
    assert row_flags("control", opts, counts, None)[row_flags("control", opts, counts, None).index("--num-heads") + 1] == "1"
    oracle = row_flags("oracle", opts, counts, ["a", "b", "c"])
    assert "oracle" in oracle and oracle[oracle.index("--num-heads") + 1] == "3"


def test_the_variant_rows_are_the_hydralora_row_with_one_setting_changed():
    counts = parameter_counts([(64, 128)], r=8, k=4, domains=None)
    opts = CompareOptions(data=["d"], output="o", rows=["lora", "hydralora", "sequence", "per-head"])
    hydra = row_flags("hydralora", opts, counts, None)
    assert row_flags("sequence", opts, counts, None) == [*hydra, "--routing", "sequence"]
    assert row_flags("per-head", opts, counts, None) == [*hydra, "--dropout-masks", "per_head"]
    assert "sequence" not in CompareOptions(data=["d"], output="o").rows  # asked for by name only
    rows = {"lora": {"loss": {"0": 1.2, "1": 1.3}}, "hydralora": {"loss": {"0": 1.25, "1": 1.3}},
            "sequence": {"loss": {"0": 1.1, "1": 1.35}}}
    line = diagnosis(rows, ["0", "1"])[-1]
    assert line.startswith("HydraLoRA, routed per example") and "1.225 against 1.275" in line
    assert "lower on 1 of 2 seeds" in line
    for row in rows.values():
        row.update(trainable_params=10, lr="1e-3", paired_vs_lora={"0": 0.0, "1": 0.0})
    assert "| HydraLoRA, routed per example (prompt) | 10 | 1e-3 | 1.100 | 1.350 |" in table(rows, ["0", "1"], None)


def test_variant_rows_refuse_flags_that_void_them(tmp_path, capsys):
    code = main(["compare", "--data", "d.jsonl", "--output", str(tmp_path / "o"),
                 "--rows", "lora", "hydralora", "per-head", "--dropout", "0"])
    assert code == 2 and "--rows per-head: per-head dropout masks need --dropout above 0" in capsys.readouterr().err
    code = main(["compare", "--data", "d.jsonl", "--output", str(tmp_path / "o"),
                 "--rows", "lora", "hydralora", "sequence", "--packing"])
    assert code == 2 and "--rows sequence" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("lora,hydra,expected", [
    ({"0": 1.2, "1": 1.3}, {"0": 1.1, "1": 1.25}, "HydraLoRA beats LoRA of equal size by 0.075"),
    ({"0": 1.2, "1": 1.3}, {"0": 1.1, "1": 1.35}, "does not pay here: ahead of LoRA of equal size by 0.025"),
    ({"0": 1.2, "1": 1.3}, {"0": 1.3, "1": 1.35}, "does not pay here: LoRA of equal size is better by 0.075"),
])
def test_the_verdict_follows_the_paired_seeds(lora, hydra, expected):
    rows = {"lora": {"loss": lora}, "hydralora": {"loss": hydra}}
    assert expected in verdict_line(rows, ["0", "1"])
    # a control lower than HydraLoRA on every seed turns a win over LoRA into the initialization's
    rows["control"] = {"loss": {"0": 1.0, "1": 1.2}}
    line = verdict_line(rows, ["0", "1"])
    if expected.startswith("HydraLoRA beats"):
        assert "one head with its initialization is better still by 0.075" in line and "heads do not pay" in line
    else:
        assert line == verdict_line({k: v for k, v in rows.items() if k != "control"}, ["0", "1"])
    rows["control"] = {"loss": {"0": 1.0, "1": 1.4}}  # lower on one seed only: no such claim
    assert verdict_line(rows, ["0", "1"]) == verdict_line({k: v for k, v in rows.items() if k != "control"}, ["0", "1"])


def test_validation_and_test_splits_are_carved_per_domain(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", tiny_records(24))
    opts = CompareOptions(data=[str(data)], output=str(tmp_path / "o"), val_per_domain=3, test_per_domain=2)
    splits = prepare_data(opts, tmp_path / "o" / "data")
    assert splits["sizes"] == [14, 6, 4] and splits["domains"] == ["headline", "math"]
    seen = [line for key in ("fit", "val", "test") for line in open(splits[key])]
    assert len(set(seen)) == len(seen) == 24  # disjoint, nothing lost


def test_bad_options_and_training_flags_are_one_error_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--seeds"):
        CompareOptions(data=["d"], output="o", seeds=["0", "x"])
    with pytest.raises(ConfigError, match="--rows"):
        CompareOptions(data=["d"], output="o", rows=["hydralora"])
    with pytest.raises(ConfigError, match="unrecognized arguments: --max-stepz"):
        training_flags(["--max-stepz", "3"])
    assert training_flags(["--max-steps", "3", "--batch-size", "2"]) ["max_steps"] == 3
    code = main(["compare", "--data", "d.jsonl", "--output", str(tmp_path / "o"), "--lr", "1e-3"])
    assert code == 2 and "compare sets --learning-rate (--lr) itself" in capsys.readouterr().err
    code = main(["compare", "--data", "d.jsonl", "--output", str(tmp_path / "o2"),
                 "--target-modules", "all-linear", "q_proj"])
    assert code == 2 and "'all-linear' already selects every linear layer" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_the_conflicting_mixture_shares_inputs_across_tasks():
    train, test = conflict_mixture(train_sentences=10, test_sentences=3)
    assert len(train) == 10 * len(TASKS) and len(test) == 3 * len(TASKS)
    by_sentence: dict[str, set] = {}
    for r in train:
        by_sentence.setdefault(r["prompt"].split("\n\n", 1)[1], set()).add(r["domain"])
    assert all(tasks == set(TASKS) for tasks in by_sentence.values())  # every sentence, every task
    test_sentences = {r["prompt"].split("\n\n", 1)[1] for r in test}
    assert not test_sentences & set(by_sentence)
    upper = next(r for r in train if r["domain"] == "upper")
    assert upper["completion"] == upper["prompt"].split("\n\n", 1)[1].upper()


@pytest.mark.slow
def test_compare_runs_end_to_end_on_the_tiny_model_and_resumes(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", tiny_records(24))
    out = tmp_path / "cmp"
    argv = ["compare", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
            "--seeds", "0", "1", "--lr-grid", "1e-3", "2e-2", "--r", "4", "--num-heads", "2",
            "--val-per-domain", "2", "--test-per-domain", "2",
            "--max-steps", "4", "--batch-size", "4", "--target-modules", "q_proj", "v_proj", "--save-steps", "0",
            "--jobs", "2"]  # two runs at once: the test's time is mostly each process's start
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "compare.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {"lora", "hydralora", "control", "oracle"}
    assert all(set(r["loss"]) == {"0", "1"} and r["lr"] in ("1e-3", "2e-2") for r in rows.values())
    assert all(set(r["validation_loss_by_lr"]) == {"1e-3", "2e-2"} for r in rows.values())
    # LoRA's trainable parameters are within one rank's worth of HydraLoRA's
    assert abs(rows["lora"]["trainable_params"] - rows["hydralora"]["trainable_params"]) <= 2 * (64 + 64)
    assert report["verdict"].startswith("HydraLoRA") and report["verdict"] in printed
    assert (out / "compare.png").stat().st_size > 1000 and "| method |" in (out / "compare.md").read_text()
    # an interrupted or repeated compare reuses every finished run
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "[compare] train " not in again and "[compare] reuse " in again
    assert json.loads((out / "compare.json").read_text())["rows"] == report["rows"]


def test_recorded_configs_are_checked_under_every_name_of_a_flag():
    from hydralora.compare.runs import config_mismatches

    recorded = {"learning_rate": 0.001, "per_device_train_batch_size": 4, "alpha": 16.0}
    flags = {"--lr": ["1e-3"], "--batch-size": ["8"], "--lora-alpha": ["16"]}
    assert config_mismatches(recorded, flags) == [
        "--batch-size 8 but train_config.yaml has per_device_train_batch_size: 4"]


def test_runs_log_one_line_at_a_time_from_parallel_workers(tmp_path):
    """Workers (--jobs) log through Runs.log, which hands the log function one line at a time."""
    import threading
    import time

    from hydralora.compare.runs import Runs, in_parallel

    inside, overlaps, lines = [0], [], []

    def slow_log(message):  # a log that would interleave if two calls overlapped
        inside[0] += 1
        overlaps.append(inside[0] > 1)
        time.sleep(0.01)
        lines.append(message)
        inside[0] -= 1

    runs = Runs(tmp_path, log=slow_log)
    start = threading.Barrier(4)
    in_parallel({i: (lambda i=i: (start.wait(), runs.log(f"line {i}"))) for i in range(4)}, workers=4)
    assert sorted(lines) == [f"line {i}" for i in range(4)] and not any(overlaps)
