"""
What evaluate.py writes from the maps and scores of one or more checkpoints: scores.csv, the overlays, studies.csv
and map volumes, and metrics.json (image and pixel metrics with bootstrap CIs, per class, per study, calibration,
operating points, the conditions of every number) or, for own images without labels, summary.json; the warnings
a reader must know first, printed and written in both. docs/evaluate.md says how each number is made.

    import report
    report.write_report(out, name, records, maps, member_scores, masks, ckpts, paths, backbone, args)
"""

import os

import numpy as np

import calibration
import data
import exports
import metrics
import studies
from runfiles import code_version, write_json
from weights import sha256

RANDOM_WEIGHTS = "random backbone weights: these numbers say nothing about the method"


EVALUATION_FILES = ("metrics.json", "summary.json", "scores.csv", "studies.csv", "skipped.csv", "roc.png",
                    "reliability.png")


def print_summary(m):
    ci = lambda d: f" [{d['auroc_ci95'][0]:.3f}, {d['auroc_ci95'][1]:.3f}]" if "auroc_ci95" in d else ""
    lines = [f"WARNING: {w}" for w in m.get("warnings", [])]
    lines.append(f"image AUROC {m['image']['auroc']:.4f}{ci(m['image'])}  AP {m['image']['ap']:.4f}")
    if m["pixel"]:
        lines.append(f"pixel AUROC {m['pixel']['auroc']:.4f}{ci(m['pixel'])}  AUPRO {m['pixel']['aupro']:.4f}")
    for key, s in (m.get("seeds") or {}).items():
        if isinstance(s, dict):
            lines.append(f"{key} over {len(s['values'])} checkpoints: {s['mean']:.4f} +- {s['std']:.4f}")
    if m["calibration"]["method"]:
        lines.append(f"calibration ECE {m['calibration']['ece']:.4f} (fitted on {m['calibration']['fitted_on']})")
    for name, op in m["operating_points"].items():
        lines.append(f"{name}: threshold {op['threshold']:.4f}  sensitivity {op['sensitivity']:.3f}  "
                     f"specificity {op['specificity']:.3f}")
    print("\n".join(lines))


def describe_checkpoints(ckpts, paths):
    """What the numbers depend on of the checkpoints: files, checksums, shots, seeds, data, synthesis, steps."""
    cfg = ckpts[0]["config"] if ckpts else {}
    return dict(checkpoints=[os.path.abspath(p) for p in paths], checkpoint_sha256=[sha256(p) for p in paths],
                shots=cfg.get("shots", 0), seeds=[c["seed"] for c in ckpts], shot_files=[c["shots"] for c in ckpts],
                train_data=cfg.get("data"), synth=cfg.get("synth"), steps=cfg.get("steps"),
                eta_warmup=cfg.get("eta_warmup"), detector_steps=[c["stats"].get("detector_steps") for c in ckpts])


def report_warnings(report, ckpts, name):
    """What a reader of these numbers must know first: random weights, an untrained detector, a calibration that
    is inverted or degenerate, or fitted on another dataset than the one tested."""
    c, cal, out = report["conditions"], report["calibration"], []
    if c["random_init"]:
        out.append(RANDOM_WEIGHTS)
    if ckpts and 0 in c["detector_steps"]:
        out.append("a checkpoint's detector never trained (0 detection steps: --steps within --eta-warmup); its "
                   "numbers are CLIP's untouched zero-shot head")
    if cal.get("warning"):
        out.append(f"calibration: {cal['warning']}")
    if ckpts and cal.get("method") and cal["fitted_on"].startswith("few-shot") and c["train_data"] != name:
        cal["cross_dataset"] = (f"fitted on {c['train_data']} (the checkpoint's few-shot set), tested on {name}: "
                                f"probabilities and thresholds may not transfer (--calib-split fits on {name})")
        out.append(f"calibration and thresholds {cal['cross_dataset']}")
    return out + calibration.transfer_warnings(report)


