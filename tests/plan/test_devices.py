import json
import subprocess
import sys

import pytest

from deskpod.plan import devices
from deskpod.plan.devices import HARDWARE, get_hardware
from deskpod.plan.shape import InvalidPlanInput


def test_profiles_cite_their_sources_and_the_headline_numbers():
    digits = HARDWARE["digits"]
    assert (digits.memory_bytes, digits.bandwidth, digits.link_bandwidth) == (128e9, 273e9, 25e9)
    assert digits.peak_flops("fp4") == 500e12  # 1 PFLOP FP4 with 2:4 sparsity
    assert HARDWARE["digits-x2"].nodes == 2 and not HARDWARE["digits-x2"].tensor_parallel
    for hw in HARDWARE.values():
        assert hw.source.startswith("https://")
        assert 0 < hw.decode_efficiency <= 1 and 0 < hw.prefill_efficiency <= 1


def test_peak_flops_falls_back_to_the_next_wider_rate():
    h100 = HARDWARE["h100"]
    assert h100.peak_flops("fp4") == h100.peak_flops("fp8") == 1979e12
    assert h100.peak_flops("bf16") == 989.5e12


def test_unknown_hardware_lists_the_profiles():
    with pytest.raises(InvalidPlanInput, match="digits, digits-x2, rtx-5090, h100, h200, this"):
        get_hardware("tpu-v9")


def test_profile_files(tmp_path):
    spec = {"name": "my-box", "memory_gb": 96, "bandwidth_gb_s": 400, "tflops": {"bf16": 100},
            "link_gbit_s": 100, "nodes": 2, "source": "https://example.com/datasheet"}
    path = tmp_path / "box.json"
    path.write_text(json.dumps(spec))
    box = get_hardware(str(path))
    assert (box.name, box.memory_bytes, box.bandwidth, box.nodes) == ("my-box", 96e9, 400e9, 2)
    assert box.link_bandwidth == 100e9 / 8 and box.peak_flops("fp8") == 100e12
    toml = tmp_path / "box.toml"
    toml.write_text('name = "t"\nmemory_gb = 8\nbandwidth_gb_s = 50\nsource = "x"\n[tflops]\nf32 = 1\n')
    assert get_hardware(str(toml)).memory_bytes == 8e9


def test_profile_files_name_what_is_missing(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"name": "x", "memory_gb": 8}')
    with pytest.raises(InvalidPlanInput, match="missing bandwidth_gb_s, tflops, source"):
        get_hardware(str(path))
    with pytest.raises(InvalidPlanInput, match="does not exist"):
        get_hardware(str(tmp_path / "nope.json"))


def test_available_memory_is_mem_available(monkeypatch):
    monkeypatch.setattr(devices, "meminfo", lambda: {"MemTotal": 8 << 30, "MemAvailable": 3 << 30})
    assert devices.available_memory_bytes(cuda=False) == 3 << 30


def test_planning_never_imports_torch():
    # a fresh interpreter: other tests in this process may have imported torch already
    code = (
        "import sys; from deskpod.plan.planner import *; from deskpod.plan import devices; "
        "devices.available_memory_bytes(); assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_this_machine_is_probed_once(monkeypatch):
    calls = []
    monkeypatch.setattr(devices, "probe_bandwidth", lambda: calls.append("bw") or 20e9)
    monkeypatch.setattr(devices, "probe_flops", lambda: calls.append("flops") or 50e9)
    monkeypatch.setattr(devices, "meminfo", lambda: {"MemTotal": 16 << 30, "MemAvailable": 10 << 30})
    devices.this_machine.cache_clear()
    try:
        first, second = get_hardware("this"), get_hardware("this")
    finally:
        devices.this_machine.cache_clear()
    assert first is second and calls == ["bw", "flops"]
    assert first.usable_bytes == 10 << 30 and first.bandwidth == 20e9 and first.peak_flops("bf16") == 50e9


def test_the_probes_measure_something():
    assert devices.probe_bandwidth(nbytes=8 << 20, repeats=1) > 1e8
    assert devices.probe_flops(n=128, repeats=1) > 1e6


@pytest.mark.parametrize("text, expected", [("16GB", 16 * 10**9), ("512mb", 512 * 10**6), ("1000", 1000), ("1.5TB", 1.5e12)])
def test_memory_limit_caps_what_is_available(monkeypatch, text, expected):
    monkeypatch.setenv("DESKPOD_MEMORY_LIMIT", text)
    monkeypatch.setattr(devices, "meminfo", lambda: {"MemAvailable": 2 * 10**12})
    assert devices.available_memory_bytes(cuda=False) == expected


@pytest.mark.parametrize("text", ["lots", "-5GB", "0"])
def test_memory_limit_nonsense_is_refused(monkeypatch, text):
    monkeypatch.setenv("DESKPOD_MEMORY_LIMIT", text)
    with pytest.raises(InvalidPlanInput, match="DESKPOD_MEMORY_LIMIT"):
        devices.available_memory_bytes(cuda=False)
