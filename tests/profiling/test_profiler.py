"""vramkit.profile on tiny pipelines: every stage, nothing left behind, report == JSON, PNG, predictions."""

from __future__ import annotations

import json
import struct
import sys
from types import SimpleNamespace

import pytest
import torch

import vramkit
from vramkit.errors import InvalidRequestError, MissingDependencyError, VramkitError
from vramkit.plan import Predicted, StagePrediction
from vramkit.profiling import Profiler, profile
from vramkit.profiling._profiler import budget_of
from vramkit.strategies import PromptCache, VaeSlicing
from vramkit.testing import tiny_call_kwargs, tiny_pipeline
from vramkit.testing.checks import assert_no_hooks

_GPU_KEYS = ("vram_allocated_peak", "vram_reserved_peak", "pinned_peak")
_MIB = 1024**2
_GIB = 1024**3


def _count_scheduler_steps(pipe):
    """Count scheduler.step calls independently of the profiler (a class-level wrapper, so the
    instance stays untouched and the profiler wraps the original)."""
    calls = []
    cls = type(pipe.scheduler)
    original = cls.step

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    return calls, cls, original, counting


@pytest.fixture(scope="module")
def pipes():
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = tiny_pipeline(kind)
        return cache[kind]

    return get


def _profiled(pipe, kind, monkeypatch, **overrides):
    calls, cls, _, counting = _count_scheduler_steps(pipe)
    monkeypatch.setattr(cls, "step", counting)
    kwargs = tiny_call_kwargs(kind)
    kwargs.update(overrides)
    with profile(pipe) as prof:
        pipe(**kwargs)
    monkeypatch.undo()
    return prof, len(calls)


@pytest.mark.parametrize(
    ("kind", "overrides", "expected_steps"),
    [
        ("flux", {}, 2),
        ("img2img", {"num_inference_steps": 4, "strength": 0.5}, 2),
        ("inpaint", {"num_inference_steps": 4, "strength": 0.75}, 3),
        ("fill", {}, 2),
        ("kontext", {}, 2),
        ("controlnet", {}, 2),
        ("multi-controlnet", {}, 2),
    ],
)
def test_every_stage_is_recorded(pipes, monkeypatch, kind, overrides, expected_steps):
    pipe = pipes(kind)
    prof, scheduler_steps = _profiled(pipe, kind, monkeypatch, **overrides)
    d = prof.to_dict()
    names = [s["name"] for s in d["stages"]]
    assert scheduler_steps == expected_steps == pipe._num_timesteps
    assert names[0] == "text_encoding" and names[-1] == "vae_decode"
    assert names.count("denoising_step") == scheduler_steps == d["num_steps"] == prof.num_steps
    assert names.count("vae_decode") == 1
    assert ("vae_encode" in names) == (kind != "flux")  # every other kind VAE-encodes an input image
    steps = [s for s in d["stages"] if s["name"] == "denoising_step"]
    assert [s["index"] for s in steps] == list(range(expected_steps))
    assert [s["label"] for s in steps] == [f"denoising_step[{i}]" for i in range(expected_steps)]
    for s in steps:
        assert s["calls"]["transformer"] == 1
        if "controlnet" in kind:
            assert s["calls"]["controlnet"] == 1
    previous_end = 0.0
    for s in d["stages"]:
        assert s["seconds"] >= 0 and s["end"] >= s["start"] >= previous_end
        assert s["seconds"] <= s["end"] - s["start"] + 1e-9
        assert s["ram_peak"] > 0
        previous_end = s["end"]
        if not torch.cuda.is_available():
            for key in _GPU_KEYS:
                assert key not in s, f"{key} must be absent without CUDA, not {s.get(key)!r}"
    assert d["total_seconds"] >= previous_end
    comps = d["components"]
    assert comps["transformer"]["calls"] == expected_steps
    assert comps["text_encoder"]["calls"] == comps["text_encoder_2"]["calls"] == 1
    assert comps["vae"]["calls"] == names.count("vae_encode") + 1
    assert all(c["seconds"] >= 0 for c in comps.values())
    if "controlnet" in kind:
        assert comps["controlnet"]["calls"] == expected_steps


