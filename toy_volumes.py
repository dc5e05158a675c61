"""
A toy set of brain MRI studies, made here from a real volume (nothing downloaded): nilearn's MNI152 T1 template
(shipped inside the nilearn package) perturbed into "normal subjects", and the same with MOOD-like inserted
anomalies and their masks (MOOD, Zimmerer et al. 2022: a sphere of foreign intensity, a local deformation, a
noise patch, a patch copied from elsewhere in the brain). For tests, the studies figure (docs/studies.md) and trying the volume
path end to end; it says nothing about the method on real pathology.

    python toy_volumes.py --out toy --normal-train 2 --normal-test 3 --anomalous 4
    # toy/<MVFA layout>: valid/good/img/*.nii.gz, test/good/img, test/Ungood/img + Ungood/anomaly_mask
    # toy/mood/{toy,toy_label/sample,toy_label/pixel}: MOOD's input and label layout for its evaluation script
    python toy_volumes.py --out toy --dicom      # also toy/dicom/: each test study as a DICOM series

    import toy_volumes
    volume, affine = toy_volumes.normal_study(rng)          # (X, Y, Z) float32 in [0, 1], RAS affine
    volume, mask = toy_volumes.insert_anomaly(volume, "sphere", rng)
"""
import argparse
import os

import numpy as np
from scipy import ndimage

KINDS = ("sphere", "deformation", "noise", "copy")


def template(zoom=1.0):
    """nilearn's MNI152 T1 template at 2 mm (99 x 117 x 95), scaled by zoom; (volume in [0, 1], affine)."""
    from nilearn import datasets
    img = datasets.load_mni152_template(resolution=2)
    v = img.get_fdata().astype(np.float32)
    affine = img.affine.copy()
    if zoom != 1:
        v = ndimage.zoom(v, zoom, order=1)
        affine[:3, :3] /= zoom
    return np.clip(v / v.max(), 0, 1), affine


def normal_study(rng, zoom=1.0):
    """The template moved (rotation up to 4 degrees, shift up to 3 voxels), under a smooth bias field (+-15 %)
    and Gaussian noise (2 % of the range): another 'normal subject'."""
    v, affine = template(zoom)
    a = np.deg2rad(rng.uniform(-4, 4, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(a[0]), -np.sin(a[0])], [0, np.sin(a[0]), np.cos(a[0])]])
    rz = np.array([[np.cos(a[2]), -np.sin(a[2]), 0], [np.sin(a[2]), np.cos(a[2]), 0], [0, 0, 1]])
    r = rx @ rz
    c = (np.array(v.shape) - 1) / 2
    v = ndimage.affine_transform(v, r, offset=c - r @ c + rng.uniform(-3, 3, 3), order=1)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in v.shape], indexing="ij"))
    bias = np.exp(0.15 * np.tensordot(rng.uniform(-1, 1, 3), grid, 1))          # a smooth multiplicative field
    v = v * bias + rng.normal(0, 0.02, v.shape) * (v > 0.02)
    return np.clip(v, 0, 1).astype(np.float32), affine


def brain_point(v, rng, margin):
    """A random voxel well inside the brain (bright tissue, at least `margin` voxels from the edge)."""
    inside = ndimage.binary_erosion(v > 0.3, iterations=margin)
    pts = np.argwhere(inside)
    return pts[rng.integers(len(pts))]


def ball(shape, centre, radius):
    idx = np.indices(shape)
    return sum((idx[i] - centre[i]) ** 2 for i in range(3)) <= radius ** 2


def insert_anomaly(v, kind, rng):
    """One MOOD-like anomaly of `kind` in a copy of v; (volume, mask). Radii scale with the volume."""
    v, r = v.copy(), max(3, int(min(v.shape) * rng.uniform(0.06, 0.1)))
    c = brain_point(v, rng, r)
    m = ball(v.shape, c, r)
    if kind == "sphere":                                   # a homogeneous blob of foreign intensity
        v[m] = rng.choice([0.05, 0.95])
    elif kind == "deformation":                            # tissue pushed out from the centre of a ball
        idx = np.indices(v.shape).astype(np.float32)
        d = np.sqrt(sum((idx[i] - c[i]) ** 2 for i in range(3))) + 1e-6
        pull = np.where(m, (1 - d / r) * 0.6, 0)           # sample nearer the centre: the middle is enlarged
        v = ndimage.map_coordinates(v, [idx[i] - pull * (idx[i] - c[i]) for i in range(3)], order=1)
    elif kind == "noise":                                  # uniform noise in a cube
        m = np.zeros(v.shape, bool)
        m[tuple(slice(c[i] - r, c[i] + r) for i in range(3))] = True
        v[m] = rng.uniform(0, 1, int(m.sum()))
    elif kind == "copy":                                   # a ball of tissue from another place
        src = brain_point(v, rng, r)
        shift = np.indices(v.shape) - (c - src)[:, None, None, None]
        v[m] = ndimage.map_coordinates(v, [s[m] for s in shift], order=1)
    else:
        raise ValueError(f"anomaly kind must be one of {KINDS}, got {kind!r}")
    return v.astype(np.float32), m


