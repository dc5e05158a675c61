"""
The ablation protocol in one command: datasets x shots x seeds x synthesis modes, the same detector, steps and
seeds for every mode; each checkpoint is evaluated, and the cells are summarised as mean +- std over seeds.

    python -m baselines.ablation --datasets brainmri busi --data-root ../shared/data --shots 1 4 --seeds 0 1 2 \
        --out runs/ablation -- --random-init --clip ViT-B-16 --steps 100

Everything after `--` goes to train.py unchanged. Block by block (a dataset and a k): every seed x mode is trained
(the modes of one seed share the frozen encodings of its views, train.py --cache <out>/cache), then all are
evaluated together, one frozen CLIP forward per test batch serving every checkpoint. Resumable: a run whose
metrics.json exists is skipped, and a run whose checkpoint exists is only evaluated, but only if its config.json
says it was made with this call's train.py settings: a run made otherwise (a smoke run left in the same --out) is
refused in one line, never reused or overwritten. `--report-only` tabulates the runs finished so far (with the
train.py options recorded in runs.json unless `--` gives others), lists the ones still missing and the ones made
with other settings (never in the table), and runs nothing. `--test-data NAME` evaluates every
checkpoint on another dataset (a cross-dataset cell). Writes <out>/table.md (image and pixel AUROC per cell) and
<out>/runs.json (every run with its full configuration and metrics, and the missing ones).

On a cluster, `--shard I/N` (1-based, as SLURM's array task ids) makes worker I of N take every N-th unit of the
protocol, a unit being a (dataset, shots, seed) with all its modes (they share the frozen encodings of its views).
N workers on a shared filesystem never train or evaluate the same run, and together cover every run once; every
file a run writes is written to a temporary name and renamed, so a killed worker leaves nothing a rerun trusts
(a run without run.pt is trained again, one without metrics.json evaluated again). scripts/ablation.sbatch is
the SLURM job array; locally:

    for i in 1 2 3 4; do python -m baselines.ablation ... --shard $i/4 > shard$i.log 2>&1 & done; wait
"""
import argparse
import hashlib
import json
import os
import sys

import numpy as np

import data
import evaluate
import report
import runfiles
import train


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description="Run the ablation table: datasets x shots x seeds x synthesis modes.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("--datasets", nargs="+", default=["brainmri", "busi"], help="datasets to train on")
    p.add_argument("--data-root", default="data", help="folder that holds the datasets")
    p.add_argument("--test-data", default=None, help="evaluate on this dataset instead of the training one")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="k values")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="support-set seeds")
    # model
    p.add_argument("--modes", nargs="+", default=list(train.SYNTH_MODES), choices=train.SYNTH_MODES,
                   help="synthesis modes to compare")
    # run
    p.add_argument("--out", default="runs/ablation", help="folder of all runs, the table and the JSON")
    p.add_argument("--report-only", action="store_true", help="train and evaluate nothing: the table of the runs "
                   "finished so far (by every shard), and the runs still missing")
    p.add_argument("--shard", default=None, metavar="I/N", help="worker I of N (1-based): every N-th (dataset, "
                   "shots, seed) unit of the protocol; without it, every unit")
    args = p.parse_args(argv)
    args.shard = parse_shard(args.shard)
    args.train_args = extra
    return args


def parse_shard(text):
    """'I/N' -> (I, N), 1 <= I <= N; None -> (1, 1)."""
    if text is None:
        return 1, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"error: --shard {text}: expected I/N, e.g. 3/16") from None
    if not 1 <= i <= n:
        raise SystemExit(f"error: --shard {text}: I must be in 1..N (1-based, as SLURM array task ids)")
    return i, n


def units(args):
    """The protocol's units in a fixed order: (dataset, shots, seed), each with all its modes."""
    return [(d, k, s) for d in args.datasets for k in args.shots for s in args.seeds]


def shard_of(args, unit):
    """The 1-based shard that owns a unit: round robin over units(), so shard sizes differ by one at most."""
    return units(args).index(unit) % args.shard[1] + 1


def run_folder(args, dataset, k, mode, seed):
    return os.path.join(args.out, dataset, f"k{k}", mode, f"s{seed}")


def train_argv(args, dataset, k, mode, seed):
    return ["--data", dataset, "--data-root", args.data_root, "--shots", str(k), "--seed", str(seed), "--synth", mode,
            "--out", run_folder(args, dataset, k, mode, seed), "--cache", os.path.join(args.out, "cache")] + \
        args.train_args


