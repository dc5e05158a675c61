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


def fake_slurm(tmp_path, cpus, mem_mib):
    """sinfo that reports one node, and sbatch that prints what it was given: no cluster needed."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sinfo").write_text(f"#!/bin/bash\necho 'node1 {cpus} {mem_mib}'\n")
    (bin_ / "sbatch").write_text("#!/bin/bash\necho \"submitted: $*\"\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}")


def test_submission_refuses_a_request_no_node_can_meet(tmp_path):
    """The default request (4 CPUs, 16G) on a 2-CPU node: one line, nothing submitted (SLURM itself would accept
    it and leave it pending forever); a request that fits goes to sbatch unchanged."""
    env = fake_slurm(tmp_path, 2, 23000)
    r = subprocess.run(["bash", "scripts/submit_ablation.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "submitted" not in r.stdout
    assert "no node has 4 CPUs and 16G" in r.stderr and "node1 2 CPUs 23000 MiB" in r.stderr
    assert "Reason=PartitionConfig" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(["bash", "scripts/submit_ablation.sh", "--cpus-per-task=1", "--mem=4G", "--array=1-2"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == \
        "submitted: --cpus-per-task=1 --mem=4G --array=1-2 scripts/ablation.sbatch"
    r = subprocess.run(["bash", "scripts/submit_ablation.sh", "-c", "2", "--mem=24000"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "2 CPUs and 24000 of memory" in r.stderr
