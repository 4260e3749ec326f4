"""`--distributed`: relaunch a script under `torch.distributed.run` when it is not already under a launcher."""

import os
import subprocess
import sys

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Environment variables that torchrun, accelerate launch and SLURM-style launchers set for each rank.
LAUNCHER_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE")
DEFAULT_CPU_PROCESSES = 2


def under_launcher() -> bool:
    return any(name in os.environ for name in LAUNCHER_VARIABLES)


def accelerator_backend() -> str | None:
    """Return the distributed backend of this machine's accelerator (such as nccl), or None when training runs on CPU.

    This is the test accelerate 1.16 makes in `PartialState`: without such a backend it sets up multi-process
    training only when told to run on CPU.
    """
    try:
        from accelerate.utils import get_distributed_backend, get_torch_accelerator_backend
    except ImportError:  # accelerate versions without these helpers
        return "nccl" if torch.cuda.is_available() else None
    device_type, _ = get_torch_accelerator_backend()
    return get_distributed_backend(device_type)


def cpu_distributed_defaults() -> dict:
    """Return the `TrainingArguments` defaults that make each launched rank train on CPU over gloo.

    Under torchrun on a machine without an accelerator, accelerate 1.16 initializes a process group but still
    treats every rank as a separate single-process run (each trains on the whole dataset, and gradients are never
    averaged) unless `use_cpu` is set. Outside a launcher, or with an accelerator, this returns `{}`.
    """
    if not under_launcher() or accelerator_backend() is not None:
        return {}
    return {"use_cpu": True, "ddp_backend": "gloo"}


def default_process_count() -> int:
    """One process per visible GPU, else two CPU processes on the gloo backend."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.cuda.device_count()
    return DEFAULT_CPU_PROCESSES


def strip_flags(argv: list[str], flags: dict[str, bool]) -> list[str]:
    """Remove `flags` from argv; `flags` maps each flag to whether it takes a value."""
    cleaned, i = [], 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in flags:
            takes_value = flags[name] and "=" not in argv[i]
            # A boolean flag may be followed by an explicit True/False.
            if not flags[name] and i + 1 < len(argv) and argv[i + 1] in ("True", "False", "true", "false"):
                takes_value = True
            i += 2 if takes_value else 1
            continue
        cleaned.append(argv[i])
        i += 1
    return cleaned


def maybe_relaunch_distributed(argv: list[str], nproc_per_node: int | None, script: str | None = None) -> bool:
    """Run `script` again under `torch.distributed.run` with `nproc_per_node` processes and wait for it.

    Returns False, and does nothing, when the process already runs under a launcher (torchrun, accelerate launch):
    the Trainer then initializes the process group itself. Returns True after the relaunched run succeeded, and
    exits with its return code when it failed.
    """
    if under_launcher():
        return False
    nproc = nproc_per_node or default_process_count()
    if nproc < 1:
        raise ValueError(f"Invalid --nproc_per_node {nproc}: it must be at least 1.")
    script = script or sys.argv[0]
    child_argv = strip_flags(argv, {"--distributed": False, "--nproc_per_node": True})
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *child_argv,
    ]
    backend = accelerator_backend() or "gloo"
    logger.warning(f"Relaunching with {nproc} processes ({backend}): {' '.join(command)}")
    completed = subprocess.run(command)
    if completed.returncode != 0:
        # torchrun has already printed which rank failed and its traceback.
        sys.exit(completed.returncode)
    return True
