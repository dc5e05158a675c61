"""
Calibration of image scores into probabilities, and the decisions made with them.

- Platt scaling (Platt 1999) on the logit of the score, with Platt's smoothed targets, its slope held >= 0 so
  that the probability never reverses the detector's ranking (an inverted calibration set is flagged);
- expected calibration error (Guo et al. 2017, 15 equal-width bins) and the reliability diagram;
- thresholds: the highest one that reaches a target sensitivity on the data it is set on; an operating point's
  sensitivity, specificity, confusion counts and per-class calls;
- a stratified, seeded split of a labelled test set for fitting on a fraction and reporting on the rest.

    import calibration
    ab = calibration.fit_platt(scores, labels)            # on the few-shot set, or a labelled fraction (a >= 0)
    calibration.check_fit(scores, labels, ab)             # None, or "inverted ..." / "degenerate ..."
    p = calibration.apply_platt(test_scores, ab)
    calibration.ece(p, test_labels), calibration.operating_point(p, test_labels, classes, 0.5)

The few-shot calibration set itself is made at the end of train.py (calibration_set, below): the top CAL_TOP map
values of the shots' views and of as many fresh synthetic anomalies, scored by the trained detector. What a test
run fits on (evaluate.py) is chosen by calibrate, at the end: each checkpoint's few-shot set, or a labelled split.
"""
import textwrap

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

import mediclip

ECE_BINS = 15  # Guo et al. 2017


def logit(p, eps=1e-6):
    p = np.clip(np.asarray(p, np.float64), eps, 1 - eps)
    return np.log(p / (1 - p))


