"""The benchmark scripts' harnesses run end to end on the tiny CPU pipelines (checks the scripts, not
the figures), and the committed results render."""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], out: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OUT=str(out), PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_grid_tiny_writes_rows_with_predictions_and_an_example_report(tmp_path: Path) -> None:
    proc = _run(
        [
            "benchmarks/grid.py",
            "--tiny",
            "--pipelines",
            "flux-dev,flux-dev+controlnet-union",
            "--control-modes",
            "2",
            "--budgets",
            "6",
            "--sizes",
            "32x32",
            "--example",
            "6:32x32",
            "--repeat",
            "3",
            "--overhead-reps",
            "1",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "grid_flux-dev_tiny.json").read_text())
    (row,) = data["rows"]
    assert row["status"] == "ok" and row["predicted_peak"] > 0
    assert {"text_encoding", "denoising_step", "vae_decode"} <= set(row["stages"])
    assert data["example"]["repeat"]["summary"]["calls"] == 3
    assert (tmp_path / "profile_6gib_32x32.txt").read_text().startswith("vramkit profile")
    cn = json.loads((tmp_path / "grid_flux-dev_controlnet-union_tiny.json").read_text())
    assert cn["control_modes"] == 2 and cn["rows"][0]["status"] == "ok"


def test_bench_compile_tiny_compiles_without_recompiling(tmp_path: Path) -> None:
    proc = _run(["benchmarks/bench_compile.py", "--tiny", "--backend", "eager", "--steps", "3", "--warmup", "2"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "compile_32_tiny.json").read_text())
    assert data["status"] == "ok", data.get("error")
    assert data["streamed_blocks"] > 0 and data["compiled_blocks"] > 0
    assert data["no_recompilation"] and data["rel_l2_err"] == 0.0


