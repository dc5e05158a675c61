"""The real-weights path, hermetic: a stand-in hub on 127.0.0.1 (HF_ENDPOINT) serving random weights under the
published repo and file names. train.py and evaluate.py without --random-init through it, then offline from a
prefetched cache with the server stopped; every way a download fails gives its one line, in seconds."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml

import encode
import weights
from conftest import ROOT, lightning_checkpoint
from hubstub import HubStub

CLIP_REPO = "timm/vit_base_patch16_clip_224.openai"   # where OpenAI's ViT-B-16 lives today
VAE_CONFIG, VAE_CKPT = "model_weights/medvae_4x1.yaml", "model_weights/vae_4x_1c_2D.ckpt"   # medvae 0.1.7's names
HUB_ENV = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "HF_TOKEN", "HTTPS_PROXY", "https_proxy",
           "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "TRANSFORMERS_OFFLINE")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Random ViT-B-16 and medvae_4_1_2d weights written as the hub publishes them (fp16 to keep them small)."""
    import open_clip
    from safetensors.torch import save_file
    d = tmp_path_factory.mktemp("served")
    torch.manual_seed(1)
    clip_sd = {k: v.half().contiguous() for k, v in open_clip.create_model("ViT-B-16").state_dict().items()}
    save_file(clip_sd, d / "open_clip_model.safetensors")
    torch.save(clip_sd, d / "open_clip_pytorch_model.bin")
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": dict(open_clip.get_model_config("ViT-B-16"),
                                                                           quick_gelu=True)}))
    vae = encode.build_medvae("medvae_4_1_2d", encode.medvae_ddconfig("medvae_4_1_2d"), 1)
    vae_sd = {k: v.half() for k, v in vae.state_dict().items()}
    lightning_checkpoint(vae_sd, d / "vae.ckpt")
    (d / "vae.yaml").write_text(yaml.safe_dump(dict(ddconfig=encode.medvae_ddconfig("medvae_4_1_2d"), embed_dim=1)))
    files = {(CLIP_REPO, f): d / f for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                                              "open_clip_config.json")}
    files.update({("stanfordmimi/MedVAE", VAE_CONFIG): d / "vae.yaml", ("stanfordmimi/MedVAE", VAE_CKPT): d / "vae.ckpt"})
    return files, clip_sd, vae_sd


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in HUB_ENV}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def run(argv, env, timeout=300):
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return r.stdout


TRAIN = ["train.py", "--data", "synthetic", "--shots", "1", "--clip", "ViT-B-16", "--views", "2", "--batch-size", "2",
         "--steps", "2", "--eta-warmup", "0", "--unet", "tiny", "--projection", "tiny", "--log-every", "1"]
EVAL = ["--overlays", "0", "--bootstrap", "0"]


def test_real_weights_through_the_hub_then_offline(served, tmp_path, monkeypatch):
    files, clip_sd, vae_sd = served
    stub = HubStub()
    for (repo, name), path in files.items():
        stub.add(repo, name, path)
    try:
        # online: the first run downloads through HF_ENDPOINT into HF_HUB_CACHE; HOME has no legacy ~/.cache/clip
        env = clean_env(HF_ENDPOINT=stub.url, HF_HUB_CACHE=str(tmp_path / "cache"), HOME=str(tmp_path / "home"))
        run(TRAIN + ["--out", str(tmp_path / "run")], env)
        ckpt = torch.load(tmp_path / "run" / "run.pt", weights_only=True)
        assert ckpt["config"]["clip_act"] == "quickgelu" and not ckpt["config"]["clip_random"]
        assert not ckpt["config"]["vae_random"]
        got = {p for _, p in stub.requests}
        assert f"/{CLIP_REPO}/resolve/main/open_clip_model.safetensors" in got      # safetensors, no pickle
        assert not any(p.endswith(".bin") for p in got)
        assert {f"/stanfordmimi/MedVAE/resolve/main/{f}" for f in (VAE_CONFIG, VAE_CKPT)} <= got
        run(["evaluate.py", "--ckpt", str(tmp_path / "run" / "run.pt")] + EVAL, env)
        m = json.load(open(tmp_path / "run" / "metrics.json"))["conditions"]
        assert m["weights"] == "open_clip tag openai" and m["activation"] == "quickgelu" and not m["random_init"]

        # a cluster's login node: prefetch into another cache, printing path and sha256 of each file
        env2 = dict(env, HF_HUB_CACHE=str(tmp_path / "cache2"))
        out = run(["encode.py", "--prefetch", "--clip", "ViT-B-16"], env2)
        for key in [(CLIP_REPO, "open_clip_model.safetensors"), ("stanfordmimi/MedVAE", VAE_CONFIG),
                    ("stanfordmimi/MedVAE", VAE_CKPT)]:
            assert f"{stub.files[key]['sha256']} " in out
        assert str(tmp_path / "cache2") in out
    finally:
        stub.stop()
    # the compute nodes: no network at all, HF_HUB_OFFLINE=1, the prefetched cache
    env3 = dict(env2, HF_HUB_OFFLINE="1")
    run(TRAIN + ["--out", str(tmp_path / "off")], env3)
    run(["evaluate.py", "--ckpt", str(tmp_path / "off" / "run.pt")] + EVAL, env3)

    # the tensors loaded are the served ones, and OpenAI's CLIP is built with QuickGELU
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "cache2"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    clip = encode.load_clip("ViT-B-16", "openai")
    assert encode.clip_activation(clip) == "quickgelu"
    for k, v in clip.state_dict().items():
        assert torch.equal(v, clip_sd[k].float()), k
    vae = encode.load_medvae("medvae_4_1_2d")
    for k, v in vae.state_dict().items():
        assert torch.equal(v, vae_sd[k].float()), k


