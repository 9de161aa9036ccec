"""The SLURM test cluster (scripts/slurm-local.sh): its launcher overrides and one check that
skips a test when no cluster is reachable, or fails it under ``PFC_REQUIRE_SLURM=1`` (CI sets
it once the cluster is up)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

PARTITION = os.environ.get("PFC_SLURM_PARTITION", "local")
# CPU-only test cluster: no GPUs, 1 CPU and 1 GB per job, short limits.
SLURM_LAUNCHER = (
    "hydra/launcher=slurm",
    f"hydra.launcher.partition={PARTITION}",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=20",
    "hydra.launcher.signal_delay_s=30",
)


def skip_reason() -> str | None:
    """Why the cluster is unusable, or None when sinfo, the partition and sacct answer."""
    for tool in ("sbatch", "sinfo", "sacct", "scontrol"):
        if shutil.which(tool) is None:
            return f"no SLURM client: {tool} not on PATH (scripts/slurm-local.sh start)"
    checks = {
        "sinfo": ["sinfo", "-h", "-p", PARTITION, "-o", "%a"],
        "sacct": ["sacct", "-n", "-X", "-S", "now-1minutes"],
    }
    for name, cmd in checks.items():
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=False)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` timed out after 5 s: no SLURM cluster reachable"
        if res.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {res.stderr.strip()[:300]}"
        if name == "sinfo" and "up" not in res.stdout.split():
            return f"partition {PARTITION!r} not found or not up (PFC_SLURM_PARTITION)"
    return None


def require_slurm() -> None:
    """Skip the calling test when no cluster is reachable; fail it under PFC_REQUIRE_SLURM=1."""
    reason = skip_reason()
    if reason is not None:
        if os.environ.get("PFC_REQUIRE_SLURM") == "1":
            pytest.fail(f"PFC_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
