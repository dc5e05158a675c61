"""
--precision auto, decided by measurement: fp32 or bf16 autocast for each path of a run, whichever this machine's
own kernels run faster on the run's own shapes, where the two agree.

Whether bf16 pays on a CPU is a question about kernels, not flags: with AMX tiles a ViT forward takes 0.3x fp32's
time, with avx512_bf16 alone it took 1.2x on a capped Xeon but 0.6x on a native AMD EPYC, with AVX2 7x
(docs/speed.md). So `auto` times both, per path, once per machine:
- frozen: one residual block of the run's CLIP image tower, forward, on a batch of 4 images' tokens (the frozen
  encodings of train.py and evaluate.py's per-image forward); bf16 runs fastclip's cast, folded copy, as
  evaluate.py does (train.py's one batch of views casts under autocast once: the same kernels);
- trainables: forward + backward of one text-tower block on the 21 prompts, a linear layer on a batch of token
  maps (the adapters) and a 3x3 convolution on a batch of latents (eta_theta, P_theta), as one detector step does.
Each is timed after a warm-up, the fastest of REPEATS, fp32 and bf16 interleaved; bf16 is chosen where it is
faster and its output agrees with fp32's within AGREEMENT (relative L2). The verdict is cached per CPU model, torch
version, thread count, oneDNN cap and shapes in CACHE (~/.cache/oneshot-medad/precision.json), so a later run
measures nothing; a verdict measured while the machine was busy (load average above its cores) is used for that
run only, not cached.
CUDA: the frozen forwards in bf16, the trainables in fp32 (not yet measured on a GPU); MPS: fp32.

    import precision
    choice = precision.pick("auto", torch.device("cpu"), "ViT-L-14")   # {"frozen": True, "trainables": True, ...}
    print(choice["line"])
"""
import json
import os
import platform
import time

import torch
import torch.nn as nn

import fastclip

AGREEMENT = 0.05   # relative L2 of bf16's output against fp32's: bf16 rounding (2^-8) over a block is ~0.01
REPEATS = 3
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "oneshot-medad",
                     "precision.json")
_verdicts = {}     # this process's verdicts: train.py asks more than once


def cpu_model():
    """The CPU's model name (Linux /proc/cpuinfo, else platform's)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(shapes):
    """What a verdict depends on: the CPU, torch, the threads, a oneDNN cap, the probe's shapes."""
    return "|".join([cpu_model(), torch.__version__, f"threads={torch.get_num_threads()}",
                     f"onednn={os.environ.get('ONEDNN_MAX_CPU_ISA', 'ALL')}", json.dumps(shapes, sort_keys=True)])


