"""What a process knows about torchrun without importing torch: the requeue exit code and whether it is a rank.

The CLI imports these at start-up; `alignflow.train.distributed` (which imports torch) re-exports them.
"""

from __future__ import annotations

import os

# Exit code of a run stopped by SIGTERM or SIGUSR1 after its checkpoint: "requeue me" (EX_TEMPFAIL).
# examples/slurm/train.sbatch requeues the job on it; a Kubernetes Job's podFailurePolicy can match it.
EXIT_REQUEUE = 75


def under_torchrun() -> bool:
    """This process is one of a torchrun job (even a job of one process: torchrun sets TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or env_world_size() > 1


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
