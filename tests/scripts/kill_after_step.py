"""Run the orthoft CLI, SIGKILLing this process right after optimizer step N (and its checkpoint, if due).

Usage: python tests/scripts/kill_after_step.py N train RECIPE.yaml [options]
tests/test_training.py uses it to test ``orthoft train --resume`` after a kill: the step's work is
done (its log record, evaluation and checkpoint when they are due), then the process dies without
any clean-up, as under an out-of-memory kill or a preempted job.
"""

from __future__ import annotations

import os
import signal
import sys

from orthoft.cli import main
from orthoft.training.loop import TrainingRun


def kill_after(step: int) -> None:
    """Make every ``TrainingRun`` kill its process once it has finished optimizer step ``step``."""
    run_step = TrainingRun.run_step

    def run_step_then_maybe_die(self: TrainingRun) -> None:
        run_step(self)
        if self.state.step == step:
            self.progress.close()
            print(f"kill_after_step.py: killing this process after step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    TrainingRun.run_step = run_step_then_maybe_die


if __name__ == "__main__":
    kill_after(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