def fit_platt(scores, labels):
    """Platt scaling: P(anomalous | s) = sigmoid(a logit(s) + b), fitted by maximum likelihood to Platt's (1999)
    smoothed targets (N+ + 1) / (N+ + 2) and 1 / (N- + 2), which keep a and b finite when the calibration set
    is separable, as a small few-shot one often is. Returns (a, b)."""
    n_pos, n_neg = labels.sum(), len(labels) - labels.sum()
    target = np.where(labels == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    # a soft target t is the likelihood of the point seen twice: labelled 1 with weight t, 0 with weight 1 - t
    x = np.r_[logit(scores), logit(scores)][:, None]
    y, w = np.r_[np.ones(len(labels)), np.zeros(len(labels))], np.r_[target, 1 - target]
    lr = LogisticRegression(C=np.inf, max_iter=1000).fit(x, y, sample_weight=w)
    a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    if a < 0:  # the set ranks its anomalies below its normals: a >= 0 keeps P non-decreasing in the score, and the
        a, b = 0.0, float(logit(target.mean()))  # constrained optimum is then a = 0, P = its smoothed prevalence
    return a, b


def check_fit(scores, labels, ab):
    """None, or why a Platt fit must not be trusted: an inverted calibration set (its anomalies score below its
    normals, so the slope is held at 0 rather than reversing the detector's ranking) or a degenerate one."""
    if len(set(labels.tolist())) < 2:
        return "degenerate calibration set: one class only"
    auroc = float(roc_auc_score(labels, scores))
    if auroc < 0.5:
        return (f"inverted calibration set: its anomalies score below its normals (AUROC {auroc:.3f}); the "
                f"probability is held at its prevalence (slope 0) instead of reversing the ranking")
    if ab[0] == 0 or auroc == 0.5:
        return f"degenerate calibration set: the score does not separate it (AUROC {auroc:.3f}); the probability is constant"
    return None


def apply_platt(scores, ab):
    return 1 / (1 + np.exp(-(ab[0] * logit(scores) + ab[1])))



def split_for_calibration(labels, frac, seed):
    """Boolean mask of a stratified, seeded fraction of the labelled images (the calibration fit set)."""
    rng, fit = np.random.default_rng(seed), np.zeros(len(labels), bool)
    for v in (0, 1):
        idx = np.flatnonzero(labels == v)
        fit[rng.choice(idx, size=int(round(frac * len(idx))), replace=False)] = True
    return fit


def ece(probs, labels, bins=ECE_BINS):
    """Expected calibration error of P(anomalous): the image-weighted |fraction anomalous - mean p| over equal-width
    bins of p (Guo et al. 2017)."""
    b = np.minimum((probs * bins).astype(int), bins - 1)
    return float(np.abs(np.bincount(b, labels, bins) - np.bincount(b, probs, bins)).sum() / len(probs))


def threshold_for_sensitivity(probs, labels, target):
    """The highest threshold t whose sensitivity P(p >= t | anomalous) on these data reaches target."""
    pos = np.sort(probs[labels == 1])
    return float(pos[int(np.floor((1 - target) * len(pos) + 1e-9))])


def operating_point(probs, labels, classes, t):
    """Sensitivity, specificity and confusion matrix at p >= t, and per class how many are called anomalous."""
    pred = probs >= t
    tp, fn = int((pred & (labels == 1)).sum()), int((~pred & (labels == 1)).sum())
    tn, fp = int((~pred & (labels == 0)).sum()), int((pred & (labels == 0)).sum())
    per_class = {c: dict(n=int((classes == c).sum()), called_anomalous=int(pred[classes == c].sum()),
                         called_normal=int((~pred[classes == c]).sum())) for c in sorted(set(classes))}
    return dict(threshold=float(t), sensitivity=tp / max(tp + fn, 1), specificity=tn / max(tn + fp, 1),
                confusion=dict(tp=tp, fn=fn, tn=tn, fp=fp), per_class=per_class)



def plot_reliability(path, probs, labels, fitted_on, bins=ECE_BINS):
    """Reliability diagram: fraction anomalous against mean predicted probability per bin, and the bin counts."""
    from matplotlib.figure import Figure
    b = np.minimum((probs * bins).astype(int), bins - 1)
    n = np.bincount(b, minlength=bins)
    has = n > 0
    mean_p, frac = np.bincount(b, probs, bins)[has] / n[has], np.bincount(b, labels, bins)[has] / n[has]
    fig = Figure(figsize=(5, 6))
    ax, hx = fig.subplots(2, 1, sharex=True, gridspec_kw=dict(height_ratios=[3, 1]))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.plot(mean_p, frac, "o-", label="test images (per bin)")
    ax.set(ylabel="fraction anomalous", ylim=(0, 1), title=f"ECE {ece(probs, labels, bins):.3f} on {len(probs)} "
           f"test images ({bins} bins)\n" + textwrap.fill(f"Platt scaling fitted on {fitted_on}", 70))
    ax.title.set_fontsize(8)
    ax.legend(loc="lower right", fontsize=7)
    hx.bar((np.arange(bins) + 0.5) / bins, n, width=1 / bins, edgecolor="white")
    hx.set(xlabel="calibrated P(anomalous)", ylabel="images", xlim=(0, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")


# -----------------------------------------------------------------------------
# the few-shot calibration set, made by train.py after its loop

CAL_TOP = 256  # anomaly-map values kept per calibration image: any image score up to evaluate.py --topk 256


def calibration_set(det, text, S, real, synthesise, bank, args):
    """What a few-shot user has, scored by the trained detector: every view of the shots (normal; trained on, so
    optimistic) and as many fresh synthetic anomalies of the kind it trained on (latent ones from synthesise(slice),
    pixel ones from the bank). Their top CAL_TOP map values; evaluate.py fits Platt scaling on them."""
    n, B = len(real[0]), args.batch_size
    normal = score_tops(det, text, S, n, lambda s: [t[s] for t in real], B)
    anomalous, n_each = [], n // (int(synthesise is not None) + int(bank is not None))
    if synthesise is not None:
        anomalous.append(score_tops(det, text, S, n_each, synthesise, B))
    if bank is not None:
        anomalous.append(score_tops(det, text, S, min(n_each, len(bank[1])), lambda s: [b[s] for b in bank[0]], B))
    return dict(normal=normal, anomalous=torch.cat(anomalous), data=args.data, synth=args.synth)


@torch.no_grad()
def score_tops(det, text, S, n, tokens_of, batch):
    """The CAL_TOP largest anomaly-map values (descending) of n images, whose tokens tokens_of(slice) gives."""
    tops = []
    for i in range(0, n, batch):
        probs = det(tokens_of(slice(i, min(i + batch, n))), text, S)             # (b, 2, S, S)
        tops.append(probs[:, 1].flatten(1).topk(CAL_TOP, dim=1).values.float().cpu())
    return torch.cat(tops)                                                      # (n, CAL_TOP)


# ---------------------------------------------------------------------------------------------- evaluate.py
# which data the calibration is fitted on, for a test run: the checkpoints' few-shot sets or a labelled split
def checkpoint_set(ckpt, topk, path):
    """Image scores (the --topk definition) and labels of a checkpoint's few-shot calibration set, or None."""
    cal = ckpt.get("calibration")
    if cal is None:
        return None
    tops = torch.cat([cal["normal"], cal["anomalous"]]).double()   # (n, CAL_TOP) largest map values, descending
    if topk > tops.shape[1]:
        raise ValueError(f"{path}: its calibration set keeps the top {tops.shape[1]} map values; --topk {topk} "
                         f"needs more (use --calib-split, or a smaller --topk)")
    labels = np.r_[np.zeros(len(cal["normal"])), np.ones(len(cal["anomalous"]))]
    return mediclip.scores_from_top(tops, topk).numpy(), labels


def calibrate(member_scores, labels, fit, ckpts, paths, args):
    """Calibrated P(anomalous) of every image, and the probabilities and labels of the data it was fitted on.
    --calib-split: one Platt fit on the (mean) score of the labelled test images in `fit`. Otherwise each
    checkpoint's own few-shot set, the members' probabilities averaged as in a deep ensemble. None if neither."""
    if args.calib_split:
        if len(set(labels[fit])) < 2:
            raise ValueError(f"--calib-split {args.calib_split} leaves no normal or no anomalous image to fit on")
        s = member_scores.mean(0)
        ab = fit_platt(s[fit], labels[fit])
        info = dict(method="platt", fitted_on=f"labelled test fraction {args.calib_split} (seed {args.seed}), "
                    f"left out of every reported number", n_normal=int((labels[fit] == 0).sum()),
                    n_anomalous=int(labels[fit].sum()), params=[ab],
                    warning=check_fit(s[fit], labels[fit], ab))
        return apply_platt(s, ab), apply_platt(s[fit], ab), labels[fit], info
    sets = [checkpoint_set(c, args.topk, p) for c, p in zip(ckpts, paths)]
    if not sets or any(x is None for x in sets):
        return None, None, None, dict(method=None, reason="no checkpoint, or one without a calibration set "
                                      "(retrain, or use --calib-split)")
    params = [fit_platt(s, y) for s, y in sets]
    probs = np.mean([apply_platt(s, ab) for s, ab in zip(member_scores, params)], axis=0)
    fit_probs = np.concatenate([apply_platt(s, ab) for (s, _), ab in zip(sets, params)])
    fit_labels = np.concatenate([y for _, y in sets])
    cfg = ckpts[0]["config"]
    whose = "its own" if len(ckpts) == 1 else f"each of the {len(ckpts)} checkpoints' own"
    info = dict(method="platt", fitted_on=f"few-shot ({whose} calibration set: the views of the {cfg['shots']} "
                f"shot(s) and synthetic '{cfg['synth']}' anomalies from {cfg['data']}, see train.py); no test label "
                f"was used",
                n_normal=int((fit_labels == 0).sum()), n_anomalous=int(fit_labels.sum()), params=params,
                warning="; ".join(sorted({w for (s, y), ab in zip(sets, params)
                                          if (w := check_fit(s, y, ab))})) or None)
    return probs, fit_probs, fit_labels, info


def transfer_warnings(report, slack=0.05):
    """With labels: an operating point that misses its sensitivity target on the test images by more than slack,
    and a calibration whose test ECE is far from its ECE on the data it was fitted on (it did not transfer)."""
    cal, out = report["calibration"], []
    for key, op in report["operating_points"].items():
        target = op.get("target_sensitivity")
        if target is not None and op["sensitivity"] < target - slack:
            out.append(f"operating point {key}: sensitivity {op['sensitivity']:.3f} on the test images against "
                       f"{op['sensitivity_on_fit_data']:.3f} on the data its threshold was set on: the target "
                       f"{target:g} is missed")
    if cal.get("ece") is not None and cal["ece"] > 2 * cal["ece_on_fit_data"] + slack:
        out.append(f"calibration does not transfer: ECE {cal['ece']:.3f} on the test images against "
                   f"{cal['ece_on_fit_data']:.3f} on the data it was fitted on; read the probabilities as scores")
    return out
