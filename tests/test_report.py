"""The trust report: bootstrap CIs, Platt calibration and ECE, operating points, --calib-split, ensembles."""
import csv

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import calibration
import evaluate
import metrics
import train
from conftest import TINY_CLIP
from test_train_eval import TINY


def records(labels, masked=False):
    return [dict(label=int(y), cls="abnormal" if y else "normal", mask=1 if masked and y else None, mask_path=None)
            for y in labels]


def scored(n, rng):
    """n images, half anomalous, whose scores separate the classes imperfectly."""
    y = np.arange(n) % 2
    return y, rng.normal(y * 0.8, 1.0)


def test_bootstrap_ci_narrows_with_more_images_and_holds_the_estimate():
    rng = np.random.default_rng(0)
    widths = []
    for n in (40, 1000):
        y, s = scored(n, rng)
        m = metrics.compute_metrics(records(y), np.zeros((n, 1, 1)), s, np.zeros((n, 1, 1), bool), n_boot=300)
        lo, hi = m["image"]["auroc_ci95"]
        assert lo <= m["image"]["auroc"] <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3        # ~ 1 / sqrt(n): 5x narrower expected


def test_image_bootstrap_is_sklearn_on_every_resample():
    rng = np.random.default_rng(3)
    for n in (7, 220):
        y, s = scored(n, rng)
        s = np.round(s, 1)                                       # ties, within and across the classes
        idx = metrics.stratified_resamples(y, 200, np.random.default_rng(0))
        ours = metrics.bootstrap_image_auroc(s, y, idx)
        assert ours == pytest.approx([roc_auc_score(y[i], s[i]) for i in idx], abs=1e-12)


def test_pixel_bootstrap_matches_sklearn_and_narrows():
    rng = np.random.default_rng(1)
    widths = []
    for n in (10, 200):
        y = np.arange(n) % 2
        masks = (rng.random((n, 8, 8)) < 0.2) & (y[:, None, None] == 1)
        maps = (rng.random((n, 8, 8)) * 0.6 + masks * 0.3).astype(np.float16)
        hist = metrics.pixel_histograms(maps, masks)
        full = metrics.histogram_auroc(hist.sum(0)[None, 0], hist.sum(0)[None, 1])[0]
        assert full == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel().astype(np.float32)), abs=1e-9)
        m = metrics.compute_metrics(records(y, masked=True), maps, maps.reshape(n, -1).max(1), masks, n_boot=200)
        lo, hi = m["pixel"]["auroc_ci95"]
        assert lo <= m["pixel"]["auroc"] <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


def test_ece_small_when_calibrated_large_when_not():
    rng = np.random.default_rng(2)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(float)
    assert calibration.ece(p, y) < 0.02
    overconfident = np.where(p > 0.5, 1 - (1 - p) ** 4, p ** 4)  # pushed towards 0 and 1
    assert calibration.ece(overconfident, y) > 0.15


def test_platt_recovers_a_known_calibration_and_stays_finite_when_separable():
    rng = np.random.default_rng(3)
    s = rng.random(50000)
    y = (rng.random(50000) < calibration.apply_platt(s, (2.0, -1.0))).astype(float)
    a, b = calibration.fit_platt(s, y)
    assert a == pytest.approx(2.0, abs=0.1) and b == pytest.approx(-1.0, abs=0.1)
    a, b = calibration.fit_platt(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0.0, 0, 1, 1]))   # separable
    assert np.isfinite([a, b]).all() and a > 0
    assert 0.5 < calibration.apply_platt(np.array([0.9]), (a, b))[0] < 0.9    # smoothed: 3/4, not 1


@pytest.mark.parametrize("n_pos,target", [(7, 0.95), (100, 0.95), (20, 0.8), (1, 0.99)])
def test_operating_point_reaches_its_target_on_the_data_it_was_set_on(n_pos, target):
    rng = np.random.default_rng(n_pos)
    p = np.r_[rng.random(n_pos).round(1), rng.random(30)]            # rounded: ties among the anomalous
    y = np.r_[np.ones(n_pos), np.zeros(30)]
    t = calibration.threshold_for_sensitivity(p, y, target)
    op = calibration.operating_point(p, y, np.where(y == 1, "abnormal", "normal"), t)
    assert op["sensitivity"] >= target
    higher = np.sort(p[y == 1])[np.sort(p[y == 1]) > t]
    if len(higher):                                                  # and it is the highest such threshold
        assert (p[y == 1] >= higher[0]).mean() < target
    c = op["confusion"]
    assert c["tp"] + c["fn"] == n_pos and c["tn"] + c["fp"] == 30
    assert op["per_class"]["abnormal"]["called_anomalous"] == c["tp"]


def test_calibration_split_is_stratified_and_seeded():
    y = np.r_[np.zeros(40), np.ones(60)]
    fit = calibration.split_for_calibration(y, 0.25, 0)
    assert fit[y == 0].sum() == 10 and fit[y == 1].sum() == 15
    assert (fit == calibration.split_for_calibration(y, 0.25, 0)).all()


