"""--precision auto by measurement (precision.py): the decision with a fake clock, the cache and what it is keyed
by, the forced and CUDA paths, and one real measurement on the tiny CLIP."""
import torch

import evaluate
import precision


class Clock:
    """A fake timer: each probe call advances it by that call's cost."""
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def probe(self, cost, out):
        def fn():
            self.now += cost
            return out
        return fn


def fake_probes(clock, frozen, trainables):
    """frozen / trainables: (fp32 s, bf16 s, bf16's relative error)."""
    y = torch.ones(100)
    make = lambda t32, t16, err: lambda shapes, gen: (clock.probe(t32, y), clock.probe(t16, y * (1 + err)))
    return (("frozen", make(*frozen)), ("trainables", make(*trainables)))


def test_auto_takes_bf16_where_it_is_faster_and_agrees():
    clock = Clock()
    v = precision.measure({}, clock, fake_probes(clock, (0.20, 0.10, 0.01), (0.30, 0.40, 0.01)))
    assert v["frozen"]["bf16"] and not v["trainables"]["bf16"]            # faster: bf16; slower: fp32
    assert v["frozen"]["fp32_s"] == 0.2 and v["frozen"]["bf16_s"] == 0.1 and v["trainables"]["rel_err"] == 0.01
    v = precision.measure({}, clock, fake_probes(clock, (0.20, 0.10, 0.2), (0.30, 0.10, precision.AGREEMENT)))
    assert not v["frozen"]["bf16"] and v["trainables"]["bf16"]            # faster but off by 20 %: fp32


def verdict(frozen, trainables):
    part = lambda on: dict(fp32_s=0.2, bf16_s=0.1 if on else 0.3, rel_err=0.01, bf16=on)
    return dict(frozen=part(frozen), trainables=part(trainables))


def test_a_cached_verdict_is_reused_and_another_thread_count_measures_again(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDAD_PRECISION_AUTO", raising=False)
    monkeypatch.setattr(precision.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    monkeypatch.setattr(precision, "_verdicts", {})
    calls = []
    measure = lambda shapes: calls.append(shapes) or verdict(True, False)
    cache, cpu, threads = str(tmp_path / "precision.json"), torch.device("cpu"), torch.get_num_threads()
    first = precision.pick("auto", cpu, "ViT-B-16", measure, cache)
    assert (first["frozen"], first["trainables"]) == (True, False) and len(calls) == 1
    assert first["line"].startswith("precision auto: frozen bf16 (fp32 200 ms, bf16 100 ms") and "measured now" in first["line"]
    monkeypatch.setattr(precision, "_verdicts", {})                       # a new process: the file is read
    again = precision.pick("auto", cpu, "ViT-B-16", measure, cache)
    assert len(calls) == 1 and again["frozen"] and "cached in" in again["source"]
    try:
        torch.set_num_threads(threads + 1)                               # another thread count: measured again
        precision.pick("auto", cpu, "ViT-B-16", measure, cache)
        assert len(calls) == 2
    finally:
        torch.set_num_threads(threads)
    precision.pick("auto", cpu, "ViT-L-14", measure, cache)              # other shapes: measured again
    assert len(calls) == 3 and calls[-1]["vision_width"] == 1024


def test_a_verdict_measured_on_a_busy_machine_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDAD_PRECISION_AUTO", raising=False)
    monkeypatch.setattr(precision, "_verdicts", {})
    monkeypatch.setattr(precision.os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    calls, cache = [], str(tmp_path / "precision.json")
    measure = lambda shapes: calls.append(1) or verdict(False, False)
    first = precision.pick("auto", torch.device("cpu"), "ViT-B-16", measure, cache)
    assert "busy machine (load 99.0" in first["line"] and not (tmp_path / "precision.json").exists()
    monkeypatch.setattr(precision, "_verdicts", {})
    monkeypatch.setattr(precision.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    precision.pick("auto", torch.device("cpu"), "ViT-B-16", measure, cache)             # quiet now: measured, kept
    assert len(calls) == 2 and (tmp_path / "precision.json").exists()


def test_forced_precisions_and_other_devices_measure_nothing(monkeypatch, tiny_clip):
    monkeypatch.delenv("MEDAD_PRECISION_AUTO", raising=False)
    never = lambda shapes: (_ for _ in ()).throw(AssertionError("measured"))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert precision.pick("bf16", cpu, tiny_clip, never)["trainables"]
    assert not precision.pick("fp32", cpu, tiny_clip, never)["frozen"]
    on_cuda = precision.pick("auto", cuda, tiny_clip, never)
    assert on_cuda["frozen"] and not on_cuda["trainables"]               # CUDA: frozen bf16, trainables fp32
    monkeypatch.setenv("MEDAD_PRECISION_AUTO", "bf16")
    assert precision.pick("auto", cpu, tiny_clip, never)["frozen"]
    auto = evaluate.parse_args(["--ckpt", "x"])
    assert evaluate.frozen_bf16(auto, cpu, tiny_clip)                      # evaluate.py follows the same verdict


def test_a_real_measurement_on_the_tiny_clip(tiny_clip):
    shapes = precision.clip_shapes(tiny_clip)
    assert shapes == dict(vision_width=64, vision_heads=2, tokens=17, text_width=32, text_heads=2)
    v = precision.measure(shapes)
    for path in ("frozen", "trainables"):
        assert v[path]["fp32_s"] > 0 and v[path]["bf16_s"] > 0
        assert v[path]["rel_err"] < precision.AGREEMENT                    # bf16 agrees with fp32 on this CPU
    assert precision.clip_shapes("ViT-L-14") == dict(vision_width=1024, vision_heads=16, tokens=257, text_width=768,
                                                     text_heads=12)