def clip_shapes(clip):
    """The probe's shapes, from a CLIP name's open_clip config (nothing loaded) or from a loaded CLIP: widths,
    heads, tokens per image."""
    if not isinstance(clip, str):
        v, t = clip.visual.transformer, clip.transformer
        return dict(vision_width=v.width, vision_heads=v.resblocks[0].attn.num_heads,
                    tokens=clip.visual.positional_embedding.shape[0], text_width=t.width,
                    text_heads=t.resblocks[0].attn.num_heads)
    import open_clip
    cfg = open_clip.get_model_config(clip)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    size = v["image_size"] if isinstance(v["image_size"], int) else v["image_size"][0]
    return dict(vision_width=v["width"], vision_heads=v["width"] // v.get("head_width", 64),
                tokens=(size // v["patch_size"]) ** 2 + 1, text_width=t["width"], text_heads=t["heads"])


def time_pair(fp32_fn, bf16_fn, timer=time.perf_counter):
    """Each call's fastest of REPEATS, the two interleaved so that a load that comes and goes falls on both alike,
    after a warm-up of each; bf16 is not timed again where its warm-up alone took over 3x fp32's best (bf16
    without native kernels: 2-30x slower). Returns the seconds and the last outputs."""
    fp32_fn()
    t = timer()
    y16 = bf16_fn()
    t16, t32 = timer() - t, float("inf")
    for _ in range(REPEATS):
        t = timer()
        y32 = fp32_fn()
        t32 = min(t32, timer() - t)
        if t16 <= 3 * t32:
            t = timer()
            y16 = bf16_fn()
            t16 = min(t16, timer() - t)
    return t32, t16, y32, y16


def block(width, heads):
    from open_clip.transformer import QuickGELU, ResidualAttentionBlock
    return ResidualAttentionBlock(width, heads, act_layer=QuickGELU)


def frozen_probe(shapes, gen):
    """(fp32 call, bf16 call): one image block forward on 4 images' tokens, as the frozen encodings run it."""
    b = block(shapes["vision_width"], shapes["vision_heads"]).eval().requires_grad_(False)
    fast = fastclip.fast_copy([b], torch.bfloat16)[0]
    x = torch.randn(shapes["tokens"], 4, shapes["vision_width"], generator=gen)       # (L, B, D): open_clip 2.x

    def run(bf16):
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return (fast if bf16 else b)(x).float()
    return (lambda: run(False)), (lambda: run(True))


def trainables_probe(shapes, gen):
    """(fp32 call, bf16 call): forward + backward of a text block on the prompts, an adapter-sized linear layer on
    token maps and a 3x3 convolution on latents; the output is the text block's gradient (one of the three)."""
    text = block(shapes["text_width"], shapes["text_heads"])
    lin = nn.Linear(shapes["vision_width"], 768, bias=False)
    conv = nn.Conv2d(64, 64, 3, padding=1).to(memory_format=torch.channels_last)
    prompts = torch.randn(13, 21, shapes["text_width"], generator=gen)               # (L, prompts, W)
    tokens = torch.randn(3 * 8 * 64, shapes["vision_width"], generator=gen)
    latents = torch.randn(8, 64, 28, 28, generator=gen).to(memory_format=torch.channels_last)

    def step(bf16):
        x = prompts.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = text(x).float().square().mean() + lin(tokens).float().square().mean() \
                + conv(latents).float().square().mean()
        loss.backward()
        return x.grad
    return (lambda: step(False)), (lambda: step(True))


PROBES = (("frozen", frozen_probe), ("trainables", trainables_probe))


def measure(shapes, timer=time.perf_counter, probes=PROBES):
    """Per path: fp32 and bf16 seconds, the agreement, and whether bf16 is chosen."""
    gen = torch.Generator().manual_seed(0)
    verdict = {}
    for path, probe in probes:
        torch.manual_seed(0)
        fp32_fn, bf16_fn = probe(shapes, gen)
        t32, t16, y32, y16 = time_pair(fp32_fn, bf16_fn, timer)
        err = float((y16.float() - y32).norm() / y32.norm().clamp_min(1e-30))
        verdict[path] = dict(fp32_s=round(t32, 4), bf16_s=round(t16, 4), rel_err=round(err, 4),
                             bf16=bool(t16 < t32 and err <= AGREEMENT))
    return verdict


def busy():
    """(load average, cores) when the machine is busier than its cores (timings then say little), else (None, n)."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return (load if load > cores else None), cores


def read_cache(path=CACHE):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def write_cache(key, verdict, path=CACHE):
    """Adds one verdict; a cache that cannot be written costs a measurement next time, nothing else."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cache = read_cache(path)
        cache[key] = verdict
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass


def describe(v, source):
    part = lambda p: (f"{p} {'bf16' if v[p]['bf16'] else 'fp32'} (fp32 {v[p]['fp32_s'] * 1000:.0f} ms, "
                      f"bf16 {v[p]['bf16_s'] * 1000:.0f} ms, agree {v[p]['rel_err']:.3f})")
    return f"precision auto: {part('frozen')}, {part('trainables')}; {source}"


def pick(precision, device, clip, measure_fn=measure, cache_path=CACHE):
    """--precision auto | fp32 | bf16 -> {"frozen": bool, "trainables": bool, "line": str, ...}: whether the frozen
    encoders' forwards and the trainables' forwards run under bf16 autocast (fp32 weights, optimiser and losses
    either way). fp32 | bf16 force both; auto measures on a CPU (once per machine, cached), as described above, for
    `clip` (a name, or a loaded CLIP). MEDAD_PRECISION_AUTO=fp32|bf16 in the environment makes auto that without
    measuring (the tests: runs compare bit for bit whatever the timings)."""
    if precision in ("fp32", "bf16"):
        on = precision == "bf16"
        return dict(frozen=on, trainables=on, source="forced", line=f"precision {precision} (forced)")
    env = os.environ.get("MEDAD_PRECISION_AUTO")
    if env in ("fp32", "bf16") and device.type == "cpu":
        on = env == "bf16"
        return dict(frozen=on, trainables=on, source="MEDAD_PRECISION_AUTO",
                    line=f"precision auto: {env} (MEDAD_PRECISION_AUTO={env}, not measured)")
    if device.type != "cpu":
        on = device.type == "cuda"
        return dict(frozen=on, trainables=False, source=device.type,
                    line=f"precision auto on {device.type}: frozen {'bf16' if on else 'fp32'}, trainables fp32")
    shapes = clip_shapes(clip)
    key = machine_key(shapes)
    if key not in _verdicts:
        cached = read_cache(cache_path).get(key)
        if cached:
            _verdicts[key] = dict(cached, source=f"cached in {cache_path}")
        else:
            load, cores = busy()
            verdict = measure_fn(shapes)
            if load is None:
                write_cache(key, verdict, cache_path)
            _verdicts[key] = dict(verdict, source="measured now, cached in " + cache_path if load is None else
                                  f"measured now on a busy machine (load {load:.1f} on {cores} cores): not cached")
    v = _verdicts[key]
    return dict(frozen=v["frozen"]["bf16"], trainables=v["trainables"]["bf16"], source=v["source"],
                measured={p: v[p] for p in ("frozen", "trainables")}, line=describe(v, v["source"]))
