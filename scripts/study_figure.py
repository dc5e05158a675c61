"""
Three orthogonal views of one study through the peak of its anomaly-map volume: the image, and the image with
the map (one scale: 0 to the map's max) and the mask's outline where there is one. For the figure in docs/studies.md.
Shown as evaluate.py's overlays and clinical viewers show them (scans.nifti_slice: radiological, the patient's
right on the image's left; sagittal: anterior left), the sides marked on every panel.

    python scripts/study_figure.py --image toy/test/Ungood/img/case_03.nii.gz \
        --map runs/toy-k2-s0/maps/test_Ungood_img_case_03.nii.gz --mask toy/test/Ungood/anomaly_mask/case_03.nii.gz \
        --out docs/study_toy.png --title "case_03 (deformation)"
"""
import argparse
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import scans  # noqa: E402

def canonical(path):
    return np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj, dtype=np.float32)


def plane(v, axis, index):
    """The slice through index along axis, as evaluate.py shows it (scans.nifti_slice)."""
    return scans.nifti_slice(v, index, axis)


def main(args):
    image, amap = canonical(args.image), canonical(args.map)
    mask = canonical(args.mask) > 0 if args.mask else None
    peak = np.unravel_index(np.argmax(amap), amap.shape)
    lo, hi = np.percentile(image, [0.5, 99.5])
    fig, axes = plt.subplots(2, 3, figsize=(9, 6.4))
    for col, (axis, name) in enumerate([(2, "axial"), (1, "coronal"), (0, "sagittal")]):
        img = plane(image, axis, peak[axis])
        for row in range(2):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
            if row == 1:
                shown = ax.imshow(plane(amap, axis, peak[axis]), cmap="inferno", alpha=0.5, vmin=0,
                                  vmax=float(amap.max()))
                if mask is not None and plane(mask, axis, peak[axis]).any():
                    ax.contour(plane(mask, axis, peak[axis]), levels=[0.5], colors="cyan", linewidths=1)
            ax.set_title(f"{name} {'xyz'[axis]}={peak[axis]}" if row == 0 else f"{name}: map" +
                         (", mask outline" if mask is not None else ""), fontsize=9)
            left, right = ("A", "P") if axis == 0 else ("R", "L")
            for x, side, ha in ((0.02, left, "left"), (0.98, right, "right")):
                ax.text(x, 0.5, side, transform=ax.transAxes, color="yellow", fontsize=9, ha=ha, va="center")
            ax.axis("off")
    fig.colorbar(shown, ax=axes[1, :].tolist(), shrink=0.8, label="anomaly map")
    fig.suptitle(args.title or os.path.basename(args.image), fontsize=10, wrap=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=90, bbox_inches="tight")                    # the title and colour bar fit
    print(f"wrote {args.out} (peak voxel {tuple(int(i) for i in peak)}, map max {float(amap.max()):.3f})")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Three orthogonal views of a study and its anomaly-map volume.")
    p.add_argument("--image", required=True, help="the study's NIfTI volume")
    p.add_argument("--map", required=True, help="its map volume (evaluate.py's maps/<name>.nii.gz)")
    p.add_argument("--mask", default=None, help="its ground-truth mask volume, if any")
    p.add_argument("--out", default="study.png", help="the PNG to write")
    p.add_argument("--title", default=None, help="the figure's title")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
