"""Metrics against hand-computed cases."""
import numpy as np
import pytest

import metrics


def test_aupro_perfect_and_hand_computed():
    masks = np.zeros((2, 1, 4), bool)
    masks[0, 0, :2] = True                    # region A: 2 pixels
    masks[1, 0, 3] = True                     # region B: 1 pixel
    perfect = masks.astype(np.float32)
    assert metrics.aupro(perfect, masks) == pytest.approx(1.0)
    # scores: A gets 0.9 and 0.1, B gets 0.8; normal pixels (5 of them) 0.5 or below
    maps = np.array([[[0.9, 0.1, 0.5, 0.2]], [[0.3, 0.4, 0.05, 0.8]]], np.float32)
    # thresholds from high to low: 0.9 -> PRO (1/2 + 0)/2 = .25, FPR 0; 0.8 -> PRO .75, FPR 0;
    # 0.5 -> FPR 1/5 = .2, PRO .75; 0.4 -> FPR .4 > .3: interpolate PRO .75 at .3
    # area over [0, .3] = .75 * .3, normalised by .3 -> .75
    assert metrics.aupro(maps, masks) == pytest.approx(0.75)


def test_aupro_without_regions_is_nan():
    assert np.isnan(metrics.aupro(np.random.rand(2, 3, 3), np.zeros((2, 3, 3), bool)))


def test_compute_metrics_per_class_and_mask_rule():
    recs = [dict(label=0, cls="normal", mask_path=None, mask=None),
            dict(label=1, cls="benign", mask_path="b.png", mask=None),
            dict(label=1, cls="malignant", mask_path="m.png", mask=None),
            dict(label=0, cls="normal", mask_path=None, mask=None)]
    scores = np.array([0.1, 0.9, 0.3, 0.4])
    masks = np.zeros((4, 2, 2), bool)
    masks[1, 0, 0] = masks[2, 1, 1] = True
    maps = masks.astype(np.float32) * 0.5 + 0.1
    m = metrics.compute_metrics(recs, maps, scores, masks)
    assert m["image"]["auroc"] == pytest.approx(0.75)        # pairs: (.9>.1, .9>.4, .3>.1, .3<.4) = 3/4
    assert m["per_class"]["benign"]["image"]["auroc"] == 1.0
    assert m["per_class"]["malignant"]["image"]["auroc"] == 0.5
    assert m["pixel"]["auroc"] == 1.0
    recs[2]["mask_path"] = None                               # one anomalous image without a mask: no pixel metrics
    assert metrics.compute_metrics(recs, maps, scores, masks)["pixel"] is None


def test_counted_pixel_metrics_equal_sklearn_on_every_pixel():
    from sklearn.metrics import average_precision_score, roc_auc_score
    rng = np.random.default_rng(0)
    masks = rng.random((20, 16, 16)) < 0.1
    maps = (rng.random((20, 16, 16)) * 0.5 + masks * 0.3 * rng.random((20, 16, 16))).astype(np.float16)
    m = metrics.pixel_metrics(maps, masks)
    y, s = masks.ravel(), maps.ravel().astype(np.float32)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
