"""
The ablation protocol in one command: datasets x shots x seeds x synthesis modes, the same detector, steps and
seeds for every mode; each checkpoint is evaluated, and the cells are summarised as mean +- std over seeds.

    python -m baselines.ablation --datasets brainmri busi --data-root ../shared/data --shots 1 4 --seeds 0 1 2 \
        --out runs/ablation -- --random-init --clip ViT-B-16 --steps 100

Everything after `--` goes to train.py unchanged. Resumable: a run whose metrics.json exists is skipped, and a
run whose checkpoint exists is only evaluated; `--report-only` tabulates the runs finished so far and runs nothing.
`--test-data NAME` evaluates every checkpoint on another dataset (a cross-dataset cell). Writes <out>/table.md
(image and pixel AUROC per cell) and <out>/runs.json (every run with its full configuration and metrics).
"""
import argparse
import json
import os
import sys

import numpy as np

import evaluate
import train


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description="Run the ablation table: datasets x shots x seeds x synthesis modes.")
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
                   "finished so far (a protocol that spans several sessions)")
    args = p.parse_args(argv)
    args.train_args = extra
    return args


def run_one(args, data, k, mode, seed):
    """Train (unless a checkpoint exists) and evaluate (unless metrics exist) one run; returns its record."""
    folder = os.path.join(args.out, data, f"k{k}", mode, f"s{seed}")
    test = args.test_data or data
    metrics_path = os.path.join(folder, f"eval-{test}", "metrics.json")
    if not os.path.isfile(metrics_path) and args.report_only:
        return None
    if not os.path.isfile(metrics_path):
        ckpt = os.path.join(folder, "run.pt")
        if not os.path.isfile(ckpt):
            train.main(train.parse_args(["--data", data, "--data-root", args.data_root, "--shots", str(k),
                                         "--seed", str(seed), "--synth", mode, "--out", folder] + args.train_args))
        evaluate.main(evaluate.parse_args(["--ckpt", ckpt, "--data", test, "--data-root", args.data_root,
                                           "--out", os.path.dirname(metrics_path), "--overlays", "0",
                                           "--bootstrap", "0"]))  # the table's spread is over seeds
    with open(metrics_path) as f:
        m = json.load(f)
    return dict(train_data=data, test_data=test, shots=k, mode=mode, seed=seed, image_auroc=m["image"]["auroc"],
                pixel_auroc=m["pixel"]["auroc"] if m["pixel"] else None, metrics=m)


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


def main(args):
    os.makedirs(args.out, exist_ok=True)
    runs = [run_one(args, d, k, mode, seed)
            for d in args.datasets for k in args.shots for seed in args.seeds for mode in args.modes]
    runs = [r for r in runs if r is not None]
    evaluate.write_json(dict(train_args=args.train_args, runs=runs), os.path.join(args.out, "runs.json"))
    write_table(runs, args.modes, os.path.join(args.out, "table.md"))
    print(open(os.path.join(args.out, "table.md")).read())
    return runs


if __name__ == "__main__":
    main(parse_args())
