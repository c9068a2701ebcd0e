"""vramkit doctor: runs without a GPU, exits 0, says what it skipped; JSON output; each finding's fix."""

from __future__ import annotations

import json

import pytest
import torch

from vramkit.profiling import doctor
from vramkit.profiling.doctor import STATUSES, DoctorReport, Finding, doctor_main, format_doctor, run_doctor

_NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def full_run() -> tuple[int, str]:
    """One full doctor run (imports every installed package once), shared by the tests below."""
    lines: list[str] = []
    import argparse

    args = argparse.Namespace(json=True, no_bandwidth=False, no_imports=False)
    code = doctor.doctor_from_args(args, write=lines.append)
    return code, "".join(lines)


def test_doctor_json_is_valid_and_complete(full_run):
    code, out = full_run
    data = json.loads(out)
    assert code == data["exit_code"] == 0
    checks = [f["check"] for f in data["findings"]]
    for name in (
        "torch",
        "diffusers",
        "accelerate",
        "transformers",
        "bitsandbytes",
        "optimum-quanto",
        "torchao",
        "diffusers_hooks",
        "cuda",
        "mps",
        "vram",
        "ram",
        "h2d_bandwidth",
        "expandable_segments",
    ):
        assert name in checks
    for f in data["findings"]:
        assert set(f) == {"check", "status", "detail", "fix"} and f["status"] in STATUSES and f["detail"]
        if f["status"] in ("warn", "fail"):
            assert f["fix"], f"{f['check']} has no fix"
    for dist in ("torch", "diffusers", "accelerate", "transformers", "bitsandbytes", "optimum-quanto", "torchao"):
        assert dist in data["versions"]
    assert data["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    if _NO_GPU:
        assert {"vram", "h2d_bandwidth", "expandable_segments"} <= set(data["skipped"])


@pytest.mark.skipif(not _NO_GPU, reason="checks the output on a machine without a GPU")
def test_doctor_main_on_cpu_exits_0_and_names_what_it_skipped(capsys):
    assert doctor_main(["--no-imports"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("vramkit doctor")
    skipped = [line for line in out.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 1
    for check in ("vram", "h2d_bandwidth", "expandable_segments"):
        assert f"{check} (no CUDA device" in skipped[0]
    assert "[skipped] h2d_bandwidth" in " ".join(out.split())
    assert "result: ready" in out


def test_doctor_main_json_prints_only_json(capsys):
    assert doctor_main(["--json", "--no-imports", "--no-bandwidth"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["status"] in STATUSES and data["findings"]


def test_a_missing_required_package_fails(monkeypatch, capsys):
    real = doctor._installed_version
    monkeypatch.setattr(doctor, "_installed_version", lambda d: None if d == "accelerate" else real(d))
    assert doctor_main(["--no-imports", "--no-bandwidth"]) == 1
    out = capsys.readouterr().out
    assert "[fail]" in out and "accelerate" in out and "pip install -U 'accelerate>=1.0'" in out
    assert "result: FAIL" in out


def test_old_or_broken_optional_packages_warn(monkeypatch):
    real = doctor._installed_version
    monkeypatch.setattr(doctor, "_installed_version", lambda d: "0.1.0" if d == "torchao" else real(d))
    broken = {"optimum.quanto": "ImportError: undefined symbol"}
    monkeypatch.setattr(doctor, "_import_error", lambda m: broken.get(m))
    report = run_doctor(measure_bandwidth=False)
    assert report.get("torchao").status == "warn" and "older than the 0.10" in report.get("torchao").detail
    quanto = report.get("optimum-quanto")
    if report.versions.get("optimum-quanto") is not None:
        assert quanto.status == "warn" and "does not import" in quanto.detail and quanto.fix
    assert report.exit_code == 0


@pytest.mark.parametrize(
    ("env", "initialized", "status", "words"),
    [
        ({}, False, "warn", "must be set before CUDA initializes"),
        ({}, True, "warn", "already initialized in this process"),
        ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128,expandable_segments:True"}, False, "ok", "on"),
        ({"PYTORCH_ALLOC_CONF": "expandable_segments:True"}, True, "ok", "only if it was set before"),
        ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}, False, "warn", "fragments"),
    ],
)
def test_expandable_segments_finding(monkeypatch, env, initialized, status, words):
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    report = DoctorReport()
    doctor._expandable_finding(report, cuda=True, initialized_before=initialized)
    finding = report.get("expandable_segments")
    assert finding.status == status
    assert words in finding.detail + " " + finding.fix
    report = DoctorReport()
    doctor._expandable_finding(report, cuda=False, initialized_before=initialized)
    assert report.get("expandable_segments").status == "skipped"


def test_format_and_exit_code():
    report = DoctorReport(
        findings=[Finding("a", "ok", "fine"), Finding("b", "warn", "hmm", "do this"), Finding("c", "skipped", "no GPU")]
    )
    text = format_doctor(report)
    assert "fix: do this" in text and "skipped: c (no GPU)" in text and "1 ok, 1 warn, 0 fail, 1 skipped" in text
    assert report.exit_code == 0 and report.status == "warn"
    report.findings.append(Finding("d", "fail", "broken", "fix it"))
    assert report.exit_code == 1 and report.status == "fail"
    assert json.loads(json.dumps(report.to_dict()))["skipped"] == ["c"]


def test_version_comparison():
    assert doctor._at_least("2.13.0+cpu", "2.4")
    assert doctor._at_least("0.36.0.dev0", "0.36") and doctor._at_least("0.36.0", "0.36")
    assert not doctor._at_least("0.35.2", "0.36")
    assert doctor._version_key("2.11.0+cu130") == (2, 11, 0)


def test_doctor_reports_stale_offload_files_with_a_fix(tmp_path, monkeypatch):
    import os

    from vramkit.memory.probe import OFFLOAD_SUFFIX, offload_host_tag

    monkeypatch.setenv("VRAMKIT_OFFLOAD_DIR", str(tmp_path))
    report = DoctorReport()
    doctor._offload_finding(report)
    finding = report.get("offload_folder")
    assert finding is not None and finding.status == "ok" and str(tmp_path) in finding.detail
    stale = tmp_path / f"Killed-{offload_host_tag()}-000000000000{OFFLOAD_SUFFIX}"
    stale.write_bytes(b"\0" * (1 << 20))
    old = stale.stat().st_mtime - 3600
    os.utime(stale, (old, old))
    report = DoctorReport()
    doctor._offload_finding(report)
    finding = report.get("offload_folder")
    assert finding is not None
    if os.name == "nt":  # no flock: nothing can be proven stale
        assert finding.status == "ok"
    else:
        assert finding.status == "warn" and "1 offload file(s)" in finding.detail and finding.fix
        assert report.exit_code == 0  # a warning, not a failure
    assert stale.exists()  # the doctor reports, it deletes nothing