def test_true_cfg_two_transformer_calls_are_one_step(pipes, monkeypatch):
    pipe = pipes("flux")
    prof, scheduler_steps = _profiled(pipe, "flux", monkeypatch, negative_prompt="blurry", true_cfg_scale=2.0)
    d = prof.to_dict()
    steps = [s for s in d["stages"] if s["name"] == "denoising_step"]
    assert len(steps) == scheduler_steps == 2
    assert all(s["calls"]["transformer"] == 2 for s in steps)
    # positive and negative prompt: two text encodings
    assert [s["label"] for s in d["stages"] if s["name"] == "text_encoding"] == ["text_encoding"] * 2


def test_timeline_and_device_without_gpu(pipes):
    pipe = pipes("flux")
    with profile(pipe, sample_interval=0.001) as prof:
        pipe(**tiny_call_kwargs("flux"))
    d = prof.to_dict()
    timeline = d["timeline"]
    assert len(timeline) >= 2 * len(d["stages"])  # boundary readings at least
    assert all(a["t"] <= b["t"] for a, b in zip(timeline, timeline[1:]))
    assert all(s["ram"] > 0 and s["t"] >= 0 for s in timeline)
    assert d["peak"]["ram"] == max(s["ram"] for s in timeline)
    assert all(s["ram_peak"] <= d["peak"]["ram"] for s in d["stages"])
    if not torch.cuda.is_available():
        assert d["device"] == {"type": "cpu", "gpu": False}
        assert set(d["peak"]) == {"ram"}
        assert all(set(s) == {"t", "ram"} for s in timeline)
    assert "budget" not in d and "predicted" not in d and "over_prediction" not in d
    json.loads(json.dumps(d))  # JSON-safe


def test_no_background_sampler(pipes):
    pipe = pipes("flux")
    with profile(pipe, sample_interval=None) as prof:
        pipe(**tiny_call_kwargs("flux"))
    assert prof.num_steps == 2 and prof._sampler is None
    with pytest.raises(InvalidRequestError, match="sample_interval"):
        profile(pipe, sample_interval=0)


def _instance_patches(pipe):
    found = {}
    for name, module in vramkit._pipeline.model_components(pipe).items():
        for attr in ("forward", "encode", "decode"):
            if attr in module.__dict__:
                found[f"{name}.{attr}"] = module.__dict__[attr]
    if "step" in pipe.scheduler.__dict__:
        found["scheduler.step"] = pipe.scheduler.__dict__["step"]
    if "encode_prompt" in pipe.__dict__:
        found["encode_prompt"] = pipe.__dict__["encode_prompt"]
    return found


@pytest.mark.parametrize("kind", ["flux", "controlnet"])
def test_pipeline_is_exactly_as_before(pipes, kind):
    pipe = pipes(kind)
    cls = type(pipe)
    reference = pipe(**tiny_call_kwargs(kind)).images
    with profile(pipe) as prof:
        assert "forward" in pipe.transformer.__dict__ and "decode" in pipe.vae.__dict__
        out = pipe(**tiny_call_kwargs(kind)).images
    assert torch.equal(out, reference), "profiling must not change the output"
    assert type(pipe) is cls
    assert _instance_patches(pipe) == {}
    assert_no_hooks(pipe, cls)
    with pytest.raises(VramkitError, match="already recorded"):
        prof.start()


def test_wrappers_removed_when_the_call_fails(monkeypatch):
    pipe = tiny_pipeline("flux")
    cls = type(pipe)

    def fail(self, *args, **kwargs):
        raise RuntimeError("boom in the middle of a step")

    monkeypatch.setattr(type(pipe.transformer), "forward", fail)
    with pytest.raises(RuntimeError, match="boom"), profile(pipe) as prof:
        pipe(**tiny_call_kwargs("flux"))
    monkeypatch.undo()
    assert _instance_patches(pipe) == {} and type(pipe) is cls
    d = prof.to_dict()
    assert [s["name"] for s in d["stages"]] == ["text_encoding", "denoising_step"]
    assert d["stages"][-1]["end"] is not None
    assert any("still open" in n for n in d["notes"])