def save_nifti(volume, affine, path):
    import nibabel as nib
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(volume, affine), path)
    return path


def write_series(volume, affine, folder, rng, series_number=1, names=None, skip=(), uid=None):
    """A volume (X, Y, Z, RAS, diagonal affine) as an axial DICOM MR series, one file per slice, in the usual
    display (anterior up, patient left on the right), uint16 with RescaleSlope 1/1000, IPP/IOP/PixelSpacing set.
    names: the file names (default shuffled numbers: the order must come from the headers); skip: slices left
    out (a gap). Returns the SeriesInstanceUID."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import MRImageStorage, ExplicitVRLittleEndian, generate_uid
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine)[:3])) or (np.diag(affine)[:3] <= 0).any():
        raise ValueError("write_series takes a volume with a positive diagonal (RAS) affine")
    X, Y, Z = volume.shape
    dx, dy, dz = np.diag(affine)[:3]
    uid, study = uid or generate_uid(), generate_uid()
    names = names or [f"IM{n:05d}" for n in rng.permutation(100 * Z)[:Z]]
    os.makedirs(folder, exist_ok=True)
    for k in range(Z):
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.StudyDate = "MR", "TOY-0001", "20260101"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study, uid, series_number
        ds.InstanceNumber = k + 1
        ras = affine @ [X - 1, Y - 1, k, 1]                      # the voxel shown top left: anterior, patient left
        ds.ImagePositionPatient = [float(-ras[0]), float(-ras[1]), float(ras[2])]   # LPS
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [float(dy), float(dx)], float(dz)
        ds.Rows, ds.Columns = Y, X
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 0.001, 0
        ds.PixelData = (volume[::-1, ::-1, k].T * 1000).round().astype(np.uint16).tobytes()
        ds.save_as(os.path.join(folder, names[k]), enforce_file_format=True)
    return uid


def make_set(out, normal_train=2, normal_test=3, anomalous=4, zoom=1.0, seed=0, dicom=False):
    """The toy set in MVFA's layout under out/, MOOD's under out/mood/, and with dicom the test studies as
    series under out/dicom/. Returns {name: (label, kind)} of the test studies."""
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(normal_train):
        v, a = normal_study(rng, zoom)
        save_nifti(v, a, os.path.join(out, "valid", "good", "img", f"train_{i:02d}.nii.gz"))
    for i in range(normal_test + anomalous):
        v, a = normal_study(rng, zoom)
        kind = KINDS[(i - normal_test) % len(KINDS)] if i >= normal_test else None
        m = np.zeros(v.shape, bool)
        if kind:
            v, m = insert_anomaly(v, kind, rng)
        name = f"case_{i:02d}.nii.gz"
        group = "Ungood" if kind else "good"
        save_nifti(v, a, os.path.join(out, "test", group, "img", name))
        if kind:
            save_nifti(m.astype(np.uint8), a, os.path.join(out, "test", group, "anomaly_mask", name))
        save_nifti(v, a, os.path.join(out, "mood", "toy", name))
        save_nifti(m.astype(np.uint8), a, os.path.join(out, "mood", "toy_label", "pixel", name))
        os.makedirs(os.path.join(out, "mood", "toy_label", "sample"), exist_ok=True)
        with open(os.path.join(out, "mood", "toy_label", "sample", name + ".txt"), "w") as f:
            f.write(f"{int(bool(kind))}\n")
        if dicom:
            write_series(v, a, os.path.join(out, "dicom", name.split(".")[0]), rng)
        truth[name] = (int(bool(kind)), kind or "normal")
    return truth


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Write a toy set of brain MRI studies from nilearn's MNI152 template.")
    p.add_argument("--out", default="toy", help="folder to write into")
    p.add_argument("--normal-train", type=int, default=2, help="normal training studies (valid/good)")
    p.add_argument("--normal-test", type=int, default=3, help="normal test studies")
    p.add_argument("--anomalous", type=int, default=4, help="anomalous test studies (kinds in turn)")
    p.add_argument("--zoom", type=float, default=1.0, help="scale of the 2 mm template (0.5: 4 mm, faster)")
    p.add_argument("--seed", type=int, default=0, help="seeds every perturbation and anomaly")
    p.add_argument("--dicom", action="store_true", help="also write each test study as a DICOM series")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    truth = make_set(args.out, args.normal_train, args.normal_test, args.anomalous, args.zoom, args.seed, args.dicom)
    print(f"wrote {len(truth)} test studies and {args.normal_train} normal training studies into {args.out}")
