"""Calibration: built-in defaults, JSON files from calibrate.py, and robust loading."""

from __future__ import annotations

import json

import pytest

from vramkit.memory.calibration import CALIBRATION_ENV, Calibration


def test_defaults_come_from_the_facts():
    cal = Calibration()
    assert cal.pinned_bandwidth == pytest.approx(55.3e9)
    assert cal.vae_decode_seconds_1mp == pytest.approx(0.086)
    assert "flux-facts" in cal.source


def test_round_trip(tmp_path):
    cal = Calibration(transformer_flops_per_s=6e14, device_name="NVIDIA H100 80GB HBM3", source="test")
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(cal.to_dict()))
    assert Calibration.from_json(path) == cal
    assert Calibration.load(path) == cal


def test_calibrate_py_layout_and_unknown_keys(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(
        json.dumps(
            {
                "calibration": {
                    "step_overhead_s": "0.02",
                    "cuda_attention_materializes_scores": 1,
                    "allocator_reserve_bytes": 1.0e8,
                    "no_such_field": 3,
                },
                "measurements": [],
            }
        )
    )
    cal = Calibration.from_json(path)
    assert cal.step_overhead_s == 0.02
    assert cal.cuda_attention_materializes_scores is True
    assert cal.allocator_reserve_bytes == 100_000_000


def test_env_var_and_bad_files(tmp_path, monkeypatch):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"t5_seconds_512": 0.05}))
    monkeypatch.setenv(CALIBRATION_ENV, str(good))
    assert Calibration.load().t5_seconds_512 == 0.05
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    monkeypatch.setenv(CALIBRATION_ENV, str(bad))
    assert Calibration.load() == Calibration()
    monkeypatch.setenv(CALIBRATION_ENV, str(tmp_path / "missing.json"))
    assert Calibration.load() == Calibration()
