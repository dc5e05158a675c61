"""
The views of the few normal shots: which image or slice each view comes from, and its random augmentation. k
shots x V views are encoded once by train.py (and rebuilt by synthesise.py from the checkpoint's names).

A shot is a study (data.sample_shots): a plain image gives its V views from itself; a NIfTI volume or a DICOM
series gives V of its slices (those with anatomy, by default), drawn from the seed. View 0 of each shot is left
unaugmented; the others are rotated (+-15 deg), scaled (0.9-1.1), shifted (+-5 %), flipped, gamma- and
brightness-jittered (0.9-1.1).

    import augment
    recs = augment.view_records(shots, n_views=16, seed=0)        # k 16 records, shot-major
    x = augment.load_views(recs, size=224, n_views=16, seed=0)    # (k 16, 3, S, S) in [0, 1]
    train_idx, held_idx = augment.split_held_out(len(x), 16)       # the last view(s) of each shot held out
"""
import numpy as np
import torch
import torch.nn.functional as F

import data
from data import DataError


def view_records(shots, n_views, seed):
    """The record each view comes from, shot-major (k n_views): a one-image shot gives its image every time; a
    study's views are n_views of its listed slices (those with anatomy, by default), drawn from seed, without
    replacement while there are enough."""
    rng = np.random.default_rng([seed, 1])
    out = []
    for recs in shots:
        pick = [0] * n_views if len(recs) == 1 else rng.choice(len(recs), n_views, replace=len(recs) < n_views)
        out += [recs[i] for i in pick]
    return out


def load_views(view_recs, size, n_views, seed):
    """(k n_views, 3, S, S): each view's image, read once per record, augmented as augment_stack says."""
    names = list(dict.fromkeys(r["name"] for r in view_recs))
    first = {r["name"]: r for r in reversed(view_recs)}
    images, _ = data.load_images([first[n] for n in names], size)
    return augment_stack(images[[names.index(r["name"]) for r in view_recs]], n_views, seed)


def augment_views(x, n_views, seed):
    """(k,3,S,S) -> (k*n_views,3,S,S), shot-major; view 0 of each shot is the image itself."""
    if n_views < 1:
        raise DataError(f"augment_views: n_views must be >= 1, got {n_views}")
    return augment_stack(x.repeat_interleave(n_views, dim=0), n_views, seed)


def augment_stack(xv, n_views, seed):
    """(k n_views, 3, S, S) shot-major -> the same, each randomly rotated, scaled, shifted, flipped, gamma- and
    brightness-jittered from seed; view 0 of each shot is left as it is."""
    g = torch.Generator().manual_seed(seed)
    n = xv.shape[0]

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=g)

    ang, scale = torch.deg2rad(u(-15, 15)), u(0.9, 1.1)
    tx, ty = u(-0.1, 0.1), u(-0.1, 0.1)  # grid coords span 2, so 0.1 = 5 % of the side
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    gamma, bright = u(0.9, 1.1), u(0.9, 1.1)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    # theta maps output coords to input coords: rotate/scale after an optional horizontal flip
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1),
                         torch.stack([sin * flip, cos, ty], 1)], 1).to(xv.device, xv.dtype)
    grid = F.affine_grid(theta, list(xv.shape), align_corners=False)
    out = F.grid_sample(xv, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)
    out = (out ** gamma.to(xv)[:, None, None, None] * bright.to(xv)[:, None, None, None]).clamp(0, 1)
    keep = torch.arange(n, device=xv.device) % n_views == 0
    out[keep] = xv[keep]
    return out


def split_held_out(n, views_per_shot):
    """Indices of the training views and of the held-out last view(s) of every shot (alignment is reported on them)."""
    n_hold = max(1, views_per_shot // 8) if views_per_shot > 1 else 0
    is_held = (torch.arange(n) % views_per_shot) >= views_per_shot - n_hold
    return (~is_held).nonzero().squeeze(1), is_held.nonzero().squeeze(1)
