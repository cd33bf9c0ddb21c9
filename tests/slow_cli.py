"""`python tests/slow_cli.py SECONDS ARGS...`: the hydralora CLI with every optimizer step slowed
down by SECONDS, so that a test can interrupt a run of a tiny model in the middle of it.

The delay is the test's own aid: a Trainer callback passed to `run_training`, nothing that the
package reads from the environment.
"""

from __future__ import annotations

import sys
import time

from transformers import TrainerCallback

import hydralora.cli as cli
from hydralora.train.run import run_training


class StepDelay(TrainerCallback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


if __name__ == "__main__":
    delay = StepDelay(float(sys.argv[1]))
    cli.run_training = lambda cfg: run_training(cfg, callbacks=[delay])
    sys.exit(cli.main(sys.argv[2:]))