def test_prompt_cache_wrapper_is_put_back_by_identity():
    pipe = tiny_pipeline("flux")
    vramkit.optimize(pipe, strategies=[PromptCache(release="cpu")])
    cls = type(pipe)
    cache = pipe.__dict__["encode_prompt"]
    with profile(pipe) as prof:
        pipe(**tiny_call_kwargs("flux"))
        pipe(**tiny_call_kwargs("flux"))  # a cache hit: a text_encoding stage with no encoder call
    assert pipe.__dict__["encode_prompt"] is cache and pipe.encode_prompt is cache
    assert type(pipe) is cls
    assert cache.hits >= 1
    d = prof.to_dict()
    encodings = [s for s in d["stages"] if s["name"] == "text_encoding"]
    assert len(encodings) == 2 and encodings[1]["calls"] == {}
    assert d["num_steps"] == 4
    assert set(_instance_patches(pipe)) == {"encode_prompt"}
    vramkit.restore(pipe)


def _row_tokens(report: str, label: str) -> list[str]:
    rows = [line.split() for line in report.splitlines() if line.split()[:1] == [label]]
    assert len(rows) == 1, f"expected one row {label!r} in:\n{report}"
    return rows[0][1:]


def _expected_tokens(d: dict, row: dict) -> list[str]:
    tokens = [f"{row['seconds']:.4f}", f"{row['ram_peak'] / _MIB:.1f}"]
    if d["device"]["gpu"]:
        tokens += [f"{row[k] / _MIB:.1f}" for k in ("vram_allocated_peak", "vram_reserved_peak")]
    if any("pinned_peak" in s for s in d["stages"]):
        tokens.append(f"{row['pinned_peak'] / _MIB:.1f}")
    if any("h2d_bytes" in s for s in d["stages"]):
        tokens.append(f"{row['h2d_bytes'] / _MIB:.1f}")
    if "predicted" in d and "predicted" in row:
        p = row["predicted"]
        tokens += [f"{p['vram'] / _MIB:.1f}", f"{p['ram'] / _MIB:.1f}", f"{p['seconds']:.4f}"]
    elif "predicted" in d:
        tokens += ["-", "-", "-"]  # a stage the plan made no prediction for
    if row.get("over_prediction"):
        tokens.append("OVER")
    return tokens


def _check_agreement(prof) -> None:
    d = prof.to_dict()
    report = prof.report(steps="all")
    for row in d["stages"]:
        assert _row_tokens(report, row["label"]) == _expected_tokens(d, row)
    for name, comp in d["components"].items():
        expected = [name, "calls", str(comp["calls"]), "seconds", f"{comp['seconds']:.4f}"]
        assert expected in [line.split() for line in report.splitlines()]
    assert f"{d['total_seconds']:.4f} s" in report.splitlines()[0]
    assert f"RAM {d['peak']['ram'] / _MIB:.1f} MiB" in report
    for note in d["notes"]:
        assert f"note: {note}" in report
    # The summary row: mean seconds, largest peaks.
    summary = d["summary"]["denoising_step"]
    summary_row = {**summary, "seconds": summary["seconds_mean"]}
    label = f"denoising_step[{summary['first']}..{summary['last']}]"
    assert _row_tokens(prof.report(steps="summary"), label) == _expected_tokens(d, summary_row)
    assert summary["count"] == d["num_steps"]
    step_seconds = [s["seconds"] for s in d["stages"] if s["name"] == "denoising_step"]
    assert summary["seconds_total"] == pytest.approx(sum(step_seconds))
    html = prof._repr_html_()
    assert html.startswith("<div>") and "<table>" in html
    for row in d["stages"]:
        assert f"<td>{row['label']}</td>" in html
        for token in _expected_tokens(d, row)[: -1 if row.get("over_prediction") else None]:
            assert f'<td style="text-align:right">{token}</td>' in html


def test_report_and_json_agree(pipes):
    pipe = pipes("controlnet")
    with profile(pipe) as prof:
        pipe(**tiny_call_kwargs("controlnet"))
    _check_agreement(prof)
    assert str(prof) == prof.report()
    with pytest.raises(InvalidRequestError):
        prof.report(steps="some")


def test_auto_report_summarizes_long_runs(pipes):
    pipe = pipes("flux")
    kwargs = tiny_call_kwargs("flux")
    kwargs["num_inference_steps"] = 14
    with profile(pipe, sample_interval=None) as prof:
        pipe(**kwargs)
    auto = prof.report()
    assert "denoising_step[0..13]" in auto and "denoising_step[3]" not in auto
    assert "denoising_step[13]" in prof.report(steps="all")


