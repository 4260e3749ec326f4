"""run_mdlm.py with an error raised in the first training step of one rank, for tests/test_distributed.py.

    FAILING_RANK=1 python tests/run_mdlm_failing_rank.py --distributed --nproc_per_node 2 [run_mdlm.py flags]

`--distributed` relaunches this script, so every rank installs the failure before running `run_mdlm.main`.
The other ranks are then blocked in a collective operation that the failed rank never joins.
"""

import os
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run_mdlm  # noqa: E402
from mdlm.trainer import MdlmTrainer  # noqa: E402


FAILURE_MESSAGE = "error injected into the first training step"


def fail_in_training_step(self, model, inputs, *args, **kwargs):
    raise RuntimeError(f"{FAILURE_MESSAGE} of rank {os.environ['RANK']}")


if __name__ == "__main__":
    if os.environ.get("RANK") is not None and os.environ.get("RANK") == os.environ.get("FAILING_RANK"):
        MdlmTrainer.compute_loss = fail_in_training_step
    run_mdlm.main()
