"""scripts/ablation.sbatch submitted, unedited, to a real SLURM: runs only where `sbatch` is on the PATH and a
controller answers (scripts/slurm_localhost.sh start makes a one-node cluster on 127.0.0.1); skipped elsewhere."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


def cluster_up():
    if not shutil.which("sbatch"):
        return False
    try:
        r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and "UP" in r.stdout


@pytest.mark.skipif(not cluster_up(), reason="no SLURM here (sbatch not on the PATH, or no controller answers)")
def test_a_two_task_array_of_a_tiny_protocol_runs_on_slurm():
    env = dict(os.environ, VENV=sys.prefix)
    r = subprocess.run(["bash", "scripts/slurm_localhost.sh", "demo"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    report = r.stdout.split("report of every task:")[-1]
    assert "| synthetic -> synthetic | 1 |" in report and "(n=2)" in report and "missing" not in report
