"""The Slurm and Kubernetes examples stay runnable: valid syntax, the launcher's flags, the requeue code."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from alignflow.cli.launch import NPROC_HELP, TORCHRUN_ARGS_ENV
from alignflow.train.distributed import EXIT_REQUEUE

REPO = Path(__file__).resolve().parents[2]


def test_sbatch_script_parses_and_requeues_on_the_exit_code() -> None:
    script = REPO / "examples" / "slurm" / "train.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --signal=USR1@120" in text and "#SBATCH --requeue" in text
    assert f'"$rc" -eq {EXIT_REQUEUE}' in text and "scontrol requeue" in text
    assert TORCHRUN_ARGS_ENV in text and "--nproc" in text


def test_kubernetes_job_ignores_the_requeue_code_and_uses_elastic_rendezvous() -> None:
    docs = list(yaml.safe_load_all((REPO / "examples" / "k8s" / "train-job.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "Job")
    rule = job["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "Ignore" and rule["onExitCodes"]["values"] == [EXIT_REQUEUE]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["alignflow", "sft"] and "--nproc" in container["command"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "--rdzv-backend c10d" in env[TORCHRUN_ARGS_ENV] and "--nnodes 1:2" in env[TORCHRUN_ARGS_ENV]
    assert TORCHRUN_ARGS_ENV in NPROC_HELP