# -----------------------------------------------------------------------------
# every failure in one line, within seconds

@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A stub with one small file, and huggingface_hub pointed at it as HF_ENDPOINT / HF_HUB_CACHE would."""
    import huggingface_hub.constants as c
    from huggingface_hub.utils import _http
    for k in HUB_ENV:
        monkeypatch.delenv(k, raising=False)
    stub = HubStub()
    (tmp_path / "a.bin").write_bytes(os.urandom(4096))
    stub.add("org/repo", "a.bin", tmp_path / "a.bin")

    def point(endpoint):
        monkeypatch.setattr(c, "ENDPOINT", endpoint)
        monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    point(stub.url)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    _http.close_session()
    stub.point = point
    yield stub
    stub.stop()
    _http.close_session()


def fails_fast(fn, needle, limit=10):
    t = time.time()
    with pytest.raises(weights.WeightsUnavailable) as e:
        fn()
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and time.time() - t < limit, msg
    return msg


def test_download_works_and_comes_from_the_cache_next_time(hub):
    path = weights.hub_file("org/repo", "a.bin", "--x")
    assert open(path, "rb").read() == hub.files[("org/repo", "a.bin")]["data"]
    n = len(hub.requests)
    assert weights.hub_file("org/repo", "a.bin", "--x") == path and len(hub.requests) == n


def test_offline_no_route(hub):
    hub.point("http://127.0.0.1:9")   # nothing listens on the discard port
    msg = fails_fast(lambda: weights.hub_file("org/repo", "a.bin", "--clip-weights"), "no route to")
    assert "--clip-weights" in msg and "--prefetch" in msg and "--random-init" in msg


def test_hf_hub_offline_with_an_empty_cache(hub, monkeypatch):
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    fails_fast(lambda: weights.hub_file("org/repo", "a.bin", "--x"), "HF_HUB_OFFLINE is set")
    assert hub.requests == []


@pytest.mark.parametrize("fault, needle", [(None, "HTTP 404"), ("repo", "HTTP 401"), (403, "HTTP 403"),
                                           (503, "HTTP 503"), ("truncate", "interrupted")])
def test_http_failures_name_status_and_url(hub, fault, needle):
    repo, name = ("org/missing", "a.bin") if fault == "repo" else ("org/repo", "a.bin" if fault else "gone.bin")
    if fault in (403, 503, "truncate"):
        hub.faults[(repo, name)] = fault
    msg = fails_fast(lambda: weights.hub_file(repo, name, "--x"), needle, limit=20)
    if fault != "truncate":
        assert f"{hub.url}/{repo}/resolve/main/{name}" in msg


def test_disk_full(hub, tmp_path, monkeypatch):
    """The download's temporary file is /dev/full, whose writes fail with ENOSPC as on a full disk."""
    import uuid
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=0))   # huggingface_hub names it <etag>.<uuid8>.incomplete
    blobs = tmp_path / "cache" / "models--org--repo" / "blobs"
    blobs.mkdir(parents=True)
    os.symlink("/dev/full", blobs / f"{hub.files[('org/repo', 'a.bin')]['git_sha']}.00000000.incomplete")
    fails_fast(lambda: weights.hub_file("org/repo", "a.bin", "--x"), "disk full")


def test_a_proxy_is_honoured_and_not_probed(hub, monkeypatch):
    from huggingface_hub.utils import _http
    hub.point("http://hub.invalid")               # unreachable itself; the proxy (our stub) reaches it
    monkeypatch.setenv("HTTP_PROXY", hub.url)
    _http.close_session()
    path = weights.hub_file("org/repo", "a.bin", "--x")
    assert os.path.getsize(path) == 4096 and ("GET", "/org/repo/resolve/main/a.bin") in hub.requests


def test_openai_old_host_is_gone_and_not_needed(hub, monkeypatch, tmp_path):
    """open_clip 2.24's own `openai` path asks the old host (404 now, as here); ours asks the hub repo."""
    import open_clip
    from open_clip import pretrained
    url = f"{hub.url}/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt"
    monkeypatch.setitem(pretrained._PRETRAINED["ViT-B-16"], "openai", dict(pretrained._PRETRAINED["ViT-B-16"]["openai"],
                                                                           url=url))
    with pytest.raises(Exception, match="404"):
        open_clip.create_model("ViT-B-16", pretrained="openai", cache_dir=str(tmp_path / "oc"))
    msg = fails_fast(lambda: weights.clip_weights_file("ViT-B-16", "openai"), "HTTP 401")
    assert CLIP_REPO in msg


def test_other_hub_tags_fall_back_to_the_bin_file(hub, tmp_path, monkeypatch, tiny_clip):
    """A non-OpenAI hub tag (e.g. laion2b): safetensors first, the .bin when the repo (or mirror) has only that."""
    from open_clip import pretrained
    from conftest import TINY_CLIP
    torch.save(tiny_clip.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    hub.add("laion/tiny", "open_clip_pytorch_model.bin", tmp_path / "open_clip_pytorch_model.bin")
    monkeypatch.setitem(pretrained._PRETRAINED, TINY_CLIP, {"laion": pretrained._pcfg(hf_hub="laion/tiny/")})
    clip = encode.load_clip(TINY_CLIP, "laion")
    assert encode.clip_activation(clip) == "gelu"
    for k, v in clip.state_dict().items():
        assert torch.equal(v, tiny_clip.state_dict()[k]), k
    assert ("HEAD", "/laion/tiny/resolve/main/open_clip_model.safetensors") in hub.requests
