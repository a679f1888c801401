"""The timed probe behind precision auto: it picks bf16 only when clearly faster, probes once per CPU,
torch, thread count and architecture (cache file and process), survives a corrupt or unwritable
cache, and times the real forward on a head-sized grid."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

import BrainIDLib.bf16_probe as bf16_probe
from BrainIDLib.inference import _autocast, model_input
from BrainIDLib.model import Architecture, BrainIDModel


def model(f_maps: int = 8, levels: int = 3, spacing: float = 2.0) -> BrainIDModel:
    torch.manual_seed(0)
    m = BrainIDModel(Architecture(f_maps=f_maps, levels=levels), {"segmentation": 4}).eval()
    m.metadata = {"input": {"spacing_mm": [spacing] * 3, "bf16": True}}
    return m


def faster(m: BrainIDModel) -> bool:
    """The probe's answer as inference asks for it."""
    return bf16_probe.bf16_faster(m, model_input(m)[0], _autocast)


def key(m: BrainIDModel) -> str:
    return bf16_probe.probe_key(m, bf16_probe.probe_side(m, model_input(m)[0]))


@pytest.fixture
def fake_timer(monkeypatch, tmp_path):
    """time_forward replaced by given timings; each call recorded. Fresh cache and process memory."""
    monkeypatch.setenv("BRAINID_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bf16_probe, "_answers", {})
    calls, timings = [], {"fp32": 1.0, "bf16": 0.5}
    monkeypatch.setattr(bf16_probe, "time_forward", lambda m, side, autocast: calls.append(side) or dict(timings))
    return calls, timings


def test_decides_by_timing_with_a_margin(fake_timer, monkeypatch):
    calls, timings = fake_timer
    assert faster(model()) is True
    for bf16, expected in [(0.95, False), (1.3, False), (0.85, True)]:
        monkeypatch.setattr(bf16_probe, "_answers", {})
        bf16_probe.cache_file().unlink()
        timings["bf16"] = bf16
        assert faster(model()) is expected, bf16
    assert len(calls) == 4


def test_probes_once_per_cpu_torch_threads_and_architecture(fake_timer, monkeypatch):
    calls, timings = fake_timer
    said = []
    assert bf16_probe.bf16_faster(model(), [2.0] * 3, _autocast, lambda f, msg: said.append(msg)) is True
    assert said == ["timing bfloat16 against float32 on a 96^3 grid (once for this CPU and model size)"]
    assert bf16_probe.bf16_faster(model(), [2.0] * 3, _autocast, lambda f, msg: said.append(msg)) is True
    assert len(said) == 1  # answered from memory: nothing to say
    timings["bf16"] = 2.0  # would flip the answer if it were timed again
    assert faster(model()) is True  # the process's answer
    monkeypatch.setattr(bf16_probe, "_answers", {})
    assert faster(model()) is True  # the cache file's (a new process)
    assert len(calls) == 1
    entry = next(iter(json.loads(bf16_probe.cache_file().read_text()).values()))
    assert entry["fp32_s"] == 1.0 and entry["bf16_s"] == 0.5 and entry["bf16_faster"] is True
    assert faster(model(f_maps=16)) is False  # another architecture: timed afresh
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    assert faster(model()) is False  # another thread count: timed afresh
    assert len(calls) == 3 and len(json.loads(bf16_probe.cache_file().read_text())) == 3


def test_corrupt_or_unwritable_cache(fake_timer, monkeypatch, tmp_path, caplog):
    calls, _ = fake_timer
    path = bf16_probe.cache_file()
    path.parent.mkdir(parents=True)
    for junk in ("{not json", "[1, 2]", json.dumps({key(model()): {"bf16_faster": "yes"}})):
        path.write_text(junk)
        monkeypatch.setattr(bf16_probe, "_answers", {})
        assert faster(model()) is True
        assert json.loads(path.read_text())[key(model())]["bf16_faster"] is True  # rewritten
    assert len(calls) == 3
    monkeypatch.setenv("BRAINID_CACHE", str(path))  # a file where the folder should be
    monkeypatch.setattr(bf16_probe, "_answers", {})
    with caplog.at_level(logging.WARNING, logger=bf16_probe.__name__):
        assert faster(model()) is True
    assert "could not keep the bf16 probe's result" in caplog.text


def test_probe_grid_is_a_head_at_the_model_spacing():
    assert bf16_probe.probe_side(model(), [2.0] * 3) == 96  # 192 mm at 2 mm
    assert bf16_probe.probe_side(model(), [1.0, 1.2, 1.2]) == 112  # capped
    assert bf16_probe.probe_side(model(), [8.0] * 3) == 48  # floored
    assert bf16_probe.probe_side(model(levels=5), [1.7] * 3) % 16 == 0  # divisible by the downsampling


def test_real_probe_times_both_precisions(monkeypatch, tmp_path):
    monkeypatch.setenv("BRAINID_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bf16_probe, "_answers", {})
    m = model(spacing=8.0).train()  # the floor grid, 48^3: emulated bf16 (CPUs without avx512_bf16) took 75 s at 96^3
    answer = faster(m)
    assert m.training  # the probe leaves the model's mode as it was
    entry = json.loads(bf16_probe.cache_file().read_text())[key(m)]
    assert 0 < entry["fp32_s"] < 60 and 0 < entry["bf16_s"] < 60
    assert answer is (entry["bf16_s"] < bf16_probe.BF16_MARGIN * entry["fp32_s"]) is bf16_probe.bf16_wins(
        {"fp32": entry["fp32_s"], "bf16": entry["bf16_s"]})


def test_benchmark_reports_whether_the_probe_picks_the_faster(benchmark_module, monkeypatch):
    P = benchmark_module("precision")
    rows = lambda *ratios: [{"network_s": {"fp32": 1.0, "bf16": r}} for r in ratios]  # noqa: E731
    for probe_bf16, ratios, verdict in [(0.7, (0.6, 0.8), "picks bf16; .* 0.70x on average, bf16 faster: agrees"),
                                        (1.2, (1.1, 1.3), "picks fp32; .* 1.20x on average, fp32 faster: agrees"),
                                        (1.0, (0.9, 0.96), "picks fp32; .* 0.93x .*: within its margin"),
                                        (1.0, (0.5, 0.7), "picks fp32; .*: DISAGREES"),
                                        (0.5, (1.1, 1.2), "picks bf16; .*: DISAGREES")]:
        monkeypatch.setattr(bf16_probe, "time_forward", lambda m, side, autocast, b=probe_bf16: {"fp32": 1.0, "bf16": b})
        line = P.probe_verdict(rows(*ratios))
        assert line.startswith("auto | probe on 96^3") and re.search(verdict, line), line
