"""The probe on this (GPU-less) machine, and the bandwidth cache."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
import torch

from vramkit.memory.probe import ASSUMED_BANDWIDTH, DeviceProbe, cache_dir, host_memory, probe

# The package exports the function ``probe``, which shadows the module name as an attribute.
probe_mod = importlib.import_module("vramkit.memory.probe")


def test_import_probes_nothing():
    code = (
        "import psutil, sys\n"
        "calls = []\n"
        "orig = psutil.virtual_memory\n"
        "psutil.virtual_memory = lambda *a, **k: calls.append(1) or orig()\n"
        "import vramkit.memory, vramkit.memory.probe, vramkit.planner\n"
        "sys.exit(len(calls))\n"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_cpu_probe():
    found = probe()
    assert isinstance(found, DeviceProbe)
    assert found.device == "cpu" and not found.is_gpu
    assert found.total_vram == found.free_vram == 0
    assert 0 < found.ram_available <= found.ram_total
    assert 0 < found.pinned_limit < found.ram_available
    assert found.h2d_bandwidth == ASSUMED_BANDWIDTH and found.bandwidth_source == "assumed"
    assert any("assumed" in n for n in found.notes)
    json.dumps(found.to_dict())


def test_host_memory():
    total, available, notes = host_memory()
    assert 0 < available <= total
    assert isinstance(notes, list)


def test_bandwidth_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMKIT_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert probe_mod._read_cached_bandwidth("GPU X") is None
    probe_mod._write_cached_bandwidth("GPU X", 12.5e9)
    probe_mod._write_cached_bandwidth("GPU Y", 50e9)
    assert probe_mod._read_cached_bandwidth("GPU X") == 12.5e9
    assert probe_mod._read_cached_bandwidth("GPU Y") == 50e9
    (tmp_path / "c" / "bandwidth.json").write_text("garbage")
    assert probe_mod._read_cached_bandwidth("GPU X") is None


def test_unwritable_cache_is_not_an_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("VRAMKIT_CACHE_DIR", str(blocker / "sub"))
    probe_mod._write_cached_bandwidth("GPU X", 1e9)  # logs, does not raise


def test_xdg_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("VRAMKIT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "vramkit"
