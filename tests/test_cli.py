"""The ``vramkit`` command line: plan output (text and JSON), probe, and bad input (exit 2, one
line on stderr, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vramkit.cli import COMMANDS, main

GiB = 1024**3
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_json(capsys):
    code, out, err = _run(capsys, "plan", "--model", "flux-dev", "--vram", "8GiB", "--size", "1024x1024", "--json")
    assert code == 0, err
    data = json.loads(out)  # exactly one JSON object
    assert isinstance(data["predicted_peak_vram"], int) and 0 < data["predicted_peak_vram"] <= 8 * GiB
    assert isinstance(data["predicted_peak_ram"], int) and data["predicted_peak_ram"] > 0
    assert isinstance(data["predicted_seconds_per_step"], float) and data["predicted_seconds_per_step"] > 0
    assert isinstance(data["steps"], list) and data["steps"]
    for step in data["steps"]:
        assert isinstance(step["strategy"], str) and isinstance(step["reason"], str) and step["reason"]
        assert step["component"] is None or isinstance(step["component"], str)
    assert isinstance(data["rejected"], list) and data["rejected"]
    assert data["plan"]["predicted"]["peak_vram"] == data["predicted_peak_vram"]
    assert data["plan"]["request"]["width"] == 1024


def test_plan_text(capsys):
    code, out, err = _run(capsys, "plan", "--model", "flux-dev", "--vram", "8GiB", "--size", "1024x1024")
    assert code == 0, err
    assert "FLUX.1-dev" in out
    assert "predicted: peak VRAM" in out and "why:" in out
    assert "denoising_step" in out and "rejected alternatives" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--model", "flux-schnell", "--vram", "6GB", "--size", "512x768", "--batch", "2"],
        ["--model", "flux-fill", "--vram", "12GiB", "--ram", "48GiB", "--quality", "lossless"],
        ["--model", "flux-kontext", "--vram", "16GiB", "--bandwidth", "50GB/s", "--steps", "20"],
        ["--model", "flux-dev+controlnet-union", "--vram", "10 GiB", "--true-cfg"],
    ],
)
def test_plan_models(capsys, argv):
    code, out, err = _run(capsys, "plan", *argv, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["predicted_peak_vram"] <= data["request"]["vram_budget"]


def test_lossless_quality_has_no_lossy_step(capsys):
    code, out, _ = _run(capsys, "plan", "--model", "flux-dev", "--vram", "8GiB", "--quality", "lossless", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["lossless"] and all(s["lossless"] for s in data["steps"])


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["plan", "--model", "flux-dev", "--vram", "0GiB"], "more than zero"),
        (["plan", "--model", "flux-dev", "--vram", "-8GiB"], "more than zero"),
        (["plan", "--model", "flux-dev", "--vram", "eight"], "could not parse"),
        (["plan", "--model", "flux-dev", "--vram", "8GiB", "--ram", "0"], "ram"),
        (["plan", "--model", "flux-dev", "--vram", "8GiB", "--size", "1000x1000"], "1008x1008"),
        (["plan", "--model", "flux-dev", "--vram", "8GiB", "--size", "1024x770"], "1024x768"),
        (["plan", "--model", "flux-dev", "--vram", "8GiB", "--size", "big"], "WIDTHxHEIGHT"),
        (["plan", "--model", "flux-dev", "--vram", "8GiB", "--size", "0x1024"], "positive"),
        (["plan", "--model", "flux-dev", "--vram", "8GiB", "--size", "16384x1024"], "8192"),
        (["plan", "--model", "flux-dev", "--vram", "8GiB", "--batch", "0"], "batch"),
        (["plan", "--model", "flux-dev", "--vram", "8GiB", "--batch", "two"], "batch"),
        (["plan", "--model", "flux-dev", "--vram", "8GiB", "--bandwidth", "0GB/s"], "bandwidth"),
        (["plan", "--model", "flux-pro", "--vram", "8GiB"], "flux-dev"),
        (["plan", "--model", "flux-dev", "--vram", "8GiB", "--quality", "best"], "quality"),
        (["plan", "--vram", "8GiB"], "--model"),
        (["frobnicate"], "invalid choice"),
        ([], "usage"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, argv, needle):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert needle.lower() in err.lower()
    assert "Traceback" not in err
    if argv:
        assert len(err.strip().splitlines()) == 1
        assert err.startswith("vramkit: error:")


def test_infeasible_exits_1(capsys):
    code, out, err = _run(
        capsys,
        "plan",
        "--model",
        "flux-dev",
        "--vram",
        "1GiB",
        "--size",
        "2048x2048",
        "--quality",
        "lossless",
        "--json",
    )
    assert code == 1
    assert "smallest plan needs" in err and len(err.strip().splitlines()) == 1
    data = json.loads(out)
    assert data["minimum_vram"] > GiB


def test_probe(capsys):
    code, out, _ = _run(capsys, "probe", "--no-measure")
    assert code == 0 and "RAM available" in out and "h2d bandwidth" in out
    code, out, _ = _run(capsys, "probe", "--json", "--no-measure")
    data = json.loads(out)
    assert {"device", "total_vram", "free_vram", "ram_available", "pinned_limit", "h2d_bandwidth"} <= set(data)
    assert data["offload_free"] is None or data["offload_free"] >= 0


def test_subcommands_are_a_table():
    assert [c.name for c in COMMANDS][:2] == ["plan", "probe"]


def _subprocess(*argv):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "vramkit.cli", *argv], capture_output=True, text=True, env=env, timeout=120
    )


def test_module_entry_point_bad_input_no_traceback():
    proc = _subprocess("plan", "--model", "flux-dev", "--vram", "8GiB", "--size", "1000x1000")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "1008x1008" in proc.stderr
    proc = _subprocess("plan", "--model", "nope", "--vram", "8GiB")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_module_entry_point_json():
    proc = _subprocess("plan", "--model", "flux-dev", "--vram", "8GiB", "--size", "1024x1024", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["predicted_peak_vram"] <= 8 * GiB