def write_report(out, name, records, maps, member_scores, masks, ckpts, paths, backbone, args):
    """Everything evaluate.py writes, from the maps and scores of M checkpoints (M = 1: that checkpoint alone)."""
    os.makedirs(out, exist_ok=True)
    score = member_scores.mean(0)                                                      # the ensemble: mean score
    labels, classes = np.array([r["label"] for r in records]), np.array([r["cls"] for r in records])
    fit = np.zeros(len(labels), bool)                    # images used to fit the calibration, left out of the report
    if args.calib_split:                                 # by study: no volume on both sides (2D: by image)
        fit, _ = studies.split_by_study(records, studies.group(records), args.calib_split, args.seed)
    probs, fit_probs, fit_labels, cal = calibration.calibrate(member_scores, labels, fit, ckpts, paths, args)
    thresholds = {} if probs is None else {
        "p>=0.5": 0.5,
        f"sensitivity>={args.target_sensitivity:g}": calibration.threshold_for_sensitivity(fit_probs, fit_labels,
                                                                               args.target_sensitivity)}
    exports.write_scores(os.path.join(out, "scores.csv"), records, member_scores, probs, thresholds, fit)
    mean_map = maps[0] if len(maps) == 1 else maps.mean(0, dtype=np.float32).astype(np.float16)   # (N, S, S)
    order = np.argsort(-score, kind="stable")
    picks = order[np.linspace(0, len(order) - 1, min(args.overlays, len(order))).round().astype(int)]
    has_masks = any(data.has_mask(r) for r in records)
    scale = (float(mean_map.min()), float(mean_map.max()))   # one colour scale for every overlay of the run
    for rank, i in enumerate(picks):
        safe = exports.safe_name(records[i]["name"])
        # a normal image of a dataset with masks has a truly empty mask; elsewhere there is no mask to show
        known = data.has_mask(records[i]) or (has_masks and records[i]["label"] == 0)
        caption = exports.overlay_caption(score[i], None if probs is None else probs[i], records[i]["label"])
        exports.write_overlay(os.path.join(out, f"overlay_{rank:02d}_{safe}.png"), data.read_image(records[i]),
                              mean_map[i].astype(np.float32), masks[i] if known else None, scale, caption,
                              exports.display_sides(records[i]))
    print(f"wrote {out}/scores.csv and {len(picks)} overlays")
    if args.save_maps:
        exports.save_maps(out, records, mean_map, score, probs)
    groups, study_score, study_y, fit_study, _ = studies.verdicts(out, records, mean_map, score, probs, fit, args)
    print(f"wrote {out}/studies.csv ({len(groups)} studies)")
    if args.mood_out:
        files = studies.mood_export(args.mood_out, args.mood_task, records, groups, study_score, mean_map)
        print(f"wrote {len(files)} MOOD {args.mood_task} file(s) into {args.mood_out}")
    conditions = dict(describe_checkpoints(ckpts, paths), **backbone, test_data=name,
                      image_score="max" if args.topk <= 0 else f"top{args.topk}", code_version=code_version())
    if args.images:     # no labels, no metrics: the same warnings, printed and in summary.json
        summary = dict(images=name, scored_images=len(records), studies=len(groups), calibration=cal,
                       operating_points={}, conditions=conditions)
        summary["warnings"] = report_warnings(summary, ckpts, name)
        print("\n".join(f"WARNING: {w}" for w in summary["warnings"]))
        write_json(summary, os.path.join(out, "summary.json"))
        print(f"wrote {os.path.join(out, 'summary.json')}")
        return None

    # every number below is on the reported images: the test set less any --calib-split fit images
    keep = ~fit
    rec, y, cls = [r for r, k in zip(records, keep) if k], labels[keep], classes[keep]
    report = dict(dataset=name, split="test", reported_on=dict(images=int(keep.sum()),
                                                                left_out_for_calibration=int(fit.sum())))
    report.update(metrics.compute_metrics(rec, mean_map[keep], score[keep], masks[keep], args.bootstrap, args.seed))
    report["bootstrap"] = dict(resamples=args.bootstrap, seed=args.seed, interval="percentile 95%",
                                resampling="images with replacement, within the normal and the anomalous ones")
    report["seeds"] = report["most_uncertain"] = None
    if len(maps) > 1:  # each checkpoint alone, mean +- std; and the images the checkpoints disagree on most
        members = [metrics.compute_metrics(rec, maps[j][keep], member_scores[j][keep], masks[keep])
                   for j in range(len(maps))]
        report["seeds"] = dict(metrics.summarise_members(members), note="each checkpoint alone; the headline numbers "
                                "are the ensemble's (mean score over checkpoints)")
        spread = member_scores[:, keep].std(0, ddof=1)
        report["most_uncertain"] = [dict(name=rec[i]["name"], label=int(y[i]), cls=rec[i]["cls"],
                                          score=float(score[keep][i]), score_std=float(spread[i]))
                                     for i in np.argsort(-spread, kind="stable")[:10]]
    report["calibration"], report["operating_points"] = cal, {}
    if probs is not None:
        p = probs[keep]
        cal.update(ece=calibration.ece(p, y), ece_on_fit_data=calibration.ece(fit_probs, fit_labels),
                   brier=float(np.mean((p - y) ** 2)), bins=calibration.ECE_BINS, reliability_png="reliability.png")
        calibration.plot_reliability(os.path.join(out, "reliability.png"), p, y, cal["fitted_on"])
        for key, t in thresholds.items():
            op = calibration.operating_point(p, y, cls, t)
            op.update(set_on=cal["fitted_on"], sensitivity_on_fit_data=float((fit_probs[fit_labels == 1] >= t).mean()))
            if key.startswith("sensitivity>="):
                op["target_sensitivity"] = args.target_sensitivity
            report["operating_points"][key] = op
    if any(len(idx) > 1 for _, idx in groups):           # volumes or series: per study as well as per slice
        report["studies"] = studies.study_metrics(study_score, study_y, np.array([classes[i[0]] for _, i in groups]),
                                                  ~fit_study, args.bootstrap, args.seed)
        report["studies"]["rule"] = args.study_score
    report["anomalib"] = metrics.anomalib_metrics(report, report["operating_points"].get("p>=0.5"))
    # the ROC is of the (mean) score; an ensemble's operating points are on the mean calibrated probability, so
    # they may sit just off its curve
    metrics.plot_roc(os.path.join(out, "roc.png"), score[keep], y, cls, report, report["operating_points"])
    report["conditions"] = conditions
    report["warnings"] = report_warnings(report, ckpts, name)
    if backbone["random_init"]:
        report["warning"] = RANDOM_WEIGHTS          # kept for readers of older reports; also first in warnings
    write_json(report, os.path.join(out, "metrics.json"))
    print_summary(report)
    print(f"wrote {os.path.join(out, 'metrics.json')}, roc.png" + (", reliability.png" if probs is not None else ""))
    return report
