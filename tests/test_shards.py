"""The ablation protocol sharded across worker processes (as SLURM array tasks would run it): the same runs and
table as one process, no run done twice, and a killed worker that is restarted finishes its share."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from baselines import ablation
from conftest import ROOT
from test_train_eval import TINY

PROTOCOL = ["--datasets", "synthetic", "--shots", "1", "--seeds", "0", "1", "--modes", "deviation", "latent-noise"]
TRAIN = TINY[TINY.index("--random-init"):]
RUNS = [(mode, seed) for seed in (0, 1) for mode in ("deviation", "latent-noise")]


def worker(out, tmp_path, *extra):
    """`python -m baselines.ablation ...` in its own process, with the tests' tiny CLIP registered and this
    process's torch thread count: sums over other thread counts differ in the last digits (OMP_NUM_THREADS=1 on
    a cluster would give the workers 1 thread and this process conftest's 2)."""
    argv = PROTOCOL + ["--out", str(out), *extra, "--"] + TRAIN
    script = (f"import runpy, sys, torch; torch.set_num_threads({torch.get_num_threads()}); "
              f"sys.path.insert(0, 'tests'); import conftest; "
              f"conftest.register_tiny_clip({str(tmp_path)!r}); sys.argv = ['ablation'] + {argv!r}; "
              f"runpy.run_module('baselines.ablation', run_name='__main__')")
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(p):
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    return out


def results(out):
    """Per run: the metrics (less the paths and checksums of its own files) and scores.csv."""
    res = {}
    for mode, seed in RUNS:
        folder = os.path.join(out, "synthetic", "k1", mode, f"s{seed}", "eval-synthetic")
        m = json.load(open(os.path.join(folder, "metrics.json")))
        for k in ("checkpoints", "checkpoint_sha256"):
            m["conditions"].pop(k)
        res[(mode, seed)] = (m, list(csv.reader(open(os.path.join(folder, "scores.csv")))))
    return res


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    out = tmp_path_factory.mktemp("alone")
    ablation.main(ablation.parse_args(PROTOCOL + ["--out", str(out), "--"] + TRAIN))
    return out


def test_two_shards_at_once_equal_one_process(alone, tmp_path):
    out = tmp_path / "sharded"
    trained = []
    for p in [worker(out, tmp_path, "--shard", f"{i}/2") for i in (1, 2)]:
        trained.append(finish(p))
    report = finish(worker(out, tmp_path, "--report-only"))
    assert results(out) == results(alone)                               # bit for bit: the runs are deterministic
    assert open(out / "table.md").read() == open(alone / "table.md").read()
    assert "missing" not in report and json.load(open(out / "runs.json"))["missing"] == []
    # each unit trained once: a checkpoint's config names the one worker's run folder, and no run was redone
    assert all(p.count("saved ") == 2 for p in trained)


def test_a_killed_shard_restarts_and_finishes_its_share(alone, tmp_path):
    out = tmp_path / "killed"
    p = worker(out, tmp_path, "--shard", "1/2")                         # owns seed 0: deviation, latent-noise
    first = out / "synthetic" / "k1" / "deviation" / "s0" / "run.pt"
    t = time.time()
    while not first.exists() and p.poll() is None and time.time() - t < 300:
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)                                       # mid-run: the second run is training
    p.communicate()
    report = finish(worker(out, tmp_path, "--report-only", "--shard", "1/2"))
    assert "owned by shards 1,2 of 2" in report or "owned by shards 2 of 2" in report
    finish(worker(out, tmp_path, "--shard", "1/2"))                     # the restart finishes shard 1's share
    missing = json.load(open(out / "runs.json"))["missing"]
    assert {(m["mode"], m["seed"], m["shard"]) for m in missing} == {("deviation", 1, 2), ("latent-noise", 1, 2)}
    finish(worker(out, tmp_path, "--shard", "2/2"))
    assert results(out) == results(alone)
    assert not [f for _, _, fs in os.walk(out) for f in fs if ".tmp" in f]


def test_shard_argument_is_checked():
    with pytest.raises(SystemExit, match="1..N"):
        ablation.parse_args(["--shard", "0/4"])
    with pytest.raises(SystemExit, match="I/N"):
        ablation.parse_args(["--shard", "two"])
    args = ablation.parse_args(PROTOCOL[:4] + ["--seeds", "0", "1", "2", "--shard", "2/2"])
    assert [u for u in ablation.units(args) if ablation.shard_of(args, u) == 2] == [("synthetic", 1, 1)]


def test_the_slurm_script_parses_and_cuts_the_protocol_evenly():
    path = os.path.join(ROOT, "scripts", "ablation.sbatch")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    text = open(path).read()
    n = int(text.split("\nN=${ABLATION_TASKS:-")[1].split("}")[0])
    protocol = text.split('\nPROTOCOL=${PROTOCOL:-"')[1].split('"')[0].split()
    assert f"#SBATCH --array=1-{n}\n" in text
    args = ablation.parse_args(protocol + ["--shard", f"1/{n}"])
    sizes = [sum(ablation.shard_of(args, u) == i for u in ablation.units(args)) for i in range(1, n + 1)]
    assert len(ablation.units(args)) == 75 and set(sizes) == {3}


def test_the_slurm_script_stops_a_task_beyond_the_array_size(tmp_path):
    path = os.path.join(ROOT, "scripts", "ablation.sbatch")
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="11", ABLATION_TASKS="10", SLURM_SUBMIT_DIR=str(tmp_path))
    r = subprocess.run(["bash", path], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "array task 11 > ABLATION_TASKS=10" in r.stderr