def test_checkpoint_holds_a_calibration_set(tmp_path):
    ckpt = torch.load(train.main(train.parse_args(TINY + ["--out", str(tmp_path)])), weights_only=True)
    cal = ckpt["calibration"]
    assert cal["normal"].shape == (4, calibration.CAL_TOP) and cal["anomalous"].shape == (4, calibration.CAL_TOP)
    assert (cal["normal"][:, :-1] >= cal["normal"][:, 1:]).all()                 # descending top values
    s, y = calibration.checkpoint_set(ckpt, 0, "x")
    assert torch.equal(torch.from_numpy(s[:4]), cal["normal"][:, 0].double()) and y.tolist() == [0] * 4 + [1] * 4
    with pytest.raises(ValueError, match="--topk"):
        calibration.checkpoint_set(ckpt, calibration.CAL_TOP + 1, "x")


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds")
    return [train.main(train.parse_args(TINY + ["--seed", str(s), "--out", str(out / f"s{s}")])) for s in (0, 1)]


def test_ensemble_of_seeds_reports_spread_and_uncertain_cases(two_seeds, tmp_path):
    m = evaluate.main(evaluate.parse_args(["--ckpt", *two_seeds, "--out", str(tmp_path), "--overlays", "0",
                                           "--bootstrap", "50"]))
    s = m["seeds"]["image_auroc"]
    assert len(s["values"]) == 2 and s["std"] == pytest.approx(np.std(s["values"], ddof=1))
    assert m["conditions"]["seeds"] == [0, 1] and len(m["most_uncertain"]) == 10
    stds = [u["score_std"] for u in m["most_uncertain"]]
    assert stds == sorted(stds, reverse=True)
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert {"score_std", "score_0", "score_1", "probability"} <= set(rows[0])
    r = rows[0]
    assert float(r["score"]) == pytest.approx((float(r["score_0"]) + float(r["score_1"])) / 2, abs=2e-6)   # scores.csv writes 6 decimals: 3 roundings of 5e-7


def test_calib_split_reports_only_on_the_rest(two_seeds, tmp_path):
    m = evaluate.main(evaluate.parse_args(["--ckpt", two_seeds[0], "--calib-split", "0.5", "--out", str(tmp_path),
                                           "--overlays", "0", "--bootstrap", "20"]))
    assert m["reported_on"] == dict(images=12, left_out_for_calibration=12) and m["image"]["n"] == 12
    assert m["calibration"]["fitted_on"].startswith("labelled test fraction 0.5")
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert sum(int(r["calibration_fit"]) for r in rows) == 12


def test_ensemble_of_different_backbones_is_refused(two_seeds, tmp_path):
    ckpt = torch.load(two_seeds[1], weights_only=True)
    ckpt["config"]["layers"] = [1, 2, 3]
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(evaluate.CheckpointError, match="other.pt: its layers"):
        evaluate.main(evaluate.parse_args(["--ckpt", two_seeds[0], str(tmp_path / "other.pt"), "--out",
                                           str(tmp_path)]))


def test_conditions_name_a_weights_file_by_its_checksum(tiny_clip, tmp_path):
    import hashlib
    path = tmp_path / "clip.pt"
    torch.save(tiny_clip.state_dict(), path)
    m = evaluate.main(evaluate.parse_args(["--zero-shot", "--clip", TINY_CLIP, "--clip-weights", str(path),
                                           "--data", "synthetic", "--out", str(tmp_path / "e"), "--overlays", "0",
                                           "--bootstrap", "0"]))
    c = m["conditions"]
    assert c["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and not c["random_init"]
    assert c["weights"] == f"file {path}" and "warning" not in m and m["calibration"]["method"] is None
    assert "auroc_ci95" not in m["image"] and m["operating_points"] == {}


def test_calib_split_too_small_to_fit_is_refused(two_seeds, tmp_path):
    with pytest.raises(ValueError, match="leaves no normal or no anomalous"):
        evaluate.main(evaluate.parse_args(["--ckpt", two_seeds[0], "--calib-split", "0.01", "--out", str(tmp_path)]))


def test_an_inverted_calibration_set_never_reverses_the_ranking():
    """A set whose anomalies score below its normals: the slope is held at 0 (P constant, so non-decreasing in
    the score), and it is flagged; a good set is not."""
    s = np.array([0.8, 0.85, 0.9, 0.95, 0.1, 0.15, 0.2, 0.25])
    y = np.array([0.0, 0, 0, 0, 1, 1, 1, 1])
    a, b = calibration.fit_platt(s, y)
    assert a == 0 and np.allclose(calibration.apply_platt(s, (a, b)), 0.5)
    assert "inverted" in calibration.check_fit(s, y, (a, b))
    ab = calibration.fit_platt(s, 1 - y)
    assert ab[0] > 0 and calibration.check_fit(s, 1 - y, ab) is None
    p = calibration.apply_platt(np.linspace(0.01, 0.99, 50), ab)
    assert np.all(np.diff(p) >= 0)