def _with_predictions(pipe, *, step_ram: int) -> vramkit.Plan:
    vramkit.optimize(pipe, strategies=[VaeSlicing()])
    plan = vramkit.applied_plan(pipe)
    assert plan is not None and plan.predicted is None
    big = 512 * _GIB
    plan.predicted = Predicted(
        peak_vram=6 * _GIB,
        peak_ram=big,
        seconds_per_step=0.5,
        seconds_per_image=2.0,
        num_inference_steps=2,
        stages={
            "text_encoding": StagePrediction(vram=5 * _GIB, ram=big, seconds=0.25),
            "denoising_step": StagePrediction(vram=6 * _GIB, ram=step_ram, seconds=0.5),
            "vae_decode": StagePrediction(vram=3 * _GIB, ram=big, seconds=0.125),
        },
    )
    plan.request.update({"vram_budget": 8 * _GIB, "ram_budget": 64 * _GIB})  # as the planner records them
    return plan


def test_predicted_next_to_measured_and_over_flagged(tmp_path):
    pipe = tiny_pipeline("flux")
    _with_predictions(pipe, step_ram=1 * _MIB)  # no process runs in 1 MiB of RSS: forced OVER
    with profile(pipe) as prof:
        pipe(**tiny_call_kwargs("flux"))
    d = prof.to_dict()
    assert d["budget"] == {"vram": 8 * _GIB, "ram": 64 * _GIB}
    assert d["predicted"]["stages"]["denoising_step"]["ram"] == _MIB
    assert d["over_prediction"] is True
    for s in d["stages"]:
        assert s["predicted"] == d["predicted"]["stages"][s["name"]]
        if s["name"] == "denoising_step":
            assert s["over_prediction"] is True and s["over"] == ["ram"]
        else:
            assert s["over_prediction"] is False and s["over"] == []
    assert d["summary"]["denoising_step"]["over_prediction"] is True
    assert d["summary"]["text_encoding"]["over_prediction"] is False
    report = prof.report(steps="all")
    assert _row_tokens(report, "denoising_step[0]")[-1] == "OVER"
    assert "OVER" not in _row_tokens(report, "text_encoding")
    assert "pred RAM MiB" in report and "budget: VRAM 8192.0 MiB, RAM 65536.0 MiB" in report
    assert "OVER" in _row_tokens(prof.report(steps="summary"), "denoising_step[0..1]")
    _check_agreement(prof)
    prof.plot(tmp_path / "over.png")
    assert _png_size(tmp_path / "over.png") == (1200, 600)
    vramkit.restore(pipe)
    assert type(pipe) is type(tiny_pipeline("flux"))


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        ({}, None),
        ({"vram_budget": 8 * _GIB, "ram_budget": 32 * _GIB}, {"vram": 8 * _GIB, "ram": 32 * _GIB}),
        ({"vram": "8GiB", "ram": None}, {"vram": 8 * _GIB}),
        ({"budget": {"vram": 1024, "ram": "1KiB"}}, {"vram": 1024, "ram": 1024}),
        ({"vram": "not a size", "ram": -5}, None),
    ],
)
def test_budget_from_the_plan_request(request_, expected):
    assert budget_of(vramkit.Plan(request=request_)) == expected
    assert budget_of(None) is None


def test_plan_without_predictions_is_said():
    pipe = tiny_pipeline("flux")
    vramkit.optimize(pipe, strategies=[VaeSlicing()])
    with profile(pipe, sample_interval=None) as prof:
        pipe(**tiny_call_kwargs("flux"))
    d = prof.to_dict()
    assert "predicted" not in d and all("predicted" not in s for s in d["stages"])
    assert any("no predictions" in n for n in d["notes"])
    vramkit.restore(pipe)


def test_h2d_bytes_from_the_streaming_engine(monkeypatch):
    """With vramkit's engine streaming a component, each stage reports the bytes it copied in."""
    pipe = tiny_pipeline("flux")
    stats = SimpleNamespace(bytes_copied=0)
    streamer = SimpleNamespace(stats=stats, pinned_nbytes=0)
    per_forward = 3 * _MIB

    def copy_in(*_):
        stats.bytes_copied += per_forward

    handle = pipe.transformer.register_forward_hook(copy_in)
    from vramkit.profiling import _meters

    monkeypatch.setattr(_meters, "_streamers", lambda modules: [streamer])
    try:
        with profile(pipe) as prof:
            pipe(**tiny_call_kwargs("flux"))
    finally:
        handle.remove()
    d = prof.to_dict()
    for s in d["stages"]:
        assert s["h2d_bytes"] == (per_forward if s["name"] == "denoising_step" else 0)
    assert d["summary"]["denoising_step"]["h2d_bytes"] == 2 * per_forward
    assert "H2D MiB" in prof.report()
    _check_agreement(prof)


