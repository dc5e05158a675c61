"""
Where a train.py run spends its wall time: runs train.py in this process with a stopwatch around each part of
the method and prints a table of exclusive seconds (a part nested in another counts only for itself, so the
rows add up to the wall time; what no row names is "other").

Forward parts are timed as they run (the CPU runs ops synchronously; on CUDA the script synchronises around each
part, which slows the run a little). The backward pass is one row: autograd runs it in one call; the per-part
forward/backward split is printed by --split (each module's forward and backward timed alone on the run's shapes).

    python scripts/profile_train.py -- --data brainmri --data-root ../shared/data --shots 1 --random-init
    python scripts/profile_train.py --split -- --data synthetic --shots 1 --random-init --clip ViT-B-16 --steps 60
"""
import argparse
import collections
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import calibration  # noqa: E402
import deviation  # noqa: E402
import encode  # noqa: E402
import encodings_cache  # noqa: E402
import mediclip  # noqa: E402
import project  # noqa: E402
import runfiles  # noqa: E402
import train  # noqa: E402

# (row, object, attribute): the stopwatch wraps object.attribute; the rows in the order of the method
PARTS = [
    ("load the frozen models", encode, "load_clip"), ("load the frozen models", encode, "load_vae"),
    ("frozen encodings (once)", encodings_cache, "encode_views"),
    ("frozen encodings (once)", encodings_cache, "encode_bank"),
    ("frozen encodings (once)", deviation, "grey_round_trip"),
    ("eta_theta forward", deviation.UNet, "forward"),
    ("masks, noise, synthesis", deviation, "sample_patch_mask"), ("masks, noise, synthesis", deviation, "sample_noise"),
    ("masks, noise, synthesis", deviation, "masked_forward"), ("masks, noise, synthesis", deviation, "sample_synthesis"),
    ("masks, noise, synthesis", deviation, "synthesise_latent"),
    ("projection P_theta forward", project.Projection, "forward"),
    ("text tower forward", mediclip.TextTower, "forward"),
    ("adapters + maps forward", mediclip.MediCLIP, "forward"),
    ("losses", mediclip, "focal_loss"), ("losses", mediclip, "dice_loss"), ("losses", project, "alignment_loss"),
    ("backward (all parts)", torch.Tensor, "backward"),
    ("optimiser (Adam)", torch.optim.Adam, "step"), ("optimiser (Adam)", torch.optim.Optimizer, "zero_grad"),
    ("calibration set (once)", calibration, "calibration_set"),
    ("save", runfiles, "save_checkpoint"),
]


class Stopwatch:
    """Exclusive time per row: time spent in a nested part is taken off its parent."""

    def __init__(self, sync):
        self.total, self.calls, self.stack, self.sync = collections.Counter(), collections.Counter(), [], sync

    def wrap(self, row, f):
        @functools.wraps(f)
        def timed(*a, **k):
            self.sync()
            self.stack.append([row, time.perf_counter(), 0.0])  # row, start, time of nested parts
            try:
                return f(*a, **k)
            finally:
                self.sync()
                row_, start, nested = self.stack.pop()
                spent = time.perf_counter() - start
                self.total[row_] += spent - nested
                self.calls[row_] += 1
                if self.stack:
                    self.stack[-1][2] += spent
        return timed


def install(watch):
    for row, obj, name in PARTS:
        setattr(obj, name, watch.wrap(row, getattr(obj, name)))


def print_table(watch, wall, steps):
    print("\n| part | s | s / step | share |\n|---|---|---|---|")
    rows = [row for row, _, _ in PARTS]
    for row in dict.fromkeys(rows):
        s = watch.total[row]
        per = f"{s / steps:.3f}" if "once" not in row and "load" not in row and row != "save" else ""
        print(f"| {row} | {s:.1f} | {per} | {100 * s / wall:.0f} % |")
    other = wall - sum(watch.total.values())
    print(f"| other (data, logging, process) | {other:.1f} | | {100 * other / wall:.0f} % |")
    print(f"| **wall** | **{wall:.1f}** | | |")


def capture(store):
    """Keep the run's trainables and the text tower (for --split)."""
    build, init = train.build_trainables, mediclip.TextTower.__init__

    def keep_trainables(*a, **k):
        store["eta"], store["proj"], store["det"] = build(*a, **k)
        return store["eta"], store["proj"], store["det"]

    def keep_text(self, clip, *a, **k):   # the last one made: the tower the steps read
        init(self, clip, *a, **k)
        store["text"] = self
    train.build_trainables, mediclip.TextTower.__init__ = keep_trainables, keep_text


def time_split(store, config, B, repeat=5):
    """Each part's forward, and forward + backward, alone on the shapes of one detector step (seconds, median),
    under the run's precision."""
    eta, proj, det, text_tower = store["eta"], store["proj"], store["det"], store["text"]
    c, hw, D, H = config["latent_channels"], config["latent_hw"], config["token_dim"], config["token_hw"]
    z = torch.randn(B, c, hw, hw)
    t = torch.randint(deviation.T, (B,))
    frozen = [torch.randn(B, D, H, H) for _ in config["layers"]]
    autocast = runfiles.bf16_autocast(torch.device("cpu"), config["bf16"])
    with autocast():  # the steps' tower: for bf16 steps its linear weights are bf16 (mediclip.TextTower)
        text = det.text_features(text_tower).detach()

    def adapters(grad):  # anomalies + projected normals (need input grads) + real tokens (do not)
        tokens = [torch.cat([torch.randn(2 * B, D, H, H, requires_grad=grad), f]) for f in frozen]
        return det(tokens, text, config["image_size"]).mean()
    parts = {"eta_theta (L_deco)": lambda grad: eta(z, t).square().mean(),
             "projection P_theta (2B)": lambda grad: sum(p.mean() for p in proj(torch.cat([z, z]))),
             "text tower + prompts": lambda grad: det.text_features(text_tower).sum(),
             "adapters + maps (3B)": adapters}
    print(f"\n| part, alone (batch {B}, {'bf16' if config['bf16'] else 'fp32'}) | forward s | forward + backward s |"
          f"\n|---|---|---|")
    for name, f in parts.items():
        fwd, both = [], []
        for _ in range(repeat):
            with torch.no_grad(), autocast():
                t0 = time.perf_counter()
                f(False)
                fwd.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with autocast():
                loss = f(True)
            loss.backward()
            both.append(time.perf_counter() - t0)
        print(f"| {name} | {sorted(fwd)[repeat // 2]:.3f} | {sorted(both)[repeat // 2]:.3f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--split", action="store_true", help="also time each module's forward and backward alone")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="train.py's flags, after --")
    a = p.parse_args()
    args = train.parse_args([x for x in a.train_args if x != "--"])
    cuda = runfiles.pick_device(args.device).type == "cuda"
    watch = Stopwatch(torch.cuda.synchronize if cuda else lambda: None)
    store = {}
    capture(store)
    install(watch)
    t0 = time.perf_counter()
    path = train.main(args)
    print_table(watch, time.perf_counter() - t0, args.steps)
    if a.split:
        time_split(store, torch.load(path, weights_only=True)["config"], args.batch_size)


if __name__ == "__main__":
    main()