def test_bench_host_ram_keeps_fp8_originals_out_of_ram_with_disk(tmp_path: Path) -> None:
    """One double- and one single-stream block at full width (about 1.3 GiB in bf16), on the CPU."""
    proc = _run(["benchmarks/bench_host_ram.py", "--double", "1", "--single", "1", "--device", "cpu",
                 "--offload-dir", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["originals"]: r for r in json.loads((tmp_path / "host_ram.json").read_text())["results"]}
    assert "error" not in rows["ram"] and "error" not in rows["disk"], rows
    ram, disk = rows["ram"], rows["disk"]
    weights = ram["weights_gib"]
    # Kept in RAM, the bf16 originals stay beside the fp8 copy; in the file, they leave RAM.
    assert disk["rss_after_apply_gib"] < ram["rss_after_apply_gib"] - 0.7 * weights
    assert disk["peak_rss_gib"] < ram["peak_rss_gib"]
    # Either way the restore ends where it started, without a second copy of the weights on the way.
    for r in (ram, disk):
        assert abs(r["rss_after_restore_gib"] - r["rss_before_gib"]) < 0.3 * weights  # allocator slack
        assert r["restore_peak_rss_gib"] < r["rss_before_gib"] + 0.8 * weights
    assert not list(tmp_path.glob("*.vramkit-offload*"))


def test_committed_results_render() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/render_tables.py"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Predicted vs measured peak VRAM: flux-dev" in proc.stdout
    committed = (ROOT / "benchmarks" / "results" / "TABLES.md").read_text()
    assert committed == proc.stdout, "benchmarks/results/TABLES.md is stale: run benchmarks/render_tables.py"


def _benchmark_script(name: str):  # type: ignore[no-untyped-def]
    """A script of benchmarks/ as a module (they import each other from their folder)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_a_run_resumed_on_other_machines_says_so() -> None:
    render_tables = _benchmark_script("render_tables")
    env = {"command": "c1"}
    assert render_tables._commands_text({"environment": env}) == "Command: `c1`; "
    one = render_tables._commands_text({"environment": env, "commands": ["c1", "c2"]})
    assert one.startswith("Commands (one run over 2 calls on one machine, resumed): `c1`; `c2`")
    two = render_tables._commands_text({"environment": env, "commands": ["c1", "c2", "c3"], "machines": 2})
    assert two.startswith("Commands (one run over 3 calls on 2 machines of one GPU model, resumed)")


def test_floor_uses_the_resident_step_of_the_rows_storage() -> None:
    rt = _benchmark_script("render_tables")

    def row(config: str, budget: float, step: float, streamed: int, storage: str | None) -> dict:
        plan = {"steps": [{"strategy": "BlockStreaming", "component": "transformer",
                           "config": {"type": "BlockStreaming", "storage": storage}}]}
        return {"config": config, "budget_gib": budget, "status": "ok", "seconds_per_step": step,
                "transformer_streamed_bytes": streamed, "plan": plan}

    ref = {"config": "unoptimized", "budget_gib": 0.0, "status": "ok", "seconds_per_step": 0.10,
           "pinned_bandwidth": 50e9}
    bf16_8 = row("vramkit", 8, 0.31, 15_000_000_000, None)
    fp8_8 = row("vramkit-fp8", 8, 0.13, 2_000_000_000, "fp8")
    fp8_16 = row("vramkit-fp8", 16, 0.12, 0, "fp8")
    # bf16: the reference's resident step against the copy time (15 GB / 50 GB/s = 0.3 s).
    assert rt.floor_seconds([ref, bf16_8, fp8_8], bf16_8) == pytest.approx(0.3)
    # fp8 without an all-resident fp8 row in the run: the bf16 step, a lower bound (copy 0.04 s).
    assert rt.floor_seconds([ref, bf16_8, fp8_8], fp8_8) == pytest.approx(0.10)
    # With one: its step is the fp8 compute term, for every fp8 row of the run.
    results = [ref, bf16_8, fp8_8, fp8_16]
    assert rt.resident_seconds(results, "fp8") == pytest.approx(0.12)
    assert rt.floor_seconds(results, fp8_8) == pytest.approx(0.12)
    assert rt.floor_seconds(results, bf16_8) == pytest.approx(0.3)
    # A row streamed with storage as loaded never takes the fp8 term, and no reference means no floor.
    assert rt.resident_seconds(results, None) == pytest.approx(0.10)
    assert rt.floor_seconds([bf16_8, fp8_16], fp8_16) is None


def test_bench_pipeline_tiny_times_steps_from_step_events(tmp_path: Path) -> None:
    proc = _run(["benchmarks/bench_pipeline.py", "--tiny", "--budgets", "8", "--configs", "vramkit",
                 "--steps", "5", "--no-reference"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads((tmp_path / "pipeline_1024_tiny.json").read_text())["results"]
    assert row["status"] == "ok", row.get("error")
    # One gap between each pair of consecutive step ends of the 5-step call.
    assert row["step_timing"] == "step events" and len(row["step_seconds"]) == 4
    assert all(g > 0 for g in row["step_seconds"])
    assert row["seconds_per_step"] == pytest.approx(statistics.fmean(row["step_seconds"]))
    assert row["seconds_per_step_median"] == statistics.median(row["step_seconds"])
    assert row["seconds_per_image_28"] > row["seconds_n_steps"]


def test_bench_pipeline_resumes_a_run_and_stops_before_its_deadline(tmp_path: Path) -> None:
    first = tmp_path / "first"
    base = ["benchmarks/bench_pipeline.py", "--tiny", "--budgets", "8", "--steps", "3", "--no-reference"]
    proc = _run([*base, "--configs", "vramkit"], first)
    assert proc.returncode == 0, proc.stderr[-2000:]
    earlier = first / "pipeline_1024_tiny.json"
    # A deadline too short for any configuration: nothing starts, the earlier rows are kept.
    second = tmp_path / "second"
    proc = _run([*base, "--configs", "vramkit,diffusers-leaf-stream", "--resume", str(earlier), "--deadline", "10"],
                second)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((second / "pipeline_1024_tiny.json").read_text())
    assert [r["config"] for r in data["results"]] == ["vramkit"]
    assert "not started: 8 diffusers-leaf-stream" in proc.stdout + proc.stderr
    # Resumed without a deadline: only the missing configuration runs, appended after the first.
    third = tmp_path / "third"
    proc = _run([*base, "--configs", "vramkit,diffusers-leaf-stream", "--resume", str(earlier)], third)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((third / "pipeline_1024_tiny.json").read_text())
    assert [r["config"] for r in data["results"]] == ["vramkit", "diffusers-leaf-stream"]
    assert all(r["status"] == "ok" for r in data["results"])
    assert len(data["commands"]) == 2 and "--resume" in data["commands"][1]
    # A mistyped file is an error, not a silent fresh start; so is a file measured with other --steps.
    proc = _run([*base, "--configs", "vramkit", "--resume", str(tmp_path / "typo.json")], tmp_path / "fourth")
    assert proc.returncode != 0 and "no such file" in proc.stderr
    proc = _run([*base[:-3], "--steps", "4", "--no-reference", "--configs", "vramkit", "--resume", str(earlier)],
                tmp_path / "fifth")
    assert proc.returncode != 0 and "another --steps" in proc.stderr


def test_bench_pipeline_sweeps_budget_blind_options_in_one_child(tmp_path: Path) -> None:
    proc = _run(["benchmarks/bench_pipeline.py", "--tiny", "--budgets", "6,12,8", "--steps", "3", "--no-reference",
                 "--configs", "diffusers-leaf-stream,vramkit"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "pipeline_1024_tiny.json").read_text())["results"]
    # diffusers' group offload never reads the free memory: one child, budgets from the largest down;
    # vramkit plans for each budget: a child of its own per budget, in the order given.
    assert [(r["config"], r["budget_gib"], r["harness"]) for r in rows] == [
        ("diffusers-leaf-stream", 12, "sweep"), ("diffusers-leaf-stream", 8, "sweep"),
        ("diffusers-leaf-stream", 6, "sweep"),
        ("vramkit", 6, "fork"), ("vramkit", 12, "fork"), ("vramkit", 8, "fork"),
    ]
    assert all(r["status"] == "ok" for r in rows)
    # The sweep applied once (its rows share one apply); each vramkit child applied its own plan.
    assert len({r["apply_seconds"] for r in rows[:3]}) == 1
    assert len({r["apply_seconds"] for r in rows[3:]}) == 3
    assert len({r["child_wall_seconds"] for r in rows[:3]}) == 1


def test_bench_pipeline_weights_cache_round_trips_a_pipeline(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_pipeline
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import torch

    from vramkit.testing import tiny_pipeline

    saved, other = tiny_pipeline("flux", seed=0), tiny_pipeline("flux", seed=1)
    path = str(tmp_path / "weights.bin")
    bench_pipeline.save_weights(saved, path, {"model": "tiny"})
    loaded = bench_pipeline.load_weights(other, path)
    for name in bench_pipeline.COMPONENTS:
        want, got = getattr(saved, name), getattr(loaded, name)
        assert want.state_dict().keys() == got.state_dict().keys()
        assert all(torch.equal(t, got.state_dict()[k]) for k, t in want.state_dict().items()), name
        assert {p.device.type for p in got.parameters()} == {"cpu"}
    t5 = loaded.text_encoder_2
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # the tie survives to_empty
    kwargs = dict(prompt="a fox", num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                  output_type="pt")
    want = saved(**kwargs, generator=torch.Generator().manual_seed(0)).images
    got = loaded(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(want, got)
    # A file that does not match the architectures is refused, not misread.
    index = json.loads(Path(path + ".json").read_text())
    index["entries"][0]["shape"] = [1]
    Path(path + ".json").write_text(json.dumps(index))
    with pytest.raises(SystemExit, match="does not hold"):
        bench_pipeline.load_weights(tiny_pipeline("flux", seed=1), path)
    # So is a file cut short (a full disk while writing, a copy interrupted).
    index["entries"][0]["shape"] = list(saved.text_encoder.state_dict()[index["entries"][0]["name"][6:]].shape)
    Path(path + ".json").write_text(json.dumps(index))
    with open(path, "r+b") as f:
        f.truncate(index["nbytes"] - 10)
    with pytest.raises(SystemExit, match="truncated"):
        bench_pipeline.load_weights(tiny_pipeline("flux", seed=1), path)


def test_bench_pipeline_forked_child_runs_its_exit_finalizers_not_the_parents(tmp_path: Path) -> None:
    """A forked child exits through os._exit: the finalizers a normal exit runs (vramkit deletes its
    offload files there) must still run for the child's objects, or the next child plans for a
    fuller disk; the parent's own finalizers are not the child's to run."""
    import weakref

    bench_pipeline = _benchmark_script("bench_pipeline")

    class Held:
        pass

    parents = Held()
    weakref.finalize(parents, (tmp_path / "parent").write_text, "ran")

    def target(emit: object) -> None:
        held = Held()  # alive until exit, like an offload file nobody restored
        target.held = held  # type: ignore[attr-defined]
        weakref.finalize(held, (tmp_path / "child").write_text, "ran")
        emit({"config": "x", "budget_gib": 1.0})  # type: ignore[operator]

    rows, outcome, current, how = bench_pipeline.run_forked(target, 60, None, str(tmp_path / "child.log"))
    assert outcome is None and rows == [{"config": "x", "budget_gib": 1.0}] and how == "exit status 0"
    assert (tmp_path / "child").read_text() == "ran"
    assert not (tmp_path / "parent").exists()


def test_bench_pipeline_times_each_budget_of_a_child(tmp_path: Path) -> None:
    import time

    bench_pipeline = _benchmark_script("bench_pipeline")

    def two_budgets(emit):  # type: ignore[no-untyped-def]
        for budget in (12.0, 8.0):
            emit({"_start": budget})
            time.sleep(0.8)  # each within the per-budget limit, the two together past it
            emit({"config": "x", "budget_gib": budget, "status": "ok"})

    rows, outcome, current, how = bench_pipeline.run_forked(two_budgets, 0.6 * 2, None, str(tmp_path / "0.log"))
    assert [r["budget_gib"] for r in rows] == [12.0, 8.0] and outcome is None and current is None

    def slow_second(emit):  # type: ignore[no-untyped-def]
        emit({"_start": 12.0})
        time.sleep(0.8)
        emit({"config": "x", "budget_gib": 12.0, "status": "ok"})
        emit({"_start": 8.0})
        time.sleep(30)

    t0 = time.monotonic()
    rows, outcome, current, how = bench_pipeline.run_forked(slow_second, 0.6 * 2, None, str(tmp_path / "a.log"))
    assert [r["budget_gib"] for r in rows] == [12.0] and outcome == "timeout" and current == 8.0
    assert how == "killed by signal 9" and time.monotonic() - t0 < 10
    # The call's deadline: "cut" (run again on --resume), the budget in progress named.
    rows, outcome, current, _ = bench_pipeline.run_forked(slow_second, 60, time.monotonic() + 1.5,
                                                          str(tmp_path / "b.log"))
    assert [r["budget_gib"] for r in rows] == [12.0] and outcome == "cut" and current == 8.0

    def fails(emit):  # type: ignore[no-untyped-def]
        emit({"_start": 6.0})
        raise RuntimeError("boom")

    rows, outcome, current, how = bench_pipeline.run_forked(fails, 60, None, str(tmp_path / "c.log"))
    assert rows == [] and outcome == "crashed" and current == 6.0 and how == "exit status 1"
    assert "boom" in (tmp_path / "c.log").read_text()


def test_bench_pipeline_rows_file_skips_half_written_and_bad_lines(tmp_path: Path) -> None:
    bench_pipeline = _benchmark_script("bench_pipeline")
    path = tmp_path / "rows"
    path.write_bytes(b'{"a": 1}\nnot json\n{"b": 2}\n{"c": ')
    rows, offset = bench_pipeline._read_rows(str(path), 0)
    assert rows == [{"a": 1}, {"b": 2}] and offset == len(b'{"a": 1}\nnot json\n{"b": 2}\n')
    with path.open("ab") as f:
        f.write(b'3}\n')
    assert bench_pipeline._read_rows(str(path), offset) == ([{"c": 3}], path.stat().st_size)


def test_bench_pipeline_sweeps_start_at_the_whole_gpu() -> None:
    bench_pipeline = _benchmark_script("bench_pipeline")
    items = bench_pipeline.plan_items(["diffusers-model-offload", "vramkit"], [8.0, 0.0, 12.0],
                                      {(12.0, "vramkit")}, reference=False)
    assert items == [("diffusers-model-offload", [0.0, 12.0, 8.0]), ("vramkit", [8.0]), ("vramkit", [0.0])]


def test_bench_pipeline_sweep_stops_where_the_allocator_kept_its_cache() -> None:
    bench_pipeline = _benchmark_script("bench_pipeline")
    gib = bench_pipeline.GIB
    bench_pipeline.sweep_check("diffusers-leaf-stream", 16.0, int(0.4 * gib), int(0.03 * gib), int(0.03 * gib))
    # mmgp's sweep on an H100: 55 GiB reserved, 0.19 GiB allocated; an error (measured again on
    # --resume), not an OOM (which would mark every smaller budget OOM too).
    with pytest.raises(RuntimeError, match=r"kept 54\.77 GiB cached.*mmgp@16 in a process of its own"):
        bench_pipeline.sweep_check("mmgp", 16.0, int(55.27 * gib), int(0.19 * gib), int(54.96 * gib))
    with pytest.raises(RuntimeError) as raised:
        bench_pipeline.sweep_check("mmgp", 16.0, int(55.27 * gib), int(0.19 * gib), int(54.96 * gib))
    assert "out of memory" not in str(raised.value).lower()  # the harness would classify it OOM
    with pytest.raises(bench_pipeline.torch.OutOfMemoryError, match="holds 9.13 GiB"):
        bench_pipeline.sweep_check("diffusers-block-stream", 8.0, int(9.13 * gib), int(9.1 * gib), int(9.1 * gib))


def test_bench_pipeline_an_option_can_carry_its_own_budgets() -> None:
    bench_pipeline = _benchmark_script("bench_pipeline")
    items = bench_pipeline.plan_items(["diffusers-sequential@4", "vramkit", "mmgp@24/4"], [8.0, 4.0],
                                      {(24.0, "mmgp")}, reference=False)
    assert items == [("diffusers-sequential", [4.0]), ("vramkit", [8.0]), ("vramkit", [4.0]), ("mmgp", [4.0])]
    # Overlapping entries (--again adds its own): each (budget, option) once, where first named.
    items = bench_pipeline.plan_items(["vramkit@8", "diffusers-model-offload", "vramkit@12/8",
                                       "diffusers-model-offload@4"], [8.0, 4.0], set(), reference=True)
    assert items == [("unoptimized", [0.0]), ("vramkit", [8.0]), ("diffusers-model-offload", [8.0, 4.0]),
                     ("vramkit", [12.0])]
    # mmgp is not swept (its allocator cache outlived the ballast): one process per budget.
    assert bench_pipeline.plan_items(["mmgp"], [8.0, 4.0], set(), reference=False) == [("mmgp", [8.0]), ("mmgp", [4.0])]
    with pytest.raises(SystemExit, match="diffusers-sequential@4/x"):
        bench_pipeline.split_config("diffusers-sequential@4/x")
    with pytest.raises(SystemExit, match="budgets after '@'"):
        bench_pipeline.split_config("diffusers-sequential@")


def test_bench_pipeline_names_an_unknown_option_before_running(tmp_path: Path) -> None:
    proc = _run(["benchmarks/bench_pipeline.py", "--tiny", "--budgets", "8", "--no-reference", "--configs",
                 "vramkit,diffusers-leaf"], tmp_path)
    assert proc.returncode != 0 and "unknown diffusers-leaf" in proc.stderr and "'suite'" in proc.stderr
    assert not (tmp_path / "pipeline_1024_tiny.json").exists()


def test_bench_pipeline_supervise_reads_what_a_killed_child_wrote_last(tmp_path: Path) -> None:
    """Rows written between the parent's last read and the kill are kept, and the budget they
    started is the one in progress; a child killed between budgets (none running over) is cut, not
    timed out, so --resume runs the rest again."""
    bench_pipeline = _benchmark_script("bench_pipeline")
    rows_path = tmp_path / "rows"
    rows_path.write_text('{"_start": 12.0}\n{"config": "x", "budget_gib": 12.0}\n')

    def kill() -> None:
        with rows_path.open("a") as f:  # the child got this far before the signal landed
            f.write('{"config": "x", "budget_gib": 12.5}\n{"_start": 8.0}\n')

    rows, outcome, current, status = bench_pipeline.supervise(lambda: None, kill, str(rows_path), -1.0, None)
    assert [r["budget_gib"] for r in rows] == [12.0, 12.5] and current == 8.0
    assert outcome == "cut" and status is None and not rows_path.exists()


def test_bench_pipeline_gpu_samples_name_the_slowdowns_seen() -> None:
    bench_pipeline = _benchmark_script("bench_pipeline")
    text = ("1980, 1980, 300.5, 45, 99, 0x0000000000000000\n"
            "1410, 1980, 700.0, 83, 100, 0x0000000000000024\n"  # power cap + software thermal slowdown
            "1755, 1980, [N/A], 60, 98, [N/A]\n"  # fields the driver could not read: the others count
            "1755, 1980\n")  # a cut line: skipped
    state = bench_pipeline.summarize_gpu_samples(text)
    assert state == {"samples": 3, "sm_clock_mhz_min": 1410.0, "sm_clock_mhz_median": 1755.0,
                     "sm_clock_mhz_max": 1980.0, "power_w_max": 700.0, "temperature_c_max": 83.0,
                     "utilization_pct_median": 99.0,
                     "slowdowns": {"power cap": 0.5, "software thermal slowdown": 0.5}}
    assert bench_pipeline.summarize_gpu_samples("") is None
    assert bench_pipeline.summarize_gpu_samples("[N/A], [N/A], [N/A], [N/A], [N/A], [N/A]") is None
    # Idle (0x1) is not a slowdown of a GPU that has work.
    assert bench_pipeline.summarize_gpu_samples("1980, 1980, 80, 30, 0, 0x1")["slowdowns"] == {}


def _fake_nvidia_smi(folder: Path, apps: str) -> None:
    """A stand-in nvidia-smi on PATH that knows only the older field name, as older drivers do, and
    answers the compute-apps query with the shell code ``apps``."""
    fake = folder / "nvidia-smi"
    fake.write_text("#!/bin/sh\n"
                    'case "$*" in\n'
                    "  *clocks_event_reasons*) exit 6;;\n"
                    f"  *compute-apps*) {apps};;\n"
                    "  *) echo '1500, 1980, 650.0, 70, 100, 0x0000000000000004';;\n"
                    "esac\n")
    fake.chmod(0o755)


def test_bench_pipeline_gpu_sampler_reads_nvidia_smi_while_a_call_runs(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    bench_pipeline = _benchmark_script("bench_pipeline")
    # Without nvidia-smi (this machine) nothing is recorded.
    monkeypatch.setenv("PATH", str(tmp_path))
    with bench_pipeline.GpuSampler() as none:
        pass
    assert none.summary is None
    monkeypatch.setenv("PATH", f"{tmp_path}:/bin:/usr/bin")
    _fake_nvidia_smi(tmp_path, "echo 101; echo 202")
    with bench_pipeline.GpuSampler(interval=0.01) as sampler:
        time.sleep(0.2)
    state = sampler.summary
    assert state is not None and state["samples"] >= 2
    assert state["sm_clock_mhz_min"] == 1500.0 and state["slowdowns"] == {"power cap": 1.0}
    assert state["gpu_processes"] == 2  # another process computed on the GPU meanwhile
    # A query that fails (NVML's error text on stdout) or hangs counts nothing and fails nothing.
    _fake_nvidia_smi(tmp_path, "echo 'Failed to initialize NVML: Unknown Error'; exit 255")
    with bench_pipeline.GpuSampler(interval=0.01) as sampler:
        time.sleep(0.05)
    assert sampler.summary is not None and "gpu_processes" not in sampler.summary
    _fake_nvidia_smi(tmp_path, "exec sleep 30")
    monkeypatch.setattr(bench_pipeline, "_SMI_TIMEOUT", 0.3)
    started = time.monotonic()
    with bench_pipeline.GpuSampler(interval=0.01) as sampler:
        pass
    assert time.monotonic() - started < 5 and "gpu_processes" not in sampler.summary


def test_tables_flag_rows_faster_than_their_floor_or_measured_on_a_slowed_gpu() -> None:
    rt = _benchmark_script("render_tables")
    ref = {"config": "unoptimized", "budget_gib": 0.0, "status": "ok", "seconds_per_step": 0.098,
           "seconds_per_image_28": 2.8, "pinned_bandwidth": 55e9, "peak_vram_gib": 32.0, "peak_host_rss_gib": 32.0}
    plan = {"steps": [{"strategy": "BlockStreaming", "component": "transformer", "config": {"storage": None}}]}
    fast = {"config": "vramkit", "budget_gib": 24.0, "status": "ok", "seconds_per_step": 0.071,
            "seconds_per_image_28": 2.2, "transformer_streamed_bytes": 2_450_000_000, "plan": plan,
            "peak_vram_gib": 21.8, "peak_host_rss_gib": 32.1}
    assert rt.below_floor(fast, rt.floor_seconds([ref, fast], fast))  # 0.071 s against a 0.098 s floor
    assert not rt.below_floor(dict(fast, seconds_per_step=0.095), 0.098)  # within 5%: noise, not flagged

    def state(slowdowns: dict, median: float = 1980.0, processes: int = 1) -> dict:
        return {"slowdowns": slowdowns, "sm_clock_mhz_median": median, "sm_clock_mhz_max": 1980.0,
                "gpu_processes": processes}

    assert not rt.slowed(fast) and not rt.slowed(dict(fast, gpu_state=state({})))
    # The power cap at full clock is a GPU at work; with the clock down it is a slowed one.
    assert not rt.slowed(dict(fast, gpu_state=state({"power cap": 1.0}, median=1900.0)))
    assert rt.slowed(dict(fast, gpu_state=state({"power cap": 1.0}, median=1400.0)))
    assert rt.slowed(dict(fast, gpu_state=state({"hardware slowdown": 0.1})))
    assert rt.slowed(dict(fast, gpu_state=state({}, processes=2)))
    env = {"device": "GPU", "torch": "t", "diffusers": "d", "command": "c"}
    table = "\n".join(rt.pipeline({"environment": env, "size": 512, "results": [ref, fast]}))
    assert "| 0.72 ‡ |" in table and "ratios marked ‡ are below 0.95" in table
    slowed_ref = dict(ref, gpu_state=state({"software thermal slowdown": 0.5}))
    table = "\n".join(rt.pipeline({"environment": env, "size": 512,
                                   "results": [slowed_ref, dict(fast, seconds_per_step=0.1)]}))
    assert "| 0 | unoptimized § |" in table and "Rows marked §" in table
    assert table.splitlines()[-1].endswith("| 0.098 | 1.02 |  |  |")  # no longer below its floor: no ‡


def test_bench_pipeline_measures_rows_again_and_keeps_the_rows_they_replace(tmp_path: Path) -> None:
    base = ["benchmarks/bench_pipeline.py", "--tiny", "--steps", "3", "--no-reference"]
    proc = _run([*base, "--budgets", "8,4", "--configs", "vramkit,diffusers-leaf-stream"], tmp_path / "first")
    assert proc.returncode == 0, proc.stderr[-2000:]
    earlier = tmp_path / "first" / "pipeline_1024_tiny.json"
    first = json.loads(earlier.read_text())["results"]
    assert [(r["config"], r["budget_gib"], r["measured_by_command"]) for r in first] == [
        ("vramkit", 8, 1), ("vramkit", 4, 1), ("diffusers-leaf-stream", 8, 1), ("diffusers-leaf-stream", 4, 1)]
    # A deadline before anything starts: the rows named stay as they were, nothing is superseded.
    proc = _run([*base, "--budgets", "8", "--configs", "diffusers-leaf-stream", "--resume", str(earlier),
                 "--again", "vramkit", "--deadline", "1"], tmp_path / "cut")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "cut" / "pipeline_1024_tiny.json").read_text())
    assert data["results"] == first and "superseded" not in data
    # vramkit again, without budgets: both of its rows (not only this call's --budgets), measured
    # by call 2; the rows they replace are kept, marked with that call.
    proc = _run([*base, "--budgets", "8", "--configs", "diffusers-leaf-stream", "--resume", str(earlier),
                 "--again", "vramkit"], tmp_path / "second")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "second" / "pipeline_1024_tiny.json").read_text())
    assert [(r["config"], r["budget_gib"], r["measured_by_command"]) for r in data["results"]] == [
        ("diffusers-leaf-stream", 8, 1), ("diffusers-leaf-stream", 4, 1), ("vramkit", 8, 2), ("vramkit", 4, 2)]
    assert all(r["status"] == "ok" for r in data["results"])
    assert [(r["budget_gib"], r["superseded_by_command"], r["seconds_per_step"]) for r in data["superseded"]] == [
        (8, 2, first[0]["seconds_per_step"]), (4, 2, first[1]["seconds_per_step"])]
    # A row the file does not hold, an unknown option, or --again without --resume: clear errors.
    for args, message in ((["--resume", str(earlier), "--again", "vramkit@8/12"], "no such row to measure again at 12"),
                          (["--resume", str(earlier), "--again", "vramkit-xl"], "unknown option"),
                          (["--again", "vramkit"], "give the file with --resume")):
        proc = _run([*base, "--budgets", "8", "--configs", "vramkit", *args], tmp_path / "bad")
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-500:]
