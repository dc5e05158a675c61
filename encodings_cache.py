"""
The frozen encodings of a run's views, computed once before the training loop (the loop never runs a frozen
encoder), or read back from `train.py --cache DIR`: CLIP's patch tokens of the chosen blocks and the VAE's
latents of the k shots' views, and for the pixel-space baselines the CLIP tokens of a bank of synthesised views.
The cache is keyed by everything the encodings depend on (cache_key), so runs on the same shots with other
--synth, steps or loss weights (the ablation's modes of one seed) skip MedVAE and CLIP, with bit-identical results.

    real, z, cached = encodings_cache.encode_views(views, clip, tokens_model, layers, device, autocast, args)
"""
import hashlib
import os
import time

import encode
import pixel_tasks
import precision
import runfiles


def encode_views(views, clip, tokens_model, layers, device, autocast, args):
    """The frozen encodings of the views: CLIP tokens (list over layers) and VAE latents z, computed once, or read
    from --cache. Returns them and whether they came from the cache."""
    cache = args.cache and os.path.join(args.cache, f"views-{cache_key(views, layers, device, args)}.pt")
    cached = runfiles.read_cache(cache)
    if cached:
        print(f"frozen encodings of the {len(views)} views read from {cache}")
        return [t.to(device) for t in cached["real"]], cached["z"].to(device), True
    vae = encode.load_vae(args.vae, args.vae_weights, args.random_init).to(device)
    t0 = time.time()
    print(f"encoding the {len(views)} views once: CLIP {args.clip} to block {max(layers)} ...", flush=True)
    real = [t.clone() for t in encode.encode_tokens(tokens_model, views.to(device), clip, autocast=autocast)]
    print(f"  {time.time() - t0:.0f} s; {args.vae} latents ...", flush=True)
    z = encode.encode_latents(vae, views.to(device), autocast=autocast).clone()          # (k V, c, h, w)
    print(f"  {time.time() - t0:.0f} s", flush=True)
    if cache:
        os.makedirs(args.cache, exist_ok=True)
        runfiles.save_checkpoint(dict(real=[t.cpu() for t in real], z=z.cpu()), cache)
    return real, z, False


def encode_bank(views, clip, tokens_model, device, autocast, args):
    """Pixel-space baselines: --bank anomalies synthesised from the views, their CLIP tokens and masks."""
    mode = "pixel-noise" if args.synth == "pixel-noise" else "mediclip"
    images, masks = pixel_tasks.build_bank(views, args.bank, mode, args.seed)
    tokens = [t.clone() for t in encode.encode_tokens(tokens_model, images.to(device), clip, autocast=autocast)]
    return tokens, masks.to(device)


def cache_key(views, layers, device, args):
    """What the frozen encodings of the views depend on: their pixels (so the data, shots, seed and
    augmentation), the encoders and their weights, the precision, and the code that builds and loads them."""
    h = hashlib.sha256(views.contiguous().numpy().tobytes())
    for module in (encode, encode.W, encode.weightfiles):
        with open(module.__file__, "rb") as f:
            h.update(f.read())
    stamp = lambda p: (os.path.abspath(p), os.path.getsize(p), os.path.getmtime(p))
    files = [None if not p else [stamp(os.path.join(p, f)) for f in sorted(os.listdir(p))] if os.path.isdir(p)
             else stamp(p) for p in (args.clip_weights, args.vae_weights)]
    h.update(repr((args.clip, args.pretrained, args.random_init, list(layers), args.vae, files, device.type,
                   precision.pick(args.precision, device, args.clip)["frozen"])).encode())
    return h.hexdigest()[:20]
