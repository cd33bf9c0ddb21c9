"""The mechanism HydraLoRA relies on, on a synthetic task whose answer is known
(benchmarks/mechanism.py): tasks sharing A and differing in B, marked only by their inputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "mechanism.py"
spec = importlib.util.spec_from_file_location("mechanism", PATH)
mechanism = importlib.util.module_from_spec(spec)
sys.modules["mechanism"] = mechanism
spec.loader.exec_module(mechanism)


@pytest.fixture(scope="module")
def tasks():
    return mechanism.make_tasks(num_tasks=3, d=16, o=12, r=2, n=128, seed=0)


def test_oracle_routing_recovers_every_task_update(tasks):
    layer = mechanism.train(mechanism.make_layer(tasks, heads=3, r=2, seed=0), tasks, steps=300,
                            lr=3e-2, oracle=True)
    errors = mechanism.recovered_update_errors(layer, tasks)
    assert max(errors) < 0.05, errors  # head t is task t's update B*_t A*
    assert mechanism.held_out_error(layer, tasks, oracle=True) < 0.01


def test_no_lora_can_fit_what_the_heads_fit(tasks):
    """A LoRA is one linear map for every task: its held-out error cannot go below the best
    single linear map's (least squares), which is far above what routed heads reach."""
    bound = mechanism.best_single_map_error(tasks)
    assert bound > 0.3  # the tasks really differ
    for r in (2, mechanism.equal_rank(tasks, heads=3, r=2)):
        lora = mechanism.train(mechanism.make_layer(tasks, heads=1, r=r, seed=0), tasks,
                               steps=300, lr=3e-2)
        assert mechanism.held_out_error(lora, tasks) > bound - 0.05, r


def test_learned_router_finds_tasks_marked_by_their_inputs(tasks):
    """No labels: the per-token router on x learns to send each task to its own head."""
    layer = mechanism.train(mechanism.make_layer(tasks, heads=3, r=2, seed=0), tasks, steps=300,
                            lr=3e-2)
    assert mechanism.held_out_error(layer, tasks) < 0.5 * mechanism.best_single_map_error(tasks)