def _png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    from PIL import Image

    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size == (width, height)
    return width, height


@pytest.mark.parametrize(("width", "height"), [(1200, 600), (801, 433)])
def test_plot_writes_a_png_of_the_stated_size(pipes, tmp_path, width, height):
    pytest.importorskip("matplotlib")
    pipe = pipes("fill")
    with profile(pipe) as prof:
        pipe(**tiny_call_kwargs("fill"))
    path = tmp_path / "timeline.png"
    if (width, height) == (1200, 600):
        prof.plot(path)
    else:
        prof.plot(str(path), width=width, height=height)
    assert _png_size(path) == (width, height)
    with pytest.raises(InvalidRequestError):
        prof.plot(path, width=10)


def test_plot_without_matplotlib_says_how_to_install(pipes, monkeypatch, tmp_path):
    pipe = pipes("flux")
    with profile(pipe, sample_interval=None) as prof:
        pipe(**tiny_call_kwargs("flux"))
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'vramkit\[plot\]'") as info:
        prof.plot(tmp_path / "x.png")
    assert isinstance(info.value, ImportError)
    assert "pip install matplotlib" in str(info.value)
    assert not (tmp_path / "x.png").exists()
    assert prof.report()  # the rest works without matplotlib


def test_profiler_is_exported(pipes):
    assert vramkit.profiling.profile is profile
    assert isinstance(profile(pipes("flux")), Profiler)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sync", [False, True])
def test_gpu_columns_on_cuda(tmp_path, sync):
    pipe = tiny_pipeline("controlnet").to("cuda")
    pipe(**tiny_call_kwargs("controlnet"))
    with profile(pipe, sync=sync) as prof:
        pipe(**tiny_call_kwargs("controlnet"))
    d = prof.to_dict()
    assert d["device"]["type"] == "cuda" and d["device"]["gpu"] is True and d["device"]["name"]
    for s in d["stages"]:
        assert s["vram_reserved_peak"] >= s["vram_allocated_peak"] > 0
    assert d["peak"]["vram_reserved"] >= max(s["vram_reserved_peak"] for s in d["stages"])
    assert all("vram_allocated" in s and "vram_reserved" in s for s in d["timeline"])
    if hasattr(torch.cuda, "host_memory_stats"):
        assert all("pinned_peak" in s for s in d["stages"])
    _check_agreement(prof)
    prof.plot(tmp_path / "gpu.png")
    assert _png_size(tmp_path / "gpu.png") == (1200, 600)
    assert _instance_patches(pipe) == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_over_prediction_on_vram():
    pipe = tiny_pipeline("flux").to("cuda")
    plan = _with_predictions(pipe, step_ram=512 * _GIB)
    plan.predicted = Predicted(
        peak_vram=1,
        peak_ram=512 * _GIB,
        seconds_per_step=1.0,
        seconds_per_image=1.0,
        num_inference_steps=2,
        stages={"denoising_step": StagePrediction(vram=1, ram=512 * _GIB, seconds=1.0)},
    )
    with profile(pipe) as prof:
        pipe(**tiny_call_kwargs("flux"))
    d = prof.to_dict()
    steps = [s for s in d["stages"] if s["name"] == "denoising_step"]
    assert steps and all(s["over"] == ["vram"] for s in steps)
    assert any("no prediction for: text_encoding, vae_decode" in n for n in d["notes"])
    _check_agreement(prof)
    vramkit.restore(pipe)


def test_report_while_recording_and_start_stop(pipes):
    pipe = pipes("flux")
    prof = profile(pipe, sample_interval=None)
    prof.start()
    try:
        pipe(**tiny_call_kwargs("flux"))
        assert prof.recording
        assert "still recording" in prof.report().splitlines()[0]
        assert prof.to_dict()["total_seconds"] is None
    finally:
        prof.stop()
    assert not prof.recording and prof.total_seconds is not None
    assert _instance_patches(pipe) == {}
    prof.stop()  # a second stop does nothing