WHERE_NOT_WHAT = ("out", "cache", "data_root", "threads", "device", "log_every", "save_synthesis")


def changed_settings(args, dataset, k, mode, seed):
    """How a run already in the folder was made otherwise than this call would make it: {setting: (then, now)};
    {} for a run that matches or has not started. Where and how fast a run ran (WHERE_NOT_WHAT) do not count."""
    path = os.path.join(run_folder(args, dataset, k, mode, seed), "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        then = json.load(f)
    now = json.loads(json.dumps(vars(train.parse_args(train_argv(args, dataset, k, mode, seed)))))
    return {key: (then.get(key), v) for key, v in now.items() if key not in WHERE_NOT_WHAT
            and not (key == "layers" and v is None) and then.get(key) != v}   # layers None: train.py resolves it


def data_identity(dataset, root):
    """What the dataset's files are, not where: a hash of every file's path inside the dataset and its size."""
    base = os.path.join(root, dataset)
    files = sorted((os.path.relpath(os.path.join(d, f), base), os.path.getsize(os.path.join(d, f)))
                   for d, _, fs in os.walk(base) for f in fs)
    return hashlib.sha256(repr(files).encode()).hexdigest()[:16] if files else dataset


def refuse_changed(args, dataset, k, mode, seed):
    """A finished or half-made run with other settings, or made from other data than --data-root holds under the
    same name, is never reused, nor overwritten: one line, and stop."""
    diff = changed_settings(args, dataset, k, mode, seed)
    path = os.path.join(run_folder(args, dataset, k, mode, seed), "data.json")
    if os.path.isfile(path):
        with open(path) as f:
            then = json.load(f)
        if then["identity"] != data_identity(dataset, args.data_root):
            diff["data"] = (f"{then['data_root']} ({then['identity']})",
                            f"{os.path.abspath(args.data_root)} ({data_identity(dataset, args.data_root)})")
    if diff:
        raise SystemExit(f"error: {run_folder(args, dataset, k, mode, seed)}: made with other train.py settings than "
                         f"this call (" + ", ".join(f"--{key.replace('_', '-')} {a} then, {b} now"
                                                    for key, (a, b) in sorted(diff.items())) +
                         "); use another --out, or remove that run to train it again")


def train_one(args, dataset, k, mode, seed):
    """Train one run, unless its checkpoint exists (a half-trained run has none, and starts again)."""
    folder = run_folder(args, dataset, k, mode, seed)
    if not os.path.isfile(os.path.join(folder, "run.pt")):
        train.main(train.parse_args(train_argv(args, dataset, k, mode, seed)))
        runfiles.write_json(dict(data_root=os.path.abspath(args.data_root),
                                 identity=data_identity(dataset, args.data_root)), os.path.join(folder, "data.json"))


def evaluate_together(args, folders, test):
    """Evaluate checkpoints of one backbone on one test set: one frozen CLIP forward per batch serves them all
    (evaluate.predict), and each gets the report `evaluate.py --ckpt <its run.pt>` alone would write."""
    paths = [os.path.join(f, "run.pt") for f in folders]
    ev = evaluate.parse_args(["--ckpt", *paths, "--data", test, "--data-root", args.data_root, "--overlays", "0",
                              "--bootstrap", "0"])                  # the table's spread is over seeds
    device = runfiles.pick_device(ev.device)
    ckpts, clip, layers, backbone, dets = evaluate.load_models(paths, ev, device)
    records = data.load_split(test, args.data_root, "test")
    maps, scores, masks = evaluate.predict(records, clip, dets, layers, ev, device)   # (M, N, S, S), (M, N)
    for j, folder in enumerate(folders):
        report.write_report(os.path.join(folder, f"eval-{test}"), test, records, maps[j:j + 1], scores[j:j + 1],
                              masks, [ckpts[j]], [paths[j]], backbone, ev)


def metrics_path(args, dataset, k, mode, seed):
    return os.path.join(run_folder(args, dataset, k, mode, seed), f"eval-{args.test_data or dataset}", "metrics.json")


def run_block(args, dataset, k, seeds):
    """The given seeds x all modes of one (dataset, shots): train what is missing, then evaluate what is missing
    together."""
    for seed in seeds:
        for mode in args.modes:
            refuse_changed(args, dataset, k, mode, seed)
    todo = [(mode, seed) for seed in seeds for mode in args.modes
            if not os.path.isfile(metrics_path(args, dataset, k, mode, seed))]
    for mode, seed in todo:
        train_one(args, dataset, k, mode, seed)
    if todo:
        evaluate_together(args, [run_folder(args, dataset, k, mode, seed) for mode, seed in todo],
                          args.test_data or dataset)


def collect(args):
    """Every finished run of the protocol, whichever worker ran it; the (dataset, shots, mode, seed) missing; and
    the runs made with other settings than the protocol's (never in the table)."""
    records, missing, other = [], [], []
    for dataset, k, seed in units(args):
        for mode in args.modes:
            path = metrics_path(args, dataset, k, mode, seed)
            diff = changed_settings(args, dataset, k, mode, seed)
            if diff:
                other.append(dict(folder=run_folder(args, dataset, k, mode, seed),
                                  settings={key: dict(run=a, protocol=b) for key, (a, b) in diff.items()}))
                continue
            if not os.path.isfile(path):
                missing.append(dict(train_data=dataset, shots=k, mode=mode, seed=seed,
                                    shard=shard_of(args, (dataset, k, seed))))
                continue
            with open(path) as f:
                m = json.load(f)
            records.append(dict(train_data=dataset, test_data=args.test_data or dataset, shots=k, mode=mode,
                                seed=seed, image_auroc=m["image"]["auroc"],
                                pixel_auroc=m["pixel"]["auroc"] if m["pixel"] else None, metrics=m))
    return records, missing, other


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def write_table(runs, modes, path):
    """One row per (train -> test, shots); per mode: image AUROC / pixel AUROC, mean ± std over seeds."""
    lines = ["| train -> test | shots | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    for cell in sorted({(r["train_data"], r["test_data"], r["shots"]) for r in runs}):
        row = []
        for mode in modes:
            rs = [r for r in runs if (r["train_data"], r["test_data"], r["shots"]) == cell and r["mode"] == mode]
            row.append(f"{mean_std([r['image_auroc'] for r in rs])} / {mean_std([r['pixel_auroc'] for r in rs])}"
                       f" (n={len(rs)})")
        lines.append(f"| {cell[0]} -> {cell[1]} | {cell[2]} | " + " | ".join(row) + " |")
    lines.append("\nEach cell: image AUROC / pixel AUROC (- where the test set has no masks), mean ± sample std "
                 "(ddof=1) over support-set seeds; n = number of seeds.")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def recorded_train_args(args):
    """The train.py options recorded in runs.json by the runs' own calls (None before any)."""
    path = os.path.join(args.out, "runs.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f).get("train_args", [])
    return None


def main(args):
    os.makedirs(args.out, exist_ok=True)
    recorded = recorded_train_args(args)
    if args.report_only and not args.train_args and recorded is not None:
        args.train_args = recorded      # --report-only without `--`: the settings the runs were made with
    mine = [u for u in units(args) if shard_of(args, u) == args.shard[0]]
    if not args.report_only:
        for dataset in args.datasets:
            for k in args.shots:
                seeds = [s for d, kk, s in mine if (d, kk) == (dataset, k)]
                if seeds:
                    run_block(args, dataset, k, seeds)
    runs, missing, other = collect(args)     # what every worker has finished so far
    # a report never changes what the next one reads: --report-only -- <other settings> keeps the recorded ones
    kept = recorded if args.report_only and recorded is not None else args.train_args
    runfiles.write_json(dict(train_args=kept, runs=runs, missing=missing, other_settings=other,
                             report_train_args=args.train_args), os.path.join(args.out, "runs.json"))
    write_table(runs, args.modes, os.path.join(args.out, "table.md"))
    print(open(os.path.join(args.out, "table.md")).read())
    if other:
        print(f"WARNING: {len(other)} run(s) in {args.out} were made with other train.py settings than "
              f"{args.train_args} and are left out of the table, e.g. {other[0]['folder']}: "
              + ", ".join(f"{k} {v['run']} (run) vs {v['protocol']}" for k, v in other[0]["settings"].items()))
    if missing:
        shards = sorted({m["shard"] for m in missing})
        print(f"{len(missing)} of {len(runs) + len(missing)} runs missing, e.g. " + ", ".join(
            f"{m['train_data']} k{m['shots']} {m['mode']} s{m['seed']}" for m in missing[:4])
            + (f"; owned by shards {','.join(map(str, shards))} of {args.shard[1]} (resubmit those array tasks)"
               if args.shard[1] > 1 else ""))
    return runs


if __name__ == "__main__":
    main(parse_args())
