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


def test_offload_free_is_read_at_the_nearest_existing_folder(tmp_path, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    seen = []

    def disk_usage(path):
        seen.append(path)
        return usage(100, 40, 60)

    monkeypatch.setattr(probe_mod.shutil, "disk_usage", disk_usage)
    monkeypatch.setenv("VRAMKIT_OFFLOAD_DIR", str(tmp_path / "not" / "yet"))
    assert probe_mod.default_offload_folder() == tmp_path / "not" / "yet"
    assert probe_mod.offload_free_bytes() == 60
    assert seen == [tmp_path]  # the folder is only created when something is written
    assert not (tmp_path / "not").exists()
    assert probe_mod.offload_free_bytes(tmp_path / "x") == 60 and seen[-1] == tmp_path


def test_offload_free_unreadable_is_unknown(tmp_path, monkeypatch):
    def disk_usage(path):
        raise PermissionError("no")

    monkeypatch.setattr(probe_mod.shutil, "disk_usage", disk_usage)
    assert probe_mod.offload_free_bytes(tmp_path) is None


def test_probe_reports_the_offload_folder_free_space(tmp_path, monkeypatch):
    import shutil

    from vramkit.engine import host

    monkeypatch.setenv("VRAMKIT_OFFLOAD_DIR", str(tmp_path / "offload"))
    found = probe(measure_bandwidth=False)
    assert isinstance(found.offload_free, int) and found.offload_free > 0
    # The same disk: within what other processes may write meanwhile.
    assert abs(found.offload_free - shutil.disk_usage(tmp_path).free) < 1 << 30
    assert found.to_dict()["offload_free"] == found.offload_free
    # The engine writes where the probe looks.
    assert host.default_offload_folder is probe_mod.default_offload_folder
    assert host.default_offload_folder() == tmp_path / "offload"
